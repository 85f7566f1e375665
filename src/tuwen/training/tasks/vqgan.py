"""Stage 1 training: the VQGAN image tokenizer on the shared trainer (``tuwen vq train``).

Data: EasyNLP TSV tables or image folders (``--tables train.tsv,val.tsv``; the last of several is the validation
table, as in EasyNLP). Images are resized (shortest side) and center- or randomly cropped to ``--size``.
Evaluation reports reconstruction PSNR beside the "predict each image's mean colour" baseline, codebook
perplexity and usage.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.images import load_image, to_pil, to_tensor
from ..data.tables import RowDataset, open_source
from ..errors import TuwenError
from ..models.discriminator import VQGANTrainModule, VQLossConfig
from ..models.vqgan import VQGAN, VQGANConfig
from ..training.trainer import Task


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2) → [B]."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def image_transform(image_col: str, size: int, random_crop: bool, seed: int):
    def transform(row: dict, index: int, epoch: int) -> dict:
        rng = random.Random(f"{seed}-{epoch}-{index}") if random_crop else None
        arr = load_image(row[image_col], size, random_crop=random_crop, rng=rng)
        return {"image": to_tensor(arr)}
    return transform


@dataclass
class VQTrainSettings:
    tables: str
    input_schema: str | None
    image_column: str
    size: int
    preset: str = "tiny"
    config_overrides: dict = field(default_factory=dict)
    init: str | None = None
    loss: VQLossConfig = field(default_factory=VQLossConfig)
    random_crop: bool = False
    skip_first_line: bool = False
    seed: int = 1234


class VQGANTrainTask(Task):
    name = "vqgan"
    betas = (0.5, 0.9)  # taming's Adam betas for both generator and discriminator
    best_metric = "psnr"
    best_mode = "max"

    def __init__(self, s: VQTrainSettings):
        self.s = s
        tables = [t for t in s.tables.split(",") if t.strip()]
        if not tables:
            raise TuwenError("--tables: give the training table (and optionally a validation table last)")
        self.train_tables, self.val_tables = (tables[:-1], tables[-1:]) if len(tables) > 1 else (tables, [])
        if s.init:
            self.vq_config = VQGAN._read_config(Path(s.init))
        else:
            self.vq_config = VQGANConfig.preset(s.preset, **{"resolution": s.size, **s.config_overrides})
        if s.size % (2 ** (len(self.vq_config.ch_mult) - 1)):
            raise TuwenError(f"--size {s.size} is not a multiple of the VQGAN's downsampling factor "
                             f"{2 ** (len(self.vq_config.ch_mult) - 1)}")

    def _dataset(self, tables, random_crop):
        src = open_source(tables, self.s.input_schema, self.s.skip_first_line, image_col=self.s.image_column)
        if self.s.image_column not in src.columns:
            raise TuwenError(f"image column {self.s.image_column!r} is not in --input_schema "
                             f"({', '.join(src.columns)}); name it with --second_sequence / --image_column")
        return RowDataset(src, image_transform(self.s.image_column, self.s.size, random_crop, self.s.seed))

    def train_dataset(self):
        return self._dataset(self.train_tables, self.s.random_crop)

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
                "size": self.s.size, "tables": self.s.tables}
