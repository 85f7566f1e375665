"""Where and how tensors run: device resolution, autocast, torch.distributed helpers.

Every module that picks a device, enters autocast or asks for its rank uses these functions, so the rules (what
``--device auto`` means, bf16 on CUDA, one process group under torchrun) are written once.

With no ``WORLD_SIZE`` in the environment (or WORLD_SIZE=1) everything is a plain single process: no process group
is created and the distributed helpers are no-ops.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .errors import TuwenError

# ----------------------------------------------------------------------------------------------- devices


def _cuda_missing(name: str, flag: str) -> TuwenError:
    why = ("this torch was built without CUDA" if not torch.backends.cuda.is_built()
           else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
    return TuwenError(f"{flag} {name}: CUDA is not available here ({why}); available: cpu. Use {flag} cpu or auto")


def resolve_device(name: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """``auto`` (or None) → the local CUDA device when there is one (``LOCAL_RANK`` under torchrun), else CPU.

    Anything else must name a device this machine has; a mistake is one ``TuwenError`` line naming ``flag``.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise TuwenError(f"{flag} {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _cuda_missing(name, flag)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TuwenError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise TuwenError(f"{flag} {name}: MPS is not available here; use {flag} cpu or auto")
    elif dev.type != "cpu":
        raise TuwenError(f"{flag} {name!r}: unsupported device type {dev.type!r} (use auto, cpu, cuda or cuda:N)")
    return dev


# ----------------------------------------------------------------------------------------------- autocast


def amp_dtype(device: torch.device, weight_dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """The autocast dtype tuwen uses for inference: bf16 on CUDA for fp32 weights, none elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and weight_dtype == torch.float32 else None


def autocast(device: torch.device | str, dtype: torch.dtype | None = None, *, cache_enabled: bool = True):
    """A context for running on ``device`` in ``dtype``.

    - ``None``: leave the caller's autocast state as it is (a null context);
    - ``torch.float32``: plain fp32, autocast switched off even inside a caller's autocast;
    - ``torch.bfloat16`` / ``torch.float16``: autocast to that dtype.
    """
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(dev_type, enabled=False)
    if dtype not in (torch.bfloat16, torch.float16):
        raise TuwenError(f"autocast dtype must be float32, bfloat16 or float16, got {dtype}")
    return torch.autocast(dev_type, dtype=dtype, cache_enabled=cache_enabled)


def inference_autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU: what every inference path (generate, caption, embed, rerank) uses."""
    return autocast(device, amp_dtype(device))


# ----------------------------------------------------------------------------------------------- distributed


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """Resolve the device and, under torchrun (WORLD_SIZE > 1), join the process group (nccl on CUDA, else gloo)."""
    dev = resolve_device(device, flag)
    if env_world_size() > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
            if dev.index is None or str(device or "auto") in ("auto", "cuda"):
                dev = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


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


def progress_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``--progress`` / ``--no_progress`` switch: None (not given) → None (tqdm shows a
    bar only when stderr is a terminal), True → always on, False → off; never on ranks other than 0."""
    if rank() != 0:
        return True
    return None if progress is None else not progress


# ----------------------------------------------------------------------------------------------- CPU threads


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask / container limit when the OS tells it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(device: torch.device | str, cores: int | None = None) -> int:
    """DataLoader workers when the user gives none (``--data_threads``).

    On CPU the model's own maths needs the cores: workers decoding images beside it oversubscribe a small machine.
    So: no workers up to 4 cores, then a quarter of the cores (at most 4). On a GPU the CPU only feeds it: up to 4
    workers, one core left for the main process. Measured (README "Training on your own images"): tiny VQGAN,
    64 px, batch 16, on a busy 2-core machine: torch's 2 threads + 1 worker 1.9–6.1 images/s, 2 threads + 0
    workers 1.1, 1 thread + 0 workers 5.8–8.3.
    """
    cores = cpu_count() if cores is None else max(1, cores)
    if torch.device(device).type == "cuda":
        return min(4, max(0, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


def default_threads(workers: int, cores: int | None = None) -> int:
    """torch intra-op threads for CPU training: threads + workers ≤ cores − 1 (one core left for the OS, the
    main process' data loading and whatever else runs on the machine), at least 1 — on 2 cores: 1 thread."""
    cores = cpu_count() if cores is None else max(1, cores)
    return max(1, cores - 1 - max(0, workers))


def configure_threads(device: torch.device | str, workers: int, cores: int | None = None) -> int:
    """Lower torch's intra-op threads to ``default_threads`` on CPU (each DataLoader worker runs one thread of its
    own), unless the user chose (``TUWEN_NUM_THREADS`` or ``OMP_NUM_THREADS`` in the environment). Returns the
    number of threads in use. Nothing changes for CUDA runs."""
    if torch.device(device).type == "cuda":
        return torch.get_num_threads()
    env = os.environ.get("TUWEN_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise TuwenError(f"TUWEN_NUM_THREADS={env!r}: not a whole number of threads") from None
        torch.set_num_threads(max(1, n))
        return torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    want = default_threads(workers, cores)
    if want < torch.get_num_threads():
        torch.set_num_threads(want)
    return torch.get_num_threads()
