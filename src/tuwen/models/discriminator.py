"""VQGAN training objective: PatchGAN discriminator, optional LPIPS, and a one-optimizer training module.

taming trains the VQGAN with two optimizers and alternates a generator step and a discriminator step. Here one
``VQGANTrainModule.forward(batch, step)`` returns a single scalar whose ``backward()`` gives *both* the right
gradients, so the shared trainer's one optimizer trains both:

* the generator's adversarial term ``g_loss = −mean(D(x̂))`` runs D through ``torch.func.functional_call`` with
  *detached* parameters, so it moves the encoder/decoder/codebook and never D;
* the discriminator's hinge term runs D on the real images and on *detached* reconstructions, so it moves only D.

Both start at ``disc_start`` (before it D gets exactly zero gradient: taming also does not train D before then).
The adaptive weight ``‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4)``, clamped to [0, 1e4] and × ``disc_weight``, is measured at
the last decoder layer L, as in taming. Key names match taming (``loss.discriminator.main.{i}.*``,
``loss.perceptual_loss.lin{k}.model.1.weight``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import TuwenError
from .vqgan import VQGAN


# ----------------------------------------------------------------------------------------------- PatchGAN

class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN as in taming: 4×4 convs, LeakyReLU 0.2, BatchNorm, N(0, 0.02) init; → [B, 1, h', w'].

    ``n_layers=2`` (the f16_16384 recipe) has convs at ``main.{0,2,5,8}`` and BatchNorms at ``main.{3,6}``.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, 2, padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 2, padw, bias=False), nn.BatchNorm2d(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 1, padw, bias=False), nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf * mult, 1, kw, 1, padw)]
        self.main = nn.Sequential(*seq)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ----------------------------------------------------------------------------------------------- LPIPS

# torchvision vgg16().features: conv widths, "M" = max-pool; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """``torchvision.models.vgg16().features[:30]`` with the same ``features.N`` names; returns the 5 LPIPS taps."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                out.append(x)
        return out


