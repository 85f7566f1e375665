"""Sharded training (``--fsdp``): FSDP2 ``fully_shard`` per transformer block + sharded checkpoints with DCP.

Plain DDP keeps the whole model, its gradients and AdamW's two moments on every GPU (16 bytes per parameter in
fp32: ~64 GB for CogView's 4B model). ``fully_shard`` splits each of them over the processes: parameters are
all-gathered block by block just for that block's forward/backward and gradients are reduce-scattered.

* Sharding: every transformer block (GPT ``Block``, ViT ``ResidualAttentionBlock``) is its own FSDP unit, then the
  whole module (embeddings, final norm, head and anything else). A module without such blocks is one unit.
* Precision: on CUDA with bf16, parameters are all-gathered and computed in bf16, gradients reduced in fp32
  (``MixedPrecisionPolicy``); the sharded master weights and optimizer states stay fp32.
* Checkpoints: ``checkpoints/step-N.dcp/`` — a ``torch.distributed.checkpoint`` folder (each rank writes its own
  shards of the model and optimizer) plus ``trainer.pt`` (step, schedule, RNG states of every rank, bad rows)
  written by rank 0, and ``complete`` written last. The folder is written under a temporary name and renamed, so a
  run killed while saving leaves no half checkpoint. DCP reshards on load, so a checkpoint also loads with a
  different number of processes — sharded, or into one unsharded process without --fsdp (the random states are
  then re-seeded, as for ``.pt`` checkpoints); a ``.pt`` of a run without --fsdp loads sharded (:func:`load_unsharded`).
* ``--fsdp_cpu_offload``: FSDP2's ``CPUOffloadPolicy`` (shards, gradients and optimizer states in CPU memory).
"""
from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TuwenError
from ..models.gpt import Block
from ..models.vit import ResidualAttentionBlock
from .. import runtime as D
from .checkpoint import CKPT_DIR
from .order import _rng_state, _set_rng_state

_STEP = re.compile(r"step-(\d+)\.dcp$")
TRAINER_STATE = "trainer.pt"
COMPLETE = "complete"


def blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: every GPT ``Block`` and ViT ``ResidualAttentionBlock`` inside
    ``module`` (the GPT of text→image, captioner, CogView; CLIP's and the captioner's vision towers)."""
    return [m for m in module.modules() if isinstance(m, (Block, ResidualAttentionBlock))]


def shard(module: nn.Module, device: torch.device, precision: str, cpu_offload: bool = False) -> nn.Module:
    """``fully_shard`` each block, then the root (in place: the parameters become DTensors, so build the optimizer
    after this). Needs a process group (torchrun). ``cpu_offload``: FSDP2's ``CPUOffloadPolicy`` — the sharded
    parameters, their gradients and the optimizer states live in CPU memory (pinned on CUDA); each block's shards
    are copied to ``device`` just for its all-gather, and the optimizer step runs on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized() or D.world_size() < 2:
        raise TuwenError("--fsdp shards the model over processes: start the run with torchrun --nproc_per_node N "
                         "(N ≥ 2), or drop --fsdp for a single process (a single process also resumes the "
                         "sharded step-N.dcp checkpoints of an --fsdp run)")
    kw = {}
    if precision == "bf16" and device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for block in blocks(module):
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    return module


def describe(module: nn.Module) -> str:
    """How ``module`` is sharded, read back from FSDP's own state: units, and how many keep their shards in CPU
    memory (``CPUOffloadPolicy``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    offloaded = 0
    for m in units:
        group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)  # None: a unit that holds no parameter
        offloaded += isinstance(getattr(group, "offload_policy", None), CPUOffloadPolicy)
    where = f", {offloaded} with their shards, gradients and optimizer states in CPU memory" if offloaded else ""
    return f"FSDP2: {len(units)} unit(s) over {D.world_size()} processes{where}"


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Accumulate gradients locally (no reduce-scatter) inside; like DDP's ``no_sync``."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def as_float(x) -> float:
    """A scalar that may be a DTensor (e.g. the total norm ``clip_grad_norm_`` returns on sharded gradients)."""
    from torch.distributed.tensor import DTensor
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def full_copy(module: nn.Module, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """An unsharded copy of the trained weights on every rank, for evaluation, sample images and ``save_model``
    (a collective: every rank calls it). Costs one full copy of the weights (not of the optimizer states). The
    global random states are left as they were, so training continues exactly as without it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    rng = _rng_state()
    try:
        copy = build().to(device)
    finally:
        _set_rng_state(rng)
    copy.load_state_dict(sd, strict=True)
    copy.train(module.training)
    return copy


