"""Vision Transformer image tower with OpenAI CLIP's ``visual`` parameter names (Radford et al. 2021).

Used by CLIP (``tuwen.models.clip``) and as the image prefix of the captioner. The state-dict names and the forward
pass are exactly those of OpenAI's ``model.visual`` (``VisionTransformer`` in openai/CLIP ``clip/model.py``, the
same module in Chinese-CLIP), so the ``visual.*`` tensors of an OpenAI ``ViT-B-32.pt`` / ``ViT-L-14.pt`` load key
for key (see ``tuwen.convert.clip.load_openai_vit``)::

    conv1.weight                          [width, 3, patch, patch]   (no bias)
    class_embedding                       [width]
    positional_embedding                  [1 + grid², width]
    ln_pre.{weight,bias}
    transformer.resblocks.{i}.ln_1.{weight,bias}
    transformer.resblocks.{i}.attn.in_proj_weight   [3·width, width]  (q, k, v stacked, like nn.MultiheadAttention)
    transformer.resblocks.{i}.attn.in_proj_bias     [3·width]
    transformer.resblocks.{i}.attn.out_proj.{weight,bias}
    transformer.resblocks.{i}.ln_2.{weight,bias}
    transformer.resblocks.{i}.mlp.c_fc.{weight,bias}     [4·width, width]
    transformer.resblocks.{i}.mlp.c_proj.{weight,bias}   [width, 4·width]
    ln_post.{weight,bias}
    proj                                  [width, output_dim]

Pre-LN residual blocks with QuickGELU (``x·σ(1.702x)``, what OpenAI's weights were trained with; ``quick_gelu=False``
gives exact GELU for models trained that way). Attention runs batch-first through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA), numerically the same as OpenAI's
``nn.MultiheadAttention`` in sequence-first layout.

    vit = VisionTransformer(ViTConfig.preset("ViT-B-32"))
    x = preprocess(pil_images, 224)            # [B, 3, 224, 224], CLIP-normalised
    emb = vit(x)                               # [B, 512]   ln_post(CLS) @ proj (not L2-normalised)
    tok = vit.forward_tokens(x)                # [B, 1 + 49, 768]  every token after ln_post (index 0 = CLS)

Inputs whose size differs from ``config.image_size`` work too: the positional embedding grid is resized bicubically
(like Chinese-CLIP's ``resize_pos_embed``) at run time; ``resize_pos_embed`` does the same for a state dict.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..data.images import CLIP_MEAN, CLIP_STD, to_uint8_batch  # CLIP_MEAN/CLIP_STD: OpenAI CLIP's normalisation
from ..errors import TuwenError

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP image towers (heads = width // 64)
    "ViT-B-32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512),
    "ViT-B-16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512),
    "ViT-L-14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
    "ViT-L-14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
    # Chinese-CLIP's / open_clip's ViT-H-14 (head width 80 → 16 heads)
    "ViT-H-14": dict(image_size=224, patch_size=14, width=1280, layers=32, heads=16, output_dim=1024),
    # small towers for tests, the synthetic data set and the demo
    "tiny": dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=64),        # ≈0.1 M params
    "small": dict(image_size=64, patch_size=8, width=192, layers=4, heads=3, output_dim=128),     # ≈1.8 M params
    "base-64": dict(image_size=64, patch_size=8, width=384, layers=6, heads=6, output_dim=256),   # ≈10.7 M params
}


@dataclasses.dataclass
class ViTConfig(BaseConfig):
    """Architecture of the image tower. ``grid = image_size // patch_size`` patches a side."""

    model_type: ClassVar[str] = "vit"

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: int = 512
    quick_gelu: bool = True        # OpenAI / Chinese-CLIP weights: True
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5

    def __post_init__(self):
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> "ViTConfig":
        if name not in PRESETS:
            raise TuwenError(f"unknown ViT preset {name!r}; choose one of {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"ViT config: {msg}")
        for name in ("image_size", "patch_size", "width", "layers", "heads", "output_dim"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            bad(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            bad(f"width {self.width} is not divisible by heads {self.heads}")


# ----------------------------------------------------------------------------------------------- blocks

class QuickGELU(nn.Module):
    """OpenAI's GELU approximation ``x · sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, batch-first, via SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, h, T, d]
        mask = None
        if key_padding_mask is not None:  # True = padding (nn.MultiheadAttention's convention)
            mask = ~key_padding_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.quick_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


def resize_pos_embed(pos: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """[1 + g², C] positional embedding → [1 + gh·gw, C] (class token kept, patch grid resized bicubically)."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    n_old = pos.shape[0] - 1
    g_old = int(round(math.sqrt(n_old)))
    if g_old * g_old != n_old:
        raise TuwenError(f"positional embedding with {n_old} patch positions is not a square grid")
    if (g_old, g_old) == (gh, gw):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    dtype = patch_pos.dtype
    patch_pos = patch_pos.float().reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


# ----------------------------------------------------------------------------------------------- the tower

class VisionTransformer(nn.Module):
    """OpenAI CLIP's ``visual`` ViT: patch conv → [CLS] + patches + positions → ln_pre → blocks → ln_post → proj."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        w = config.width
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=config.ln_eps)
        self.transformer = Transformer(config)
        self.ln_post = nn.LayerNorm(w, eps=config.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(w, config.output_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # OpenAI's CLIP.initialize_parameters for the transformer blocks
        w, L = self.config.width, self.config.layers
        proj_std = (w ** -0.5) * ((2 * L) ** -0.5)
        attn_std = w ** -0.5
        fc_std = (2 * w) ** -0.5
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    @property
    def width(self) -> int:
        return self.config.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, H, W] → every token after the transformer with ``ln_post`` applied:
        [B, 1 + N, width]; index 0 is the class token (``forward`` = ``forward_tokens(x)[:, 0] @ proj``), indices
        1… the N = (H/patch)·(W/patch) patch tokens in row-major order. Not projected, not normalised to unit length.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise TuwenError(f"VisionTransformer: expected images [B, 3, H, W], got {tuple(x.shape)}")
        p = self.config.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise TuwenError(f"VisionTransformer: image size {tuple(x.shape[-2:])} is not a multiple of the patch "
                             f"size {p}")
        x = x.to(self.conv1.weight.dtype)
        x = self.conv1(x)                                   # [B, width, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                    # [B, gh·gw, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)                      # [B, 1 + gh·gw, width]
        pos = self.positional_embedding
        if pos.shape[0] != x.shape[1]:
            pos = resize_pos_embed(pos, (gh, gw))
        x = x + pos.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x)
        return self.ln_post(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, H, W] → image embeddings [B, output_dim] (ln_post(CLS) @ proj)."""
        return self.forward_tokens(x)[:, 0] @ self.proj

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------- preprocessing

def normalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
              value_range: str = "0,1") -> torch.Tensor:
    """Float NCHW images → CLIP-normalised. ``value_range``: "0,1" or "-1,1" (tuwen's generator/VQGAN range)."""
    if value_range == "-1,1":
        x = (x + 1.0) * 0.5
    elif value_range != "0,1":
        raise ValueError(f"value_range must be '0,1' or '-1,1', got {value_range!r}")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def uint8_to_input(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 [B, H, W, 3] tensor (any device) → float32 CLIP-normalised [B, 3, H, W] on the same device."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return normalize(x, mean, std)


def preprocess(images, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               device: torch.device | str | None = None, resize: str = "center_crop") -> torch.Tensor:
    """PIL image(s) / uint8 HWC array(s) → float32 [B, 3, size, size] CLIP-normalised tensor.

    Same as OpenAI's ``Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize(CLIP_MEAN, CLIP_STD)``
    (Pillow's antialiased bicubic resize); ``resize="squash"`` for Chinese-CLIP's ``Resize((size, size))``.
    """
    arr = torch.from_numpy(to_uint8_batch(images, size, resize))
    if device is not None:
        arr = arr.to(device)
    return uint8_to_input(arr, mean, std)