class _NetLinLayer(nn.Module):
    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS (VGG16 variant) as used by taming; frozen, always in eval mode. Input: two images in [-1, 1].

    Weights are never downloaded: ``LPIPS.from_files(lpips_path, vgg_path)`` reads taming's / richzhang's
    ``vgg.pth`` (``lin{0..4}.model.1.weight``) and torchvision's VGG16 file (``features.N.*``), or one file that
    holds both (taming's ``loss.perceptual_loss.*`` with ``net.slice{k}.N.*``).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for k, c in enumerate(_LPIPS_CHANNELS):
            setattr(self, f"lin{k}", _NetLinLayer(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: dropout off even when the parent trains
        return super().train(False)

    @staticmethod
    def _normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """→ [B, 1, 1, 1] perceptual distance."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        val = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            d = (self._normalize(a) - self._normalize(b)) ** 2
            val = val + getattr(self, f"lin{k}").model(d).mean(dim=(2, 3), keepdim=True)
        return val

    @classmethod
    def from_files(cls, lpips_path: str | os.PathLike, vgg_path: str | os.PathLike | None = None) -> "LPIPS":
        from ..hub import load_weights

        m = cls()
        sd: dict[str, torch.Tensor] = {}
        for path in [p for p in (vgg_path, lpips_path) if p]:
            raw = load_weights(path)
            for k, v in raw.items():
                k = k.removeprefix("loss.perceptual_loss.").removeprefix("perceptual_loss.")
                if k.startswith("features."):                 # torchvision vgg16
                    sd["net." + k] = v
                elif (mm := k.split(".")) and k.startswith("net.slice") and len(mm) == 4:  # taming net.sliceK.N.w
                    sd[f"net.features.{mm[2]}.{mm[3]}"] = v
                elif k.startswith("lin") and ".model." in k:
                    sd[k] = v
        own = m.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            what = "VGG16 weights (torchvision vgg16 .pth; pass vgg_path / --vgg_path)" if any(
                k.startswith("net.") for k in missing) else "LPIPS lin weights (taming's vgg.pth)"
            raise TuwenError(f"perceptual loss: {what} not found in {lpips_path}"
                             f"{' / ' + str(vgg_path) if vgg_path else ''} (missing e.g. {missing[0]})")
        shapes = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
        if shapes:
            raise TuwenError(f"perceptual loss: {shapes[0]} has shape {tuple(sd[shapes[0]].shape)}, expected "
                             f"{tuple(own[shapes[0]].shape)}; is this a VGG16 / LPIPS-vgg file?")
        m.load_state_dict({k: sd[k] for k in own})
        return m


# ----------------------------------------------------------------------------------------------- the loss

@dataclasses.dataclass
class VQLossConfig(BaseConfig):
    """The VQGAN objective. Defaults follow taming's f16_16384 recipe except ``disc_start`` (taming: 0 there,
    250001 / 10000 in the repo's configs; the GAN switching on is the usual moment reconstructions get worse)."""

    model_type: ClassVar[str] = "vqgan_loss"

    pixel_weight: float = 1.0          # L1
    l2_weight: float = 0.0             # optional extra L2
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0     # only used when lpips_path is given
    lpips_path: str | None = None      # taming vgg.pth (lin layers), or a file holding LPIPS + VGG
    vgg_path: str | None = None        # torchvision vgg16 weights (features.N.*)
    disc_weight: float = 0.75          # 0 switches the GAN off (no discriminator is built)
    disc_start: int = 10000
    disc_num_layers: int = 2
    disc_ndf: int = 64
    disc_factor: float = 1.0
    disc_loss: str = "hinge"           # hinge | vanilla
    dead_code_steps: int = 0           # > 0: re-init codes unused for this many steps from encoder outputs

    def validate(self) -> None:
        if self.disc_loss not in ("hinge", "vanilla"):
            raise TuwenError(f"disc_loss {self.disc_loss!r}: use hinge or vanilla")
        if self.disc_num_layers < 1:
            raise TuwenError("disc_num_layers must be ≥ 1")
        if min(self.pixel_weight, self.l2_weight, self.codebook_weight, self.perceptual_weight, self.disc_weight) < 0:
            raise TuwenError("loss weights must be ≥ 0")
        if self.vgg_path and not self.lpips_path:
            raise TuwenError("vgg_path is given but lpips_path is not: the perceptual loss needs both "
                             "(taming's vgg.pth lin weights + torchvision VGG16 weights)")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class VQLoss(nn.Module):
    """L1 (+ L2) + LPIPS (optional) + codebook/commitment + hinge PatchGAN with adaptive weight."""

    def __init__(self, config: VQLossConfig | None = None, in_channels: int = 3):
        super().__init__()
        self.config = config = config or VQLossConfig()
        if config.disc_weight > 0:
            self.discriminator = NLayerDiscriminator(in_channels, config.disc_ndf, config.disc_num_layers)
        else:
            self.discriminator = None
        if config.lpips_path and config.perceptual_weight > 0:
            self.perceptual_loss = LPIPS.from_files(config.lpips_path, config.vgg_path)
        else:
            self.perceptual_loss = None
        self._d_loss_fn = hinge_d_loss if config.disc_loss == "hinge" else vanilla_d_loss

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.disc_start and self.config.disc_factor > 0

    def _d_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with D's parameters detached: gradients reach x only. Buffers (BN stats) update as usual."""
        d = self.discriminator
        params = {k: v.detach() for k, v in d.named_parameters()}
        return torch.func.functional_call(d, {**params, **dict(d.named_buffers())}, (x,))

    @staticmethod
    def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def forward(self, x: torch.Tensor, xrec: torch.Tensor, vq_loss: torch.Tensor, step: int,
                last_layer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x, xrec: [B, C, H, W]. Returns a dict with ``loss`` (one scalar for generator + discriminator) and parts."""
        c = self.config
        x, xrec = x.float(), xrec.float()
        rec = c.pixel_weight * (x - xrec).abs()
        if c.l2_weight > 0:
            rec = rec + c.l2_weight * (x - xrec) ** 2
        out: dict[str, torch.Tensor] = {"rec_loss": rec.detach().mean()}
        if self.perceptual_loss is not None:
            p = self.perceptual_loss(x, xrec)                         # [B, 1, 1, 1]
            rec = rec + c.perceptual_weight * p
            out["p_loss"] = p.detach().mean()
        nll = rec.mean()
        zero = nll.new_zeros(())
        g_loss, d_loss, d_weight = zero, zero, zero
        if self.disc_active(step):
            g_loss = -self._d_frozen(xrec).float().mean()
            if torch.is_grad_enabled() and last_layer is not None and xrec.requires_grad:
                d_weight = self.adaptive_weight(nll, g_loss, last_layer) * c.disc_weight
            else:
                d_weight = nll.new_tensor(c.disc_weight)
            logits_real = self.discriminator(x.detach().contiguous()).float()
            logits_fake = self.discriminator(xrec.detach().contiguous()).float()
            d_loss = c.disc_factor * self._d_loss_fn(logits_real, logits_fake)
            out["logits_real"] = logits_real.detach().mean()
            out["logits_fake"] = logits_fake.detach().mean()
        elif self.discriminator is not None and torch.is_grad_enabled():
            # D idle before disc_start: give its parameters an exact zero gradient so that DDP sees them used
            d_loss = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
        gen = nll + d_weight * c.disc_factor * g_loss + c.codebook_weight * vq_loss
        out.update(loss=gen + d_loss, nll_loss=nll.detach(), codebook_loss=vq_loss.detach(), g_loss=g_loss.detach(),
                   d_loss=d_loss.detach(), d_weight=d_weight.detach())
        return out


# ----------------------------------------------------------------------------------------------- training module

class VQGANTrainModule(nn.Module):
    """What the shared trainer trains: ``forward(batch, step)`` → dict with one scalar ``loss`` (see module doc).

    ``batch["image"]``: float NCHW in [-1, 1] (uint8 NHWC is accepted too). The returned dict also holds
    ``rec_loss`` (L1), ``codebook_loss`` (the VQ loss), ``g_loss``, ``d_loss``, ``d_weight``, ``perplexity``,
    ``usage`` and, when codes were restarted this step, ``restarted``. Use Adam betas (0.5, 0.9) as taming does;
    ``param_groups()`` separates generator and discriminator parameters if they need different settings.
    """

    def __init__(self, vqgan: VQGAN, loss: VQLoss | VQLossConfig | None = None):
        super().__init__()
        self.vqgan = vqgan
        self.loss = loss if isinstance(loss, VQLoss) else VQLoss(loss, vqgan.config.in_channels)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        gen = [p for p in self.vqgan.parameters() if p.requires_grad]
        disc = [p for p in self.loss.parameters() if p.requires_grad]
        return {"generator": gen, "discriminator": disc}

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        x = batch["image"]
        if x.dtype == torch.uint8:  # NHWC uint8 → NCHW float in [-1, 1]
            x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        x = x.to(self.vqgan.device, dtype=torch.float32, non_blocking=True)
        vq = self.vqgan
        z_e = vq.encode_latent(x)
        restarted = None
        if self.training and self.loss.config.dead_code_steps > 0:
            restarted = vq.quantize.restart_dead_codes(z_e, self.loss.config.dead_code_steps)
        z_q, vq_loss, info = vq.quantize(z_e)
        if self.training:
            vq.quantize.update_usage(info["indices"])
        xrec = vq.decode_latent(z_q)
        out = self.loss(x, xrec, vq_loss, step, last_layer=vq.get_last_layer())
        out.update(vq.codebook_stats(info["indices"]))
        if restarted is not None:
            out["restarted"] = torch.tensor(float(restarted))
        return out
