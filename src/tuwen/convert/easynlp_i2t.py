"""EasyNLP image2text / video2text checkpoint folders → the pieces of a ``tuwen.models.captioner.Captioner``.

An EasyNLP ``Trainer`` folder holds ``config.json`` (``model_type`` ``mingpt_i2t``, or ``artist_i2t`` for the first
VQGAN captioners), ``pytorch_model.bin`` (the whole app ``state_dict``) and ``vocab.txt``::

    transformer.tok_emb.weight          [vocab_size, n_embd]    (ViT: text vocab; VQ: text + image + 1)
    transformer.pos_emb                 [1, block_size, n_embd] (block_size = text_len + img_len, e.g. 288)
    transformer.blocks.{i}.…            minGPT blocks (+ attn.mask buffers, dropped)
    transformer.head.weight             [decode_vocab_size, n_embd]   (the text vocabulary)
    first_stage_model.*                 ViT prefix: OpenAI CLIP ``visual`` (conv1, class_embedding,
                                        positional_embedding, ln_pre, transformer.resblocks.*, ln_post, proj — no
                                        proj when n_embd == width); VQ prefix: the taming VQGAN

The config does not say whether the model captions images or videos (``video2text_generation`` trains the same
layout on one CLS vector per frame): pass ``frame_num`` (> 0) for a video model. ``text_len`` (default 32) splits
``block_size`` into text and prefix positions. When ``first_stage_model.*`` is absent the tower is read from
``prefix_encoder_ckpt_path`` (ViT; resolved like ``vit_ckpt_path``) or ``vqgan_path`` (VQ).

``read_easynlp_i2t`` returns plain pieces (the captioner's config fields, the GPT state dict, the loaded image
tower or VQGAN, the tokenizer); ``Captioner.from_pretrained`` builds the model from them.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import TuwenError
from ..hub import load_state_dict_checked, load_torch_file, tuwen_home
from ..models.gpt import GPT
from ..models.vit import VisionTransformer
from ..text.tokenizer import TextTokenizer
from .clip import load_visual_into, openai_visual_state_dict, vit_config_from_state_dict

MODEL_TYPES = ("mingpt_i2t", "artist_i2t")
PREFIX = "first_stage_model."
GPT_PREFIX = "transformer."


def _weights_file(path: Path) -> Path:
    w = path / "pytorch_model.bin"
    if w.exists():
        return w
    alt = sorted(p for p in path.glob("pytorch_model*.bin") if not p.name.endswith(".meta.bin"))
    if not alt:
        raise TuwenError(f"{path}: EasyNLP folder without pytorch_model.bin")
    return alt[-1]


def read_easynlp_state_dict(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = _weights_file(path)
    sd = load_torch_file(weights)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise TuwenError(f"{weights}: expected a state dict")
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and torch.is_tensor(v)}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return weights, sd


def resolve_vit_path(spec: str) -> Path:
    """``vit_ckpt_path`` / ``prefix_encoder_ckpt_path``: a local file/folder, or an OpenAI model name (``ViT-L/14`` →
    ``ViT-L-14.pt``) under ``$TUWEN_HOME/models``. Nothing is downloaded; a missing file is a TuwenError saying
    where to put it."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if spec.startswith(("oss://", "http://", "https://")):
        raise TuwenError(f"vit_ckpt_path={spec!r}: tuwen downloads nothing; copy the file to a local path")
    if spec.startswith(("/", "./", "../", "~")):
        raise TuwenError(f"vit_ckpt_path={spec!r}: no such file or folder")
    fname = spec.replace("/", "-")
    if not fname.endswith((".pt", ".bin", ".pth", ".safetensors")):
        fname += ".pt"
    home = tuwen_home()
    for c in (home / "models" / fname, home / fname, home / "models" / spec.replace("/", "-")):
        if c.exists():
            return c
    raise TuwenError(
        f"vit_ckpt_path={spec!r} not found: it is not a local path and {home / 'models' / fname} does not exist. "
        f"tuwen downloads nothing: put OpenAI's {fname} (the file openai/CLIP publishes for {spec}) at "
        f"{home / 'models' / fname} (set TUWEN_HOME to change the root), or pass vit_ckpt_path=/path/to/{fname} or "
        f"a tuwen CLIP model folder")


