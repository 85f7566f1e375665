"""Time FD/KID: feature extraction for N images and the statistics themselves (prints figures; not a test).

    python bench/bench_metrics.py --n 1000                       # random tiny CLIP (+ tiny VQGAN) feature nets
    python bench/bench_metrics.py --n 2000 --features clip:runs/clip --features inception:pt_inception.pth
    python bench/bench_metrics.py --n 1000 --dims 64,512,2048 --kid_subsets 100 --kid_subset_size 1000

Images are synthetic (coloured shapes drawn with Pillow, 64 px by default), so nothing is read from disk except the
networks. Extraction is timed end to end from PIL images (resize + normalise + forward), like
``tuwen evaluate-images`` does. Set OMP_NUM_THREADS on a shared machine: thread contention dominates small nets.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tuwen.metrics.image import fd_from_features, kid, load_feature_extractor  # noqa: E402


def make_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.randint(200, 255, 3)))
        d = ImageDraw.Draw(img)
        x, y = rng.randint(0, size // 2, 2)
        s = rng.randint(size // 6, size // 2)
        color = tuple(int(v) for v in rng.randint(0, 255, 3))
        (d.ellipse if rng.rand() < 0.5 else d.rectangle)((x, y, x + s, y + s), fill=color)
        out.append(img)
    return out


def default_specs(tmp: Path, size: int) -> list[str]:
    from tuwen.models.clip import CLIP
    from tuwen.text.tokenizer import TextTokenizer

    specs = []
    tok = TextTokenizer.train(["红色的圆形", "蓝色的正方形"], vocab_size=100)
    torch.manual_seed(0)
    CLIP.build(tok, vision="small", text="tiny", image_size=size).save_pretrained(tmp / "clip")
    specs.append(f"clip:{tmp / 'clip'}")
    try:
        from tuwen.models.vqgan import VQGAN, VQGANConfig
        VQGAN(VQGANConfig.preset("tiny", resolution=size)).save_pretrained(tmp / "vq")
        specs.append(f"vqgan:{tmp / 'vq'}")
    except Exception as e:  # the VQGAN is another module; the bench still runs without it
        print(f"(no vqgan feature net: {e})")
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="images per set")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--features", action="append", default=None, help="clip:DIR | vqgan:DIR | inception:FILE")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dims", default="64,256,512,2048", help="feature dims for the FD/KID timing")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    a = p.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, cuda {torch.cuda.is_available()}")
    t = time.perf_counter()
    imgs = make_images(a.n, a.size)
    print(f"drew {a.n} images of {a.size} px in {time.perf_counter() - t:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        specs = a.features or default_specs(Path(tmp), a.size)
        print("\n== feature extraction (PIL → features), one set of N images")
        for spec in specs:
            ext = load_feature_extractor(spec, a.device, a.batch_size)
            ext.extract(imgs[: min(len(imgs), a.batch_size)])              # warm-up
            t = time.perf_counter()
            f = ext.extract(imgs)
            dt = time.perf_counter() - t
            t = time.perf_counter()
            fd = fd_from_features(f, f[::-1] + 0.01)
            dt_fd = time.perf_counter() - t
            print(f"{spec.split(':')[0]:10s} {ext.dim:5d}-d  {a.n / dt:9.1f} img/s  ({dt:.2f} s)   "
                  f"FD on these features {dt_fd * 1e3:.1f} ms (value {fd:.4g})")

    print(f"\n== statistics only (float64), N = {a.n} per set")
    print(f"{'dim':>6s} {'FD ms':>10s} {'KID ms':>10s}   (KID: {a.kid_subsets} subsets of "
          f"{min(a.kid_subset_size, a.n)})")
    rng = np.random.RandomState(0)
    for d in [int(x) for x in a.dims.split(",") if x.strip()]:
        x, y = rng.randn(a.n, d), rng.randn(a.n, d) + 0.1
        t = time.perf_counter()
        fd_from_features(x, y)
        t_fd = time.perf_counter() - t
        t = time.perf_counter()
        kid(x, y, a.kid_subset_size, a.kid_subsets)
        t_kid = time.perf_counter() - t
        print(f"{d:6d} {t_fd * 1e3:10.1f} {t_kid * 1e3:10.1f}")


if __name__ == "__main__":
    main()
