"""VQGAN image tokenizer: taming-transformers' ``VQModel`` (Esser et al. 2021), re-implemented in plain torch.

Images (float NCHW in [-1, 1]) → ``Encoder`` → ``quant_conv`` → nearest codebook entry (``VectorQuantizer``) →
``post_quant_conv`` → ``Decoder``. The state-dict names are exactly taming's, so a taming ``.ckpt`` or EasyNLP's
``vqgan_f16_16384.bin`` loads key for key (see ``tuwen.convert.taming``).

    vq = VQGAN(VQGANConfig.preset("f16_16384"))    # 76,073,859 parameters, 343 tensors
    codes = vq.encode(images)                       # LongTensor [B, 16, 16] for 256×256 images
    x = vq.decode(codes)                            # float NCHW in [-1, 1]

Nothing is tied to 256 px / 16×16: the grid is ``resolution // 2**(len(ch_mult) - 1)`` on each side, and any image
whose sides are multiples of that factor can be encoded (attention sits at fixed *levels*, whatever the size).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..data.images import resize_crop, to_pil, to_rgb
from ..errors import TuwenError
from ..hub import PretrainedModel
from ..runtime import autocast

# ----------------------------------------------------------------------------------------------- config

PRESETS: dict[str, dict[str, Any]] = {
    # the published taming-transformers vqgan_imagenet_f16_16384 (EasyNLP's vqgan_f16_16384.bin): 256² → 16×16
    "f16_16384": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
                      embed_dim=256, n_embed=16384, resolution=256),
    # taming configs/imagenet_vqgan.yaml: same network, 1024 codes
    "f16_1024": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
                     embed_dim=256, n_embed=1024, resolution=256),
    # small models for tests and the demo. tiny: f8, 64 px → 8×8 (32 px → 4×4), ≈1.2 M parameters
    "tiny": dict(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=64,
                 embed_dim=32, n_embed=512, resolution=64),
    # small: f16, 128 px → 8×8, ≈13.7 M parameters
    "small": dict(ch=64, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[8], z_channels=128,
                  embed_dim=64, n_embed=1024, resolution=128),
}


@dataclasses.dataclass
class VQGANConfig(BaseConfig):
    """Architecture of a VQGAN; field names follow taming's ``ddconfig`` + ``embed_dim`` / ``n_embed``.

    ``legacy``: taming's ``VectorQuantizer2`` defaults to ``legacy=True``, which puts β on the *codebook* term
    (``‖z − sg[e]‖² + β‖sg[z] − e‖²``). tuwen trains with ``legacy=False``, the VQ-VAE paper's form with β on the
    commitment term (``‖sg[z] − e‖² + β‖z − sg[e]‖²``). Encoding and decoding do not depend on it.
    """

    model_type: ClassVar[str] = "vqgan"

    ch: int = 128
    ch_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = dataclasses.field(default_factory=lambda: [16])
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 16384
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    beta: float = 0.25
    legacy: bool = False
    l2_norm: bool = False     # LlamaGen/ViT-VQGAN: match l2-normalised latents to l2-normalised codes (cosine);
                              # not in taming (False loads taming weights unchanged); helps small low-dim codebooks
    norm_groups: int = 32     # GroupNorm groups (taming: 32, i.e. 4 channels a group at its 128-wide levels). At
                              # 32 channels, 32 groups normalise each channel on its own (instance norm), which
                              # erases the per-channel means and scales that carry an image's colours; the recipe
                              # gives small models 8. Not in the weights: a folder without the field loads as 32

    def __post_init__(self):
        self.ch_mult = [int(m) for m in self.ch_mult]
        self.attn_resolutions = [int(r) for r in self.attn_resolutions]
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> "VQGANConfig":
        if name not in PRESETS:
            raise TuwenError(f"unknown VQGAN preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def level_resolutions(self) -> list[int]:
        """Feature-map side at each level for an input of ``resolution`` px (attention goes where it is listed)."""
        return [self.resolution // 2 ** i for i in range(self.num_levels)]

    def grid_size(self, resolution: int | Sequence[int] | None = None) -> tuple[int, int]:
        """Code grid (h, w) for square ``resolution`` px images or an (H, W) pair; default: the config resolution."""
        if resolution is None:
            resolution = self.resolution
        hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        f = self.downsample_factor
        if len(hw) != 2 or any(int(s) <= 0 or int(s) % f for s in hw):
            raise TuwenError(f"image size {hw}: both sides must be positive multiples of {f} for this VQGAN "
                             f"(ch_mult has {self.num_levels} levels → f{f})")
        return int(hw[0]) // f, int(hw[1]) // f

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"VQGAN config: {msg}")

        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            bad(f"ch_mult {self.ch_mult} must be a non-empty list of positive integers")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        if self.norm_groups < 1:
            bad(f"norm_groups {self.norm_groups} must be ≥ 1")
        if self.ch < 1 or any(w % self.norm_groups for w in widths):
            bad(f"ch={self.ch} × ch_mult {self.ch_mult} gives widths {sorted(set(widths))}; every width must be a "
                f"multiple of norm_groups={self.norm_groups} (GroupNorm)")
        if self.num_res_blocks < 1:
            bad("num_res_blocks must be ≥ 1")
        if self.resolution < 1 or self.resolution % self.downsample_factor:
            bad(f"resolution {self.resolution} must be a multiple of {self.downsample_factor} "
                f"(2 ** (len(ch_mult) - 1))")
        levels = self.level_resolutions()
        for r in self.attn_resolutions:
            if r not in levels:
                bad(f"attn_resolutions entry {r} is not a feature-map size of this network "
                    f"({', '.join(map(str, levels))} at resolution {self.resolution})")
        if min(self.z_channels, self.embed_dim, self.n_embed, self.in_channels, self.out_ch) < 1:
            bad("z_channels, embed_dim, n_embed, in_channels and out_ch must be ≥ 1")
        if self.double_z:
            bad("double_z=true is for KL autoencoders; a VQGAN needs double_z=false")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout {self.dropout} must be in [0, 1)")
        if self.beta < 0:
            bad(f"beta {self.beta} must be ≥ 0")


# ----------------------------------------------------------------------------------------------- building blocks

def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 → norm2 → swish → dropout → conv2, plus a 1×1 ``nin_shortcut`` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions (1×1 convs q, k, v, proj_out; scale C^-0.5; residual)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] → [B, 1, H*W, C]: one head of width C; SDPA's default scale is C^-0.5, as in taming
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Asymmetric zero pad (left 0, right 1, top 0, bottom 1), then a stride-2 3×3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (empty or one per block), ``down/upsample``."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """[B, in_channels, H, W] → [B, z_channels, H/f, W/f] with f = 2**(len(ch_mult) - 1)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        in_mult = [1] + list(cfg.ch_mult)
        self.down = nn.ModuleList()
        res = cfg.resolution
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level()
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, cfg.norm_groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg.norm_groups))
            if i != cfg.num_levels - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout, cfg.norm_groups)
        self.norm_out = Normalize(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] → [B, out_ch, h·f, w·f]. ``up`` is indexed like taming: ``up.0`` is the finest level."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, cfg.dropout, cfg.norm_groups)
        levels: list[_Level] = []
        for i in reversed(range(cfg.num_levels)):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, cfg.norm_groups))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg.norm_groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------- quantizer

