"""Writing files safely: every file tuwen writes goes through these helpers.

A regular file is written to a temporary file in the same folder and renamed over the target, so a reader never
sees half a file and a crash leaves the old version in place. Files get the permissions the process umask gives
(as other tools' files do), not ``mkstemp``'s private 0600. A symlink is written through and kept; standard output
(``-``), a FIFO or a device is written in place and never replaced by a regular file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import shutil
import stat
import sys
import tempfile
import threading
import time
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


def sanitize_name(s, maxlen: int = 80) -> str:
    """A safe file-name part from user text (idx values): no path separators, no dot-files, no NUL, bounded
    length. When this changes the text (``a/b``, ``a b``, ``a?b`` all give ``a_b``; ``..``, ``.`` and empty give
    ``row``), a short hash of the raw text is appended, so that different idx values never share a name."""
    raw = str(s)
    name = re.sub(r"[^\w\-.]+", "_", raw, flags=re.UNICODE).strip("._") or "row"
    if name != raw or len(name) > maxlen:
        h = hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        name = f"{name[:maxlen - 9]}_{h}"
    return name


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
    fd, tmp = tempfile.mkstemp(prefix=f".{(real or Path('out')).name}.{os.getpid()}.", suffix=".tmp", dir=target_dir)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
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


# ----------------------------------------------------------------------------------------------- leftovers

_TMP_PID = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_stale_tmp(folder: str | Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Remove the temporary files and folders that writers which died left in ``folder`` (not recursive).

    A temporary name carries its writer's pid (``.NAME.PID.XXXX.tmp``): it is removed when that process is gone.
    Older names without a pid are removed once they are ``max_age_s`` old. Returns what was removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue
        m = _TMP_PID.match(p.name)
        try:
            stale = not pid_alive(int(m.group(1))) if m else now - p.lstat().st_mtime > max_age_s
        except OSError:
            continue
        if stale and not p.is_symlink():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------- checksums

CHECKSUM_SUFFIX = ".sha256"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_checksum(path: str | Path) -> Path:
    """Write ``PATH.sha256`` beside ``path`` (``sha256sum`` format: hash, two spaces, size, file name)."""
    path = Path(path)
    side = path.with_name(path.name + CHECKSUM_SUFFIX)
    atomic_write_text(side, f"{sha256_file(path)}  {path.stat().st_size}  {path.name}\n")
    return side


def verify_checksum(path: str | Path) -> str | None:
    """None when ``path`` matches its ``.sha256`` (or has none: files from before checksums); else the reason."""
    path = Path(path)
    side = path.with_name(path.name + CHECKSUM_SUFFIX)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    if not side.is_file():
        return None
    try:
        digest, want_size, *_ = side.read_text(encoding="utf-8").split()
        want_size = int(want_size)
    except (OSError, ValueError, UnicodeDecodeError):
        return f"unreadable checksum file {side.name}"
    if size != want_size:
        return f"truncated or extended: {size} bytes, {want_size} when written"
    if sha256_file(path) != digest:
        return "content changed since it was written (sha256 mismatch: flipped bits or a partial copy)"
    return None


def write_folder_checksums(folder: str | Path, names: list[str], filename: str = "checksums.sha256") -> Path:
    """One ``checksums.sha256`` for a model folder: a line per file (hash, size, relative name)."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / n)}  {(folder / n).stat().st_size}  {n}" for n in sorted(names)]
    atomic_write_text(folder / filename, "\n".join(lines) + "\n")
    return folder / filename


def verify_folder_checksums(folder: str | Path, filename: str = "checksums.sha256") -> list[str]:
    """Problems with the files that ``checksums.sha256`` lists (empty: all good, or no checksum file)."""
    folder = Path(folder)
    listing = folder / filename
    if not listing.is_file():
        return []
    problems = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        parts = line.split("  ", 2)
        if len(parts) != 3:
            continue
        digest, size, name = parts
        p = folder / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != int(size):
            problems.append(f"{name}: {p.stat().st_size} bytes, {size} when written (truncated or replaced)")
        elif sha256_file(p) != digest:
            problems.append(f"{name}: sha256 mismatch (the file changed since it was written)")
    return problems


# ----------------------------------------------------------------------------------------------- locks

class DirLock:
    """An exclusive lock on a folder (``FOLDER/.lock``) for one run at a time.

    The lock is an ``flock`` on the lock file, so it is released by the kernel when its holder dies: a lock
    file left by a dead run is taken over (with a note naming the old holder). The file records who holds it
    (pid, host, start time, command) for the message a second run gets.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str = "--checkpoint_dir"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, warn=None) -> "DirLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            h = self.holder()
            who = (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}"
                   + (f": {h['command']}" if h.get("command") else "")) if h else "another process"
            raise TuwenError(f"{self.what} {self.folder} is in use by another run ({who}). Wait for it to finish, "
                             f"or give another {self.what}") from None
        old = self.holder()
        if old and warn is not None and old.get("pid") != os.getpid():
            warn(f"{self.what} {self.folder}: taking over the lock left by a run that ended without releasing it "
                 f"(pid {old.get('pid')} on {old.get('host')}, started {old.get('started')})")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
