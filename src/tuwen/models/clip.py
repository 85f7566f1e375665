"""CLIP: a contrastive image–text model (ViT or ResNet image tower + BERT text tower), model_type ``clip``.

The layout is Chinese-CLIP's (``cn_clip``), so its checkpoints load::

    visual.*            VisionTransformer (OpenAI CLIP names), output = ln_post(CLS) @ visual.proj  [B, embed_dim]
                        or ModifiedResNet (``RN50`` …, ``tuwen.models.resnet``), output = attnpool(features)
    bert.*              TextEncoder (HF BERT names), output = hidden[CLS] @ text_projection          [B, embed_dim]
    text_projection     [text hidden, embed_dim]
    logit_scale         scalar, init ln(1/0.07), clamped to [0, ln 100] after every optimizer step (open_clip)

The image tower is chosen by ``config.vision``: a ``ViTConfig`` or a ``ResNetConfig``; in ``config.json`` the
``vision`` object's own ``model_type`` (``vit`` | ``resnet``) says which (folders written before ResNet towers
existed have ``vit`` there and load as they did). Presets: ``CLIP.build(tok, vision="RN50")`` or any ViT preset.

Both embeddings are L2-normalised; ``similarity`` is their cosine, ``logit_scale.exp()·cos`` the logits. The folder
written by ``save_pretrained`` holds ``config.json``, ``model.safetensors`` and the tokenizer (``vocab.txt`` +
``tokenizer_config.json``). Texts are tokenised as ``[CLS] text [SEP]`` padded with [PAD] to ``context_length``
(52, like Chinese-CLIP).

    clip = CLIP.from_pretrained("runs/clip")
    sim = clip.similarity(pil_images, ["左上角有一个红色的圆形", "一只狗"])     # [n_images, n_texts] cosines
    clip = load_chinese_clip("/models/clip_cn_vit-b-16.pt", "/models/vocab.txt")    # a Chinese-CLIP checkpoint
    convert_chinese_clip("/models/clip_cn_vit-b-16.pt", "/models/vocab.txt", "models/cnclip-b16")  # tuwen folder

Training (loss, EasyNLP commands): ``tuwen.training.tasks.clip`` and ``tuwen.cli.easynlp.clip``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..convert import clip as conv
from ..data.images import to_uint8_batch
from ..errors import TuwenError
from ..hub import PretrainedModel, load_state_dict_checked
from ..text.tokenizer import TextTokenizer
from .resnet import ModifiedResNet, ResNetConfig, fill_bn_counters, is_resnet_preset
from .resnet import PRESETS as RESNET_PRESETS
from .text_encoder import TextEncoder, TextEncoderConfig
from .vit import CLIP_MEAN, CLIP_STD, ViTConfig, VisionTransformer, resize_pos_embed, uint8_to_input
from .vit import PRESETS as VIT_PRESETS

LOGIT_SCALE_INIT = math.log(1 / 0.07)   # 2.6593
LOGIT_SCALE_MAX = math.log(100.0)       # 4.6052


# ----------------------------------------------------------------------------------------------- config

VisionConfig = ViTConfig | ResNetConfig
VISION_CONFIGS: dict[str, type] = {"vit": ViTConfig, "resnet": ResNetConfig}   # config.json vision.model_type


def vision_preset(name: str, **overrides) -> VisionConfig:
    """An image-tower preset ``RN50``, ``RN101``, ``RN50x4`` … (ResNet) or ``ViT-B-32``, ``tiny`` … (ViT)."""
    if is_resnet_preset(name):
        return ResNetConfig.preset(name, **overrides)
    if name not in VIT_PRESETS:
        names = ", ".join(list(VIT_PRESETS) + list(RESNET_PRESETS))
        raise TuwenError(f"unknown image tower {name!r}; choose one of {names}")
    return ViTConfig.preset(name, **overrides)


def vision_config_from_dict(d: dict, source: str) -> VisionConfig:
    """The ``vision`` object of a CLIP config.json → ViTConfig / ResNetConfig by its ``model_type`` (default vit)."""
    mt = d.get("model_type", "vit")
    if mt not in VISION_CONFIGS:
        raise TuwenError(f"{source}: vision.model_type is {mt!r}; expected one of {', '.join(VISION_CONFIGS)}")
    return VISION_CONFIGS[mt].from_dict(d, source=f"{source}: vision")


def build_image_tower(config: VisionConfig) -> nn.Module:
    """``VisionTransformer`` for a ViTConfig, ``ModifiedResNet`` for a ResNetConfig."""
    return ModifiedResNet(config) if isinstance(config, ResNetConfig) else VisionTransformer(config)


@dataclasses.dataclass
class CLIPConfig(BaseConfig):
    """A CLIP model: image tower, text tower, shared embedding size (``vision.output_dim == embed_dim``)."""

    model_type: ClassVar[str] = "clip"

    embed_dim: int = 64
    vision: ViTConfig | ResNetConfig = dataclasses.field(default_factory=lambda: ViTConfig.preset("tiny"))
    text: TextEncoderConfig = dataclasses.field(default_factory=lambda: TextEncoderConfig.preset("tiny"))
    context_length: int = 52
    logit_scale_init: float = LOGIT_SCALE_INIT
    logit_scale_max: float = LOGIT_SCALE_MAX
    image_mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))
    image_resize: str = "center_crop"    # how PIL inputs are sized: center_crop (OpenAI) | squash (Chinese-CLIP)

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", **overrides):
        d = {**d, **overrides}
        if isinstance(d.get("vision"), dict):
            d["vision"] = vision_config_from_dict(d["vision"], source)
        return super().from_dict(d, source)

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"CLIP config: {msg}")
        if not isinstance(self.vision, (ViTConfig, ResNetConfig)):
            bad(f"vision must be a ViT or ResNet config, got {type(self.vision).__name__}")
        if self.vision.output_dim != self.embed_dim:
            bad(f"vision.output_dim {self.vision.output_dim} must equal embed_dim {self.embed_dim}")
        if not 3 <= self.context_length <= self.text.max_position_embeddings:
            bad(f"context_length {self.context_length} must be in [3, text.max_position_embeddings="
                f"{self.text.max_position_embeddings}]")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            bad("image_mean / image_std must be 3 numbers (std > 0)")
        if self.image_resize not in ("center_crop", "squash"):
            bad(f"image_resize must be center_crop or squash, got {self.image_resize!r}")

    @property
    def image_size(self) -> int:
        return self.vision.image_size


# ----------------------------------------------------------------------------------------------- model

class CLIP(PretrainedModel):
    """Contrastive image–text model; see the module docstring for the layout."""

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig, tokenizer: TextTokenizer | None = None):
        super().__init__(config)
        self.visual = build_image_tower(config.vision)
        self.bert = TextEncoder(config.text)
        self.text_projection = nn.Parameter(torch.empty(config.text.hidden_size, config.embed_dim))
        nn.init.normal_(self.text_projection, std=config.text.hidden_size ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    @classmethod
    def build(cls, tokenizer: TextTokenizer, vision: str | VisionConfig = "tiny",
              text: str | TextEncoderConfig = "tiny", embed_dim: int | None = None, context_length: int = 52,
              image_size: int | None = None, **text_overrides) -> "CLIP":
        """A randomly initialised CLIP from presets (``vision_preset`` / ``TextEncoderConfig.preset`` names)."""
        v = vision_preset(vision, image_size=image_size) if isinstance(vision, str) else vision
        if embed_dim is not None:
            v = v.replace(output_dim=embed_dim)
        if isinstance(text, str):
            t = TextEncoderConfig.preset(text, **text_overrides).replace(vocab_size=tokenizer.vocab_size)
        else:
            t = text.replace(vocab_size=max(text.vocab_size, tokenizer.vocab_size))
        t = t.replace(pad_token_id=tokenizer.pad_id, max_position_embeddings=max(t.max_position_embeddings,
                                                                                 context_length))
        cfg = CLIPConfig(embed_dim=v.output_dim, vision=v, text=t, context_length=context_length)
        return cls(cfg, tokenizer)

    # ---------------------------------------------------------------- tokenizer
    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        if tokenizer.vocab_size > self.config.text.vocab_size:
            raise TuwenError(f"CLIP: the tokenizer has {tokenizer.vocab_size} ids but the text tower only "
                             f"{self.config.text.vocab_size} embeddings; use the vocab.txt the model was trained with")
        if tokenizer.pad_id != self.config.text.pad_token_id:
            raise TuwenError(f"CLIP: the tokenizer's [PAD] id is {tokenizer.pad_id}, the model's "
                             f"{self.config.text.pad_token_id}")
        if tokenizer.cls_id is None or tokenizer.sep_id is None:
            raise TuwenError("CLIP: the vocabulary needs [CLS] and [SEP]")
        self.tokenizer = tokenizer

    def _save_extra(self, path: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    def _load_extra(self, path: Path) -> None:
        if (path / "vocab.txt").exists():
            self.set_tokenizer(TextTokenizer.from_pretrained(path))

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts → LongTensor [B, context_length]: ``[CLS] tokens [SEP] [PAD]…`` (long texts truncated)."""
        if self.tokenizer is None:
            raise TuwenError("CLIP: no tokenizer (the model folder has no vocab.txt); pass token ids instead")
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer.encode_batch(list(texts), max_length=self.config.context_length,
                                          add_special_tokens=True, pad=True)
        return torch.tensor(ids, dtype=torch.long)

    # ---------------------------------------------------------------- encoders
    def pixel_values(self, images) -> torch.Tensor:
        """PIL images / uint8 arrays [H, W, 3] / uint8 tensor [B, H, W, 3] / CLIP-normalised float [B, 3, H, W]
        → CLIP-normalised float32 [B, 3, S, S] on the model's device (S = config.image_size for PIL/arrays)."""
        dev = self.device
        if torch.is_tensor(images):
            if images.dtype == torch.uint8:
                x = images if images.dim() == 4 else images[None]
                return uint8_to_input(x.to(dev), self.config.image_mean, self.config.image_std)
            return (images if images.dim() == 4 else images[None]).to(dev, torch.float32)
        arr = torch.from_numpy(to_uint8_batch(images, self.config.image_size, self.config.image_resize)).to(dev)
        return uint8_to_input(arr, self.config.image_mean, self.config.image_std)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images → projected (not normalised) embeddings [B, embed_dim]."""
        return self.visual(pixel_values)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] → projected (not normalised) embeddings [B, embed_dim]."""
        return self.bert.pooled(input_ids) @ self.text_projection

    def encode_image(self, images, normalize: bool = True, batch_size: int | None = None) -> torch.Tensor:
        """Images (see ``pixel_values``) → float32 embeddings [B, embed_dim], L2-normalised by default."""
        if isinstance(images, (list, tuple)) and batch_size and len(images) > batch_size:
            return torch.cat([self.encode_image(images[i:i + batch_size], normalize)
                              for i in range(0, len(images), batch_size)])
        f = self.image_features(self.pixel_values(images)).float()
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, texts, normalize: bool = True, batch_size: int | None = None) -> torch.Tensor:
        """Texts (str / list of str) or token ids [B, T] → float32 embeddings [B, embed_dim], L2-normalised."""
        if torch.is_tensor(texts):
            ids = texts if texts.dim() == 2 else texts[None]
        else:
            if isinstance(texts, str):
                texts = [texts]
            if batch_size and len(texts) > batch_size:
                return torch.cat([self.encode_text(texts[i:i + batch_size], normalize)
                                  for i in range(0, len(texts), batch_size)])
            ids = self.tokenize(texts)
        f = self.text_features(ids.to(self.device)).float()
        return F.normalize(f, dim=-1) if normalize else f

    @torch.no_grad()
    def similarity(self, images, texts) -> torch.Tensor:
        """Cosine similarity [n_images, n_texts] (float32, in [-1, 1])."""
        return self.encode_image(images) @ self.encode_text(texts).T

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        """(image embeddings, text embeddings, logit scale) — embeddings L2-normalised float32, scale = exp()."""
        img = F.normalize(self.image_features(pixel_values).float(), dim=-1)
        txt = F.normalize(self.text_features(input_ids).float(), dim=-1)
        return img, txt, self.logit_scale.float().exp()

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.config.logit_scale_max)

    def load_converted(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a CLIP state dict in this layout (``visual.*``, ``bert.*``, ``text_projection``, ``logit_scale``)
        read from a foreign checkpoint; the image tower's positional grid is resized when it differs."""
        sd = dict(sd)
        key = "attnpool.positional_embedding" if isinstance(self.visual, ModifiedResNet) else "positional_embedding"
        pos, own = sd.get(f"visual.{key}"), self.visual.get_parameter(key)
        if pos is not None and pos.shape[0] != own.shape[0]:
            sd[f"visual.{key}"] = resize_pos_embed(pos, self.visual.config.grid)
        if isinstance(self.visual, ModifiedResNet):
            sd = fill_bn_counters(self, sd)
        dtype = self.text_projection.dtype
        load_state_dict_checked(self, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()},
                                str(source))


