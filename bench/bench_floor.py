"""The memory-traffic floor of text→image decoding on this machine, and what it allows for batch 8 against batch 1.

    OMP_NUM_THREADS=2 python bench/bench_floor.py                    # base, the CPU default weights
    OMP_NUM_THREADS=2 python bench/bench_floor.py --weights int8

On CPU a decode step of the base model (12×768, pai-painter shape: 32 text tokens + 256 codes) is bound by the
bytes it reads, not by arithmetic: every step reads all the weights once (for every row of the batch together)
and each row's whole KV cache. At batch 1 the weights dominate; at batch 8 the fp32 KV cache, averaged over the
256 steps, is about as large as the int8 weights. This script counts those bytes, measures the streaming read
bandwidth torch reaches here (``torch.sum`` over a 512 MB buffer), and prints:

* the floor per image's codes at batch 1 and 8 (bytes per step / bandwidth × steps / batch), beside the measured
  time of ``generate`` (same model, same shape);
* the end-to-end ratio batch 8 / batch 1 (codes + the VQGAN f16_16384 decode at 256 px in bf16, measured here),
  as measured, and the best it could be with batch 8 at its floor — with the fp32 KV cache, and with a KV cache
  half as large (bf16), which torch's CPU attention kernels do not read faster today (see README "Speed").

Issue 16's target is that ratio ≥ 3; this shows how far the hardware lets it go.
"""
from __future__ import annotations

import argparse

import torch

from tuwen.models.gpt import GPT, GPTConfig
from tuwen.models.quant import quantize_weights, resolve_weights_dtype
from tuwen.models.vqgan import VQGAN, VQGANConfig
from tuwen.sampling import generate
from bench_t2i import timed  # bench/bench_t2i.py (this script's folder is on sys.path)


def best_time(fn, repeats: int) -> float:
    """Best wall seconds of ``repeats`` calls (bench_t2i's timer)."""
    return timed(fn, torch.device("cpu"), repeats)[0]


def weight_bytes(model: GPT) -> int:
    """Bytes a decode step reads of the model's state: everything but the embedding tables (one row each)."""
    total = 0
    for name, t in model.state_dict().items():
        total += (t.shape[-1] if name in ("tok_emb.weight", "pos_emb") else t.numel()) * t.element_size()
    return total


def kv_bytes(cfg: GPTConfig, batch: int, prefix: int, n_tok: int, elem: int) -> float:
    """Bytes of keys and values a decode step reads, averaged over the ``n_tok`` steps."""
    mean_len = prefix + (n_tok - 1) / 2
    return 2 * cfg.n_layer * batch * cfg.n_embd * mean_len * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="auto",
                    help="GPT weights dtype: auto (the CPU default), fp32, bf16, int8, w8a8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--num-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    P, N, B = a.text_len, a.num_tokens, a.batch
    torch.manual_seed(0)
    cfg = GPTConfig.preset("base", vocab_size=37512, block_size=P + N, n_out=16384)
    a.weights = resolve_weights_dtype(a.weights, "cpu", "--weights")
    model = quantize_weights(GPT(cfg).eval(), a.weights)
    vq = VQGAN(VQGANConfig.preset("f16_16384")).eval()

    buf = torch.ones(128 * 2**20)  # 512 MB fp32
    buf.sum()
    bw = buf.numel() * 4 / best_time(lambda: buf.sum(), 5)
    del buf

    w = weight_bytes(model)
    kv = {b: kv_bytes(cfg, b, P, N, 4) for b in (1, B)}
    floor = {b: (w + kv[b]) / bw * N / b for b in (1, B)}
    floor_bf16kv = (w + kv[B] / 2) / bw * N / B

    with torch.inference_mode():
        codes_t = {}
        for b in (1, B):
            kw = dict(prefix_ids=torch.randint(16384, 37512, (b, P)), seeds=torch.arange(b), top_k=100)
            generate(model, **kw, num_tokens=4)
            codes_t[b] = best_time(lambda: generate(model, **kw, num_tokens=N), a.repeats) / b
        z = torch.randint(0, 16384, (1, 16, 16))
        vq.decode(z, dtype=torch.bfloat16)
        d = best_time(lambda: vq.decode(z, dtype=torch.bfloat16), a.repeats)

    mb = 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, base {a.weights} weights, "
          f"prefix {P} + {N} codes")
    print(f"streaming read bandwidth (torch.sum, 512 MB fp32): {bw / 1e9:.1f} GB/s")
    print(f"read per decode step: weights {w / mb:.1f} MB; fp32 KV cache, mean over the steps: "
          f"batch 1 {kv[1] / mb:.1f} MB, batch {B} {kv[B] / mb:.1f} MB")
    print(f"{'':<10} {'floor s/image':>14} {'measured s/image':>17} {'measured/floor':>15}")
    for b in (1, B):
        print(f"{'batch ' + str(b):<10} {floor[b]:>14.3f} {codes_t[b]:>17.3f} {codes_t[b] / floor[b]:>15.2f}")
    print(f"VQGAN f16_16384 decode at 256 px, bf16: {d:.3f} s/image")
    e1 = codes_t[1] + d
    print(f"batch {B} / batch 1, codes + decode: measured {e1 / (codes_t[B] + d):.2f}x; "
          f"with batch {B} at its floor {e1 / (floor[B] + d):.2f}x (fp32 KV), "
          f"{e1 / (floor_bf16kv + d):.2f}x (a KV cache half as large)")


if __name__ == "__main__":
    main()
