"""Stage 1 training: the VQGAN image tokenizer on the shared trainer (``tuwen vq train``), and its objective.

Data: EasyNLP TSV tables or image folders (``--tables train.tsv,val.tsv``; the last of several is the validation
table, as in EasyNLP). Images are resized (shortest side) and center- or randomly cropped to ``--size``.
Evaluation reports reconstruction PSNR beside the "predict each image's mean colour" baseline, codebook
perplexity and usage.

Objective (``VQLoss``): L1 (+ L2) (+ 4×4 mean-colour L2) + LPIPS (optional) + codebook/commitment + PatchGAN. taming trains the VQGAN with
two optimizers and alternates a generator step and a discriminator step. Here one
``VQGANTrainModule.forward(batch, step)`` returns a single scalar whose ``backward()`` gives *both* the right
gradients, so the shared trainer's one optimizer trains both:

* the generator's adversarial term ``g_loss = −mean(D(x̂))`` runs D through ``torch.func.functional_call`` with
  *detached* parameters, so it moves the encoder/decoder/codebook and never D;
* the discriminator's hinge term runs D on the real images and on *detached* reconstructions, so it moves only D.

Both start at ``disc_start`` (before it D gets exactly zero gradient: taming also does not train D before then).
The adaptive weight ``‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4)``, clamped to [0, 1e4] and × ``disc_weight``, is measured at
the last decoder layer L, as in taming. The networks (``NLayerDiscriminator``, ``LPIPS``) are in
``tuwen.models.discriminator``.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import BaseConfig
from ...data.images import load_image, to_pil, to_tensor
from ...data.tables import RowDataset, open_source
from ...errors import TuwenError
from ...models.discriminator import LPIPS, NLayerDiscriminator
from ...models.vqgan import VQGAN, VQGANConfig
from ..trainer import Task
from .common import split_tables


# ----------------------------------------------------------------------------------------------- the loss

@dataclasses.dataclass
class VQLossConfig(BaseConfig):
    """The VQGAN objective. Defaults follow taming's f16_16384 recipe except ``disc_start`` (taming: 0 there,
    250001 / 10000 in the repo's configs; the GAN switching on is the usual moment reconstructions get worse)."""

    model_type: ClassVar[str] = "vqgan_loss"

    pixel_weight: float = 1.0          # L1
    l2_weight: float = 0.0             # optional extra L2
    color_weight: float = 0.0          # L2 between 4×4 average-pooled images: the colours of each region
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
        if min(self.pixel_weight, self.l2_weight, self.color_weight, self.codebook_weight, self.perceptual_weight,
               self.disc_weight) < 0:
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
        if c.color_weight > 0:  # per-region mean colours: saturated hues the per-pixel losses average away
            cl = (F.adaptive_avg_pool2d(x, 4) - F.adaptive_avg_pool2d(xrec, 4)).pow(2).mean(dim=(1, 2, 3))
            rec = rec + c.color_weight * cl.view(-1, 1, 1, 1)
            out["color_loss"] = cl.detach().mean()
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


# ----------------------------------------------------------------------------------------------- the task

def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2) → [B]."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


AUGMENTS = ("flip", "hue")

