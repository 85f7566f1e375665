"""ModifiedResNet image tower with OpenAI CLIP's ``visual`` parameter names (Radford et al. 2021, ``RN50`` …).

The CLIP image tower of OpenAI's ``RN50.pt`` / ``RN101.pt`` / ``RN50x4.pt`` …, open_clip's ``RN50`` and
Chinese-CLIP's ``RN50``: a ResNet-D-like network with three changes to torchvision's ResNet —

* a stem of **three** 3×3 convolutions (the first with stride 2) and an average pool instead of one 7×7 conv and a
  max pool;
* anti-aliased strided blocks: a stride-2 ``Bottleneck`` runs its 3×3 conv at stride 1 and then an ``AvgPool2d(2)``
  (its shortcut too: ``AvgPool2d`` → 1×1 conv → BN);
* the final pooling is **attention pooling**: one query (the mean of the feature map + a positional embedding)
  attends over all positions, and its output projection gives the embedding.

State-dict names (exactly ``model.visual`` of openai/CLIP ``clip/model.py``; ``w`` = width, ``E = 32·w``)::

    conv1.weight [w/2, 3, 3, 3]   bn1.*   conv2.weight [w/2, w/2, 3, 3]   bn2.*   conv3.weight [w, w/2, 3, 3]   bn3.*
    layer{1..4}.{i}.conv1.weight [p, in, 1, 1]  bn1.*  conv2.weight [p, p, 3, 3]  bn2.*  conv3.weight [4p, p, 1, 1]
                    bn3.*  downsample.0.weight [4p, in, 1, 1]  downsample.1.*        (p = w, 2w, 4w, 8w)
    attnpool.positional_embedding [1 + (S/32)², E]
    attnpool.{q,k,v}_proj.{weight,bias} [E, E]   attnpool.c_proj.{weight,bias} [output_dim, E]

(``bn*.*`` = weight, bias, running_mean, running_var, num_batches_tracked.) Attention pooling runs through
``F.scaled_dot_product_attention``, numerically the same as OpenAI's ``F.multi_head_attention_forward``.

    rn = ModifiedResNet(ResNetConfig.preset("RN50"))
    x = preprocess(pil_images, 224)            # [B, 3, 224, 224], CLIP-normalised (tuwen.models.vit.preprocess)
    emb = rn(x)                                # [B, 1024]   attention-pooled, projected (not L2-normalised)

Weights: ``tuwen.convert.clip.load_openai_resnet("RN50.pt")`` (read without running the TorchScript archive).
Inputs of another size than ``config.image_size`` (a multiple of 32) work: the positional grid is resized bicubically.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import TuwenError
from .vit import resize_pos_embed

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP's ResNet towers (heads = 32·width // 64, as in OpenAI's build_model)
    "RN50": dict(image_size=224, layers=[3, 4, 6, 3], width=64, heads=32, output_dim=1024),      # ≈38 M params
    "RN101": dict(image_size=224, layers=[3, 4, 23, 3], width=64, heads=32, output_dim=512),
    "RN50x4": dict(image_size=288, layers=[4, 6, 10, 6], width=80, heads=40, output_dim=640),
    "RN50x16": dict(image_size=384, layers=[6, 8, 18, 8], width=96, heads=48, output_dim=768),
    "RN50x64": dict(image_size=448, layers=[3, 15, 36, 10], width=128, heads=64, output_dim=1024),
    # a small tower for tests and the synthetic data set
    "rn-tiny": dict(image_size=64, layers=[1, 1, 1, 1], width=8, heads=4, output_dim=64),          # ≈0.3 M params
}
# open_clip spells some of them with a -quickgelu suffix (it changes the text tower only)
ALIASES = {f"{k}-quickgelu": k for k in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")}


def is_resnet_preset(name: str) -> bool:
    return name in PRESETS or name in ALIASES


@dataclasses.dataclass
class ResNetConfig(BaseConfig):
    """Architecture of the ResNet image tower. The feature map is ``image_size / 32`` a side, ``32·width`` deep."""

    model_type: ClassVar[str] = "resnet"

    image_size: int = 224
    layers: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 6, 3])   # Bottlenecks per stage
    width: int = 64                 # channels after the stem (stage i has width·2^i planes, 4× as many outputs)
    heads: int = 32                 # attention-pooling heads
    output_dim: int = 1024

    def __post_init__(self):
        self.layers = [int(n) for n in self.layers]
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> "ResNetConfig":
        name = ALIASES.get(name, name)
        if name not in PRESETS:
            raise TuwenError(f"unknown ResNet preset {name!r}; choose one of {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    @property
    def embed_dim(self) -> int:
        """Channels of the last feature map (what attention pooling attends over)."""
        return self.width * 32

    @property
    def grid(self) -> int:
        return self.image_size // 32

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"ResNet config: {msg}")
        for name in ("image_size", "width", "heads", "output_dim"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.image_size % 32:
            bad(f"image_size {self.image_size} is not a multiple of 32 (the tower downsamples 32×)")
        if len(self.layers) != 4 or min(self.layers) < 1:
            bad(f"layers must be 4 block counts ≥ 1, got {self.layers}")
        if self.width % 2:
            bad(f"width {self.width} must be even (the stem's first convs have width/2 channels)")
        if self.embed_dim % self.heads:
            bad(f"32·width = {self.embed_dim} is not divisible by heads {self.heads}")


# ----------------------------------------------------------------------------------------------- blocks

class Bottleneck(nn.Module):
    """1×1 → 3×3 → (avg-pool if strided) → 1×1 (×4 channels), BN + ReLU; shortcut avg-pool → 1×1 → BN."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # OpenAI names: downsample."-1" (AvgPool2d, no parameters), "0" (conv), "1" (BN)
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # [B, in, H, W] → [B, 4p, H/s, W/s]
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """One query (mean of the map + its position) attends over [mean; every position]; output projected."""

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)                        # [B, H·W, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1 + H·W, C]
        pos = self.positional_embedding
        if pos.shape[0] != x.shape[1]:
            pos = resize_pos_embed(pos, (H, W))
        x = x + pos.to(x.dtype)
        h, d = self.heads, C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, h, d).transpose(1, 2)       # [B, h, 1, d]
        k = self.k_proj(x).view(B, -1, h, d).transpose(1, 2)             # [B, h, 1 + H·W, d]
        v = self.v_proj(x).view(B, -1, h, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)                      # [B, h, 1, d]
        return self.c_proj(y.transpose(1, 2).reshape(B, C))              # [B, output_dim]


