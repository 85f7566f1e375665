"""The networks of the VQGAN training objective: taming's PatchGAN discriminator and LPIPS (VGG16 features).

The loss that uses them (``VQLoss``) and the one-optimizer training module live beside the VQGAN training task,
in ``tuwen.training.tasks.vqgan``. Key names match taming (``loss.discriminator.main.{i}.*``,
``loss.perceptual_loss.lin{k}.model.1.weight``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import TuwenError
from ..hub import load_weights


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