def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VectorQuantizer(nn.Module):
    """taming's ``VectorQuantizer2``: nearest code by squared L2 distance, straight-through gradients.

    The distance ``‖z‖² + ‖e‖² − 2 z·e`` and the losses are always computed in fp32 (autocast is switched off
    here), so codes do not depend on the autocast dtype of the surrounding network.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False, l2_norm: bool = False):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy, self.l2_norm = n_embed, embed_dim, beta, legacy, l2_norm
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        # steps since each code was last chosen (for dead-code restarts); not saved with the weights
        self.register_buffer("unused_steps", torch.zeros(n_embed, dtype=torch.long), persistent=False)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """[N, D] → LongTensor [N] of nearest codebook rows (fp32, chunked to bound the [N, n_embed] matrix)."""
        with torch.autocast(z_flat.device.type, enabled=False):
            e = self.codebook().detach()
            e2 = e.pow(2).sum(1)                                        # [n_embed]
            z_flat = self._norm(z_flat.detach().float())
            out = torch.empty(z_flat.shape[0], dtype=torch.long, device=z_flat.device)
            rows = max(1, (1 << 25) // self.n_embed)
            for s in range(0, z_flat.shape[0], rows):
                zc = z_flat[s:s + rows]
                d = torch.addmm(zc.pow(2).sum(1, keepdim=True) + e2, zc, e.t(), alpha=-2.0)  # [n, n_embed]
                out[s:s + rows] = d.argmin(1)
        return out

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_norm else x

    def codebook(self) -> torch.Tensor:
        """The codebook as used for matching/decoding, fp32 [n_embed, embed_dim] (l2-normalised rows if l2_norm)."""
        return self._norm(self.embedding.weight.float())

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] → quantized latents [B, embed_dim, h, w] (taming's ``get_codebook_entry``)."""
        return self._norm(self.embedding(codes)).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """z [B, D, h, w] → (z_q [B, D, h, w] fp32 with straight-through grads, vq loss, info)."""
        B, D, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = self._norm(z.float().permute(0, 2, 3, 1))                       # [B, h, w, D]
            idx = self.nearest(z.reshape(-1, D))
            z_q = self._norm(self.embedding(idx).float()).view(z.shape)
            codebook = torch.mean((z_q - z.detach()) ** 2)                      # moves the codes
            commitment = torch.mean((z_q.detach() - z) ** 2)                    # moves the encoder
            if self.legacy:
                loss = commitment + self.beta * codebook
            else:
                loss = codebook + self.beta * commitment
            z_q = z + (z_q - z).detach()
            z_q = z_q.permute(0, 3, 1, 2).contiguous()
        info = {"indices": idx.view(B, h, w), "codebook_loss": codebook.detach(),
                "commitment_loss": commitment.detach()}
        return z_q, loss, info

    # ---------------------------------------------------------------- usage statistics and dead-code restarts
    @torch.no_grad()
    def stats(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Perplexity ``exp(H(p))`` of the code histogram and the fraction of the codebook used in ``indices``."""
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).float()
        p = counts / counts.sum().clamp_min(1)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return {"perplexity": entropy.exp(), "usage": (counts > 0).float().mean()}

    @torch.no_grad()
    def update_usage(self, indices: torch.Tensor) -> torch.Tensor:
        """Count one step: codes seen in ``indices`` (summed over ranks) reset to 0, the others age by 1."""
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed)
        if _dist_ready():
            torch.distributed.all_reduce(counts)
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, z_e: torch.Tensor, unused_for: int) -> int:
        """Re-initialise every code unused for ≥ ``unused_for`` steps with a random encoder output from ``z_e``.

        ``z_e``: encoder outputs (after ``quant_conv``), [B, D, h, w] or [N, D]. Returns the number of codes reset.
        Under torch.distributed the replacement vectors come from rank 0 so that every rank stays identical
        (``update_usage`` already sums the counts over ranks). Call it before the codebook is used in a forward.
        """
        dead = torch.nonzero(self.unused_steps >= unused_for).flatten()
        if dead.numel() == 0:
            return 0
        if z_e.dim() == 4:
            z_e = z_e.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        z_e = z_e.detach().float()
        pick = torch.randint(0, z_e.shape[0], (dead.numel(),), device=z_e.device)
        new = z_e[pick] + 1e-3 * z_e.std() * torch.randn_like(z_e[pick])  # jitter so duplicates split apart
        if _dist_ready():
            torch.distributed.broadcast(new, src=0)
        w = self.embedding.weight
        w[dead] = new.to(device=w.device, dtype=w.dtype)
        self.unused_steps[dead] = 0
        return int(dead.numel())


# ----------------------------------------------------------------------------------------------- decode dtype
# ``--vq_dtype`` / ``vq_dtype=``: the dtype text→image decodes codes to pixels in. fp32 is the default (the images
# of every earlier release, byte for byte); bf16 is 2.2–2.9× faster on CPUs with AVX512-BF16 and within a few
# levels on a trained VQGAN (README "VQGAN decode"). The resolved value goes into the PNG record ("vq_dtype",
# written only when it is not fp32), so ``--from-png`` decodes the same way; a record without it means fp32.

#: the decode dtypes a record can hold; ``--vq_dtype`` also accepts "auto"
VQ_DTYPES = ("fp32", "bf16")


def fast_bf16(device: torch.device | str) -> bool:
    """True where bf16 convolutions are fast: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(cpu, probe)():
                return True
        except (AttributeError, RuntimeError):  # an older torch without the probe: not known to be fast
            continue
    return False


def check_vq_dtype(name: str | None, flag: str = "vq_dtype", allow_auto: bool = True) -> str | None:
    """``name`` lower-cased if it is fp32, bf16 (or auto with ``allow_auto``); None passes; else a TuwenError
    naming ``flag``."""
    if name is None:
        return None
    n = str(name).strip().lower()
    ok = VQ_DTYPES + (("auto",) if allow_auto else ())
    if n not in ok:
        raise TuwenError(f"{flag} {name!r}: expected one of {', '.join(ok)}")
    return n


def resolve_vq_dtype(name: str | None, device: torch.device | str, flag: str = "vq_dtype") -> str:
    """None → "fp32" (the default); "auto" → "bf16" where :func:`fast_bf16`, else "fp32"; fp32/bf16 as given."""
    n = check_vq_dtype(name, flag)
    if n is None:
        return "fp32"
    if n == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return n


def vq_torch_dtype(name: str) -> torch.dtype | None:
    """``VQGAN.decode``'s ``dtype`` for a resolved decode dtype name (None = fp32)."""
    return torch.bfloat16 if name == "bf16" else None


# ----------------------------------------------------------------------------------------------- the model

class VQGAN(PretrainedModel):
    """taming's ``VQModel`` without the loss: ``encoder``, ``quant_conv``, ``quantize``, ``post_quant_conv``,
    ``decoder`` (343 tensors for f16_16384). Training objective: ``tuwen.models.discriminator``."""

    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta, config.legacy, config.l2_norm)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    # ---------------------------------------------------------------- training path
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] → continuous latents z_e [B, embed_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] → images [B, out_ch, h·f, w·f] (no clamping)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Training forward: (reconstruction, vq loss (codebook + commitment), info).

        info: ``indices`` [B, h, w], ``codebook_loss``, ``commitment_loss`` (detached), ``z_e`` (encoder output).
        """
        z_e = self.encode_latent(x)
        z_q, vq_loss, info = self.quantize(z_e)
        info["z_e"] = z_e
        return self.decode_latent(z_q), vq_loss, info

    def get_last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is measured at (taming: ``decoder.conv_out.weight``)."""
        return self.decoder.conv_out.weight

    def codebook_stats(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"perplexity", "usage"} of a batch of codes."""
        return self.quantize.stats(indices)

    def restart_dead_codes(self, z_e: torch.Tensor, unused_for: int) -> int:
        """See ``VectorQuantizer.restart_dead_codes``; usage is counted by ``self.quantize.update_usage``."""
        return self.quantize.restart_dead_codes(z_e, unused_for)

    # ---------------------------------------------------------------- inference API
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def grid_size(self, resolution: int | Sequence[int] | None = None) -> tuple[int, int]:
        """Code grid (h, w) for ``resolution`` px square images (or an (H, W) pair); default: config.resolution."""
        return self.config.grid_size(resolution)

    def prepare_images(self, images, size: int | None = None) -> torch.Tensor:
        """Any supported image input → float32 NCHW in [-1, 1] on the model's device.

        * float tensor [B, C, H, W] or [C, H, W] in [-1, 1] (used as is);
        * uint8 numpy array or tensor [B, H, W, C] / [H, W, C], or a list of [H, W, C] arrays (used as is);
        * a PIL image or a list of them: shortest side resized to ``size`` (default ``config.resolution``), then
          center-cropped to ``size``×``size``.
        """
        from PIL import Image

        dev = self.device
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise TuwenError("VQGAN.encode: no images given")
            if isinstance(images[0], Image.Image):
                s = size or self.config.resolution
                images = np.stack([np.asarray(resize_crop(to_rgb(im), s), dtype=np.uint8) for im in images])
            elif isinstance(images[0], np.ndarray):
                shapes = {a.shape for a in images}
                if len(shapes) > 1:
                    raise TuwenError(f"VQGAN.encode: arrays of different shapes {sorted(shapes)}; resize them to "
                                     f"one size first (e.g. tuwen.data.images.load_image)")
                images = np.stack(images)
            elif torch.is_tensor(images[0]):
                images = torch.stack(list(images))
            else:
                raise TuwenError(f"VQGAN.encode: unsupported image type {type(images[0]).__name__}")
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TuwenError(f"VQGAN.encode: numpy images must be uint8 HWC (got {images.dtype}); pass floats "
                                 f"as a torch tensor NCHW in [-1, 1]")
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not torch.is_tensor(images):
            raise TuwenError(f"VQGAN.encode: unsupported image input {type(images).__name__}")
        if images.dtype == torch.uint8:  # HWC / NHWC; convert on the device (4× less to copy)
            x = images.to(dev, non_blocking=True)
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[-1] != self.config.in_channels:
                raise TuwenError(f"VQGAN.encode: uint8 images must be [B, H, W, {self.config.in_channels}], "
                                 f"got {tuple(images.shape)}")
            x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        else:
            x = images.to(dev, dtype=torch.float32)
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != self.config.in_channels:
                raise TuwenError(f"VQGAN.encode: float images must be NCHW with C={self.config.in_channels}, "
                                 f"got {tuple(images.shape)}")
        self.grid_size(tuple(x.shape[-2:]))  # checks divisibility
        return x.contiguous()

    @torch.inference_mode()
    def encode(self, images, size: int | None = None, batch_size: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Images → codes, LongTensor [B, h, w] on the model's device. Deterministic.

        ``images``: see ``prepare_images``. ``batch_size``: encode in chunks of this many images.
        ``dtype``: None/float32 (default, autocast switched off) or torch.bfloat16 for the encoder convs; the
        nearest-code search is fp32 either way.
        """
        x = self.prepare_images(images, size)
        out = []
        for chunk in x.split(batch_size or x.shape[0]):
            with autocast(chunk.device, dtype or torch.float32):
                z_e = self.encode_latent(chunk.to(self._param_dtype()))
            B, D, h, w = z_e.shape
            out.append(self.quantize.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w))
        return torch.cat(out)

    def _param_dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    def _codes_to_grid(self, codes, grid: Sequence[int] | None) -> torch.Tensor:
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes.astype(np.int64, copy=False))
        elif not torch.is_tensor(codes):
            codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TuwenError(f"VQGAN.decode: codes must be integers, got {codes.dtype}")
        codes = codes.to(self.device, dtype=torch.long)
        if codes.dim() == 1:
            codes = codes.unsqueeze(0)
        if codes.dim() == 2:  # [B, h*w]
            L = codes.shape[1]
            if grid is None:
                h, w = self.grid_size()
                if h * w != L:
                    side = math.isqrt(L)
                    if side * side != L:
                        raise TuwenError(f"VQGAN.decode: {L} codes per image is not {h}×{w} and not a square; "
                                         f"pass grid=(h, w) (--grid HxW)")
                    h = w = side
            else:
                h, w = (int(g) for g in grid)
                if h * w != L:
                    raise TuwenError(f"VQGAN.decode: grid {h}×{w} does not hold {L} codes")
            codes = codes.view(-1, h, w)
        if codes.dim() != 3:
            raise TuwenError(f"VQGAN.decode: codes must be [B, h, w] or [B, h*w], got shape {tuple(codes.shape)}")
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.config.n_embed:
                raise TuwenError(f"VQGAN.decode: codes range {lo}..{hi} is outside this codebook (0..{self.config.n_embed - 1}); "
                                 f"were they made with a different VQGAN?")
        return codes

    @torch.inference_mode()
    def decode(self, codes, grid: Sequence[int] | None = None, batch_size: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Codes [B, h, w] or [B, h*w] (tensor / numpy / list) → images, float32 NCHW in [-1, 1] (clamped).

        The decoder runs in fp32 even inside a caller's autocast; ``dtype=torch.bfloat16`` runs it under bf16
        autocast instead (faster on GPUs, and 2.5–3.4× on CPUs with AVX512-BF16/AMX; pixels within a few levels
        of fp32, see README "Speed"). ``grid``: (h, w) for flat codes when the length is neither the config's
        grid nor a square. On CPU the latents go in channels-last (NHWC), oneDNN's fast convolution layout
        (1.3× at 256 px in fp32; same values up to float rounding, < 0.01 of a pixel level).
        """
        codes = self._codes_to_grid(codes, grid)
        if batch_size is None and codes.device.type == "cpu":
            # on CPU, decode ≤ 256² output pixels at a time: the activations of one 256 px image stay in the
            # caches (f16_16384 at 256 px, batch 8: 992 against 1 193 ms per image fp32, 475 against 542 bf16)
            f = self.config.downsample_factor
            batch_size = max(1, 65536 // (codes.shape[1] * codes.shape[2] * f * f))
        out = []
        for chunk in codes.split(batch_size or max(1, codes.shape[0])):
            with autocast(chunk.device, dtype or torch.float32):
                z_q = self.quantize.embed(chunk).to(self._param_dtype())
                if z_q.device.type == "cpu":
                    z_q = z_q.contiguous(memory_format=torch.channels_last)  # the convs keep NHWC throughout
                out.append(self.decode_latent(z_q).float().clamp_(-1.0, 1.0).contiguous())
        return torch.cat(out) if out else torch.empty(0, self.config.out_ch, 0, 0, device=self.device)

    def decode_to_pil(self, codes, grid: Sequence[int] | None = None, batch_size: int | None = None,
                      dtype: torch.dtype | None = None) -> list:
        """``decode`` then convert to RGB PIL images."""
        return to_pil(self.decode(codes, grid, batch_size, dtype))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        c = self.config
        h, w = self.grid_size()
        return (f"VQGAN f{c.downsample_factor}, {c.n_embed} codes × {c.embed_dim}, {c.resolution} px → {h}×{w} codes, "
                f"{self.num_params() / 1e6:.2f} M parameters")
