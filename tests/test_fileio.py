"""Atomic writes never replace what is not a regular file, and files get the umask's permissions."""
from __future__ import annotations

import os
import stat
import threading

import pytest
import torch

from tuwen.errors import TuwenError
from tuwen.fileio import atomic_dir, atomic_torch_save, atomic_write_text


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_files_follow_the_umask_and_existing_keep_their_mode(tmp_path, umask022):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "x")
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    os.chmod(p, 0o640)
    atomic_write_text(p, "y")
    assert p.read_text() == "y" and stat.S_IMODE(p.stat().st_mode) == 0o640
    atomic_torch_save({"a": torch.ones(1)}, tmp_path / "ck.pt")
    assert stat.S_IMODE((tmp_path / "ck.pt").stat().st_mode) == 0o644
    with atomic_dir(tmp_path / "folder") as d:
        (d / "f").write_text("1")
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_a_symlink_is_written_through_and_kept(tmp_path):
    real = tmp_path / "real.tsv"
    real.write_text("old")
    link = tmp_path / "link.tsv"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    dangling = tmp_path / "dangling.tsv"
    dangling.symlink_to(tmp_path / "sub" / "made.tsv")
    atomic_write_text(dangling, "z")
    assert dangling.is_symlink() and (tmp_path / "sub" / "made.tsv").read_text() == "z"


def test_fifo_device_and_stdout_are_written_in_place(tmp_path, capfd):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}

    def read():
        with open(fifo, encoding="utf-8") as f:
            got["text"] = f.read()

    t = threading.Thread(target=read)
    t.start()
    atomic_write_text(fifo, "through the pipe\n")
    t.join(10)
    assert got["text"] == "through the pipe\n" and stat.S_ISFIFO(fifo.stat().st_mode)
    atomic_write_text("/dev/null", "discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    atomic_write_text("-", "to stdout\n")
    assert "to stdout" in capfd.readouterr().out
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(TuwenError, match="is a folder"):
        atomic_write_text(tmp_path, "x")


def test_dev_stdout_through_a_pipe_stays_a_link(tmp_path):
    import subprocess
    import sys

    code = "from tuwen.fileio import atomic_write_text; atomic_write_text('/dev/stdout', 'piped\\n')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "piped\n", r.stderr
    assert os.path.islink("/dev/stdout")
