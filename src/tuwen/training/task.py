"""What a task gives the shared trainer (``Task``) and the trainer's settings (``TrainArgs``, EasyNLP's flag names)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..data.tables import collate_skip_bad
from ..errors import TuwenError


@dataclasses.dataclass
class TrainArgs:
    """Trainer settings; EasyNLP's flag names where they exist."""

    checkpoint_dir: str
    learning_rate: float = 5e-5
    weight_decay: float = 1e-4
    epoch_num: int = 3
    max_steps: int | None = None           # stop after this many optimizer steps (overrides epoch_num)
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0             # <= 0 disables clipping
    warmup_proportion: float = 0.1
    lr_schedule: str = "linear"            # linear | cosine | constant (after warmup)
    optimizer_type: str = "AdamW"          # AdamW | Adam
    random_seed: int = 1234
    logging_steps: int = 100
    save_checkpoint_steps: int | None = None  # default: once per epoch
    save_checkpoint_minutes: float | None = None  # also save a checkpoint when this much time passed since the last
    save_checkpoint_epochs: int | None = None      # open_clip's --save-frequency: every N epochs (default 1)
    warmup_steps: int | None = None                # open_clip's --warmup: steps (overrides warmup_proportion)
    save_all_checkpoints: bool = False
    keep_checkpoints: int = 2
    resume: str | None = None              # None | "auto" | path
    precision: str = "auto"                # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    num_workers: int | None = None         # DataLoader workers (EasyNLP --data_threads); None = auto
    strict: bool = False
    do_eval: bool = True
    tensorboard: bool | None = None        # None: on when tensorboard is installed
    max_bad_listed: int = 20
    compile: bool = False
    fsdp: bool = False                     # shard model/grads/optimizer over processes (FSDP2; torchrun)
    fsdp_cpu_offload: bool = False         # --fsdp: sharded weights, grads and optimizer states in CPU memory
    progress: bool | None = None           # None: tqdm only on a terminal

    def validate(self) -> None:
        checks = [
            (self.micro_batch_size >= 1, "--micro_batch_size must be ≥ 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be ≥ 1"),
            (self.epoch_num >= 1 or self.max_steps, "--epoch_num must be ≥ 1"),
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (0 <= self.warmup_proportion < 1, "--warmup_proportion must be in [0, 1)"),
            (self.logging_steps >= 1, "--logging_steps must be ≥ 1"),
            (self.save_checkpoint_steps is None or self.save_checkpoint_steps >= 1,
             "--save_checkpoint_steps must be ≥ 1"),
            (self.save_checkpoint_minutes is None or self.save_checkpoint_minutes > 0,
             "--save_checkpoint_minutes must be > 0"),
            (self.lr_schedule in ("linear", "cosine", "constant"), "--lr_schedule must be linear, cosine or constant"),
            (self.optimizer_type.lower() in ("adamw", "adam"), f"--optimizer_type {self.optimizer_type!r}: "
                                                                "tuwen supports AdamW and Adam"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--precision must be auto, fp32, bf16 or fp16"),
            (self.fsdp or not self.fsdp_cpu_offload, "--fsdp_cpu_offload offloads the shards of --fsdp: add --fsdp "
                                                     "(under torchrun, ≥ 2 processes), or drop --fsdp_cpu_offload"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TuwenError(msg)


class Task:
    """What the trainer needs from a task. Subclasses override the methods marked as required."""

    name = "task"
    betas: tuple[float, float] = (0.9, 0.999)
    best_metric = "loss"
    best_mode = "min"

    def build_module(self) -> nn.Module:  # required: forward(batch, step=int) -> {"loss": scalar, ...}
        raise NotImplementedError

    def train_dataset(self):  # required: map-style; items are dicts or BadRow
        raise NotImplementedError

    def val_dataset(self):
        return None

    def collate(self, samples: list) -> dict:
        return collate_skip_bad(samples)

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict]:
        """Default split: weight decay on ≥2-D weights only (not biases, norms, embeddings, position tables)."""
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            parts = name.split(".")
            leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
            if p.dim() < 2 or "emb" in leaf or "emb" in parent or "norm" in parent or parent.startswith("ln"):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def eval_step(self, module: nn.Module, batch: dict) -> dict[str, tuple[float, int]]:
        """Sums and counts of metrics for one validation batch (averaged over all batches and ranks)."""
        out = module(batch, step=0)
        n = int(batch["size"])
        return {k: (float(v) * n, n) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}

    def after_step(self, module: nn.Module, step: int) -> None:
        """Called after every optimizer step (e.g. clamp CLIP's temperature, restart dead VQ codes)."""

    def save_model(self, module: nn.Module, out_dir: Path) -> None:  # required
        raise NotImplementedError

    def sample_images(self, module: nn.Module, batch: dict):
        """Optional: PIL images written to ``samples/step-N.png`` (and TensorBoard) at evaluation time."""
        return None

    def describe(self) -> dict:
        return {"task": self.name}


# ------------------------------------------------------------------------------------------------- sampling
