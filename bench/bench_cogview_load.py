"""Load time and peak memory of a CogView-layout checkpoint (random weights) on CPU, against its size.

    python bench/bench_cogview_load.py --layers 24 --hidden 1792 --dtype bfloat16   # ~1.0 B parameters

Writes a DeepSpeed folder (fp16, as released) + a tiny VQ-VAE + SentencePiece model under --dir, then loads it
with CogView.from_pretrained in a fresh process and prints wall time and peak RSS (ru_maxrss).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def make(d: Path, layers: int, hidden: int, vocab: int = 58240, npos: int = 1089) -> int:
    ck = d / "cogview" / "cogview-big"
    if (ck / "latest_checkpointed_iteration.txt").exists():
        return -1
    (ck / "1").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).half()  # noqa: E731
    sd = {"word_embeddings.weight": r(vocab, hidden), "transformer.position_embeddings.weight": r(npos, hidden)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm", "third_layernorm", "fourth_layernorm"):
            sd[p + ln + ".weight"] = torch.ones(hidden).half()
            sd[p + ln + ".bias"] = torch.zeros(hidden).half()
        sd[p + "attention.query_key_value.weight"] = r(3 * hidden, hidden)
        sd[p + "attention.query_key_value.bias"] = r(3 * hidden)
        sd[p + "attention.dense.weight"] = r(hidden, hidden)
        sd[p + "attention.dense.bias"] = r(hidden)
        sd[p + "mlp.dense_h_to_4h.weight"] = r(4 * hidden, hidden)
        sd[p + "mlp.dense_h_to_4h.bias"] = r(4 * hidden)
        sd[p + "mlp.dense_4h_to_h.weight"] = r(hidden, 4 * hidden)
        sd[p + "mlp.dense_4h_to_h.bias"] = r(hidden)
    sd["transformer.final_layernorm.weight"] = torch.ones(hidden).half()
    sd["transformer.final_layernorm.bias"] = torch.zeros(hidden).half()
    n = sum(v.numel() for v in sd.values())
    torch.save({"module": sd, "iteration": 1}, ck / "1" / "mp_rank_00_model_states.pt")
    (ck / "latest_checkpointed_iteration.txt").write_text("1")
    # VQ-VAE (released shapes) and a SentencePiece model with 50,000 pieces are not needed for the GPT's
    # size; a small VQ-VAE with 8192 codes and an spm of the right vocabulary are written instead
    (d / "vqvae").mkdir(exist_ok=True)
    C, D = 16, 256
    vq = {"enc_b.blocks.0.weight": torch.zeros(C, 3, 4, 4), "enc_b.blocks.0.bias": torch.zeros(C),
          "enc_b.blocks.2.weight": torch.zeros(C, C, 4, 4), "enc_b.blocks.2.bias": torch.zeros(C),
          "enc_b.blocks.4.weight": torch.zeros(C, C, 4, 4), "enc_b.blocks.4.bias": torch.zeros(C),
          "enc_b.blocks.6.weight": torch.zeros(D, C, 1, 1), "enc_b.blocks.6.bias": torch.zeros(D),
          "quantize_t.embed": torch.zeros(D, 8192), "quantize_t.cluster_size": torch.zeros(8192),
          "quantize_t.embed_avg": torch.zeros(D, 8192),
          "dec.blocks.0.weight": torch.zeros(D, C, 4, 4), "dec.blocks.0.bias": torch.zeros(C),
          "dec.blocks.2.weight": torch.zeros(C, C, 4, 4), "dec.blocks.2.bias": torch.zeros(C),
          "dec.blocks.4.weight": torch.zeros(C, C, 4, 4), "dec.blocks.4.bias": torch.zeros(C),
          "dec.blocks.6.weight": torch.zeros(3, C, 1, 1), "dec.blocks.6.bias": torch.zeros(3)}
    torch.save(vq, d / "vqvae" / "vqvae_hard_biggerset_011.pt")
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/cogview_bench/pretrained")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1792)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--spm", required=True, help="a SentencePiece .model whose vocabulary fits 58,240 rows")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    d = Path(a.dir)
    if a.child:
        from tuwen.models.cogview import CogView
        t = time.perf_counter()
        m = CogView.from_pretrained(d / "cogview" / "cogview-big", tokenizer=a.spm, dtype=getattr(torch, a.dtype))
        dt = time.perf_counter() - t
        n = sum(p.numel() for p in m.gpt.parameters())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"loaded {n / 1e9:.3f} B parameters ({a.dtype}: {n * m.gpt.tok_emb.weight.element_size() / 2**30:.2f} GiB) "
              f"in {dt:.1f} s, peak RSS {peak:.2f} GiB")
        return
    d.mkdir(parents=True, exist_ok=True)
    from tuwen.text.cogview import SentencePieceTokenizer, pad_vocab_size
    n_text = SentencePieceTokenizer(a.spm).vocab_size  # the embedding has 8192 + n_text + 27 rows, padded
    make(d, a.layers, a.hidden, vocab=pad_vocab_size(8192 + n_text + 27))
    f = d / "cogview" / "cogview-big" / "1" / "mp_rank_00_model_states.pt"
    print(f"checkpoint {f} ({f.stat().st_size / 2**30:.2f} GiB on disk, fp16)")
    subprocess.run([sys.executable, __file__, "--child", "--dir", a.dir, "--dtype", a.dtype, "--spm", a.spm,
                    "--layers", str(a.layers), "--hidden", str(a.hidden)], check=True)


if __name__ == "__main__":
    main()
