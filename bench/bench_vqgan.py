"""VQGAN encode / decode throughput (images/s) with random weights.

    python bench/bench_vqgan.py                               # f16_16384, batch 4, 256 px, auto device
    python bench/bench_vqgan.py --batch 64 --iters 10         # on a GPU: fp32 and bf16
    python bench/bench_vqgan.py --preset tiny --resolution 64

On CUDA both fp32 (TF32 convs as PyTorch allows by default) and bf16 autocast are measured; on CPU fp32 only
(pass --dtypes fp32,bf16 to try CPU bf16). Encode includes the nearest-code search; decode includes the codebook
lookup and clamping. Inputs are already on the device (no image decoding / host transfer).
"""
from __future__ import annotations

import argparse
import time

import torch

from tuwen.models.vqgan import VQGAN, VQGANConfig


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call (median of ``iters`` timed calls after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="f16_16384")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, help="image size (default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", help="comma-separated: fp32,bf16 (default: fp32,bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    a = p.parse_args(argv)

    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = VQGANConfig.preset(a.preset)
    vq = VQGAN(cfg).to(dev).eval()
    res = a.resolution or cfg.resolution
    h, w = vq.grid_size(res)
    dtypes = (a.dtypes or ("fp32,bf16" if dev.type == "cuda" else "fp32")).split(",")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"VQGAN {a.preset}: {vq.num_params() / 1e6:.2f} M params, {res}px → {h}×{w} codes, batch {a.batch}, "
          f"{name}, torch {torch.__version__}")
    x = torch.rand(a.batch, 3, res, res, device=dev) * 2 - 1
    codes = torch.randint(0, cfg.n_embed, (a.batch, h, w), device=dev)
    for dt_name in dtypes:
        dt = {"fp32": None, "bf16": torch.bfloat16}[dt_name.strip()]
        t_enc = bench(lambda: vq.encode(x, dtype=dt), dev, a.warmup, a.iters)
        t_dec = bench(lambda: vq.decode(codes, dtype=dt), dev, a.warmup, a.iters)
        print(f"  {dt_name:>4}: encode {a.batch / t_enc:8.1f} img/s ({t_enc * 1e3:7.1f} ms/batch)   "
              f"decode {a.batch / t_dec:8.1f} img/s ({t_dec * 1e3:7.1f} ms/batch)")


if __name__ == "__main__":
    main()
