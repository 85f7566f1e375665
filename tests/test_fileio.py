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


# ----------------------------------------------------------------------------------------------- locks, leftovers, checksums

def _lock_in_child(folder, hold_s: float):
    import subprocess
    import sys

    code = ("import sys, time; from tuwen.fileio import DirLock; l = DirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder), str(hold_s)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_dir_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    from tuwen.fileio import DirLock

    child = _lock_in_child(tmp_path, 60)
    try:
        with pytest.raises(TuwenError, match=rf"in use by another run \(pid {child.pid} on "):
            DirLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    notes = []
    lock = DirLock(tmp_path).acquire(warn=notes.append)   # the dead run's lock is taken over
    assert notes and f"pid {child.pid}" in notes[0]
    lock.release()
    notes.clear()
    DirLock(tmp_path).acquire(warn=notes.append).release()  # released cleanly: nothing to say
    assert notes == []


def test_clean_stale_tmp_removes_only_dead_writers_files(tmp_path):
    from tuwen.fileio import clean_stale_tmp

    dead = tmp_path / ".step-5.pt.999999999.abcd.tmp"
    mine = tmp_path / f".step-6.pt.{os.getpid()}.abcd.tmp"
    dead.write_bytes(b"x")
    mine.write_bytes(b"y")
    assert clean_stale_tmp(tmp_path) == [dead]
    assert not dead.exists() and mine.exists()


def test_checksums_catch_flipped_bits_truncation_and_empty_files(tmp_path):
    from tuwen.fileio import verify_checksum, verify_folder_checksums, write_checksum, write_folder_checksums

    p = tmp_path / "ck.pt"
    p.write_bytes(bytes(range(256)) * 10)
    assert verify_checksum(p) is None          # no checksum yet: accepted (files from older versions)
    write_checksum(p)
    assert verify_checksum(p) is None
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    assert "sha256 mismatch" in verify_checksum(p)
    p.write_bytes(bytes(data[:50]))
    assert "truncated" in verify_checksum(p)
    p.write_bytes(b"")
    assert "empty" in verify_checksum(p)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.bin").write_bytes(b"abc")
    write_folder_checksums(tmp_path / "m", ["a.bin"])
    assert verify_folder_checksums(tmp_path / "m") == []
    (tmp_path / "m" / "a.bin").write_bytes(b"abd")
    assert "a.bin: sha256 mismatch" in verify_folder_checksums(tmp_path / "m")[0]
