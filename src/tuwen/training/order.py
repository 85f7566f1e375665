"""The order of training: which rows each rank reads in each epoch, random states, the learning-rate schedule.

Everything here is a pure function of (seed, epoch, position), which is what makes ``--resume`` exact.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from .. import runtime as D


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices, sharded over ranks like ``DistributedSampler``, resumable mid-epoch.

    The permutation of epoch e depends only on (seed, e); ``set_epoch(e, start)`` skips the first ``start``
    indices of this rank's shard (used when resuming in the middle of an epoch).
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world
        idx = (idx * math.ceil(total / max(len(idx), 1)))[:total] if idx else []  # pad by wrapping, like DDP's sampler
        return idx[self.rank:total:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def _shard_indices(n: int) -> list[int]:
    return list(range(D.rank(), n, D.world_size()))


# ------------------------------------------------------------------------------------------------- helpers

def _rng_state() -> dict:
    st = np.random.get_state()
    out = {"python": random.getstate(), "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return max(0.0, 1.0 - frac)
    return f
