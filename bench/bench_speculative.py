"""Speculative Jacobi decoding (``generate(..., speculative=K)``) against one-by-one decoding: accepted codes per
forward and time per image, on the shipped demo model (its prompts and sampling defaults: top_k 16, CFG 2.0) and
on a random-weight base-size GPT (12×768, pai-painter shape: 32 text + 256 codes, top_k 100). Process-CPU time
is printed next to wall time because the machine may be shared; the best of ``--repeats`` runs counts.

    OMP_NUM_THREADS=1 python bench/bench_speculative.py                       # demo and base, K = 2, 4, 8
    OMP_NUM_THREADS=2 python bench/bench_speculative.py --models base --ks 4 --weights fp32
"""
from __future__ import annotations

import argparse
import time

import torch

from tuwen.models.gpt import GPT, GPTConfig
from tuwen.models.quant import quantize_weights, resolve_weights_dtype
from tuwen.sampling import generate


def timed(fn, repeats):
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return best_wall, best_cpu


def demo_setup(weights, batch):
    from tuwen.models.text2image import TextToImage
    from tuwen.pipelines import demo_model_path

    m = TextToImage.from_pretrained(demo_model_path(), weights_dtype=weights)
    prompts = ["左上角有一个红色的圆形", "右下角有一个蓝色的正方形", "左下角有一个绿色的三角形", "右上角有一个紫色的长方形"]
    text = m.tokenize((prompts * batch)[:batch])
    sp = m.config.sampling

    def run(k, st):
        return generate(m.gpt, prefix_ids=text, num_tokens=m.config.img_len, seeds=torch.arange(batch),
                        top_k=sp.top_k, top_p=sp.top_p, temperature=sp.temperature,
                        guidance_scale=sp.guidance_scale,
                        uncond_prefix_ids=m.uncond_ids(1) if sp.guidance_scale is not None else None,
                        use_cuda_graph=False, speculative=k, stats=st)
    return run, f"demo (4×256, {m.config.img_len} codes, top_k {sp.top_k}, cfg {sp.guidance_scale})"


def base_setup(weights, batch, top_k):
    torch.manual_seed(0)
    gpt = quantize_weights(GPT(GPTConfig.preset("base", vocab_size=37512, block_size=288, n_out=16384)).eval(),
                           weights)
    prefix = torch.randint(16384, 37512, (batch, 32))

    def run(k, st):
        return generate(gpt, prefix_ids=prefix, num_tokens=256, seeds=torch.arange(batch), top_k=top_k,
                        use_cuda_graph=False, speculative=k, stats=st)
    return run, f"base random (12×768, 256 codes, top_k {top_k})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,base")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--weights", default="auto", help="fp32|bf16|int8|w8a8|auto (auto: the CPU default)")
    ap.add_argument("--top-k", type=int, default=100, help="base model's top_k")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    wd = resolve_weights_dtype(a.weights, "cpu") or "fp32"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {wd}, batch {a.batch}")
    for name in a.models.split(","):
        run, desc = demo_setup(wd, a.batch) if name == "demo" else base_setup(wd, a.batch, a.top_k)
        print(desc)
        run(None, {})  # warm-up
        ref_wall, ref_cpu = timed(lambda: run(None, {}), a.repeats)
        print(f"  one-by-one      {ref_wall / a.batch * 1e3:8.1f} ms/image wall {ref_cpu / a.batch * 1e3:8.1f} "
              f"ms/image cpu   1.00 codes/forward", flush=True)
        for k in [int(x) for x in a.ks.split(",")]:
            st: dict = {}
            run(k, st)
            wall, cpu = timed(lambda: run(k, {}), a.repeats)
            print(f"  speculative K={k:<2} {wall / a.batch * 1e3:8.1f} ms/image wall {cpu / a.batch * 1e3:8.1f} "
                  f"ms/image cpu {st['tokens_per_step']:6.2f} codes/forward  speed-up {ref_cpu / cpu:.2f}× cpu "
                  f"({ref_wall / wall:.2f}× wall)", flush=True)


if __name__ == "__main__":
    main()
