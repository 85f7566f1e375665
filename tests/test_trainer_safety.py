"""What protects a training run: one run per folder, checksummed checkpoints with fallback, Ctrl-C saves,
timed checkpoints, samples on disk, clear errors for all-bad data and NaN losses."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_train import ToyData, ToyTask  # noqa: E402

from tuwen.errors import TuwenError  # noqa: E402
from tuwen.fileio import DirLock  # noqa: E402
from tuwen.training.checkpoint import CKPT_DIR, list_checkpoints  # noqa: E402
from tuwen.training.trainer import TrainArgs, Trainer  # noqa: E402


def _args(ck, **kw):
    base = dict(checkpoint_dir=str(ck), learning_rate=1e-2, max_steps=8, micro_batch_size=8,
                save_checkpoint_steps=2, logging_steps=100, num_workers=0, random_seed=7, tensorboard=False,
                progress=False)
    base.update(kw)
    return TrainArgs(**base)


def _train(ck, task=None, log=None, **kw):
    t = Trainer(_args(ck, **kw), task or ToyTask(), log=log)
    return t, t.train()


def test_a_second_run_on_the_same_folder_fails_at_once(tmp_path):
    holder = DirLock(tmp_path, "--checkpoint_dir").acquire()
    try:
        with pytest.raises(TuwenError, match=r"--checkpoint_dir .* is in use by another run \(pid "):
            _train(tmp_path)
    finally:
        holder.release()
    assert not (tmp_path / CKPT_DIR).exists()  # nothing was written by the refused run
    _train(tmp_path)                            # free again: the run goes through


def test_broken_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    _train(tmp_path, keep_checkpoints=3)
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step-00000004.pt", "step-00000006.pt", "step-00000008.pt"]
    assert all(p.with_name(p.name + ".sha256").exists() for p in ckpts)
    data = bytearray(ckpts[-1].read_bytes())
    data[len(data) // 2] ^= 0x10                # one flipped bit in the newest
    ckpts[-1].write_bytes(bytes(data))
    ckpts[-2].write_bytes(ckpts[-2].read_bytes()[:100])   # the one before it truncated
    (tmp_path / CKPT_DIR / f".step-00000010.pt.{2 ** 22 + 12345}.abcd.tmp").write_bytes(b"orphan")
    logs = []
    t, _ = _train(tmp_path, resume="auto", max_steps=10, log=logs.append)
    text = "\n".join(logs)
    assert "skipping" in text and "step-00000008.pt" in text and "sha256 mismatch" in text
    assert "step-00000006.pt" in text and "truncated" in text
    assert "resumed from" in text and "step-00000004.pt" in text
    assert "a temporary file of a run that died" in text
    assert not list((tmp_path / CKPT_DIR).glob(".*.tmp"))
    assert t.step == 10


def test_empty_checkpoint_gives_a_reason(tmp_path):
    _train(tmp_path, max_steps=2)
    (ck,) = list_checkpoints(tmp_path)
    ck.write_bytes(b"")
    with pytest.raises(TuwenError, match=r"every checkpoint .* is broken .*empty file \(0 bytes\)"):
        _train(tmp_path, resume="auto", max_steps=4)
    with pytest.raises(TuwenError, match=r"checkpoint .*step-00000002.pt is broken: empty file"):
        _train(tmp_path, resume=str(ck), max_steps=4)


class _AllBad(ToyTask):
    def train_dataset(self):
        return ToyData(self.n, bad_every=1)


def test_all_bad_rows_is_an_error_and_saves_nothing(tmp_path):
    with pytest.raises(TuwenError, match=r"no usable training rows: every one of the 96 rows was bad"):
        _train(tmp_path, task=_AllBad(), max_steps=None, epoch_num=1, save_checkpoint_steps=None)
    assert not (tmp_path / "toy_model.pt").exists() and not list_checkpoints(tmp_path)


def test_nan_loss_right_after_resume_blames_the_checkpoint(tmp_path):
    _train(tmp_path, max_steps=4)
    ck = list_checkpoints(tmp_path)[-1]
    st = torch.load(ck, weights_only=True)
    st["optimizer"]["state"][0]["exp_avg"].fill_(float("nan"))  # weights fine, optimizer state corrupt
    torch.save(st, ck)
    ck.with_name(ck.name + ".sha256").unlink()   # as if written by a tuwen without checksums
    with pytest.raises(TuwenError, match=r"loss became nan .* after resuming from .*step-00000004.pt: that "
                                         r"checkpoint is probably damaged"):
        _train(tmp_path, resume="auto", max_steps=8)
    # non-finite weights are caught when the checkpoint is read: auto falls back, a named file is an error
    st["module"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in st["module"].items()}
    torch.save(st, ck)
    with pytest.raises(TuwenError, match="holds non-finite weights"):
        _train(tmp_path, resume=str(ck), max_steps=8)
    logs = []
    t, _ = _train(tmp_path, resume="auto", max_steps=8, log=logs.append)
    assert any("skipping" in m and "non-finite" in m for m in logs) and t.step == 8


class _InterruptAt(ToyTask):
    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at = at

    def after_step(self, module, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, task=_InterruptAt(3), save_checkpoint_steps=100)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003.pt"]
    t, _ = _train(tmp_path, resume="auto", save_checkpoint_steps=100)
    assert t.step == 8


def test_timed_checkpoints(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])

    class Slow(ToyTask):
        def after_step(self, module, step):
            clock[0] += 40.0  # each step "takes" 40 s

    _train(tmp_path, task=Slow(), save_checkpoint_steps=100, save_checkpoint_minutes=1.0, keep_checkpoints=10)
    steps = [int(p.stem.split("-")[1]) for p in list_checkpoints(tmp_path)]
    assert steps == [2, 4, 6, 8]   # every 80 s ≥ 1 min, plus the last step


class _WithSamples(ToyTask):
    def sample_images(self, module, batch):
        from PIL import Image
        v = int(batch["y"][0].abs().item() * 50) % 255
        return [Image.new("RGB", (8, 8), (v, 0, 0)) for _ in range(4)]


def test_sample_grids_are_written_to_disk(tmp_path):
    _train(tmp_path, task=_WithSamples(), max_steps=4)
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["step-00000002.png", "step-00000004.png"]


def test_warmup_steps_and_save_every_n_epochs(tmp_path):
    t, _ = _train(tmp_path, max_steps=None, epoch_num=3, save_checkpoint_steps=None, save_checkpoint_epochs=2,
                  warmup_steps=5, keep_checkpoints=10, log=lambda m: None)
    steps = [int(p.stem.split("-")[1]) for p in list_checkpoints(tmp_path)]
    assert steps == [24, 36]            # 12 steps an epoch: after epoch 2, and the last step
    log = [__import__("json").loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [round(r["lr"] / 1e-2, 4) for r in log[:6]] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
