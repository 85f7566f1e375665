"""Writing files safely: every file tuwen writes goes through these helpers.

A regular file is written to a temporary file in the same folder and renamed over the target, so a reader never
sees half a file and a crash leaves the old version in place. Files get the permissions the process umask gives
(as other tools' files do), not ``mkstemp``'s private 0600. A symlink is written through and kept; standard output
(``-``), a FIFO or a device is written in place and never replaced by a regular file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from .errors import TuwenError


_umask_lock = threading.Lock()


def _umask() -> int:
    with _umask_lock:  # the only portable way to read it is to set it
        old = os.umask(0o022)
        os.umask(old)
    return old


def _copy_into(src: str, dest: str | Path) -> None:
    """Stream a finished temporary file into a target that must be written in place (stdout, FIFO, device)."""
    if str(dest) == "-":
        out = sys.stdout.buffer
        with open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        out.flush()
        return
    with open(src, "rb") as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out)


def write_target(path: str | Path) -> tuple[Path | None, str]:
    """Where and how a file named by the user is written: ``(real path, "atomic")`` for a regular file (or a new
    one), the symlink's target when ``path`` is a symlink; ``(None, "in_place")`` for ``-``, a FIFO, a character
    or block device. A folder or a socket is a ``TuwenError``."""
    if str(path) == "-":
        return None, "in_place"
    p = Path(path)
    real = Path(os.path.realpath(p)) if p.is_symlink() else p  # write through a link, never replace it
    try:
        st = os.stat(p)  # follows links: /dev/stdout → the pipe or terminal it stands for
    except FileNotFoundError:
        return real, "atomic"
    if stat.S_ISREG(st.st_mode):
        return real, "atomic"
    if stat.S_ISDIR(st.st_mode):
        raise TuwenError(f"{path}: is a folder; give a file name")
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return None, "in_place"
    raise TuwenError(f"{path}: not a regular file, FIFO or device; give a file name")


def atomic_write(path: str | Path, write_fn) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``write_fn(tmp_path)`` writes a temporary file in the target's folder, which is then renamed over the target
    (with the target's mode, or the process umask for a new file). A symlink is written through (its target is
    replaced, the link stays); ``-`` (stdout), a FIFO or a device is written in place, never replaced.
    """
    real, how = write_target(path)
    target_dir = (real or Path(".")).parent
    if real is not None:
        target_dir.mkdir(parents=True, exist_ok=True)
    else:
        target_dir = Path(tempfile.gettempdir())
    fd, tmp = tempfile.mkstemp(prefix=f".{(real or Path('out')).name}.", suffix=".tmp", dir=target_dir)
    os.close(fd)
    try:
        write_fn(tmp)
        if how == "in_place":
            _copy_into(tmp, path)
            os.unlink(tmp)
            return
        try:
            mode = stat.S_IMODE(real.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda t: Path(t).write_text(text, encoding="utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda t: torch.save(obj, t))


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Build a folder under a temporary name, then swap it in for ``path`` (for component sub-folders)."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    if path.exists() and not path.is_dir():
        raise TuwenError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
