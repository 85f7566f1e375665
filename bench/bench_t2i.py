"""Text→image sampling speed: tuwen's ``generate`` (KV cache; on CUDA a static cache + CUDA-graph step) against
the naive loop EasyNLP uses (the full forward re-run over the whole sequence at every step), same weights, same
run; then codes + the VQGAN decode at 256 px (f16_16384 layout, random weights; ``--decode fp32,bf16``), the
time a user waits per image. Each time is the best of ``--repeats`` rounds (the decode: at least 5), the
settings of a config and batch interleaved within each round; wall and process-CPU time are both
printed (on a shared machine the wall time is inflated by other jobs; with ``OMP_NUM_THREADS=1`` the CPU time is
the wall time of a quiet core).

Text→image shape of pai-painter: a 32-token text prefix, 256 sampled image codes, vocab 37512 (21128 text + 16384
image), block 288, head over the 16384 image codes; random weights (speed does not depend on them).

    OMP_NUM_THREADS=2 python bench/bench_t2i.py                       # CPU: tiny and base at batch 1 and 8
    OMP_NUM_THREADS=2 python bench/bench_t2i.py --configs base --weights fp32,int8 --decode fp32,bf16
    python bench/bench_t2i.py --device cuda --dtype bf16              # GPU: adds graph on/off rows for each config
    python bench/bench_t2i.py --configs base --batches 1 --naive full # run EasyNLP's loop in full (~80 s on CPU)

Columns: ms/image and images/s (batch time / B), and the speed-up over the naive loop at the same config and batch.
On CPU the naive loop for ``base`` is *estimated* (``--naive auto``) from full forwards timed at 5 lengths and
interpolated over the 256 steps, because running it takes minutes; ``--naive full`` times it for real.
Targets (issue 16): CPU 2 cores, base, B=1, codes + decode at 256 px ≤ 2.5 s per image (≥ 30× the naive loop);
B=8 ≥ 3× the images/s of B=1. GPU: B=1 ≤ 75 ms per image's codes, ≥ 500 images/s at B=64 (codes only).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch

from tuwen.models.gpt import GPT, GPTConfig
from tuwen.models.quant import quantize_weights
from naive import generate_naive  # bench/naive.py (this script's folder is on sys.path)
from tuwen.sampling import generate


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """(best wall seconds, best process-CPU seconds) of ``repeats`` calls."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return best, best_cpu