# RGB ↔ YIQ (NTSC): Y is luminance, (I, Q) a chroma plane whose angle is the hue
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rotate_hue(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the hue of a CHW image in [-1, 1] by ``degrees`` (luminance kept; out-of-gamut values clamped)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ                      # [3, 3] acting on (r, g, b)
    rgb = (x + 1) / 2
    out = torch.einsum("ij,jhw->ihw", m, rgb)
    return (out.clamp(0, 1) * 2 - 1).to(x.dtype)


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """``--augment flip,hue`` → ('flip', 'hue'); unknown names are an error."""
    names = tuple(a.strip() for a in (spec or "").split(",") if a.strip() and a.strip() != "none")
    bad = [a for a in names if a not in AUGMENTS]
    if bad:
        raise TuwenError(f"--augment {spec!r}: unknown {', '.join(bad)}; choose from {', '.join(AUGMENTS)} "
                         "(comma-separated) or none")
    return names


def image_transform(image_col: str, size: int, random_crop: bool, seed: int, augment: tuple[str, ...] = ()):
    """Row → {"image": CHW in [-1, 1]}. Random crops and ``augment`` (``flip``: mirror half the images; ``hue``:
    rotate the hue of half the images by a uniform random angle, so the other half keep the data's own colours)
    are drawn from (seed, epoch, index), so a resumed run sees the same images. A tokenizer needs no caption to
    stay true, so both are safe here (unlike for the text→image GPT)."""
    def transform(row: dict, index: int, epoch: int) -> dict:
        rng = random.Random(f"{seed}-{epoch}-{index}") if (random_crop or augment) else None
        arr = load_image(row[image_col], size, random_crop=random_crop, rng=rng if random_crop else None)
        x = to_tensor(arr)
        if "flip" in augment and rng.random() < 0.5:
            x = x.flip(-1)
        if "hue" in augment and rng.random() < 0.5:
            x = rotate_hue(x, rng.uniform(0.0, 360.0))
        return {"image": x}
    return transform


@dataclasses.dataclass
class VQTrainSettings:
    tables: str
    input_schema: str | None
    image_column: str
    size: int
    preset: str = "tiny"
    config_overrides: dict = dataclasses.field(default_factory=dict)
    init: str | None = None
    loss: VQLossConfig = dataclasses.field(default_factory=VQLossConfig)
    random_crop: bool = False
    augment: tuple[str, ...] = ()      # training images only: "flip", "hue" (see image_transform)
    skip_first_line: bool = False
    seed: int = 1234


class VQGANTrainTask(Task):
    name = "vqgan"
    betas = (0.5, 0.9)  # taming's Adam betas for both generator and discriminator
    best_metric = "psnr"
    best_mode = "max"

    def __init__(self, s: VQTrainSettings):
        self.s = s
        self.train_tables, self.val_tables = split_tables(
            s.tables, what="training (the training table, and optionally a validation table last)")
        if s.init:
            self.vq_config = VQGAN._read_config(Path(s.init))
        else:
            self.vq_config = VQGANConfig.preset(s.preset, **{"resolution": s.size, **s.config_overrides})
        if s.size % (2 ** (len(self.vq_config.ch_mult) - 1)):
            raise TuwenError(f"--size {s.size} is not a multiple of the VQGAN's downsampling factor "
                             f"{2 ** (len(self.vq_config.ch_mult) - 1)}")

    def _dataset(self, tables, random_crop, augment=()):
        src = open_source(tables, self.s.input_schema, self.s.skip_first_line, image_col=self.s.image_column,
                          require_text=False)  # images only: folders need no captions
        if self.s.image_column not in src.columns:
            raise TuwenError(f"image column {self.s.image_column!r} is not in --input_schema "
                             f"({', '.join(src.columns)}); name it with --second_sequence / --image_column")
        return RowDataset(src, image_transform(self.s.image_column, self.s.size, random_crop, self.s.seed, augment))

    def train_dataset(self):
        return self._dataset(self.train_tables, self.s.random_crop, self.s.augment)

    def val_dataset(self):
        return self._dataset(self.val_tables, False) if self.val_tables else None

    def build_module(self):
        vq = VQGAN.from_pretrained(self.s.init) if self.s.init else VQGAN(self.vq_config)
        vq.train()
        return VQGANTrainModule(vq, self.s.loss)

    def param_groups(self, module, weight_decay):
        g = module.param_groups()
        groups = [{"params": g["generator"], "weight_decay": 0.0}]
        if g["discriminator"]:
            groups.append({"params": g["discriminator"], "weight_decay": 0.0})
        return groups

    @torch.no_grad()
    def eval_step(self, module, batch):
        x = batch["image"].float()
        vq = module.vqgan
        z_q, _, info = vq.quantize(vq.encode_latent(x))
        xrec = vq.decode_latent(z_q)
        n = x.shape[0]
        mean_color = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        stats = vq.codebook_stats(info["indices"])
        return {"psnr": (psnr(xrec, x).sum().item(), n),
                "psnr_mean_color": (psnr(mean_color, x).sum().item(), n),
                "l1": ((xrec.float() - x).abs().mean().item() * n, n),
                "perplexity": (float(stats["perplexity"]) * n, n),
                "usage": (float(stats["usage"]) * n, n)}

    def save_model(self, module, out_dir):
        module.vqgan.save_pretrained(out_dir)

    def sample_images(self, module, batch):
        x = batch["image"][:8].float()
        with torch.no_grad():
            xrec = module.vqgan(x)[0]
        return to_pil(torch.cat([x, xrec]))

    def describe(self):
        return {"task": self.name, "vqgan": self.vq_config.to_dict(), "loss": self.s.loss.to_dict(),
                "size": self.s.size, "tables": self.s.tables, "augment": list(self.s.augment)}
