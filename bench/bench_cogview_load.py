"""Load time and peak memory of a CogView-layout checkpoint (random weights) on CPU, against its size.

    OMP_NUM_THREADS=1 python bench/bench_cogview_load.py --layers 24 --hidden 1792 --dtype bfloat16  # 1.03 B

Writes a DeepSpeed folder (one fp16 ``mp_rank_00_model_states.pt``, as released; CogView's 58,240-row embedding)
+ a small all-zero VQ-VAE with 8192 codes + a tiny SentencePiece model under --dir, loads it with
``CogView.from_pretrained`` in a fresh process and prints the load time, the weights' size in bytes and the
process's peak RSS (``ru_maxrss``); deletes the folder afterwards unless --keep.
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


def tiny_spm(d: Path) -> Path:
    """A small SentencePiece model (the text vocabulary does not change the GPT's size: the embedding keeps
    CogView's 58,240 rows, which any vocabulary of ≤ 50,000 pieces fits)."""
    import sentencepiece as spm

    corpus = ["一只红色的猫在草地上", "左上角有一个红色的圆形", "右下角有一个蓝色的正方形", "a red cat on the grass",
              "一个漂亮的女孩", "蓝天白云下的城市", "the quick brown fox", "黄色的三角形和绿色的长方形"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(d / "cog-pretrain"),
                                   vocab_size=60, model_type="unigram", character_coverage=1.0, minloglevel=2,
                                   num_threads=1)
    return d / "cog-pretrain.model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/cogview_bench/pretrained")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1792)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--spm", default=None, help="a SentencePiece .model (default: a tiny one written under --dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written folder (default: delete it at the end)")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    d = Path(a.dir)
    if a.child:
        from tuwen.models.cogview import CogView
        t = time.perf_counter()
        m = CogView.from_pretrained(d / "cogview" / "cogview-big", tokenizer=a.spm, dtype=getattr(torch, a.dtype))
        dt = time.perf_counter() - t
        seen, n, nbytes = set(), 0, 0
        for p in m.gpt.parameters():  # a tied head counts once
            if id(p) not in seen:
                seen.add(id(p))
                n, nbytes = n + p.numel(), nbytes + p.numel() * p.element_size()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print(f"loaded {n:,} parameters in {dt:.1f} s; weights in memory ({a.dtype}): {nbytes:,} bytes "
              f"({nbytes / 2**30:.2f} GiB); peak RSS of the loading process: {peak:,} bytes "
              f"({peak / 2**30:.2f} GiB, {peak / nbytes:.2f}× the weights)")
        return
    import shutil

    d.mkdir(parents=True, exist_ok=True)
    try:
        spm_path = a.spm or str(tiny_spm(d))
        t = time.perf_counter()
        n = make(d, a.layers, a.hidden)
        f = d / "cogview" / "cogview-big" / "1" / "mp_rank_00_model_states.pt"
        print(f"wrote {f}: {n:,} parameters, {a.layers} layers × {a.hidden} hidden, {f.stat().st_size:,} bytes on "
              f"disk (fp16, CogView's layout) in {time.perf_counter() - t:.0f} s")
        subprocess.run([sys.executable, __file__, "--child", "--dir", a.dir, "--dtype", a.dtype, "--spm", spm_path,
                        "--layers", str(a.layers), "--hidden", str(a.hidden)], check=True)
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
