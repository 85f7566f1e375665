"""EasyNLP image2text / video2text checkpoint folders → ``tuwen.tasks.captioning.Captioner`` (read only).

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
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import TuwenError
from ..hub import load_torch_file

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


def load_easynlp_captioner(path: Path, raw: dict, frame_num: int = 0, text_len: int | None = None,
                           img_size: int | None = None, vqgan_path=None, vqgan_config=None, vit_heads: int | None = None,
                           freeze_vit: bool | None = None, **gen):
    """Build a ``Captioner`` from an EasyNLP I2T/V2T folder (see the module docstring); ``gen``: decoding
    defaults (num_beams, top_k, top_p, temperature, length_penalty, no_repeat_ngram_size)."""
    from ..models.gpt import GPT
    from ..models.vit import VisionTransformer
    from ..tasks.captioning import GENERATION_KEYS, Captioner, CaptionerConfig, resolve_vit_path
    from ..text.tokenizer import TextTokenizer
    from .clip import load_visual_into, openai_visual_state_dict, vit_config_from_state_dict

    unknown = sorted(set(gen) - set(GENERATION_KEYS))
    if unknown:
        raise TuwenError(f"unknown setting(s) for an EasyNLP captioner: {', '.join(unknown)}")
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
    common = dict(text_len=text_len, img_len=img_len, text_vocab_size=text_vocab, vocab_size=vocab_rows,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd, **gen)

    vit = vq = None
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
        vcfg = vit_config_from_state_dict(vis, image_size=img_size, heads=vit_heads)
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
        config = CaptionerConfig(prefix_encoder="vit", frame_num=int(frame_num or 0), img_size=vcfg.image_size,
                                 vit=vcfg.to_dict(), vit_proj=has_proj,
                                 freeze_vit=True if freeze_vit is None else bool(freeze_vit),
                                 image_resize="center_crop", **common)
    else:
        if frame_num:
            raise TuwenError(f"{path}: a VQGAN-prefix captioner cannot caption videos (frame_num={frame_num})")
        from ..convert.taming import extract_vqgan_state_dict, infer_vqgan_config, load_config, load_vqgan
        from ..hub import load_state_dict_checked
        from ..models.vqgan import VQGAN
        if vqgan_path:
            vq = load_vqgan(vqgan_path, config=vqgan_config)
        elif fs:
            vsd = extract_vqgan_state_dict({PREFIX + k: v for k, v in fs.items()}, str(weights))
            cfg = load_config(vqgan_config) if vqgan_config is not None else \
                infer_vqgan_config(vsd, img_size or 256, str(weights))
            vq = VQGAN(cfg)
            load_state_dict_checked(vq, {k: v.float() if v.is_floating_point() else v for k, v in vsd.items()},
                                    f"{weights} (first_stage_model.*)")
        else:
            raise TuwenError(f"{weights}: no first_stage_model.* (VQGAN) weights; pass vqgan_ckpt_path=... "
                             f"(e.g. vqgan_f16_16384.bin)")
        size = int(img_size or vq.config.resolution)
        h, w = vq.grid_size(size)
        if h * w != img_len:
            raise TuwenError(f"{path}: block_size {block} - text_len {text_len} = {img_len} prefix positions, but the "
                             f"VQGAN gives {h}×{w}={h * w} codes for {size}px images; pass text_len={block - h * w} "
                             f"or the img_size the model was trained with")
        config = CaptionerConfig(prefix_encoder="vqgan", img_size=size, img_vocab_size=vq.config.n_embed, vit=None,
                                 image_resize="squash", **common)
    model = Captioner(config, tok, vit=vit, vqgan=vq)
    from ..hub import load_state_dict_checked
    load_state_dict_checked(model.gpt, gpt_sd, f"{weights} (transformer.*)")
    return model
