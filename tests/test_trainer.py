"""The shared trainer: learning, exact resume after a kill, bad rows, strict mode, 2-process torchrun (gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_train import ToyTask  # noqa: E402

from tuwen.data.tables import BadRowError  # noqa: E402
from tuwen.errors import TuwenError  # noqa: E402
from tuwen.training.trainer import TrainArgs, Trainer, _lr_lambda  # noqa: E402

SCRIPT = str(Path(__file__).parent / "toy_train.py")


def _run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, **kw)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(d):
    return [json.loads(line) for line in Path(d, "train_log.jsonl").read_text().splitlines()]


def _args(tmp_path, **kw):
    base = dict(checkpoint_dir=str(tmp_path / "ck"), learning_rate=1e-2, max_steps=12, micro_batch_size=8,
                save_checkpoint_steps=6, num_workers=0, random_seed=3, tensorboard=False, progress=False)
    base.update(kw)
    return TrainArgs(**base)


def test_trains_and_saves(tmp_path):
    tr = Trainer(_args(tmp_path, max_steps=36), ToyTask(), log=lambda m: None)
    res = tr.train()
    log = _log(tmp_path / "ck")
    assert [r["step"] for r in log] == list(range(1, 37))
    first, last = sum(r["loss"] for r in log[:6]) / 6, sum(r["loss"] for r in log[-6:]) / 6
    assert last < 0.5 * first, (first, last)
    assert (tmp_path / "ck" / "toy_model.pt").exists()
    assert res["best"] is not None and res["history"][-1]["step"] == 36
    ckpts = sorted((tmp_path / "ck" / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000030.pt", "step-00000036.pt"]  # keeps the last 2
    st = torch.load(ckpts[-1], weights_only=True)  # loadable without unpickling code
    assert {"module", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng"} <= set(st)


def test_lr_schedule_warmup_then_decay():
    f = _lr_lambda("linear", 10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == 0.0
    g = _lr_lambda("cosine", 0, 100)
    assert g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.5) and g(100) == pytest.approx(0.0)


@pytest.mark.slow
def test_resume_after_kill_is_exact(tmp_path):
    """An uninterrupted run and a run SIGKILLed mid-way then resumed give the same loss sequence and weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--max_steps", "20", "--save_every", "4", "--gas", "2"]
    r = _run(["--ckpt", str(a), *common])
    assert r.returncode == 0, r.stderr
    r = _run(["--ckpt", str(b), *common, "--kill_at", "10"])
    assert r.returncode != 0  # killed
    assert len(_log(b)) < 20
    r = _run(["--ckpt", str(b), *common, "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "step-00000008.pt" in r.stderr
    la, lb = _log(a), _log(b)
    assert [x["step"] for x in lb] == list(range(1, 21))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert (a / "digest-rank0.txt").read_text() == (b / "digest-rank0.txt").read_text()


@pytest.mark.parametrize("name, cls", [("AdamW", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_optimizer_type_builds_that_optimizer(tmp_path, name, cls):
    """--optimizer_type Adam is EasyNLP's Adam (weight decay as an L2 gradient term), AdamW decays decoupled."""
    tr = Trainer(_args(tmp_path, optimizer_type=name, learning_rate=0.1, weight_decay=0.5), ToyTask())
    w = torch.nn.Parameter(torch.full((2, 2), 4.0))
    holder = torch.nn.Module()
    holder.w = w
    opt = tr._make_optimizer(holder)
    assert type(opt) is cls
    w.grad = torch.zeros_like(w)  # only the weight decay moves w
    opt.step()
    # AdamW: w -= lr·wd·w = 4 - 0.2; Adam: the first step moves by ≈lr whatever the size of the (L2) gradient
    assert torch.allclose(w.detach(), torch.full((2, 2), 3.8 if cls is torch.optim.AdamW else 3.9), atol=1e-4)
    assert {p["weight_decay"] for p in opt.param_groups} == {0.5}


def test_evaluate_without_training(tmp_path):
    """evaluate() works on a fresh trainer (the task builds the model) and on a checkpoint named by --resume."""
    fresh = Trainer(_args(tmp_path), ToyTask(), log=lambda m: None).evaluate()
    assert set(fresh) == {"loss"} and fresh["loss"] > 0
    tr = Trainer(_args(tmp_path, max_steps=12), ToyTask(), log=lambda m: None)
    tr.train()
    after = tr.evaluate()
    assert after["loss"] < fresh["loss"]
    assert tr.history[-1]["loss"] == pytest.approx(after["loss"])
    resumed = Trainer(_args(tmp_path, resume="auto"), ToyTask(), log=lambda m: None)
    assert resumed.evaluate() == pytest.approx(after)
    assert resumed.step == 12


def test_bad_rows_skipped_and_reported(tmp_path):
    msgs = []
    tr = Trainer(_args(tmp_path, max_steps=12), ToyTask(bad_every=5), log=msgs.append)
    res = tr.train()
    assert res["bad_rows"] == 96 // 5
    summary = [m for m in msgs if m.startswith("skipped")]
    assert summary and "skipped 19 bad row(s) of 96" in summary[0]
    assert "toy.tsv:5: bad base64" in "\n".join(msgs)


def test_strict_stops_at_first_bad_row(tmp_path):
    tr = Trainer(_args(tmp_path, strict=True), ToyTask(bad_every=5), log=lambda m: None)
    with pytest.raises(BadRowError, match=r"toy.tsv:\d+: bad base64"):
        tr.train()


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(TuwenError, match="micro_batch_size"):
        Trainer(_args(tmp_path, micro_batch_size=0), ToyTask())
    with pytest.raises(TuwenError, match="optimizer_type"):
        Trainer(_args(tmp_path, optimizer_type="SGD"), ToyTask())
    with pytest.raises(TuwenError, match="no checkpoint"):
        Trainer(_args(tmp_path, resume=str(tmp_path / "nothing")), ToyTask(), log=lambda m: None).train()


@pytest.mark.slow
def test_torchrun_two_processes_agree(tmp_path):
    """2-process DDP on CPU (gloo): both ranks end with identical weights; bad rows counted over both ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, "--ckpt", str(tmp_path / "d"), "--max_steps", "8", "--bad_every", "10"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    d0 = (tmp_path / "d" / "digest-rank0.txt").read_text()
    d1 = (tmp_path / "d" / "digest-rank1.txt").read_text()
    assert d0 == d1
    assert (tmp_path / "d" / "bad_rows.txt").read_text() == "9"
    assert [x["step"] for x in _log(tmp_path / "d")] == list(range(1, 9))
