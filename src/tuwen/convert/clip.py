"""Read OpenAI CLIP, Chinese-CLIP, HF CLIP/ChineseCLIP and HF BERT weights into tuwen's towers (read only).

Layouts that load (checked key for key and shape for shape; anything else is a TuwenError naming the keys):

* **OpenAI CLIP ``.pt``** (``ViT-B-32.pt``, ``ViT-B-16.pt``, ``ViT-L-14.pt``, ``ViT-L-14-336px.pt``), either the
  released TorchScript archive — its weights read by ``tuwen.convert.torchscript`` without running anything from
  the file (``torch.jit.load`` would run the archive's code; ``torch.load(weights_only=True)`` cannot read
  TorchScript) — or a plain state dict
  (``torch.save(model.state_dict())``, read with ``weights_only=True``). Only the image tower is used: the
  ``visual.*`` tensors → ``VisionTransformer`` (``load_openai_vit``). fp16 tensors become fp32. The architecture is
  read from the shapes (width, patch, grid, layers, output_dim; heads = width // 64 as in OpenAI's ``build_model``,
  16 for width 1280). OpenAI's text tower (BPE, English) is not used. ResNet image towers (``RN50.pt``,
  ``RN101.pt``, ``RN50x4.pt`` …) load into ``ModifiedResNet`` (``load_openai_resnet``; layers, width, output_dim
  and image size read from the shapes, heads = 32·width // 64 as in ``build_model``) for CLIP
  (``vit_ckpt_path=RN50.pt``); the captioner's image prefix takes ViT towers only.
* **Chinese-CLIP checkpoints** (``clip_cn_vit-b-16.pt`` …, ``torch.load`` → ``{"state_dict": {"module.visual.*",
  "module.bert.*", "module.text_projection", "module.logit_scale"}, "epoch", …}``; the ``module.`` prefix and the
  ``state_dict`` wrapper are optional) → ``CLIP`` (``tuwen.models.clip.load_chinese_clip``) with the user's
  ``vocab.txt`` (Chinese-CLIP's vocabulary is the 21128-line Google Chinese BERT ``vocab.txt``;
  ``pip install --no-deps cn_clip`` ships it as ``cn_clip/clip/vocab.txt``). ViT and ResNet (``clip_cn_rn50.pt``)
  image towers. The converted model sizes PIL inputs like Chinese-CLIP (``image_resize="squash"``: ``Resize((S, S))``).
* **HF transformers layouts** (``pytorch_model.bin`` / ``model.safetensors`` of ``CLIPModel``,
  ``CLIPVisionModel(WithProjection)`` and ``ChineseCLIPModel``): ``vision_model.*`` (separate q/k/v projections,
  ``pre_layrnorm``, ``layer_norm1/2``, ``mlp.fc1/fc2``) + ``visual_projection.weight`` are rewritten to the OpenAI
  names; ChineseCLIP's ``text_model.*`` + ``text_projection.weight`` to ``bert.*`` + ``text_projection``.
* **HF BERT / RoBERTa-wwm-ext** weights (``bert.*`` or bare ``embeddings.*``/``encoder.*`` keys, a file or a folder
  with ``config.json``; TF-style ``LayerNorm.gamma/beta`` accepted) → the text tower (``bert_ckpt_path=``).
  Pooler, MLM/NSP heads and ``position_ids`` buffers are dropped.

    vit = load_openai_vit("/models/ViT-B-32.pt")                         # image tower only
    sd, fields = chinese_clip_state_dict("/models/clip_cn_vit-b-16.pt", tokenizer)   # → tuwen.models.clip

Whole CLIP models (``load_chinese_clip`` / ``convert_chinese_clip``) are built in ``tuwen.models.clip``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import TuwenError
from ..hub import load_state_dict_checked, load_torch_file, load_weights
from ..models.resnet import ModifiedResNet, ResNetConfig, fill_bn_counters
from ..models.text_encoder import TextEncoder, TextEncoderConfig
from ..models.vit import ViTConfig, VisionTransformer, resize_pos_embed
from .torchscript import is_torchscript, read_torchscript_state_dict

# ----------------------------------------------------------------------------------------------- reading

def _unwrap(obj, source: str) -> dict:
    """Checkpoint dict → flat state dict (``state_dict`` / ``model`` / ``module`` wrappers, ``module.`` prefixes)."""
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and \
                any(torch.is_tensor(v) for v in obj[key].values()):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise TuwenError(f"{source}: no state dict found (expected a dict of tensors, or one under 'state_dict')")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    while sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path_or_sd, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint file/folder (TorchScript archive, torch.save'd dict, safetensors) or a dict → flat state dict
    with floating tensors as fp32."""
    if isinstance(path_or_sd, dict):
        sd = _unwrap(path_or_sd, what)
    else:
        path = Path(path_or_sd).expanduser()
        if not path.exists():
            raise TuwenError(f"{what} {path}: no such file or folder")
        if path.is_dir():
            sd = _unwrap(load_weights(path), str(path))
        elif path.suffix == ".safetensors":
            sd = load_weights(path)
        elif is_torchscript(path):
            sd = read_torchscript_state_dict(path)
        else:
            sd = _unwrap(load_torch_file(path), str(path))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- HF layouts

