"""--fsdp (FSDP2 + DCP checkpoints) on CPU with 2 gloo processes: same losses as DDP, bit-exact resume from a
sharded checkpoint, the shards load into one process, --fsdp_cpu_offload gives the same losses, checkpoints resume
on another world size (2 → 1 from step-N.dcp, 1 → 2 from step-N.pt), clear errors."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_train import ToyTask  # noqa: E402

from tuwen.errors import TuwenError  # noqa: E402
from tuwen.training.trainer import TrainArgs, Trainer  # noqa: E402

SCRIPT = str(Path(__file__).parent / "toy_train.py")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(ckpt, *extra, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for _ in range(30):  # a killed run's other rank may hold the folder lock for a moment
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               SCRIPT, "--ckpt", str(ckpt), "--max_steps", "8", "--save_every", "4", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        if "is in use by another run" not in r.stderr:
            break
        time.sleep(1)
    if ok:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def _log(d):
    return [json.loads(line) for line in Path(d, "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp") / "run"
    _torchrun(d, "--fsdp")
    return d


@pytest.mark.slow
def test_fsdp_matches_ddp(fsdp_run, tmp_path):
    ddp = tmp_path / "ddp"
    _torchrun(ddp)
    a, b = _log(fsdp_run), _log(ddp)
    assert [x["step"] for x in a] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["lr"] == y["lr"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    # both ranks hold the same (gathered) weights, and they are DDP's within float tolerance
    assert (fsdp_run / "digest-rank0.txt").read_text() == (fsdp_run / "digest-rank1.txt").read_text()
    ckpts = sorted(p.name for p in (fsdp_run / "checkpoints").iterdir())
    assert ckpts == ["step-00000004.dcp", "step-00000008.dcp"]
    for c in ckpts:
        assert {"complete", "trainer.pt", ".metadata"} <= {p.name for p in (fsdp_run / "checkpoints" / c).iterdir()}
    assert (fsdp_run / "toy_model.pt").exists()  # save_model got the full (unsharded) weights
    sd = torch.load(fsdp_run / "toy_model.pt", weights_only=True)
    assert sd["net.0.weight"].shape == (32, 8)


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact(fsdp_run, tmp_path):
    d = tmp_path / "killed"
    r = _torchrun(d, "--fsdp", "--kill_at", "6", ok=False)
    assert r.returncode != 0
    assert [p.name for p in (d / "checkpoints").iterdir() if p.name.endswith(".dcp")] == ["step-00000004.dcp"]
    r = _torchrun(d, "--fsdp", "--resume", "auto")
    assert "resumed from" in r.stderr and "step-00000004.dcp at step 4" in r.stderr
    assert _log(d) == _log(fsdp_run)  # same losses, lrs and grad norms, bit for bit
    assert (d / "digest-rank0.txt").read_text() == (fsdp_run / "digest-rank0.txt").read_text()


@pytest.mark.slow
def test_sharded_checkpoint_loads_in_one_process(fsdp_run):
    """DCP reshards: a 2-process checkpoint's weights load into one process, equal to the saved full model."""
    args = TrainArgs(checkpoint_dir=str(fsdp_run / "eval"), resume=str(fsdp_run / "checkpoints"), fsdp=True,
                     micro_batch_size=8, num_workers=0, tensorboard=False, progress=False)
    trainer = Trainer(args, ToyTask())
    metrics = trainer.evaluate()
    assert trainer.step == 8
    full = torch.load(fsdp_run / "toy_model.pt", weights_only=True)
    for k, v in trainer.module.state_dict().items():
        assert torch.equal(v, full[k]), k
    assert metrics["loss"] > 0


def test_fsdp_needs_torchrun(tmp_path):
    args = TrainArgs(checkpoint_dir=str(tmp_path / "ck"), max_steps=2, fsdp=True, num_workers=0,
                     tensorboard=False, progress=False)
    with pytest.raises(TuwenError, match="torchrun"):
        Trainer(args, ToyTask()).train()


def test_damaged_sharded_checkpoint_is_named_without_fsdp(tmp_path):
    """Without --fsdp a single process resumes step-N.dcp folders too; a damaged one is named."""
    (tmp_path / "ck" / "checkpoints" / "step-00000004.dcp").mkdir(parents=True)
    (tmp_path / "ck" / "checkpoints" / "step-00000004.dcp" / "complete").write_text("ok\n")
    args = TrainArgs(checkpoint_dir=str(tmp_path / "ck"), max_steps=2, resume="auto", num_workers=0,
                     tensorboard=False, progress=False)
    with pytest.raises(TuwenError, match="step-00000004.dcp.*trainer.pt"):
        Trainer(args, ToyTask()).train()


