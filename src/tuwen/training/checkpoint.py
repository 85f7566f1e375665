"""Training checkpoints on disk: one ``checkpoints/step-NNNNNNNN.pt`` per save, each with a ``.sha256`` beside it.

Writing is atomic (temporary file + rename) and the checksum is written after the file, so a checkpoint without a
checksum is one from an older tuwen or one whose writer died between the two (it is still read, after the
``torch.load`` itself succeeds). ``--resume auto`` takes the newest checkpoint that verifies and reads; a broken one
(flipped bits, truncated, empty) is named in a warning and the previous one is used. Temporary files left by
writers that died are removed when a run starts.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Callable

import torch

from ..errors import TuwenError
from ..fileio import atomic_torch_save, clean_stale_tmp, verify_checksum, write_checksum

CKPT_DIR = "checkpoints"
FORMAT = "tuwen-train-state"
_STEP = re.compile(r"step-(\d+)\.pt$")


def list_checkpoints(folder: str | Path) -> list[Path]:
    """``step-*.pt`` in ``folder`` (or its ``checkpoints/``), oldest first."""
    folder = Path(folder)
    for d in (folder / CKPT_DIR, folder):
        if d.is_dir():
            found = [p for p in d.glob("step-*.pt") if _STEP.search(p.name)]
            if found:
                return sorted(found, key=lambda p: int(_STEP.search(p.name).group(1)))
    return []


def read_checkpoint(path: str | Path, flag: str = "--resume") -> dict:
    """Read one checkpoint (weights_only) after checking its checksum; a TuwenError says what is wrong."""
    path = Path(path)
    problem = verify_checksum(path)
    if problem:
        raise TuwenError(f"{flag}: checkpoint {path} is broken: {problem}")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuwenError(f"{flag}: cannot read checkpoint {path} ({reason})") from None
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise TuwenError(f"{flag}: {path} is not a tuwen training checkpoint (write one with a tuwen train run)")
    bad = [k for k, v in st.get("module", {}).items() if torch.is_tensor(v) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise TuwenError(f"{flag}: checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}"
                         f"{' …' if len(bad) > 3 else ''})")
    return st


def latest_valid_checkpoint(folder: str | Path, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``folder`` that verifies and reads, with its state; broken newer ones are
    named in ``warn``. None when there is no checkpoint; a TuwenError when every one is broken."""
    found = list_checkpoints(folder)
    problems = []
    for path in reversed(found):
        try:
            return path, read_checkpoint(path)
        except TuwenError as e:
            problems.append(str(e).removeprefix("--resume: "))
            warn(f"warning: skipping {path}: {problems[-1]}; trying the previous checkpoint")
    if found:
        raise TuwenError(f"--resume auto: every checkpoint in {Path(folder) / CKPT_DIR} is broken "
                         f"({'; '.join(problems[:3])}); start without --resume or restore a good copy")
    return None


def write_checkpoint(state: dict, folder: str | Path, step: int, keep: int | None) -> Path:
    """Write ``checkpoints/step-N.pt`` + its checksum; keep the newest ``keep`` (None: all)."""
    d = Path(folder) / CKPT_DIR
    path = d / f"step-{step:08d}.pt"
    atomic_torch_save(state, path)
    write_checksum(path)
    if keep is not None:
        for old in list_checkpoints(folder)[: -max(1, keep)]:
            for p in (old, old.with_name(old.name + ".sha256")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
    return path


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Temporary files of dead writers in the run folder and its checkpoints/."""
    folder = Path(folder)
    return clean_stale_tmp(folder) + clean_stale_tmp(folder / CKPT_DIR)