def trim_padding(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Token ids [B, T] → [B, T'] without the trailing columns that are [PAD] in every row."""
    if input_ids.numel():
        used = (input_ids != pad_id).any(0).nonzero()
        if len(used):
            return input_ids[:, : int(used.max()) + 1]
    return input_ids


# ----------------------------------------------------------------------------------------------- Chinese-CLIP

def chinese_clip_weights(path_or_sd, tokenizer: TextTokenizer, image_size: int | None = None,
                         context_length: int = 52, vision_heads: int | None = None,
                         text_heads: int | None = None) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """A Chinese-CLIP (or HF ChineseCLIPModel) checkpoint → (CLIP state dict, CLIPConfig); see
    ``tuwen.convert.clip.chinese_clip_state_dict``. The config sizes PIL inputs like Chinese-CLIP (``squash``)."""
    sd, fields = conv.chinese_clip_state_dict(path_or_sd, tokenizer, image_size, context_length, vision_heads,
                                              text_heads)
    cfg = CLIPConfig(**fields, context_length=context_length, image_resize="squash")
    if "logit_scale" not in sd:
        sd["logit_scale"] = torch.tensor(cfg.logit_scale_init)
    return sd, cfg


def load_chinese_clip(path_or_sd, vocab, image_size: int | None = None, context_length: int = 52,
                      vision_heads: int | None = None, text_heads: int | None = None) -> CLIP:
    """Chinese-CLIP checkpoint + its ``vocab.txt`` (path, folder or TextTokenizer) → ``CLIP`` (eval mode)."""
    tok = vocab if isinstance(vocab, TextTokenizer) else TextTokenizer.from_pretrained(vocab)
    sd, cfg = chinese_clip_weights(path_or_sd, tok, image_size, context_length, vision_heads, text_heads)
    model = CLIP(cfg, tok)
    model.load_converted(sd, str(path_or_sd) if not isinstance(path_or_sd, dict) else "state dict")
    return model.eval()


def convert_chinese_clip(src, vocab, out_dir, image_size: int | None = None, context_length: int = 52,
                         vision_heads: int | None = None, text_heads: int | None = None) -> Path:
    """Write a tuwen CLIP folder (config.json + model.safetensors + vocab.txt) from a Chinese-CLIP checkpoint."""
    return load_chinese_clip(src, vocab, image_size, context_length, vision_heads,
                             text_heads).save_pretrained(out_dir)


