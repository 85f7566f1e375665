"""CogView's image tokenizer: the VQ-VAE of ``vqvae/vqvae_zc.py`` (file ``vqvae_hard_biggerset_011.pt``).

A plain conv encoder/decoder (no ResBlocks, no attention) around an EMA codebook; parameter names are exactly
those of CogView's ``VQVAE(channel=512, n_res_block=0, n_res_channel=32, embed_dim=256, n_embed=8192,
stride=6)`` (``simple=True``), so its state dict loads as it is (a leading ``module.`` is dropped)::

    enc_b.blocks.0  Conv2d(3, C, 4, stride 2, pad 1)     ReLU      256² → 128²
    enc_b.blocks.2  Conv2d(C, C, 4, stride 2, pad 1)     ReLU      → 64²
    enc_b.blocks.4  Conv2d(C, C, 4, stride 2, pad 1)     ReLU      → 32²
    enc_b.blocks.6  Conv2d(C, D, 1)                                → z_e [B, D, 32, 32]
    quantize_t.embed        [D, K]  (columns are the codes; EMA buffers cluster_size [K], embed_avg [D, K])
    dec.blocks.0    ConvTranspose2d(D, C, 4, 2, 1)       ReLU      32² → 64²
    dec.blocks.2    ConvTranspose2d(C, C, 4, 2, 1)       ReLU      → 128²
    dec.blocks.4    ConvTranspose2d(C, C, 4, 2, 1)       ReLU      → 256²
    dec.blocks.6    Conv2d(C, 3, 1)                                → image (normalised space)

C = ``channel`` (512), D = ``embed_dim`` (256), K = ``n_embed`` (8192): f8, 256² → 32×32 = 1024 codes.

Pixels are **not** in [-1, 1]: CogView normalises with mean (0.79093, 0.76271, 0.75340) and std (0.30379,
0.32279, 0.32800) after ``Resize(256)`` (shortest side, bilinear) + ``CenterCrop(256)``. :meth:`encode` /
:meth:`decode` follow tuwen's image-tokenizer protocol (same names and shapes as :class:`~tuwen.models.vqgan.VQGAN`:
PIL / uint8 / [-1, 1] float images in, codes ``[B, h, w]`` out; decode gives [-1, 1] float images);
:meth:`normalize` / :meth:`decode_normalized` expose CogView's own pixel space.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import BaseConfig
from ..data.images import to_pil
from ..errors import TuwenError
from ..hub import PretrainedModel

__all__ = ["CogViewVQVAEConfig", "CogViewVQVAE", "cogview_resize_crop", "MEAN", "STD"]

MEAN = (0.79093, 0.76271, 0.75340)
STD = (0.30379, 0.32279, 0.32800)


@dataclasses.dataclass
class CogViewVQVAEConfig(BaseConfig):
    """CogView's ``vqvae.new_model()``: channel 512, embed_dim 256, n_embed 8192, three stride-2 convs (f8)."""

    model_type: ClassVar[str] = "cogview_vqvae"

    channel: int = 512
    embed_dim: int = 256
    n_embed: int = 8192
    in_channel: int = 3
    resolution: int = 256            # Resize(resolution) + CenterCrop(resolution) of CogView's read_img
    decay: float = 0.99              # EMA decay of the codebook (training only)
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("channel", "embed_dim", "n_embed", "in_channel", "resolution"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TuwenError(f"CogViewVQVAEConfig.{name} must be a positive integer, got {v!r}")
        if self.resolution % 8:
            raise TuwenError(f"CogViewVQVAEConfig.resolution must be a multiple of 8 (f8), got {self.resolution}")
        if len(self.mean) != self.in_channel or len(self.std) != self.in_channel:
            raise TuwenError("CogViewVQVAEConfig: mean and std need one value per input channel")


def cogview_resize_crop(img: Image.Image, size: int = 256) -> Image.Image:
    """torchvision's ``Resize(size)`` (shortest side, PIL bilinear, long side ``int(size·long/short)``) then
    ``CenterCrop(size)`` (offsets ``int(round((d - size) / 2))``) — CogView's ``read_img``. RGBA drops alpha
    as CogView does; other modes become RGB."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class _Encoder(nn.Module):
    def __init__(self, c: CogViewVQVAEConfig):
        super().__init__()
        C = c.channel
        self.blocks = nn.Sequential(
            nn.Conv2d(c.in_channel, C, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(C, C, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(C, C, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(C, c.embed_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # [B, D, H/8, W/8]


class _Decoder(nn.Module):
    def __init__(self, c: CogViewVQVAEConfig):
        super().__init__()
        C = c.channel
        self.blocks = nn.Sequential(
            nn.ConvTranspose2d(c.embed_dim, C, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(C, C, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(C, C, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(C, c.in_channel, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


class _EMAQuantize(nn.Module):
    """Sonnet's EMA vector quantiser as CogView keeps it: codebook ``embed`` [D, K] (codes are columns)."""

    def __init__(self, c: CogViewVQVAEConfig):
        super().__init__()
        self.dim, self.n_embed, self.decay, self.eps = c.embed_dim, c.n_embed, c.decay, 1e-5
        embed = torch.empty(c.embed_dim, c.n_embed)
        nn.init.xavier_uniform_(embed, gain=nn.init.calculate_gain("tanh"))
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(c.n_embed))
        self.register_buffer("embed_avg", embed.clone())

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """[N, D] → LongTensor [N]: argmin of ||z - e||² in fp32 (CogView's expansion), chunked."""
        e = self.embed.float()  # [D, K]
        e2 = e.pow(2).sum(0, keepdim=True)  # [1, K]
        out = []
        for zc in z.float().split(max(1, (1 << 24) // self.n_embed)):
            dist = zc.pow(2).sum(1, keepdim=True) - 2 * zc @ e + e2  # [n, K]
            out.append((-dist).max(1).indices)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=z.device)

    def embed_code(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embed.t())  # [..., D]

    def ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step of the codebook from latents z [N, D] and their codes [N] (training)."""
        onehot = F.one_hot(codes, self.n_embed).to(z.dtype)  # [N, K]
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(z.t() @ onehot, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
        self.embed.copy_(self.embed_avg / size.unsqueeze(0))


class CogViewVQVAE(PretrainedModel):
    """CogView's VQ-VAE behind tuwen's image-tokenizer protocol (``encode``, ``decode``, ``grid_size``,
    ``n_embed``)."""

    config_class: ClassVar[type[BaseConfig]] = CogViewVQVAEConfig

    def __init__(self, config: CogViewVQVAEConfig):
        super().__init__(config)
        self.enc_b = _Encoder(config)
        self.quantize_t = _EMAQuantize(config)
        self.dec = _Decoder(config)

    # ------------------------------------------------------------------------------------------ protocol
    @property
    def n_embed(self) -> int:
        return self.config.n_embed

    @property
    def downsample_factor(self) -> int:
        return 8

    def grid_size(self, resolution: int | Sequence[int] | None = None) -> tuple[int, int]:
        r = self.config.resolution if resolution is None else resolution
        h, w = (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))
        if h % 8 or w % 8:
            raise TuwenError(f"CogView VQ-VAE: image size {h}×{w} must be a multiple of 8")
        return h // 8, w // 8

    def _mean_std(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.tensor(self.config.mean, device=device).view(1, -1, 1, 1)
        s = torch.tensor(self.config.std, device=device).view(1, -1, 1, 1)
        return m, s

    def normalize(self, images, size: int | None = None) -> torch.Tensor:
        """Images → CogView's input space ``(x/255 - mean) / std``, float32 NCHW on the model's device.

        PIL images (or lists) are resized as CogView does (:func:`cogview_resize_crop`); uint8 arrays/tensors
        [B, H, W, C] / [H, W, C] are used as they are; float tensors NCHW are taken to be in [-1, 1].
        """
        dev = self.device
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise TuwenError("CogView VQ-VAE: no images given")
            if all(isinstance(im, Image.Image) for im in images):
                s = size or self.config.resolution
                images = np.stack([np.asarray(cogview_resize_crop(im, s), dtype=np.uint8) for im in images])
            elif all(isinstance(im, np.ndarray) for im in images):
                images = np.stack(images)
            else:
                raise TuwenError("CogView VQ-VAE: give PIL images, uint8 arrays or a float tensor")
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TuwenError(f"CogView VQ-VAE: numpy images must be uint8 HWC, got {images.dtype}")
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not torch.is_tensor(images):
            raise TuwenError(f"CogView VQ-VAE: unsupported image input {type(images).__name__}")
        if images.dtype == torch.uint8:
            x = images.to(dev)
            x = x.unsqueeze(0) if x.dim() == 3 else x
            if x.dim() != 4 or x.shape[-1] != self.config.in_channel:
                raise TuwenError(f"CogView VQ-VAE: uint8 images must be [B, H, W, 3], got {tuple(images.shape)}")
            x = x.permute(0, 3, 1, 2).float() / 255.0
        else:
            x = images.to(dev, torch.float32)
            x = x.unsqueeze(0) if x.dim() == 3 else x
            if x.dim() != 4 or x.shape[1] != self.config.in_channel:
                raise TuwenError(f"CogView VQ-VAE: float images must be NCHW, got {tuple(images.shape)}")
            x = (x + 1) / 2
        self.grid_size(tuple(x.shape[-2:]))
        m, s = self._mean_std(dev)
        return (x - m) / s

    @torch.inference_mode()
    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """CogView-normalised images [B, 3, H, W] → codes [B, H/8, W/8] (CogView's ``img2code``)."""
        z = self.enc_b(x.to(self.quantize_t.embed.dtype))  # [B, D, h, w]
        B, D, h, w = z.shape
        return self.quantize_t.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)

    def encode(self, images, size: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Images (see :meth:`normalize`) → codes, LongTensor [B, h, w] on the model's device."""
        x = self.normalize(images, size)
        return torch.cat([self.encode_normalized(c) for c in x.split(batch_size or x.shape[0])])

    def _codes(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(np.asarray(codes) if isinstance(codes, list) else codes)
        if codes.is_floating_point():
            raise TuwenError(f"CogView VQ-VAE: codes must be integers, got {codes.dtype}")
        codes = codes.to(self.device, torch.long)
        codes = codes.unsqueeze(0) if codes.dim() == 1 else codes
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise TuwenError(f"CogView VQ-VAE: {codes.shape[1]} codes per image is not a square grid")
            codes = codes.view(-1, side, side)
        if codes.dim() != 3:
            raise TuwenError(f"CogView VQ-VAE: codes must be [B, h, w] or [B, h*w], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_embed):
            raise TuwenError(f"CogView VQ-VAE: codes outside 0..{self.n_embed - 1}")
        return codes

    @torch.inference_mode()
    def decode_normalized(self, codes) -> torch.Tensor:
        """Codes → images ``out * std + mean`` (CogView's ``code2img``: about [0, 1], not clamped)."""
        codes = self._codes(codes)
        z = self.quantize_t.embed_code(codes).permute(0, 3, 1, 2)  # [B, D, h, w]
        m, s = self._mean_std(codes.device)
        return self.dec(z).float() * s + m

    def decode(self, codes, batch_size: int | None = None) -> torch.Tensor:
        """Codes [B, h, w] or [B, h*w] → images, float32 NCHW in [-1, 1] (clamped), like ``VQGAN.decode``."""
        codes = self._codes(codes)
        outs = [self.decode_normalized(c) for c in codes.split(batch_size or max(1, codes.shape[0]))]
        return (torch.cat(outs) * 2 - 1).clamp_(-1, 1)

    def decode_to_pil(self, codes, batch_size: int | None = None) -> list:
        return to_pil(self.decode(codes, batch_size))

    def describe(self) -> str:
        c = self.config
        h, w = self.grid_size()
        n = sum(p.numel() for p in self.parameters())
        return (f"CogView VQ-VAE f8, {c.n_embed} codes × {c.embed_dim} (EMA), {c.resolution} px → {h}×{w} codes, "
                f"{n / 1e6:.1f} M parameters")
