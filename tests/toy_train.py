"""A tiny task for trainer tests; also runnable as a script (for kill/resume and torchrun tests)."""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
from pathlib import Path

import torch
from torch import nn

from tuwen.data.tables import BadRow
from tuwen.training.trainer import Task, TrainArgs, Trainer, unwrap
from tuwen import runtime as D


class ToyData:
    """Item i: x ~ N(0,1)^8 seeded by i, y = x·w + augmentation noise seeded by (epoch, i). Every `bad_every`-th row is bad."""

    def __init__(self, n=96, bad_every=0):
        self.n, self.bad_every, self.epoch = n, bad_every, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.bad_every and i % self.bad_every == self.bad_every - 1:
            return BadRow("toy.tsv", i + 1, "bad base64")
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, generator=g)
        noise = random.Random(f"{self.epoch}-{i}").gauss(0, 0.1)
        y = (x * torch.arange(1, 9).float() / 8).sum() + noise
        return {"x": x, "y": y}


class ToyModule(nn.Module):
    def __init__(self, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 1))

    def forward(self, batch, step=0):
        pred = self.net(batch["x"]).squeeze(-1)
        return {"loss": ((pred - batch["y"]) ** 2).mean()}


class ToyTask(Task):
    name = "toy"

    def __init__(self, n=96, bad_every=0, kill_at=None, dropout=0.1):
        self.n, self.bad_every, self.kill_at, self.dropout = n, bad_every, kill_at, dropout

    def build_module(self):
        return ToyModule(self.dropout)

    def train_dataset(self):
        return ToyData(self.n, self.bad_every)

    def val_dataset(self):
        return ToyData(32)

    def after_step(self, module, step):
        if self.kill_at and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def save_model(self, module, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), out_dir / "toy_model.pt")


def param_digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(unwrap(module).state_dict().items()):
        v = v.full_tensor() if hasattr(v, "full_tensor") else v  # --fsdp: DTensor shards → the whole tensor
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--max_steps", type=int, default=12)
    p.add_argument("--save_every", type=int, default=4)
    p.add_argument("--resume", default=None)
    p.add_argument("--kill_at", type=int, default=None)
    p.add_argument("--bad_every", type=int, default=0)
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--fsdp_cpu_offload", action="store_true")
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--dump_state", action="store_true", help="rank 0 writes the full model+optimizer state")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = TrainArgs(checkpoint_dir=a.ckpt, learning_rate=1e-2, max_steps=a.max_steps,
                     micro_batch_size=a.micro_batch_size,
                     gradient_accumulation_steps=a.gas, save_checkpoint_steps=a.save_every, logging_steps=4,
                     resume=a.resume, num_workers=1, random_seed=7, tensorboard=False, progress=False,
                     fsdp=a.fsdp, fsdp_cpu_offload=a.fsdp_cpu_offload)
    task = ToyTask(bad_every=a.bad_every, kill_at=a.kill_at, dropout=a.dropout)
    trainer = Trainer(args, task)
    made, make = [], trainer._make_optimizer  # remember the run's optimizer (the first one made) for --dump_state
    trainer._make_optimizer = lambda module: made.append(make(module)) or made[-1]
    result = trainer.train()
    # every rank writes the digest of its own in-memory weights and its bad-row count
    Path(a.ckpt, f"digest-rank{D.rank()}.txt").write_text(param_digest(trainer.module))
    if a.dump_state:  # the full (gathered) weights and optimizer state, keyed by parameter name (a collective)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, optim_sd = get_state_dict(trainer.module, made[0],
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if D.is_main():
            torch.save({"model": model_sd, "optim": optim_sd}, Path(a.ckpt, "full_state.pt"))
    if D.is_main():
        Path(a.ckpt, "bad_rows.txt").write_text(str(result["bad_rows"]))
    D.cleanup()


if __name__ == "__main__":
    main()