def test_cpu_offload_needs_fsdp(tmp_path):
    args = TrainArgs(checkpoint_dir=str(tmp_path / "ck"), max_steps=2, fsdp_cpu_offload=True, num_workers=0,
                     tensorboard=False, progress=False)
    with pytest.raises(TuwenError, match="--fsdp_cpu_offload.*add --fsdp"):
        Trainer(args, ToyTask()).train()


def test_cpu_offload_flag_reaches_the_trainer(tmp_path):
    from tuwen.cli.common import train_args_from
    from tuwen.cli.easynlp import parse
    a = parse(["--mode=train", "--app_name=clip", "--fsdp", "--fsdp_cpu_offload", f"--checkpoint_dir={tmp_path}"])
    t = train_args_from(a, default_lr=1e-4)
    assert (t.fsdp, t.fsdp_cpu_offload) == (True, True)


@pytest.mark.slow
def test_fsdp_cpu_offload_gives_the_same_losses(fsdp_run, tmp_path):
    """CPUOffloadPolicy (shards, gradients and AdamW states in CPU memory, the step on the CPU): on a CPU-only gloo
    run the same losses as plain --fsdp; its checkpoints resume like the others."""
    d = tmp_path / "offload"
    r = _torchrun(d, "--fsdp", "--fsdp_cpu_offload")
    assert "1 with their shards, gradients and optimizer states in CPU memory" in r.stderr  # read back from FSDP
    a, b = _log(d), _log(fsdp_run)
    assert [x["step"] for x in a] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["lr"] == y["lr"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-6)
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step-00000004.dcp", "step-00000008.dcp"]


def _single(ckpt, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, SCRIPT, "--ckpt", str(ckpt), "--max_steps", "8", "--save_every", "4", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _same_losses(a, b):
    assert [x["step"] for x in a] == [y["step"] for y in b]
    for x, y in zip(a, b):
        assert x["lr"] == y["lr"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_checkpoints_resume_on_another_world_size(tmp_path):
    """2 processes × 8 rows (--fsdp, sharded step-N.dcp) ↔ 1 process × 16 rows (step-N.pt): the same rows per
    step, so with no dropout the resumed runs continue the uninterrupted loss sequence within float tolerance."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from toy_train import ToyModule
    from tuwen.training import fsdp as FS

    two = tmp_path / "two"  # uninterrupted, sharded over 2 processes
    _torchrun(two, "--fsdp", "--dropout", "0", "--dump_state")
    # 2 → 1: step-4.dcp, written by 2 processes, resumed by one (no --fsdp, no torchrun)
    one = tmp_path / "one"
    r = _single(one, "--dropout", "0", "--micro_batch_size", "16",
                "--resume", str(two / "checkpoints" / "step-00000004.dcp"))
    assert "resumed from" in r.stderr and "at step 4 (epoch 0, batch 4)" in r.stderr
    assert "micro_batch_size was" not in r.stderr  # 2 × 8 rows = 1 × 16 rows: the same steps, no warning
    _same_losses(_log(one), _log(two)[4:])
    # the loaded weights and AdamW state (moments, step counts) equal the ones the 2 processes held at step 8
    module = ToyModule(0.0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    FS.load(two / "checkpoints" / "step-00000008.dcp", module, opt)
    full = torch.load(two / "full_state.pt", weights_only=True)
    model_sd, optim_sd = get_state_dict(module, opt)
    for k, v in full["model"].items():
        assert torch.equal(model_sd[k], v), k
    assert set(optim_sd["state"]) == set(full["optim"]["state"]) == set(full["model"])
    for k, st in full["optim"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optim_sd["state"][k][name], st[name]), (k, name)
    # 1 → 2: a one-process run's step-4.pt resumed by 2 processes with --fsdp (the full state sharded on load)
    single = tmp_path / "single"
    _single(single, "--dropout", "0", "--micro_batch_size", "16")
    _same_losses(_log(single), _log(two))
    back = tmp_path / "back"
    r = _torchrun(back, "--fsdp", "--dropout", "0", "--resume", str(single / "checkpoints" / "step-00000004.pt"))
    assert "resumed from" in r.stderr
    _same_losses(_log(back), _log(two)[4:])
    assert (back / "digest-rank0.txt").read_text() == (back / "digest-rank1.txt").read_text()


@pytest.mark.slow
def test_gpt_is_sharded_per_block_and_trains_like_one_copy(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(Path(__file__).parent / "fsdp_gpt_check.py"), str(tmp_path / "ok")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "ok").read_text() == "OK"
