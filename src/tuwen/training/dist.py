"""torch.distributed helpers: env-var initialisation (torchrun), rank queries, reductions.

With no ``WORLD_SIZE`` in the environment (or WORLD_SIZE=1) everything is a plain single process: no process group
is created and the helpers are no-ops.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device: str = "auto") -> torch.device:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (nccl on CUDA, else gloo)."""
    want_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if env_world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if want_cuda:
        if device.startswith("cuda:"):
            return torch.device(device)
        return torch.device("cuda", local_rank if env_world_size() > 1 else torch.cuda.current_device())
    if device not in ("auto", "cpu"):
        from ..errors import TuwenError
        raise TuwenError(f"--device {device!r}: not available here (CUDA available: {torch.cuda.is_available()})")
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    lst = [obj]
    dist.broadcast_object_list(lst, src=src)
    return lst[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