# ----------------------------------------------------------------------------------------------- the tower

class ModifiedResNet(nn.Module):
    """OpenAI CLIP's ``visual`` ResNet: 3-conv stem → avg-pool → 4 stages of Bottlenecks → attention pooling."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = w
        self.layer1 = self._make_layer(w, config.layers[0])
        self.layer2 = self._make_layer(w * 2, config.layers[1], stride=2)
        self.layer3 = self._make_layer(w * 4, config.layers[2], stride=2)
        self.layer4 = self._make_layer(w * 8, config.layers[3], stride=2)
        self.attnpool = AttentionPool2d(config.grid, config.embed_dim, config.heads, config.output_dim)
        self.grad_checkpointing = False
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # OpenAI's CLIP.initialize_parameters for a ResNet tower
        std = self.attnpool.c_proj.in_features ** -0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                nn.init.zeros_(blk.bn3.weight)   # each residual branch starts as the identity

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def stem(self, x: torch.Tensor) -> torch.Tensor:         # [B, 3, S, S] → [B, w, S/4, S/4]
        x = F.relu(self.bn1(self.conv1(x)))                 # [B, w/2, S/2, S/2]
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))                 # [B, w, S/2, S/2]
        return self.avgpool(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, H, W] → the last feature map [B, 32·width, H/32, W/32]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise TuwenError(f"ModifiedResNet: expected images [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise TuwenError(f"ModifiedResNet: image size {tuple(x.shape[-2:])} is not a multiple of 32")
        x = self.stem(x.to(self.conv1.weight.dtype))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):   # → S/4, S/8, S/16, S/32
            for blk in stage:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, H, W] → image embeddings [B, output_dim] (attention-pooled)."""
        return self.attnpool(self.forward_features(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def fill_bn_counters(module: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` (keys as in ``module.state_dict()``) plus a 0 for every BatchNorm ``num_batches_tracked`` the file
    left out (only counted, never used in eval or training with momentum) — for state dicts saved without them."""
    out = dict(sd)
    for k, buf in module.state_dict().items():
        if k.endswith(".num_batches_tracked") and k not in out and k[:-19] + "running_mean" in out:
            out[k] = torch.zeros_like(buf)
    return out
