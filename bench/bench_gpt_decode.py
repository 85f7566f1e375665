"""Scratch bench of the raw GPT decode loop (random weights): naive (EasyNLP) vs KV-cached generation.

Text→image shape: a 32-token text prefix, 256 sampled image codes, vocab 37512, block 288, head 16384.

    python bench/bench_gpt_decode.py                       # tiny B=1, tiny B=64, base B=1 on CPU
    python bench/bench_gpt_decode.py --configs base --naive full   # also run EasyNLP's loop in full (~80 s)
    python bench/bench_gpt_decode.py --device cuda --dtype bf16 --batches 1,64

Prints ms/step (decode steps after the prefill) and s/image (one image = 256 codes; batch time / B).
The naive base loop at B=1 is estimated from forwards timed at a few lengths (``--naive estimate``, the
default for base on CPU) because running it takes over a minute; ``--naive full`` runs it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tuwen.models.gpt import GPT, GPTConfig
from tuwen.sampling import generate, generate_naive


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def naive_estimate(model, prefix, n_tok, device, repeats):
    """Seconds of the naive loop: one full forward (head on every position) per length, interpolated."""
    P = prefix.shape[1]
    lengths = sorted({P, P + n_tok // 4, P + n_tok // 2, P + 3 * n_tok // 4, P + n_tok - 1})
    times = {}
    with torch.inference_mode():
        for L in lengths:
            x = torch.randint(0, model.config.n_out, (prefix.shape[0], L), device=device)
            model(x)  # warm-up
            times[L] = timed(lambda: model(x), device, repeats)
    total = 0.0
    for L in range(P, P + n_tok):
        lo = max(k for k in lengths if k <= L)
        hi = min(k for k in lengths if k >= L)
        w = 0.0 if hi == lo else (L - lo) / (hi - lo)
        total += times[lo] * (1 - w) + times[hi] * w
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--batches", default=None, help="comma list; default 1,64 for tiny and 1 for larger")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--num-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--naive", default="auto", choices=["auto", "full", "estimate", "off"],
                    help="auto: full for tiny, estimate for the rest on CPU, full on CUDA")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-graph", action="store_true", help="CUDA: eager static-cache decode instead of a graph")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f", {args.dtype}, prefix {args.text_len} + {args.num_tokens} tokens, top_k {args.top_k}")
    print(f"{'config':<6} {'B':>3} {'params':>8} {'mode':<14} {'prefill ms':>10} {'ms/step':>8} {'s/batch':>8} {'s/image':>8}")

    for name in args.configs.split(","):
        torch.manual_seed(0)
        cfg = GPTConfig.preset(name, vocab_size=37512, block_size=args.text_len + args.num_tokens,
                               n_out=16384)
        model = GPT(cfg).to(device=device, dtype=dtype).eval()
        batches = ([int(b) for b in args.batches.split(",")] if args.batches
                   else ([1, 64] if name in ("tiny", "small") else [1]))
        for B in batches:
            prefix = torch.randint(16384, 37512, (B, args.text_len), device=device)
            kw = dict(prefix_ids=prefix, seeds=torch.arange(B), top_k=args.top_k)
            graph = "auto" if not args.no_graph else False
            static = None if not args.no_graph else (device.type == "cuda")
            row = f"{name:<6} {B:>3} {model.num_params() / 1e6:>7.1f}M"

            def cached(n):
                return lambda: generate(model, num_tokens=n, use_cuda_graph=graph, static_cache=static, **kw)

            cached(4)()  # warm-up
            t_pre = timed(cached(1), device, args.repeats)
            t_all = timed(cached(args.num_tokens), device, args.repeats)
            step = (t_all - t_pre) / (args.num_tokens - 1)
            mode = "kv-cache" + ("+graph" if device.type == "cuda" and not args.no_graph else "")
            print(f"{row} {mode:<14} {t_pre * 1e3:>10.1f} {step * 1e3:>8.2f} {t_all:>8.2f} {t_all / B:>8.3f}")

            naive = args.naive
            if naive == "auto":
                naive = "full" if (name in ("tiny", "small") or device.type == "cuda") else "estimate"
            if naive == "full":
                t = timed(lambda: generate_naive(model, num_tokens=args.num_tokens, **kw), device, 1)
                print(f"{row} {'naive':<14} {'':>10} {t / args.num_tokens * 1e3:>8.2f} {t:>8.2f} {t / B:>8.3f}")
            elif naive == "estimate":
                t = naive_estimate(model, prefix, args.num_tokens, device, args.repeats)
                print(f"{row} {'naive (est.)':<14} {'':>10} {t / args.num_tokens * 1e3:>8.2f} {t:>8.2f} "
                      f"{t / B:>8.3f}")


if __name__ == "__main__":
    main()
