"""Readers of CogView's released files (THUDM/CogView), read-only and without running code from them.

**Image tokenizer** ``vqvae_hard_biggerset_011.pt``: a plain state dict (``torch.save(model.state_dict())``,
sometimes with a ``module.`` prefix) of ``vqvae/vqvae_zc.py:VQVAE`` → :func:`read_vqvae`.

**Transformer** (``cogview-base``, ``cogview-caption``, ``cogview-sr``): a Megatron/DeepSpeed checkpoint folder::

    latest_checkpointed_iteration.txt      "20000" (or "release")
    20000/mp_rank_00_model_states.pt       {"module": state dict, "iteration": …, optimizer/rng states …}
    20000/mp_rank_01_model_states.pt       (one file per model-parallel rank, when --model-parallel-size > 1)

``module`` holds ``GPT2Model`` (``model/gpt2_modeling.py`` + ``mpu/sparse_transformer.py``)::

    word_embeddings.weight                               [V/p, h]   vocab-parallel (rows split over ranks)
    transformer.position_embeddings.weight               [1089, h]  copied on every rank
    transformer.layers.{i}.input_layernorm.{weight,bias}            LN before attention
    transformer.layers.{i}.attention.query_key_value.{weight,bias}  [3h/p, h] column-parallel, stride 3:
                                                                    rank r holds [q_r; k_r; v_r]
    transformer.layers.{i}.attention.dense.{weight,bias}   weight [h, h/p] row-parallel, bias [h] copied
    transformer.layers.{i}.third_layernorm.*                        Sandwich-LN after attention
    transformer.layers.{i}.post_attention_layernorm.*               LN before the MLP
    transformer.layers.{i}.mlp.dense_h_to_4h.{weight,bias}          [4h/p, h] column-parallel
    transformer.layers.{i}.mlp.dense_4h_to_h.{weight,bias}          weight [h, 4h/p] row-parallel
    transformer.layers.{i}.fourth_layernorm.*                       Sandwich-LN after the MLP
    transformer.final_layernorm.{weight,bias}

The logits are ``F.linear(final_hidden, word_embeddings.weight)`` (tied, no bias); GELU is the tanh form.
:func:`read_checkpoint_folder` merges the shards and renames the tensors to :class:`~tuwen.models.gpt.GPT`'s
(``tie_head``, ``sandwich_ln``, ``gelu="tanh"``). Every file is read with ``torch.load(weights_only=True,
mmap=True)`` (numpy arrays of DeepSpeed's saved RNG states are allowed, nothing else), one shard at a time, and
each tensor is cast to the requested dtype as it is taken, so peak memory stays near the size of the result.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import TuwenError
from ..models.cogview_vqvae import CogViewVQVAEConfig
from ..models.gpt import GPTConfig

__all__ = ["read_vqvae", "read_checkpoint_folder", "is_checkpoint_folder", "checkpoint_files", "load_pt",
           "VQVAE_NAME", "HEAD_DIM"]

VQVAE_NAME = "vqvae_hard_biggerset_011.pt"
TRACKER = "latest_checkpointed_iteration.txt"
HEAD_DIM = 64  # 2560/40 (cogview-base), 1024/16 (the tutorial): the head count is not stored in the checkpoint
_SHARD = re.compile(r"mp_rank_(\d+)_model_states\.pt")


def load_pt(path: Path) -> object:
    """``torch.load(weights_only=True)`` (memory-mapped when the file is a zip archive); DeepSpeed's numpy RNG
    states are the only extra objects allowed."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise TuwenError(f"{path}: file not found")

    def load():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format

    try:
        return load()
    except Exception as first:  # noqa: BLE001
        numpy_ok = [np.ndarray, np.dtype, np._core.multiarray._reconstruct]
        numpy_ok += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "uint8", "int32", "float32")]
        try:
            with torch.serialization.safe_globals(numpy_ok):
                return load()
        except Exception:  # noqa: BLE001
            msg = str(first).splitlines()[-1] if str(first) else type(first).__name__
            raise TuwenError(f"{path}: cannot be read safely with torch.load(weights_only=True) ({msg[:300]}); "
                             f"tuwen never unpickles arbitrary objects") from None


# ============================================================================================ VQ-VAE