def naive_estimate(model, B, P, n_tok, device, repeats):
    """Seconds of the naive loop (one full forward per step), from forwards timed at a few lengths."""
    lengths = sorted({P, P + n_tok // 4, P + n_tok // 2, P + 3 * n_tok // 4, P + n_tok - 1})
    times = {}
    with torch.inference_mode():
        for L in lengths:
            x = torch.randint(0, model.config.n_out, (B, L), device=device)
            model(x)  # warm-up
            times[L] = timed(lambda: model(x), device, repeats)
    total = [0.0, 0.0]
    for L in range(P, P + n_tok):
        lo = max(k for k in lengths if k <= L)
        hi = min(k for k in lengths if k >= L)
        w = 0.0 if hi == lo else (L - lo) / (hi - lo)
        for i in range(2):
            total[i] += times[lo][i] * (1 - w) + times[hi][i] * w
    return tuple(total)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--num-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--naive", default="auto", choices=["auto", "full", "estimate", "off"],
                    help="auto: full on CUDA and for tiny on CPU, estimated for larger configs on CPU")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", default=None, help="comma list of GPT weights dtypes to time: fp32,bf16,int8,w8a8 "
                    "(tuwen.models.quant; the naive loop always runs the fp32 model). Default: fp32,int8,w8a8 on CPU "
                    "(the CPU default is w8a8 where fbgemm runs, else int8), fp32 on CUDA")
    ap.add_argument("--decode", default="fp32,bf16", help="comma list of VQGAN decode dtypes (f16_16384 layout at "
                    "256 px, random weights) to add to the codes' time, or 'off'")
    ap.add_argument("--speculative", type=int, default=0,
                    help="also time speculative Jacobi decoding with this many guessed codes per step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.weights = args.weights or ("fp32" if device.type == "cuda" else "fp32,int8,w8a8")
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") else torch.float32
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f", {torch.get_num_threads()} threads")
          + f", {str(dtype).replace('torch.', '')}, prefix {args.text_len} + {args.num_tokens} codes, "
            f"top_k {args.top_k}")
    decodes = [] if args.decode == "off" else args.decode.split(",")
    vq = None
    if decodes:
        from tuwen.models.vqgan import VQGAN, VQGANConfig
        torch.manual_seed(0)
        vq = VQGAN(VQGANConfig.preset("f16_16384")).to(device).eval()
    if device.type == "cpu":
        import os
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    head = (f"{'config':<6} {'B':>3} {'params':>7} {'mode':<24} {'ms/image':>10} {'cpu ms/im':>10} {'images/s':>9} "
            f"{'vs naive':>9}" + "".join(f" {'+dec ' + d + ' s/im':>17}" for d in decodes))
    print(head)
    print("-" * len(head))
    for name in args.configs.split(","):
        torch.manual_seed(0)
        cfg = GPTConfig.preset(name, vocab_size=37512, block_size=args.text_len + args.num_tokens, n_out=16384)
        model = GPT(cfg).to(device=device, dtype=dtype).eval()
        for B in [int(b) for b in args.batches.split(",")]:
            prefix = torch.randint(16384, 37512, (B, args.text_len), device=device)
            kw = dict(prefix_ids=prefix, seeds=torch.arange(B), top_k=args.top_k, num_tokens=args.num_tokens)
            modes = [("kv-cache+graph", dict(use_cuda_graph="auto")),
                     ("kv-cache (eager)", dict(use_cuda_graph=False, static_cache=True))] \
                if device.type == "cuda" else [("kv-cache", dict(use_cuda_graph=False))]
            # every setting is timed once per round, the rounds interleaved, each setting's best kept: a slow spell
            # of a shared machine then hits all settings alike instead of the one that happened to run in it
            jobs = []  # (row label or ("decode", dtype), function, stats dict, how many rounds)
            for wd in args.weights.split(","):
                m = model if wd == "fp32" else quantize_weights(copy.deepcopy(model), wd)
                spec = [("", {})] + ([(f"+sjd{args.speculative}", {"speculative": args.speculative})]
                                     if args.speculative else [])
                for (mode, extra), (sname, sx) in itertools.product(modes, spec):
                    generate(m, **{**kw, "num_tokens": 4}, **extra, **sx)  # warm-up (and graph capture)
                    st: dict = {}
                    fn = (lambda m=m, extra=extra, sx=sx, st=st: generate(m, **kw, **extra, **sx, stats=st))
                    jobs.append((mode + ("" if wd == "fp32" else f" {wd}") + sname, fn, st, args.repeats))
            for d in decodes:  # VQGAN decode of B images at 256 px (16×16 codes)
                codes = torch.randint(0, 16384, (B, 16, 16), device=device)
                ddt = {"fp32": None, "bf16": torch.bfloat16}[d]
                vq.decode(codes[:1], dtype=ddt)  # warm-up
                # at least 5 rounds: the decode is short (at 256 px on CPU batch 8 is 8 decodes of one image)
                jobs.append((("decode", d), (lambda codes=codes, ddt=ddt: vq.decode(codes, dtype=ddt)), None,
                             max(args.repeats, 5)))
            best = {label: (float("inf"), float("inf")) for label, *_ in jobs}
            for r in range(max(n for *_, n in jobs)):
                for label, fn, _, n in jobs:
                    if r < n:
                        t = timed(fn, device, 1)
                        best[label] = (min(best[label][0], t[0]), min(best[label][1], t[1]))
            rows = [(label, best[label]) for label, *_ in jobs if isinstance(label, str)]
            dec_t = {d: best[("decode", d)] for d in decodes}
            for label, _, st, _ in jobs:
                if st:
                    print(f"  {label}: {st['tokens_per_step']:.2f} codes per step", flush=True)
            naive = args.naive
            if naive == "auto":
                naive = "full" if (device.type == "cuda" or name in ("tiny", "small")) else "estimate"
            t_naive = None
            if naive == "full":
                generate_naive(model, **{**kw, "num_tokens": 4})
                t_naive = timed(lambda: generate_naive(model, **kw), device, 1)
                rows.append(("naive (EasyNLP)", t_naive))
            elif naive == "estimate":
                t_naive = naive_estimate(model, B, args.text_len, args.num_tokens, device, args.repeats)
                rows.append(("naive (estimated)", t_naive))
            for mode, (t, tc) in rows:
                ratio = f"{t_naive[0] / t:>8.1f}x" if t_naive else f"{'-':>9}"
                dec = "".join(f" {(t + dec_t[d][0]) / B:>8.2f} ({(tc + dec_t[d][1]) / B:>5.2f} cpu)"
                              for d in decodes) if not mode.startswith("naive") else ""
                print(f"{name:<6} {B:>3} {model.num_params() / 1e6:>6.1f}M {mode:<24} {t / B * 1e3:>10.1f} "
                      f"{tc / B * 1e3:>10.1f} {B / t:>9.2f} {ratio}{dec}", flush=True)
            for d in decodes:
                print(f"{'':<6} {B:>3} {'':>7} {'(VQGAN decode ' + d + ')':<24} {dec_t[d][0] / B * 1e3:>10.1f} "
                      f"{dec_t[d][1] / B * 1e3:>10.1f} {B / dec_t[d][0]:>9.2f}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