# ------------------------------------------------------------------------------------------------- checkpoints

def is_dcp(path: str | Path) -> bool:
    """A sharded checkpoint folder (``step-N.dcp``), as opposed to a single-file ``step-N.pt``."""
    return Path(path).name.endswith(".dcp")


def step_of(path: Path) -> int:
    return int(_STEP.search(path.name).group(1))


def list_dcp(folder: str | Path) -> list[Path]:
    """Complete ``step-*.dcp`` folders under ``folder`` (or its ``checkpoints/``), oldest first."""
    folder = Path(folder)
    for d in (folder / CKPT_DIR, folder):
        if d.is_dir():
            found = [p for p in d.glob("step-*.dcp") if _STEP.search(p.name) and (p / COMPLETE).exists()]
            if found:
                return sorted(found, key=step_of)
    return []


def save(folder: str | Path, step: int, module: nn.Module, optimizer, trainer_state: dict | None,
         keep: int | None) -> Path:
    """Write ``checkpoints/step-N.dcp`` (every rank calls it; ``trainer_state`` is rank 0's, None elsewhere)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    d = Path(folder) / CKPT_DIR
    final = d / f"step-{step:08d}.dcp"
    tmp = d / f".tmp-step-{step:08d}.dcp"
    if D.is_main():
        for stale in d.glob(".tmp-step-*.dcp"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if D.is_main():
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / COMPLETE).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            for old in list_dcp(folder)[: -max(1, keep)]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def read_trainer_state(path: Path, flag: str = "--resume") -> dict:
    if not (path / COMPLETE).exists():
        raise TuwenError(f"{flag}: {path} is not a complete sharded checkpoint (its writer died while saving); "
                         "resume from an earlier one")
    try:
        return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TuwenError(f"{flag}: cannot read {path / TRAINER_STATE} ({type(e).__name__}: {e})") from None


def load(path: Path, module: nn.Module, optimizer) -> None:
    """Load the model and optimizer shards of ``path`` into ``module`` / ``optimizer`` (every rank): sharded ones
    of any world size (DCP reshards: a checkpoint of 2 processes loads into 1, 4, …), or a plain (unsharded) module
    and its optimizer, with or without a process group (one process, or DDP). ``optimizer`` None: only the
    weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": module.state_dict()}
    else:
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():  # no process group: DCP says it loads in a single process, as meant
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuwenError(f"--resume: {path} does not match this model or is damaged ({first}); resume with the "
                         "same model settings it was written with") from None
    if optimizer is None:
        module.load_state_dict(state["model"], strict=True)
    else:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_unsharded(st: dict, path: Path, module: nn.Module, optimizer, build: Callable[[], nn.Module],
                   make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
    """A single-file ``step-N.pt`` (one process or DDP) into the sharded ``module`` / ``optimizer`` of an --fsdp run
    (every rank). Its optimizer state is keyed by parameter number; a plain CPU copy of the model and optimizer
    translates it to parameter names, then every rank keeps its own shards of the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    rng = _rng_state()
    try:
        plain = build()
    finally:
        _set_rng_state(rng)
    try:
        plain.load_state_dict(st["module"], strict=True)
        plain_opt = make_optimizer(plain)
        plain_opt.load_state_dict(st["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TuwenError(f"--resume: {path} does not match this model ({str(e).splitlines()[0]}); resume with the "
                         "same model settings it was written with") from None
    model_sd, optim_sd = get_state_dict(plain, plain_opt)
    set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
