"""VQGAN encode / decode throughput (images/s) with random weights, and the decode's pixel difference to fp32.

    OMP_NUM_THREADS=2 python bench/bench_vqgan.py                             # f16_16384, batch 1, 256 px
    OMP_NUM_THREADS=2 python bench/bench_vqgan.py --preset tiny --batch 8     # the demo's layout, 64 px
    OMP_NUM_THREADS=2 python bench/bench_vqgan.py --demo --batch 8            # the demo's trained VQGAN, real codes
    python bench/bench_vqgan.py --batch 64 --iters 10                         # on a GPU: fp32 and bf16

Decode rows: ``nchw fp32`` is the decoder on NCHW latents (the path before channels-last), ``fp32`` and ``bf16``
are ``VQGAN.decode`` as shipped (channels-last on CPU) with ``dtype=None`` / ``torch.bfloat16``; ``pixel diff`` is
max / mean |Δ| against ``nchw fp32`` in 0–255 levels after rounding to uint8, as a PNG would store it. On CUDA both
fp32 (TF32 convs as PyTorch allows by default) and bf16 autocast are measured. Encode includes the nearest-code
search; decode includes the codebook lookup and clamping. Inputs are already on the device. Times are the median
of ``--iters`` calls; on CPU the process-CPU time per call is printed too (the wall time is unreliable on a shared
machine; CPU time / threads ≈ the wall time of a quiet one).
"""
from __future__ import annotations

import argparse
import time

import torch

from tuwen.models.vqgan import VQGAN, VQGANConfig


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev: torch.device, warmup: int, iters: int) -> tuple[float, float, object]:
    """(median wall seconds, median process-CPU seconds, last result) of ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    walls, cpus = [], []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        _sync(dev)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    walls.sort(), cpus.sort()
    return walls[len(walls) // 2], cpus[len(cpus) // 2], out


def to_u8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


@torch.inference_mode()
def decode_nchw(vq: VQGAN, codes: torch.Tensor) -> torch.Tensor:
    """The decode path before channels-last: NCHW latents, fp32."""
    with torch.autocast(codes.device.type, enabled=False):
        return vq.decode_latent(vq.quantize.embed(codes)).clamp_(-1.0, 1.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="f16_16384")
    p.add_argument("--demo", action="store_true", help="the shipped demo's trained VQGAN and codes of its prompts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, help="image size (default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    p.add_argument("--no-encode", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    a = p.parse_args(argv)

    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.demo:
        from tuwen.models.text2image import TextToImage
        from tuwen.pipelines import demo_model_path

        t2i = TextToImage.from_pretrained(demo_model_path()).to(dev)
        vq, name = t2i.vqgan.eval(), "demo (trained)"
        prompts = ["左上角有一个红色的圆形", "右下角有一个蓝色的正方形", "左下角有一个绿色的三角形", "右上角有一个紫色的长方形"]
        h, w = t2i.grid
        codes = t2i.generate((prompts * a.batch)[:a.batch], seed=0, return_codes=True).reshape(a.batch, h, w)
        res = h * vq.downsample_factor
    else:
        cfg = VQGANConfig.preset(a.preset)
        vq, name = VQGAN(cfg).to(dev).eval(), a.preset
        res = a.resolution or cfg.resolution
        h, w = vq.grid_size(res)
        codes = torch.randint(0, cfg.n_embed, (a.batch, h, w), device=dev)
    name_dev = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"VQGAN {name}: {vq.num_params() / 1e6:.2f} M params, {res}px → {h}×{w} codes, batch {a.batch}, "
          f"{name_dev}, torch {torch.__version__}")
    x = torch.rand(a.batch, 3, res, res, device=dev) * 2 - 1

    def line(what, t_wall, t_cpu, extra=""):
        cpu = f" cpu {t_cpu * 1e3:8.1f} ms/batch" if dev.type == "cpu" else ""
        print(f"  {what:<16} {a.batch / t_wall:8.2f} img/s ({t_wall * 1e3:8.1f} ms/batch){cpu}{extra}", flush=True)

    t_wall, t_cpu, ref = bench(lambda: decode_nchw(vq, codes), dev, a.warmup, a.iters)
    ref = to_u8(ref)
    line("decode nchw fp32", t_wall, t_cpu)
    for dt_name in a.dtypes.split(","):
        dt = {"fp32": None, "bf16": torch.bfloat16}[dt_name.strip()]
        t_wall, t_cpu, out = bench(lambda: vq.decode(codes, dtype=dt), dev, a.warmup, a.iters)
        d = (to_u8(out) - ref).abs()
        line(f"decode {dt_name}", t_wall, t_cpu, f"   pixel diff max {float(d.max()):.0f} mean {float(d.mean()):.3f}")
    if not a.no_encode:
        for dt_name in a.dtypes.split(","):
            dt = {"fp32": None, "bf16": torch.bfloat16}[dt_name.strip()]
            t_wall, t_cpu, _ = bench(lambda: vq.encode(x, dtype=dt), dev, a.warmup, a.iters)
            line(f"encode {dt_name}", t_wall, t_cpu)


if __name__ == "__main__":
    main()