def read_vqvae(path: str | os.PathLike, resolution: int = 256) -> tuple[CogViewVQVAEConfig, dict[str, torch.Tensor]]:
    """``vqvae_hard_biggerset_011.pt`` → (config inferred from the shapes, state dict for ``CogViewVQVAE``)."""
    path = Path(path)
    obj = load_pt(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise TuwenError(f"{path}: expected CogView's VQ-VAE state dict (enc_b.*, quantize_t.*, dec.*)")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    need = ("enc_b.blocks.0.weight", "enc_b.blocks.6.weight", "quantize_t.embed", "dec.blocks.0.weight",
            "dec.blocks.6.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        if "encoder.conv_in.weight" in sd:
            raise TuwenError(f"{path}: this is a taming VQGAN, not CogView's VQ-VAE; use `tuwen vq import`")
        raise TuwenError(f"{path}: not CogView's VQ-VAE layout (vqvae_zc.py with channel=512, stride=6): "
                         f"missing {', '.join(missing)}")
    if "enc_b.blocks.8.weight" in sd or any(".conv." in k for k in sd):
        raise TuwenError(f"{path}: a CogView VQ-VAE with ResBlocks or another stride; only the released f8 "
                         f"layout (n_res_block=0, stride=6, simple) is supported")
    embed = sd["quantize_t.embed"]
    cfg = CogViewVQVAEConfig(channel=int(sd["enc_b.blocks.0.weight"].shape[0]), embed_dim=int(embed.shape[0]),
                             n_embed=int(embed.shape[1]), in_channel=int(sd["enc_b.blocks.0.weight"].shape[1]),
                             resolution=resolution)
    return cfg, {k: v.float() for k, v in sd.items()}


# ============================================================================================ transformer

def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """A Megatron/DeepSpeed folder: the tracker file, or a folder of ``mp_rank_XX_model_states.pt``."""
    p = Path(path)
    return p.is_dir() and ((p / TRACKER).is_file() or any(_SHARD.fullmatch(f.name) for f in p.iterdir()))


def checkpoint_files(path: str | os.PathLike, iteration: str | int | None = None) -> tuple[str, list[Path]]:
    """(iteration, shard files in rank order) of a checkpoint folder (or of an iteration folder itself)."""
    p = Path(path)
    if not p.is_dir():
        raise TuwenError(f"{p}: not a folder (expected CogView's checkpoint folder, e.g. pretrained/cogview/cogview-base)")
    shards_here = sorted(f for f in p.iterdir() if _SHARD.fullmatch(f.name))
    if iteration is None and shards_here:
        it, folder = p.name, p
    else:
        if iteration is None:
            tracker = p / TRACKER
            if not tracker.is_file():
                raise TuwenError(f"{p}: no {TRACKER} and no mp_rank_XX_model_states.pt: not a CogView "
                                 f"(Megatron/DeepSpeed) checkpoint folder")
            it = tracker.read_text(encoding="utf-8", errors="replace").strip()
            if not (it.isdigit() or it == "release"):
                raise TuwenError(f"{tracker}: expected an iteration number or 'release', got {it[:40]!r}")
        else:
            it = str(iteration)
        folder = p / it
        if not folder.is_dir():
            raise TuwenError(f"{folder}: missing (named by {TRACKER}); the checkpoint folder is incomplete")
        shards_here = sorted(f for f in folder.iterdir() if _SHARD.fullmatch(f.name))
    if not shards_here:
        raise TuwenError(f"{folder}: no mp_rank_XX_model_states.pt files")
    ranks = [int(_SHARD.fullmatch(f.name).group(1)) for f in shards_here]
    shards = [f for _, f in sorted(zip(ranks, shards_here))]
    if sorted(ranks) != list(range(len(ranks))):
        raise TuwenError(f"{folder}: model-parallel shards {sorted(ranks)} are not 0..{len(ranks) - 1}; a shard is missing")
    return it, shards


def _module_of(obj, path: Path) -> dict[str, torch.Tensor]:
    sd = obj.get("module") if isinstance(obj, dict) else None
    if sd is None and isinstance(obj, dict) and "model" in obj:
        sd = obj["model"]
    if not isinstance(sd, dict):
        raise TuwenError(f"{path}: no 'module' state dict (not a Megatron/DeepSpeed model-states file)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if torch.is_tensor(v)}


# how each CogView tensor is split over model-parallel ranks: dim to concatenate on, or None = copied
def _split_dim(name: str) -> int | None:
    if name == "word_embeddings.weight":
        return 0
    if name.endswith(("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias")):
        return 0
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return 1
    return None


_RENAME = [
    (re.compile(r"^transformer\.layers\.(\d+)\.input_layernorm\."), r"blocks.\1.ln1."),
    (re.compile(r"^transformer\.layers\.(\d+)\.post_attention_layernorm\."), r"blocks.\1.ln2."),
    (re.compile(r"^transformer\.layers\.(\d+)\.third_layernorm\."), r"blocks.\1.ln3."),
    (re.compile(r"^transformer\.layers\.(\d+)\.fourth_layernorm\."), r"blocks.\1.ln4."),
    (re.compile(r"^transformer\.layers\.(\d+)\.attention\.dense\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\."), r"blocks.\1.mlp.0."),
    (re.compile(r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\."), r"blocks.\1.mlp.2."),
    (re.compile(r"^transformer\.final_layernorm\."), "ln_f."),
]


def read_checkpoint_folder(path: str | os.PathLike, *, n_head: int | None = None, dtype: torch.dtype | None = None,
                           block_size: int | None = None, iteration: str | int | None = None
                           ) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    """A CogView checkpoint folder → (GPTConfig, GPT state dict, info {"iteration", "shards", "dtype"}).

    ``n_head``: attention heads (CogView's ``--num-attention-heads``; default hidden / 64). ``dtype``: cast every
    tensor to it while reading (default: the file's dtype, fp16 for the released models). ``block_size``: the
    longest sequence the model will run (default max(positions, 1345) — CogView's ``MAXSEQLEN`` of
    super-resolution, whose position ids restart after ``[ROI2]``).
    """
    it, shards = checkpoint_files(path, iteration)
    p = len(shards)
    parts: dict[str, list[torch.Tensor]] = {}
    file_dtype = None
    for f in shards:  # one shard at a time; the tensors stay memory-mapped until cast/concatenated
        sd = _module_of(load_pt(f), f)
        for k, v in sd.items():
            file_dtype = file_dtype or v.dtype
            parts.setdefault(k, []).append(v if dtype is None or _split_dim(k) is not None else v.to(dtype))
        del sd
    need = ("word_embeddings.weight", "transformer.position_embeddings.weight", "transformer.final_layernorm.weight",
            "transformer.layers.0.attention.query_key_value.weight")
    missing = [k for k in need if k not in parts]
    if missing:
        raise TuwenError(f"{shards[0]}: not CogView's GPT2Model ({', '.join(missing)} missing)")
    bad = [k for k, v in parts.items() if len(v) != p]
    if bad:
        raise TuwenError(f"{shards[0].parent}: tensors missing from some model-parallel shards: {', '.join(bad[:5])}")

    def merged(k: str) -> torch.Tensor:
        vs, d = parts.pop(k), _split_dim(k)
        if d is None or p == 1:
            t = vs[0]
        elif "query_key_value" in k:  # stride 3: each rank holds [q_r; k_r; v_r]
            chunks = [v.chunk(3, dim=0) for v in vs]
            t = torch.cat([torch.cat([c[j] for c in chunks]) for j in range(3)])
        else:
            t = torch.cat(vs, dim=d)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    n_layer = 1 + max(int(m.group(1)) for k in parts if (m := re.match(r"transformer\.layers\.(\d+)\.", k)))
    out: dict[str, torch.Tensor] = {}
    for k in list(parts):
        if k == "word_embeddings.weight":
            out["tok_emb.weight"] = merged(k)
            out["head.weight"] = out["tok_emb.weight"]  # tied (CogView computes logits with the embedding)
        elif k == "transformer.position_embeddings.weight":
            out["pos_emb"] = merged(k).unsqueeze(0)
        elif k.endswith("attention.query_key_value.weight") or k.endswith("attention.query_key_value.bias"):
            i, kind = re.match(r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(\w+)", k).groups()
            q, kk, v = merged(k).chunk(3, dim=0)
            out[f"blocks.{i}.attn.query.{kind}"] = q
            out[f"blocks.{i}.attn.key.{kind}"] = kk
            out[f"blocks.{i}.attn.value.{kind}"] = v
        else:
            for pat, rep in _RENAME:
                if pat.match(k):
                    out[pat.sub(rep, k)] = merged(k)
                    break
            else:
                raise TuwenError(f"{shards[0]}: unexpected tensor {k!r} (sparse-attention or other variant?)")
    V, h = out["tok_emb.weight"].shape
    n_pos = int(out["pos_emb"].shape[1])
    heads = n_head or max(1, h // HEAD_DIM)
    if h % heads:
        raise TuwenError(f"{path}: hidden size {h} is not divisible by {heads} attention heads (--num-attention-heads)")
    sandwich = "blocks.0.ln3.weight" in out
    cfg = GPTConfig(vocab_size=int(V), block_size=max(n_pos, block_size or 1345), n_out=int(V), n_layer=n_layer,
                    n_head=heads, n_embd=int(h), sandwich_ln=sandwich, gelu="tanh", tie_head=True,
                    n_positions=n_pos)
    return cfg, out, {"iteration": it, "shards": len(shards), "dtype": str(dtype or file_dtype).replace("torch.", "")}