def _hf_vision_to_openai(sd: dict, prefix: str = "vision_model.") -> dict:
    """HF ``CLIPVisionTransformer`` keys → OpenAI ``visual.*`` keys (q/k/v concatenated into in_proj)."""
    out: dict[str, torch.Tensor] = {}
    g = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out["visual.class_embedding"] = g["embeddings.class_embedding"]
    out["visual.conv1.weight"] = g["embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = g["embeddings.position_embedding.weight"]
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        out[f"visual.{b}.weight"], out[f"visual.{b}.bias"] = g[f"{a}.weight"], g[f"{a}.bias"]
    layers = sorted({int(m.group(1)) for k in g if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        s, d = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[d + f"attn.in_proj_{kind}"] = torch.cat([g[s + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[d + f"attn.out_proj.{kind}"] = g[s + f"self_attn.out_proj.{kind}"]
            out[d + f"ln_1.{kind}"] = g[s + f"layer_norm1.{kind}"]
            out[d + f"ln_2.{kind}"] = g[s + f"layer_norm2.{kind}"]
            out[d + f"mlp.c_fc.{kind}"] = g[s + f"mlp.fc1.{kind}"]
            out[d + f"mlp.c_proj.{kind}"] = g[s + f"mlp.fc2.{kind}"]
    if "visual_projection.weight" in sd:
        out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    return out


def _from_hf(sd: dict) -> dict:
    """Rewrite HF CLIPModel / ChineseCLIPModel / CLIPVisionModel keys to the OpenAI/cn_clip layout (no-op otherwise)."""
    if not any(k.startswith("vision_model.") for k in sd):
        return sd
    try:
        out = _hf_vision_to_openai(sd)
    except KeyError as e:
        raise TuwenError(f"HF vision checkpoint without the tensor {e}; is it a CLIP vision tower?") from None
    if any(k.startswith("text_model.encoder.layer.") for k in sd):      # ChineseCLIP's BERT text tower
        for k, v in sd.items():
            if k.startswith("text_model.") and ".pooler." not in k and not k.endswith("position_ids"):
                out["bert." + k[len("text_model."):]] = v
        if "text_projection.weight" in sd:
            out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out


# ----------------------------------------------------------------------------------------------- image tower

def is_resnet_state_dict(vis: dict) -> bool:
    """``visual.*`` tensors (prefix removed) of a ModifiedResNet (``RN50`` …) rather than a ViT."""
    return "attnpool.c_proj.weight" in vis or "layer1.0.conv1.weight" in vis


def openai_visual_state_dict(path_or_sd, allow_resnet: bool = False) -> dict[str, torch.Tensor]:
    """The image tower of an OpenAI / Chinese-CLIP / HF CLIP checkpoint, with the ``visual.`` prefix removed.

    A state dict of a bare ``VisionTransformer`` (``conv1.weight``, ``class_embedding``, …) or ``ModifiedResNet``
    (``layer1.0.conv1.weight``, ``attnpool.*``, …) is accepted as is; ResNet towers only with ``allow_resnet``.
    """
    what = str(path_or_sd) if not isinstance(path_or_sd, dict) else "state dict"
    sd = _from_hf(read_state_dict(path_or_sd, "vit_ckpt_path"))
    if any(k.startswith("visual.") for k in sd):
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    elif "conv1.weight" in sd and ("class_embedding" in sd or is_resnet_state_dict(sd)):
        vis = dict(sd)
    else:
        raise TuwenError(f"{what}: no CLIP image tower found (expected visual.* keys as in OpenAI's ViT-B-32.pt; "
                         f"first keys: {', '.join(list(sd)[:5])})")
    if is_resnet_state_dict(vis):
        if not allow_resnet:
            raise TuwenError(f"{what}: a ResNet image tower (RN50…); only CLIP (--app_name=clip, "
                             f"vit_ckpt_path=) takes it — here a ViT is needed (ViT-B-32, ViT-B-16, ViT-L-14, …)")
        for key in ("attnpool.c_proj.weight", "attnpool.positional_embedding", "layer1.0.conv1.weight"):
            if key not in vis:
                raise TuwenError(f"{what}: the visual.* tensors look like a ResNet tower but lack {key}")
        return vis
    if "conv1.weight" not in vis or "class_embedding" not in vis:
        raise TuwenError(f"{what}: the visual.* tensors are not a CLIP ViT (no conv1.weight / class_embedding)")
    return vis


def vit_config_from_state_dict(sd: dict, image_size: int | None = None, heads: int | None = None,
                               quick_gelu: bool = True) -> ViTConfig:
    """Infer a ``ViTConfig`` from ``visual.*`` tensors (prefix removed), as OpenAI's ``build_model`` does."""
    try:
        width, _, patch, _ = sd["conv1.weight"].shape
        n_pos = sd["positional_embedding"].shape[0]
        output_dim = sd["proj"].shape[1]
        hidden = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise TuwenError(f"image tower state dict lacks {e}") from None
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid + 1 != n_pos:
        raise TuwenError(f"positional_embedding has {n_pos} rows, not 1 + a square grid")
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    if heads is None:
        heads = 16 if width == 1280 else max(1, width // 64)
    size = image_size or grid * patch
    if size % patch:
        raise TuwenError(f"image_size {size} is not a multiple of the checkpoint's patch size {patch}")
    return ViTConfig(image_size=size, patch_size=int(patch), width=int(width), layers=layers, heads=int(heads),
                     output_dim=int(output_dim), quick_gelu=quick_gelu, mlp_ratio=hidden / width)


def resnet_config_from_state_dict(sd: dict, image_size: int | None = None, heads: int | None = None) -> ResNetConfig:
    """Infer a ``ResNetConfig`` from ModifiedResNet ``visual.*`` tensors (prefix removed), as OpenAI's
    ``build_model`` does: block counts from the ``layer{1..4}.{i}`` keys, width from ``layer1.0.conv1``, the image
    size from the attention-pooling grid, heads = 32·width // 64."""
    try:
        width = int(sd["layer1.0.conv1.weight"].shape[0])
        n_pos, embed = sd["attnpool.positional_embedding"].shape
        output_dim = int(sd["attnpool.c_proj.weight"].shape[0])
    except KeyError as e:
        raise TuwenError(f"ResNet image tower state dict lacks {e}") from None
    layers = [len({int(m.group(1)) for k in sd if (m := re.match(rf"layer{b}\.(\d+)\.", k))}) for b in (1, 2, 3, 4)]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid + 1 != n_pos:
        raise TuwenError(f"attnpool.positional_embedding has {n_pos} rows, not 1 + a square grid")
    if embed != 32 * width:
        raise TuwenError(f"attnpool works on {embed} channels but layer1 is {width} wide (expected 32·{width})")
    return ResNetConfig(image_size=image_size or grid * 32, layers=layers, width=width,
                        heads=int(heads or max(1, width * 32 // 64)), output_dim=output_dim)


def visual_config_from_state_dict(sd: dict, image_size: int | None = None,
                                  heads: int | None = None) -> ViTConfig | ResNetConfig:
    """``ViTConfig`` or ``ResNetConfig`` for ``visual.*`` tensors (prefix removed), whichever tower they are."""
    if is_resnet_state_dict(sd):
        return resnet_config_from_state_dict(sd, image_size, heads)
    return vit_config_from_state_dict(sd, image_size, heads)


def load_visual_into(tower: VisionTransformer | ModifiedResNet, sd: dict, source: str = "checkpoint") -> None:
    """Load ``visual.*`` tensors (prefix removed) into a ViT or ResNet tower; the positional grid is resized if
    needed. BatchNorm step counters (``num_batches_tracked``) absent from a file are taken as 0."""
    sd = dict(sd)
    key = "attnpool.positional_embedding" if isinstance(tower, ModifiedResNet) else "positional_embedding"
    pos = sd.get(key)
    if pos is not None and pos.shape[0] != tower.get_parameter(key).shape[0]:
        sd[key] = resize_pos_embed(pos, tower.config.grid)
    if isinstance(tower, ModifiedResNet):
        sd = fill_bn_counters(tower, sd)
    dtype = tower.conv1.weight.dtype
    load_state_dict_checked(tower, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()},
                            str(source))


def load_openai_vit(path_or_sd, image_size: int | None = None, heads: int | None = None) -> VisionTransformer:
    """OpenAI CLIP ``.pt`` (TorchScript or state dict), Chinese-CLIP or HF CLIP weights → ``VisionTransformer``."""
    sd = openai_visual_state_dict(path_or_sd)
    vit = VisionTransformer(vit_config_from_state_dict(sd, image_size, heads))
    load_visual_into(vit, sd, str(path_or_sd) if not isinstance(path_or_sd, dict) else "state dict")
    return vit.eval()


def load_openai_resnet(path_or_sd, image_size: int | None = None, heads: int | None = None) -> ModifiedResNet:
    """OpenAI CLIP ``RN50.pt`` / ``RN101.pt`` / ``RN50x4.pt`` … (TorchScript archive, read without running it, or a
    state dict), or Chinese-CLIP's ``RN50`` → ``ModifiedResNet`` (eval mode)."""
    sd = openai_visual_state_dict(path_or_sd, allow_resnet=True)
    if not is_resnet_state_dict(sd):
        raise TuwenError(f"{path_or_sd if not isinstance(path_or_sd, dict) else 'state dict'}: a ViT image tower, "
                         f"not a ResNet (RN50…); use load_openai_vit")
    rn = ModifiedResNet(resnet_config_from_state_dict(sd, image_size, heads))
    load_visual_into(rn, sd, str(path_or_sd) if not isinstance(path_or_sd, dict) else "state dict")
    return rn.eval()


# ----------------------------------------------------------------------------------------------- text tower

_BERT_DROP = (".pooler.", "position_ids")


def _bert_keys(sd: dict, source: str = "bert_ckpt_path") -> dict:
    """``bert.``/``roberta.``/``text_model.`` prefixed or bare BERT keys → TextEncoder keys (heads dropped)."""
    for prefix in ("bert.", "roberta.", "text_model.", ""):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix + "embeddings.word_embeddings")
               or k.startswith(prefix + "encoder.layer.") or k.startswith(prefix + "embeddings.")}
        if "embeddings.word_embeddings.weight" in sub:
            break
    else:
        raise TuwenError(f"{source}: no BERT text tower found (expected bert.embeddings.word_embeddings.weight; "
                         f"first keys: {', '.join(list(sd)[:3]) or 'none'})")
    out = {}
    for k, v in sub.items():
        if any(d in "." + k for d in _BERT_DROP):
            continue
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out


def text_config_from_state_dict(sd: dict, hf_config: dict | None = None) -> TextEncoderConfig:
    """Infer a ``TextEncoderConfig`` from TextEncoder keys (an HF ``config.json`` dict refines heads/act/eps)."""
    try:
        vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
        max_pos = sd["embeddings.position_embeddings.weight"].shape[0]
        types = sd["embeddings.token_type_embeddings.weight"].shape[0]
        inter = sd["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise TuwenError(f"text tower state dict lacks {e}") from None
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    hc = hf_config or {}
    heads = int(hc.get("num_attention_heads") or max(1, hidden // 64))
    act = hc.get("hidden_act", "gelu")
    return TextEncoderConfig(vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=int(inter),
                             max_position_embeddings=int(max_pos), type_vocab_size=int(types),
                             hidden_act=act if act in ("gelu", "gelu_new", "relu") else "gelu",
                             layer_norm_eps=float(hc.get("layer_norm_eps", 1e-12)),
                             hidden_dropout_prob=float(hc.get("hidden_dropout_prob", 0.1)),
                             attention_probs_dropout_prob=float(hc.get("attention_probs_dropout_prob", 0.1)),
                             pad_token_id=int(hc.get("pad_token_id", 0) or 0))


def bert_state_dict(path_or_sd) -> tuple[dict[str, torch.Tensor], TextEncoderConfig]:
    """HF BERT weights (file, folder with config.json, or dict) → (TextEncoder state dict, its config)."""
    hf = None
    if not isinstance(path_or_sd, dict):
        p = Path(path_or_sd).expanduser()
        cfg = (p if p.is_dir() else p.parent) / "config.json"
        if cfg.exists():
            try:
                hf = json.loads(cfg.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TuwenError(f"{cfg}: not valid JSON ({e})") from None
            if not isinstance(hf, dict) or "hidden_size" not in hf:
                hf = None   # not an HF BERT config (e.g. a tuwen folder)
    where = "bert_ckpt_path" if isinstance(path_or_sd, dict) else str(path_or_sd)
    sd = _bert_keys(_from_hf(read_state_dict(path_or_sd, "bert_ckpt_path")), where)
    return sd, text_config_from_state_dict(sd, hf)


def load_bert_into(encoder: TextEncoder, sd: dict, source: str = "checkpoint") -> None:
    """Load TextEncoder-keyed tensors into ``encoder`` (a larger vocabulary than the tokenizer's is fine)."""
    dtype = encoder.embeddings.word_embeddings.weight.dtype
    load_state_dict_checked(encoder, {k: v.to(dtype) for k, v in sd.items()}, str(source))


# ----------------------------------------------------------------------------------------------- whole CLIP

def chinese_clip_state_dict(path_or_sd, tokenizer, image_size: int | None = None, context_length: int = 52,
                            vision_heads: int | None = None, text_heads: int | None = None):
    """A Chinese-CLIP (or HF ChineseCLIPModel) checkpoint → (CLIP state dict, CLIPConfig fields).

    The fields are ``{"embed_dim", "vision": ViTConfig | ResNetConfig, "text": TextEncoderConfig}``
    (``tuwen.models.clip`` builds the model from them). ``logit_scale`` is in the state dict only when the
    checkpoint has it. Head counts are not stored in the weights: by default width // 64 (16 for width 1280; a
    ResNet tower 32·width // 64), as in all released Chinese-CLIP models; ``vision_heads`` / ``text_heads``
    override."""
    what = str(path_or_sd) if not isinstance(path_or_sd, dict) else "state dict"
    sd = _from_hf(read_state_dict(path_or_sd, "cnclip_ckpt_path"))
    if "text_projection" not in sd or not any(k.startswith("bert.") for k in sd):
        raise TuwenError(f"{what}: not a Chinese-CLIP checkpoint (expected visual.*, bert.*, text_projection, "
                         f"logit_scale; first keys: {', '.join(list(sd)[:5])})")
    vis = openai_visual_state_dict({k: x for k, x in sd.items() if k.startswith("visual.")}, allow_resnet=True)
    v = visual_config_from_state_dict(vis, image_size, vision_heads)
    bert = _bert_keys({k: x for k, x in sd.items() if k.startswith("bert.")})
    t = text_config_from_state_dict(bert, {"num_attention_heads": text_heads} if text_heads else None)
    embed = sd["text_projection"].shape[1]
    if embed != v.output_dim:
        raise TuwenError(f"{what}: text_projection maps to {embed} dims but the image tower to {v.output_dim}")
    if tokenizer.vocab_size > t.vocab_size:
        raise TuwenError(f"{what}: the text tower has {t.vocab_size} word embeddings but the vocabulary "
                         f"{tokenizer.vocab_size} ids; pass Chinese-CLIP's vocab.txt (21128 lines)")
    if context_length > t.max_position_embeddings:
        raise TuwenError(f"context_length {context_length} exceeds the {t.max_position_embeddings} text positions")
    out = {f"visual.{k}": x for k, x in vis.items()}
    out.update({f"bert.{k}": x for k, x in bert.items()})
    out["text_projection"] = sd["text_projection"]
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"].reshape(())
    return out, {"embed_dim": int(embed), "vision": v, "text": t.replace(pad_token_id=tokenizer.pad_id)}