def load_kwargs_from_udp(udp: dict, video: bool) -> dict:
    """``Captioner.from_pretrained`` settings of an EasyNLP folder (its config.json does not hold them) from the
    typed ``user_defined_parameters`` of image2text / video2text (frame_num defaults to 3 for video, as EasyNLP)."""
    over = {k: udp[k] for k in ("text_len", "img_size") if udp.get(k) is not None}
    if video:
        over["frame_num"] = udp.get("frame_num") or 3
    if udp.get("vqgan_ckpt_path"):
        over["vqgan_path"] = udp["vqgan_ckpt_path"]
    if udp.get("vqgan_config"):
        over["vqgan_config"] = udp["vqgan_config"]
    return over


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TuwenError(f"{path}: not a model folder (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuwenError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TuwenError(f"{cfg}: expected a JSON object")
    return d


@dataclasses.dataclass
class EasyNLPCaptioner:
    """What an EasyNLP I2T/V2T folder holds, in tuwen's terms."""

    fields: dict[str, Any]                    # CaptionerConfig.build keyword arguments (GPT sizes included)
    gpt_state_dict: dict[str, torch.Tensor]   # tuwen GPT names
    tokenizer: TextTokenizer
    weights: Path                             # the file read (for messages)
    vit: VisionTransformer | None = None      # ViT prefix, weights loaded
    vqgan: Any = None                         # VQ prefix (tuwen VQGAN), weights loaded


def read_easynlp_i2t(path: Path, frame_num: int = 0, text_len: int | None = None, image_size: int | None = None,
                     vqgan_path=None, vqgan_config=None, vit_heads: int | None = None) -> EasyNLPCaptioner:
    """Read an EasyNLP I2T/V2T folder (see the module docstring). ``frame_num`` > 0: a video2text model;
    ``text_len`` (default 32) splits ``block_size``; ``image_size``: the tower's input size (default: the
    checkpoint's); ``vqgan_path`` / ``vqgan_config``: the VQGAN of a VQ checkpoint without ``first_stage_model.*``."""
    raw = _read_config(path)
    weights, sd = read_easynlp_state_dict(path)
    gpt_sd = GPT.drop_legacy_buffers({k[len(GPT_PREFIX):]: v for k, v in sd.items() if k.startswith(GPT_PREFIX)})
    for key in ("tok_emb.weight", "pos_emb", "head.weight"):
        if key not in gpt_sd:
            raise TuwenError(f"{weights}: no transformer.{key}; is this an EasyNLP image2text / video2text checkpoint?")
    vocab_rows, n_embd = (int(s) for s in gpt_sd["tok_emb.weight"].shape)
    block = int(gpt_sd["pos_emb"].shape[1])
    text_vocab = int(gpt_sd["head.weight"].shape[0])
    n_layer = len({k.split(".")[1] for k in gpt_sd if k.startswith("blocks.")})
    n_head = int(raw.get("n_head", 12))
    for k, v in (("n_embd", n_embd), ("block_size", block), ("n_layer", n_layer), ("decode_vocab_size", text_vocab),
                 ("vocab_size", vocab_rows)):
        if k in raw and int(raw[k]) != v:
            raise TuwenError(f"{path / 'config.json'}: {k}={raw[k]} but the weights say {v}")
    other = sorted({k.split(".")[0] for k in sd if not k.startswith((GPT_PREFIX, PREFIX))})
    if other:
        print(f"warning: {weights}: ignoring tensors outside transformer.* / first_stage_model.* "
              f"({', '.join(other[:5])})", file=sys.stderr)

    fs = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    kind = raw.get("prefix_encoder_type") or ("vqgan" if raw.get("model_type") == "artist_i2t" else None)
    if kind is None:
        kind = "vit" if "conv1.weight" in fs else "vqgan" if "encoder.conv_in.weight" in fs else None
        if kind is None:
            raise TuwenError(f"{path / 'config.json'}: no prefix_encoder_type and no first_stage_model.* weights to "
                             f"tell a ViT from a VQGAN prefix")
    if kind not in ("vit", "vqgan"):
        raise TuwenError(f"{path / 'config.json'}: prefix_encoder_type {kind!r} (expected vit or vqgan)")
    if not (path / "vocab.txt").exists():
        raise TuwenError(f"{path}: no vocab.txt. EasyNLP does not copy it when a model is trained without "
                         f"pretrain_model_name_or_path: copy the vocab.txt the model was trained with (e.g. "
                         f"bert-base-chinese's) into {path}")
    tok = TextTokenizer.from_pretrained(path)
    text_len = int(text_len or 32)
    img_len = block - text_len  # prefix positions; checked against the tower below
    fields = dict(text_len=text_len, img_len=img_len, text_vocab_size=text_vocab, vocab_size=vocab_rows,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd)

    if kind == "vit":
        if fs:
            vis, src = dict(fs), f"{weights} (first_stage_model.*)"
        else:
            ckpt = raw.get("prefix_encoder_ckpt_path")
            if not ckpt:
                raise TuwenError(f"{weights}: no first_stage_model.* (image tower) and no prefix_encoder_ckpt_path in "
                                 f"config.json")
            src = str(resolve_vit_path(ckpt))
            vis = openai_visual_state_dict(src)
        vis = {k: (v.float() if v.is_floating_point() else v) for k, v in vis.items()}
        has_proj = "proj" in vis
        if not has_proj:  # EasyNLP set visual.proj = None (n_embd == width): keep an unused identity
            width = int(vis["conv1.weight"].shape[0])
            vis["proj"] = torch.eye(width)
        vcfg = vit_config_from_state_dict(vis, image_size=image_size, heads=vit_heads)
        feat = vcfg.output_dim if has_proj else vcfg.width
        if feat != n_embd:
            raise TuwenError(f"{weights}: the image tower gives {feat}-wide features but the GPT has n_embd={n_embd}")
        if frame_num and img_len < frame_num:
            raise TuwenError(f"{path}: block_size {block} - text_len {text_len} = {img_len} prefix positions, fewer "
                             f"than frame_num={frame_num}; pass the text_len the model was trained with")
        if not frame_num and vcfg.num_patches != img_len:
            raise TuwenError(f"{path}: block_size {block} - text_len {text_len} = {img_len} prefix positions, but the "
                             f"image tower cuts {vcfg.image_size}px images into {vcfg.num_patches} patches; pass "
                             f"text_len={block - vcfg.num_patches} (or, for a video2text model, frame_num)")
        vit = VisionTransformer(vcfg)
        load_visual_into(vit, vis, src)
        fields.update(prefix_encoder="vit", frame_num=int(frame_num or 0), image_size=vcfg.image_size, vit=vcfg,
                      vit_proj=has_proj, image_resize="center_crop")
        return EasyNLPCaptioner(fields, gpt_sd, tok, weights, vit=vit)

    if frame_num:
        raise TuwenError(f"{path}: a VQGAN-prefix captioner cannot caption videos (frame_num={frame_num})")
    from ..models.vqgan import VQGAN
    from .taming import extract_vqgan_state_dict, infer_vqgan_config, load_config, load_vqgan
    if vqgan_path:
        vq = load_vqgan(vqgan_path, config=vqgan_config)
    elif fs:
        vsd = extract_vqgan_state_dict({PREFIX + k: v for k, v in fs.items()}, str(weights))
        cfg = load_config(vqgan_config) if vqgan_config is not None else \
            infer_vqgan_config(vsd, image_size or 256, str(weights))
        vq = VQGAN(cfg)
        load_state_dict_checked(vq, {k: v.float() if v.is_floating_point() else v for k, v in vsd.items()},
                                f"{weights} (first_stage_model.*)")
    else:
        raise TuwenError(f"{weights}: no first_stage_model.* (VQGAN) weights; pass vqgan_ckpt_path=... "
                         f"(e.g. vqgan_f16_16384.bin)")
    size = int(image_size or vq.config.resolution)
    h, w = vq.grid_size(size)
    if h * w != img_len:
        raise TuwenError(f"{path}: block_size {block} - text_len {text_len} = {img_len} prefix positions, but the "
                         f"VQGAN gives {h}×{w}={h * w} codes for {size}px images; pass text_len={block - h * w} "
                         f"or the img_size the model was trained with")
    fields.update(prefix_encoder="vqgan", image_size=size, img_vocab_size=vq.config.n_embed, vit=None,
                  image_resize="squash")
    return EasyNLPCaptioner(fields, gpt_sd, tok, weights, vqgan=vq)
