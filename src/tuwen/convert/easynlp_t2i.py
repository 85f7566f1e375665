"""EasyNLP ARTIST / pai-painter text→image folders → the pieces of a ``tuwen.models.text2image.TextToImage``.

An EasyNLP folder holds ``config.json`` (``model_type`` ``artist``), ``pytorch_model.bin`` (the whole app
``state_dict``) and ``vocab.txt``::

    transformer.tok_emb.weight          [img_vocab + text_vocab, n_embd]   (image codes first, then text ids)
    transformer.pos_emb                 [1, block_size, n_embd]            (block_size = text_len + img_len)
    transformer.blocks.{i}.…            minGPT blocks (+ attn.mask buffers, dropped)
    transformer.head.weight             [img_vocab, n_embd]                (the head predicts image codes only)
    first_stage_model.*                 the taming VQGAN (absent in some releases: pass vqgan_path)

The folder does not describe its VQGAN: its architecture comes from ``vqgan_config`` (taming yaml/json) or is
inferred from the tensor shapes. ``n_head`` is not in the weights (EasyNLP's config.json has it; default 12).
This module returns plain pieces (config fields, state dict, VQGAN, tokenizer); the model is built by
``TextToImage.from_pretrained``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import TuwenError
from ..hub import CONFIG_NAME, load_state_dict_checked
from ..models.gpt import GPT, GPTConfig
from ..models.vqgan import VQGAN
from ..text.tokenizer import TextTokenizer
from .easynlp_i2t import read_easynlp_state_dict
from .taming import extract_vqgan_state_dict, infer_vqgan_config, load_config, load_vqgan

MODEL_TYPES = ("artist",)
GPT_PREFIX = "transformer."
VQGAN_PREFIX = "first_stage_model."


@dataclasses.dataclass
class ArtistCheckpoint:
    """What an EasyNLP text→image folder holds, in tuwen's terms."""

    fields: dict[str, Any]                 # TextToImageConfig fields (text_len, img_len, …, gpt: GPTConfig)
    gpt_state_dict: dict[str, torch.Tensor]
    vqgan: VQGAN
    tokenizer: TextTokenizer
    source: str                            # the weights file, for error messages


def read_artist(path: Path, raw: dict, *, vqgan_config=None, vqgan_path=None, image_size: int | None = None,
                text_len: int | None = None, img_len: int | None = None,
                n_head: int | None = None) -> ArtistCheckpoint:
    """Read an EasyNLP ARTIST folder (``raw``: its config.json). ``image_size`` defaults to 256 (EasyNLP's
    ``size``), ``img_len`` to the VQGAN grid at that size, ``text_len`` to block_size - img_len."""
    weights, sd = read_easynlp_state_dict(path)
    gpt_sd = {k[len(GPT_PREFIX):]: v for k, v in sd.items() if k.startswith(GPT_PREFIX)}
    if not gpt_sd:
        raise TuwenError(f"{weights}: no transformer.* weights; is this an EasyNLP text2image checkpoint?")
    gpt_sd = GPT.drop_legacy_buffers(gpt_sd)
    vocab_rows, n_embd = gpt_sd["tok_emb.weight"].shape
    block = gpt_sd["pos_emb"].shape[1]
    n_layer = len({k.split(".")[1] for k in gpt_sd if k.startswith("blocks.")})
    img_vocab = gpt_sd["head.weight"].shape[0]
    n_head = int(n_head if n_head is not None else raw.get("n_head", 12))
    image_size = int(image_size or 256)

    vqgan = _read_vqgan(sd, weights, vqgan_config, vqgan_path, image_size)
    h, w = vqgan.grid_size(image_size)
    il = int(img_len or h * w)
    tl = int(text_len if text_len is not None else block - il)
    if tl + il != block:
        raise TuwenError(f"{path}: text_len ({tl}) + img_len ({il}) = {tl + il} but the checkpoint has "
                         f"{block} positions (block_size)")
    text_vocab = vocab_rows - img_vocab
    for k, have in (("text_vocab_size", text_vocab), ("img_vocab_size", img_vocab)):
        if k in raw and int(raw[k]) != have:
            raise TuwenError(f"{path / CONFIG_NAME}: {k}={raw[k]} does not match the weights "
                             f"(tok_emb has {vocab_rows} rows, head {img_vocab})")
    gpt = GPTConfig(vocab_size=vocab_rows, block_size=block, n_out=img_vocab, n_layer=n_layer, n_head=n_head,
                    n_embd=n_embd)
    fields = dict(text_len=tl, img_len=il, img_vocab_size=img_vocab, text_vocab_size=text_vocab,
                  image_size=image_size, gpt=gpt)
    return ArtistCheckpoint(fields, gpt_sd, vqgan, TextTokenizer.from_pretrained(path), f"{weights} (transformer.*)")


def _read_vqgan(sd: dict, weights: Path, vqgan_config, vqgan_path, image_size: int) -> VQGAN:
    """The VQGAN: ``first_stage_model.*`` inside the checkpoint, or the separate ``vqgan_path``."""
    if vqgan_path:
        return load_vqgan(vqgan_path, config=vqgan_config)
    vq_sd = {k: v for k, v in sd.items() if k.startswith(VQGAN_PREFIX)}
    if not vq_sd:
        raise TuwenError(f"{weights}: no first_stage_model.* (VQGAN) weights; pass vqgan_path=... "
                         f"(e.g. vqgan_f16_16384.bin) and, if not f16_16384, vqgan_config=")
    vq_sd = extract_vqgan_state_dict(vq_sd, str(weights))
    cfg = load_config(vqgan_config) if vqgan_config is not None else infer_vqgan_config(vq_sd, image_size, str(weights))
    vq = VQGAN(cfg)
    load_state_dict_checked(vq, {k: v.float() for k, v in vq_sd.items()}, f"{weights} (first_stage_model.*)")
    return vq
