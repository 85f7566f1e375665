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
import math
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


EASYNLP_TEXT_LEN = 32  # EasyNLP's default text_len


def read_artist(path: Path, raw: dict, *, vqgan_config=None, vqgan_path=None, image_size: int | None = None,
                text_len: int | None = None, img_len: int | None = None,
                n_head: int | None = None) -> ArtistCheckpoint:
    """Read an EasyNLP ARTIST folder (``raw``: its config.json).

    EasyNLP's config.json does not say the image size. It is, in order: ``image_size`` (EasyNLP ``size``); the
    size whose grid gives ``img_len`` (or ``block_size - text_len``); the VQGAN's own ``resolution`` when its
    config is given (``vqgan_config`` / a ``vqgan_path`` folder); otherwise the size that leaves EasyNLP's default
    ``text_len`` 32. When none fits the checkpoint's ``block_size`` this is an error naming ``size=`` /
    ``img_len=``; a model with ``text_len < 1`` is never built."""
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

    known_vq = _read_vqgan(sd, weights, vqgan_config, vqgan_path, None)  # None: architecture needs a size
    f = known_vq.config.downsample_factor if known_vq is not None else _downsample_factor(sd, weights)
    image_size = _image_size(path, block, f, image_size, text_len, img_len,
                             known_vq.config.resolution if known_vq is not None else None)
    vqgan = known_vq if known_vq is not None else _read_vqgan(sd, weights, None, None, image_size)
    h, w = vqgan.grid_size(image_size)
    il = int(img_len or h * w)
    tl = int(text_len if text_len is not None else block - il)
    if tl < 1 or il < 1:
        raise TuwenError(f"{path}: size={image_size} gives img_len {il} ({h}×{w} codes) but the checkpoint has only "
                         f"{block} positions (block_size), leaving text_len {tl}; pass the size it was trained "
                         f"at: size= or img_len= (and text_len=)")
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


def _image_size(path: Path, block: int, f: int, image_size, text_len, img_len, vq_resolution) -> int:
    """The image size of an EasyNLP checkpoint with ``block`` positions on a VQGAN of downsampling factor ``f``
    (see ``read_artist``)."""
    if image_size:
        return int(image_size)

    def side(n: int) -> int | None:  # a square grid of n codes → pixels
        r = math.isqrt(n) if n > 0 else 0
        return r * f if r > 0 and r * r == n else None

    if img_len or text_len is not None:
        n = int(img_len or block - int(text_len))
        s = side(n)
        if s is None:
            raise TuwenError(f"{path}: img_len {n} is not a square grid of codes; pass size= (pixels) as well")
        return s
    if vq_resolution:
        return int(vq_resolution)
    s = side(block - EASYNLP_TEXT_LEN)
    if s is None:
        raise TuwenError(f"{path}: EasyNLP's config.json does not give the image size, and none fits the checkpoint's "
                         f"{block} positions with text_len {EASYNLP_TEXT_LEN}; give the size it was trained at: size= (pixels) "
                         f"or img_len= (and text_len=) in --user_defined_parameters / pipeline(), or --size / "
                         f"--img_len / --text_len (tuwen generate, tuwen convert)")
    return s


def _downsample_factor(sd: dict, weights: Path) -> int:
    """The VQGAN's downsampling factor from the ``first_stage_model.*`` shapes (no size needed)."""
    vq_sd = {k: v for k, v in sd.items() if k.startswith(VQGAN_PREFIX)}
    if not vq_sd:
        raise TuwenError(f"{weights}: no first_stage_model.* (VQGAN) weights; pass vqgan_path=... "
                         f"(e.g. vqgan_f16_16384.bin) and, if not f16_16384, vqgan_config=")
    cfg = infer_vqgan_config(extract_vqgan_state_dict(vq_sd, str(weights)), 1 << 14, str(weights))
    return cfg.downsample_factor


def _read_vqgan(sd: dict, weights: Path, vqgan_config, vqgan_path, image_size: int | None) -> VQGAN | None:
    """The VQGAN: the separate ``vqgan_path``, or ``first_stage_model.*`` inside the checkpoint with
    ``vqgan_config`` or (given ``image_size``) the architecture inferred from the shapes; None when the
    architecture needs ``image_size`` and it is not given yet."""
    if vqgan_path:
        return load_vqgan(vqgan_path, config=vqgan_config)
    vq_sd = {k: v for k, v in sd.items() if k.startswith(VQGAN_PREFIX)}
    if not vq_sd:
        raise TuwenError(f"{weights}: no first_stage_model.* (VQGAN) weights; pass vqgan_path=... "
                         f"(e.g. vqgan_f16_16384.bin) and, if not f16_16384, vqgan_config=")
    if vqgan_config is None and image_size is None:
        return None
    vq_sd = extract_vqgan_state_dict(vq_sd, str(weights))
    cfg = load_config(vqgan_config) if vqgan_config is not None else infer_vqgan_config(vq_sd, image_size, str(weights))
    vq = VQGAN(cfg)
    load_state_dict_checked(vq, {k: v.float() for k, v in vq_sd.items()}, f"{weights} (first_stage_model.*)")
    return vq
