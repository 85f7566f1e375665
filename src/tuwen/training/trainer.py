"""The one trainer for every task (VQGAN, text→image GPT, captioner, CLIP).

A task supplies datasets, a trainable module whose ``forward(batch, step=...)`` returns a dict with a scalar
``"loss"`` (plus any scalars to log), and how to save the inference model. The trainer does the rest:

* single process on CPU or one GPU with no distributed setup; multi-GPU / multi-node under ``torchrun``
  (DDP, env-var initialisation, rank-0-only logging and saving, per-epoch sampler seeding);
* bf16 autocast on CUDA (fp16 with a GradScaler on request), gradient accumulation (``no_sync`` on the
  non-final micro-batches), clipping after unscaling, AdamW (or EasyNLP's Adam: L2 weight decay) with warmup
  + linear/cosine decay;
* tqdm progress on rank 0 (loss, lr, items/s, ETA), a JSON-lines log of every optimizer step, optional TensorBoard;
* bad rows are skipped and reported at the end (``--strict`` stops at the first);
* atomic checkpoints with model, optimizer, scheduler, step, epoch, data position and RNG states, so that
  ``--resume auto|PATH`` continues exactly (the same loss sequence on CPU as an uninterrupted run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.tables import BadRow, BadRowError, BadRowReport
from ..errors import TuwenError
from ..fileio import DirLock, atomic_write
from ..hub import atomic_write_text
from .. import runtime as D
from .checkpoint import (CKPT_DIR, FORMAT, clean_leftovers, latest_valid_checkpoint, list_checkpoints,  # noqa: F401
                         read_checkpoint, write_checkpoint)

from . import fsdp as FS
from .order import EpochSampler, _lr_lambda, _rng_state, _set_rng_state, _shard_indices, seed_everything  # noqa: F401,E501
from .task import Task, TrainArgs  # noqa: F401  (re-exported: tuwen.training.trainer.Task)

LOG_NAME = "train_log.jsonl"
SAMPLES_DIR = "samples"


def unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "_orig_mod", module)  # torch.compile
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def find_latest_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint file as it is, or the newest ``step-*.pt`` of a run folder (not verified: see
    ``checkpoint.latest_valid_checkpoint``)."""
    path = Path(path)
    if path.is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------- trainer

@dataclasses.dataclass
class _Run:
    """What one ``Trainer.train()`` call sets up, plus its running sums (step/epoch/best stay on the Trainer)."""

    module: nn.Module              # the bare module: checkpoints, clipping, after_step, evaluation
    model: nn.Module               # what the micro-steps call: ``module`` wrapped in DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    sampler: EpochSampler
    train_ds: Any
    val_ds: Any
    batches_per_epoch: int
    steps_per_epoch: int
    total: int                     # optimizer steps of the whole run
    epochs: int
    save_every: int
    log_file: Any = None           # train_log.jsonl (rank 0)
    bar: Any = None                # tqdm
    group_losses: dict[str, float] = dataclasses.field(default_factory=dict)  # sums over this accumulation group
    group_n: int = 0
    items_total: int = 0           # good rows seen by this rank
    window: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per-step metrics since the last line
    t_start: float = 0.0
    step_start: int = 0
    t_last: float = 0.0
    items_last: int = 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log_file:
            self.log_file.close()


_AMP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, args: TrainArgs, task: Task, log: Callable[[str], None] | None = None):
        args.validate()
        self.args, self.task = args, task
        self.device = D.init_distributed(args.device)
        self.rank, self.world = D.rank(), D.world_size()
        self.is_main = self.rank == 0
        self._print = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.ckpt_dir = Path(args.checkpoint_dir)
        prec = args.precision
        if prec == "auto":
            prec = "bf16" if self.device.type == "cuda" else "fp32"
        if prec == "fp16" and self.device.type != "cuda":
            raise TuwenError("--precision fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
        self.precision = prec
        self.amp_dtype = _AMP_DTYPES[prec]
        self.report = BadRowReport(args.max_bad_listed)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: float | None = None
        self.history: list[dict] = []
        self.module: nn.Module | None = None  # the trained module after train() (or the one evaluate() built)
        self._tb = None                       # TensorBoard writer on rank 0 while train() runs, else None
        self.resumed_from: tuple[Path, int] | None = None   # (checkpoint, its step) after a resume
        self._last_save = time.time()
        self._stop_requested = False          # set by the first Ctrl-C: save at the end of the step, then stop

    def log(self, msg: str) -> None:
        if self.is_main:
            self._print(msg)

    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter`` of the running ``train()`` on rank 0; None otherwise."""
        return self._tb

    def log_images(self, tag: str, images: list, step: int | None = None) -> None:
        """Show PIL images as one grid in TensorBoard (nothing when TensorBoard is off or on other ranks)."""
        if not (self.is_main and self._tb and images):
            return
        from ..data.images import make_grid
        grid = np.asarray(make_grid(images))
        self._tb.add_image(tag, grid, self.step if step is None else step, dataformats="HWC")

    # ------------------------------------------------------------------ setup
    def _loader(self, dataset, sampler, batch_size: int, epoch: int) -> DataLoader:
        nw = self.args.num_workers
        if nw is None:
            nw = D.default_workers(self.device)  # 0 on a small CPU machine: workers compete with the model
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=nw,
                          collate_fn=self.task.collate, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.args.random_seed + epoch),
                          persistent_workers=False, drop_last=False)

    def _make_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """AdamW (decoupled weight decay), or Adam for ``--optimizer_type Adam`` with weight decay added to the
        gradient as an L2 term, like EasyNLP's Adam."""
        groups = self.task.param_groups(module, self.args.weight_decay)
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise TuwenError("nothing to train: the model has no trainable parameters")
        kw = {"lr": self.args.learning_rate, "betas": self.task.betas}
        if self.device.type == "cuda" and not self.args.fsdp_cpu_offload:  # offloaded: the step runs on the CPU
            kw["fused"] = True
        if self.args.optimizer_type.lower() == "adam":
            return torch.optim.Adam(groups, **kw)
        return torch.optim.AdamW(groups, **kw)

    def _resume_state(self) -> tuple[Path, dict] | None:
        """The checkpoint ``--resume`` names, read and verified (None: no --resume, or ``auto`` with nothing saved
        yet). ``auto`` and a folder take the newest checkpoint that verifies, warning about broken newer ones."""
        a = self.args
        if not a.resume:
            return None
        where = self.ckpt_dir if a.resume == "auto" else Path(a.resume)
        if a.fsdp:
            return self._resume_state_fsdp(where)
        if where.is_file():
            return where, read_checkpoint(where)
        if where.name.endswith(".dcp"):  # a sharded checkpoint of an --fsdp run: DCP reshards it onto this run
            return where, FS.read_trainer_state(where)
        found = latest_valid_checkpoint(where, warn=self.log)
        dcps = FS.list_dcp(where)
        if dcps and (found is None or FS.step_of(dcps[-1]) > found[1]["step"]):
            self.log(f"--resume {a.resume}: {dcps[-1].name} is a sharded checkpoint of an --fsdp run; loading it "
                     f"unsharded into {self.world} process(es)")
            return dcps[-1], FS.read_trainer_state(dcps[-1])
        if found is None:
            if a.resume != "auto":
                raise TuwenError(f"--resume {a.resume}: no checkpoint found there")
            self.log(f"--resume auto: no checkpoint in {self.ckpt_dir / CKPT_DIR}; starting from scratch")
        return found

    def _resume_state_fsdp(self, where: Path) -> tuple[Path, dict] | None:
        """--fsdp: the named ``step-N.dcp`` folder, or the newest complete one under ``where``; a single-file
        ``step-N.pt`` (of a run without --fsdp) when it is named, or newer than every sharded one."""
        if where.is_file():
            return where, read_checkpoint(where)
        if where.name.endswith(".dcp"):
            return where, FS.read_trainer_state(where)
        found = FS.list_dcp(where)
        plain = latest_valid_checkpoint(where, warn=self.log)
        if plain is not None and (not found or plain[1]["step"] > FS.step_of(found[-1])):
            return plain
        if found:
            return found[-1], FS.read_trainer_state(found[-1])
        if self.args.resume != "auto":
            raise TuwenError(f"--resume {self.args.resume}: no sharded checkpoint (step-N.dcp) found there")
        self.log(f"--resume auto: no checkpoint in {self.ckpt_dir / CKPT_DIR}; starting from scratch")
        return None

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DDP under torchrun (not with --fsdp: ``_setup`` sharded the module in place), torch.compile on request."""
        model = module
        if self.world > 1 and not self.args.fsdp:
            model = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=True, find_unused_parameters=getattr(self.task, "find_unused_parameters", False))
        if self.args.compile:
            model = torch.compile(model)
        return model

    def _setup(self) -> _Run:
        """Build the module, data, optimizer and schedule; resume; open the logs (rank 0) and the progress bar."""
        a = self.args
        seed_everything(a.random_seed)
        module = self.task.build_module()
        if not a.fsdp:  # --fsdp: fully_shard moves each unit to the device as it shards it (never the whole model)
            module = module.to(self.device)
        module.train()
        if a.fsdp:
            FS.shard(module, self.device, self.precision, a.fsdp_cpu_offload)  # before the optimizer (DTensors)
        self.module = module
        train_ds = self.task.train_dataset()
        val_ds = self.task.val_dataset() if a.do_eval else None
        if len(train_ds) == 0:
            raise TuwenError("the training data has no rows")
        optimizer = self._make_optimizer(module)
        sampler = EpochSampler(len(train_ds), shuffle=True, seed=a.random_seed, rank=self.rank, world=self.world)
        batches_per_epoch = math.ceil(sampler.per_rank / a.micro_batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / a.gradient_accumulation_steps)
        total = a.max_steps or steps_per_epoch * a.epoch_num
        warmup = a.warmup_steps if a.warmup_steps is not None else int(a.warmup_proportion * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(a.lr_schedule, warmup, total))
        scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

        found = self._resume_state()
        if found is not None:
            self._load_checkpoint(*found, module, optimizer, scheduler, scaler)
        if self.step == 0:
            seed_everything(a.random_seed + self.rank)

        run = _Run(module=module, model=self._wrap(module), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                   sampler=sampler, train_ds=train_ds, val_ds=val_ds, batches_per_epoch=batches_per_epoch,
                   steps_per_epoch=steps_per_epoch, total=total, epochs=math.ceil(total / steps_per_epoch),
                   save_every=a.save_checkpoint_steps or steps_per_epoch * (a.save_checkpoint_epochs or 1))
        if self.is_main:
            run.log_file = self._open_logs(run)
        from tqdm import tqdm
        disable = D.progress_disable(a.progress)  # None: on only when stderr is a terminal
        run.bar = tqdm(total=total, initial=self.step, desc=self.task.name, unit="step", dynamic_ncols=True,
                       disable=disable, file=sys.stderr)
        run.t_start = run.t_last = time.time()
        run.step_start = self.step
        return run

    def _open_logs(self, run: _Run):
        """Rank 0: train_config.json, the JSON-lines log (cut back to the resumed step), TensorBoard, a summary."""
        a = self.args
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.ckpt_dir / "train_config.json",
                          json.dumps({"args": dataclasses.asdict(a), "task": self.task.describe(),
                                      "world_size": self.world, "precision": self.precision,
                                      "device": str(self.device)}, indent=2, ensure_ascii=False) + "\n")
        log_path = self.ckpt_dir / LOG_NAME
        kept = []
        if self.step and log_path.exists():  # drop log lines written after the checkpoint we resumed from
            kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
        atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))
        self._tb = self._open_tensorboard()
        n_params = sum(p.numel() for p in run.module.parameters() if p.requires_grad)
        self.log(f"training {self.task.name}: {len(run.train_ds)} rows, {run.total} steps "
                 f"({run.steps_per_epoch}/epoch × {run.epochs} epoch(s)), batch {a.micro_batch_size}×"
                 f"{a.gradient_accumulation_steps} accumulation×{self.world} process(es), "
                 f"{n_params / 1e6:.2f}M trainable parameters, {self.device}, {self.precision}")
        if a.fsdp:
            self.log(FS.describe(run.module))
        return open(log_path, "a", encoding="utf-8")

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict[str, Any]:
        """Train until ``max_steps`` / ``epoch_num``; returns the step, best metric, eval history, bad-row count.

        One run at a time per ``--checkpoint_dir`` (a lock; a second run fails at once naming the first). The
        first Ctrl-C finishes the current step, saves a checkpoint and stops (``--resume auto`` continues from
        it); a second Ctrl-C stops at once.
        """
        lock = None
        if self.is_main:
            lock = DirLock(self.ckpt_dir, "--checkpoint_dir").acquire(warn=self.log)
            for p in clean_leftovers(self.ckpt_dir):
                self.log(f"removed {p} (a temporary file of a run that died)")
        threads = torch.get_num_threads()
        workers = self.args.num_workers if self.args.num_workers is not None else D.default_workers(self.device)
        D.configure_threads(self.device, workers)  # CPU: threads + workers ≤ cores − 1 unless OMP_NUM_THREADS is set
        try:
            with self._ctrl_c_saves():
                run = self._setup()
                try:
                    while self.step < run.total and self.epoch < run.epochs:
                        self._train_epoch(run)
                finally:
                    run.close()
                self._finish(run)
        finally:
            torch.set_num_threads(threads)
            if lock is not None:
                lock.release()
        return {"step": self.step, "best": self.best, "history": self.history, "bad_rows": self.report.count}

    @contextlib.contextmanager
    def _ctrl_c_saves(self):
        """SIGINT → request a save-and-stop at the next step boundary; a second SIGINT raises at once."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.log("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _after_step(self, run: _Run) -> None:
        """Checkpoints that are not on the step schedule: on a Ctrl-C (then stop) and every
        ``--save_checkpoint_minutes``. Every rank takes the same decision."""
        stop = self._stop_requested
        due = bool(self.args.save_checkpoint_minutes) and \
            time.time() - self._last_save >= 60 * self.args.save_checkpoint_minutes
        if self.world > 1:
            flags = D.all_reduce_sum(torch.tensor([float(stop), float(due)], device=self.device))
            stop, due = bool(flags[0] > 0), bool(flags[1] > 0)
        if stop or due:
            self.save_checkpoint(run.module, run.optimizer, run.scheduler, run.scaler)
        if stop:
            self.log(f"stopped at step {self.step}; continue with --resume auto")
            raise KeyboardInterrupt

    def _train_epoch(self, run: _Run) -> None:
        """From ``batch_in_epoch`` to the end of the epoch (or of the run): micro-steps grouped into optimizer steps."""
        a = self.args
        micro = self.batch_in_epoch
        run.sampler.set_epoch(self.epoch, micro * a.micro_batch_size)
        run.group_losses, run.group_n = {}, 0
        for batch in self._loader(run.train_ds, run.sampler, a.micro_batch_size, self.epoch):
            group_start = (micro // a.gradient_accumulation_steps) * a.gradient_accumulation_steps
            group_size = min(a.gradient_accumulation_steps, run.batches_per_epoch - group_start)
            last_in_group = micro + 1 == group_start + group_size
            self._micro_step(run, batch, group_size, sync=last_in_group)
            micro += 1
            if not last_in_group:
                continue
            lr, grad_norm = self._optimizer_step(run, micro)
            self._log_step(run, lr, grad_norm)
            if self.step % run.save_every == 0 or self.step == run.total:
                self._eval_and_save(run)
            else:
                self._after_step(run)
            if self.step >= run.total:
                return
        if self.batch_in_epoch != 0:  # loader ended early (cannot happen unless data changed)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _micro_step(self, run: _Run, batch: dict, group_size: int, sync: bool) -> None:
        """Forward and backward of one micro-batch (loss / group_size); gradients sync across ranks only if ``sync``.

        A batch whose rows are all bad is skipped — on every rank when it is empty on any, so that DDP stays in step.
        """
        self._note_bad(batch)
        n_good = int(batch["size"])
        skip = n_good == 0
        if self.world > 1:
            skip = bool(D.all_reduce_sum(torch.tensor([float(skip)], device=self.device)).item())
        if skip:
            return
        batch = _to_device(batch, self.device)
        ctx = contextlib.nullcontext() if sync or self.world == 1 else (
            FS.no_sync(run.module) if self.args.fsdp else run.model.no_sync())
        with ctx:
            with D.autocast(self.device, self.amp_dtype):
                out = run.model(batch, step=self.step)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise TuwenError(self._nonfinite_reason(float(loss.item())))
            scaled = loss / group_size
            (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                run.group_losses[k] = run.group_losses.get(k, 0.0) + float(v.detach())
        run.group_n += 1
        run.items_total += n_good

    def _nonfinite_reason(self, value: float) -> str:
        """What is known about a NaN/inf loss: right after a resume the checkpoint is the suspect, at the very
        first step the data or the starting weights, later the optimisation."""
        if self.resumed_from is not None and self.step - self.resumed_from[1] <= 1:
            return (f"loss became {value} at step {self.step}, right after resuming from {self.resumed_from[0]}: that "
                    f"checkpoint is probably damaged (bad weights or optimizer state); resume from an earlier "
                    f"checkpoint (--resume PATH) or start again")
        if self.step == 0:
            return (f"loss became {value} at the first step: check the starting weights "
                    f"(pretrain_model_name_or_path / vqgan_ckpt_path) and the input data; with --precision fp16 "
                    f"try bf16 or fp32")
        return (f"loss became {value} at step {self.step}; lower --learning_rate (now {self.args.learning_rate}) "
                f"or use --precision fp32")

    def _optimizer_step(self, run: _Run, micro: int) -> tuple[float, float | None]:
        """Unscale, clip, step, advance the schedule and the position; returns (lr this step used, grad norm)."""
        a = self.args
        if run.scaler:
            run.scaler.unscale_(run.optimizer)
        grad_norm = None
        if a.max_grad_norm and a.max_grad_norm > 0:
            grad_norm = FS.as_float(torch.nn.utils.clip_grad_norm_(run.module.parameters(), a.max_grad_norm))
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        lr = run.scheduler.get_last_lr()[0]  # the rate this step used
        run.scheduler.step()
        self.step += 1
        self.batch_in_epoch = micro
        if micro >= run.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.task.after_step(unwrap(run.module), self.step)
        return lr, grad_norm

    def _log_step(self, run: _Run, lr: float, grad_norm: float | None) -> None:
        """Group means (averaged over ranks) to the JSON-lines log, tqdm and TensorBoard; a text line every
        ``logging_steps``."""
        metrics = {k: v / max(run.group_n, 1) for k, v in run.group_losses.items()}
        if self.world > 1 and metrics:
            keys = sorted(metrics)
            vec = D.all_reduce_sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                                                device=self.device)) / self.world
            metrics = dict(zip(keys, vec.tolist()))
        run.group_losses, run.group_n = {}, 0
        if self.is_main:
            rec = {"step": self.step, "epoch": self.epoch, "lr": lr, **metrics}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            run.log_file.write(json.dumps(rec) + "\n")
            run.log_file.flush()
            for k, v in metrics.items():
                run.window.setdefault(k, []).append(v)
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")
            if self._tb:
                for k, v in metrics.items():
                    self._tb.add_scalar(f"train/{k}", v, self.step)
                self._tb.add_scalar("train/lr", lr, self.step)
        if self.step % self.args.logging_steps == 0 or self.step == run.total:
            now = time.time()
            rate = (run.items_total - run.items_last) * self.world / max(now - run.t_last, 1e-9)
            run.t_last, run.items_last = now, run.items_total
            means = {k: sum(v) / len(v) for k, v in run.window.items()}
            run.window = {}
            shown = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            eta = (run.total - self.step) * (now - run.t_start) / max(1, self.step - run.step_start)
            self.log(f"step {self.step}/{run.total} epoch {self.epoch} {shown} lr {lr:.3e} "
                     f"{rate:.1f} items/s eta {eta / 60:.1f} min")
            if self._tb:
                self._tb.add_scalar("train/items_per_s", rate, self.step)

    def _eval_and_save(self, run: _Run) -> None:
        """Evaluate; save the inference model when the best metric improved (or there is none); checkpoint."""
        used = int(D.all_reduce_sum(torch.tensor([float(run.items_total)], device=self.device)).item())
        if used == 0 and not self.resumed_from:
            if self.epoch >= 1 or self.step >= run.total:  # a whole epoch and not one usable row
                reports = D.all_gather_objects(self.report.state())
                merged = BadRowReport(self.args.max_bad_listed)
                merged.merge_states(reports)
                raise TuwenError(f"no usable training rows: every one of the {len(run.train_ds)} rows was bad, "
                                 f"nothing was trained or saved. {merged.summary(total=len(run.train_ds))}")
            self.log(f"step {self.step}: no usable rows yet; not saving")
            return
        metrics = {}
        plain = run.module  # --fsdp: an unsharded copy for evaluation, samples and save_model
        if self.args.fsdp:  # a collective: every rank
            plain = FS.full_copy(run.module, self.task.build_module, self.device)
        if run.val_ds is not None and len(run.val_ds):
            metrics = self._evaluate(plain, run.val_ds)
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.log(f"eval step {self.step}: {shown}")
            if self._tb:
                for k, v in metrics.items():
                    self._tb.add_scalar(f"eval/{k}", v, self.step)
        self.history.append({"step": self.step, **metrics})
        value = metrics.get(self.task.best_metric)
        better = value is None or self.best is None or (
            value < self.best if self.task.best_mode == "min" else value > self.best)
        if better and value is not None:
            self.best = value
        if self.is_main and better:
            self.task.save_model(unwrap(plain), self.ckpt_dir)
            what = f"best {self.task.best_metric} {value:.4f}" if value is not None else "latest"
            self.log(f"saved model ({what}) to {self.ckpt_dir}")
        self.save_checkpoint(run.module, run.optimizer, run.scheduler, run.scaler)

    def _finish(self, run: _Run) -> None:
        """Merge the bad-row reports of all ranks (rank 0 prints the summary); close TensorBoard."""
        reports = D.all_gather_objects(self.report.state())
        if self.is_main:
            final = BadRowReport(self.args.max_bad_listed)
            final.merge_states(reports)
            self.report = final
            if final.count:
                self.log(final.summary(total=len(run.train_ds)))
            if self._tb:
                self._tb.close()
                self._tb = None
        D.barrier()

    def _open_tensorboard(self):
        want = self.args.tensorboard
        if want is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            if want:
                raise TuwenError("--tensorboard needs the tensorboard package: pip install 'tuwen[tensorboard]'")
            return None
        return SummaryWriter(str(self.ckpt_dir / "log"))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, module, optimizer, scheduler, scaler) -> dict | None:
        rngs = D.all_gather_objects(_rng_state())
        reports = D.all_gather_objects(self.report.state())
        if not self.is_main:
            return None
        merged = BadRowReport(self.args.max_bad_listed)
        merged.load_state(self.report.state())
        merged.merge_states(reports)
        sharded = self.args.fsdp  # model and optimizer are in the DCP shards
        return {
            "format": FORMAT, "version": 1,
            "module": None if sharded else unwrap(module).state_dict(),
            "optimizer": None if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "rng": rngs, "world_size": self.world, "bad_rows": merged.state(), "best": self.best,
            "args": dataclasses.asdict(self.args), "task": self.task.describe(),
        }

    def save_checkpoint(self, module, optimizer, scheduler, scaler) -> None:
        state = self._checkpoint_state(module, optimizer, scheduler, scaler)
        if self.args.fsdp:
            keep = None if self.args.save_all_checkpoints else self.args.keep_checkpoints
            path = FS.save(self.ckpt_dir, self.step, module, optimizer, state, keep)
            self.log(f"saved checkpoint {path}")
        elif self.is_main:
            keep = None if self.args.save_all_checkpoints else self.args.keep_checkpoints
            path = write_checkpoint(state, self.ckpt_dir, self.step, keep)
            self.log(f"saved checkpoint {path}")
        self._last_save = time.time()
        D.barrier()

    @staticmethod
    def _load_module_state(module: nn.Module, st: dict, path: Path) -> None:
        try:
            unwrap(module).load_state_dict(st["module"], strict=True)
        except RuntimeError as e:
            raise TuwenError(f"--resume: {path} does not match this model ({str(e).splitlines()[0]}); "
                             "resume with the same model settings it was written with") from None

    def _load_checkpoint(self, path: Path, st: dict, module, optimizer, scheduler, scaler) -> None:
        if FS.is_dcp(path):  # sharded (--fsdp) checkpoint: into the sharded module, or a plain one on any world size
            FS.load(path, module, optimizer)
        elif self.args.fsdp:  # a step-N.pt of a run without --fsdp, sharded onto this one
            FS.load_unsharded(st, path, module, optimizer, self.task.build_module, self._make_optimizer)
        else:
            self._load_module_state(module, st, path)
            optimizer.load_state_dict(st["optimizer"])
        self.resumed_from = (path, st["step"])
        scheduler.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        self.best = st.get("best")
        self.report.load_state(st["bad_rows"])
        old = st.get("args", {})
        a, old_world = self.args, st.get("world_size") or 1
        old_micro, old_gas = old.get("micro_batch_size", a.micro_batch_size), old.get("gradient_accumulation_steps",
                                                                                       a.gradient_accumulation_steps)
        # the same rows per optimizer step (micro batch × accumulation × processes) split another way — e.g. 2
        # processes × 8 resumed in 1 process × 16 — replays the same steps; the position is counted in micro batches
        same_global = old_micro * old_gas * old_world == a.micro_batch_size * a.gradient_accumulation_steps * self.world
        if (old_micro, old_world) != (a.micro_batch_size, self.world) and self.batch_in_epoch:
            rows, per = self.batch_in_epoch * old_micro * old_world, a.micro_batch_size * self.world
            self.batch_in_epoch = -(-rows // per)
            same_global = same_global and rows % per == 0
        for k in ("micro_batch_size", "gradient_accumulation_steps", "random_seed"):
            if k in old and old[k] != getattr(a, k) and not (same_global and k != "random_seed"):
                self.log(f"warning: --{k} was {old[k]} in the checkpoint and is {getattr(a, k)} now; "
                         "the run continues but will not repeat the original exactly")
        rngs = st.get("rng") or []
        if st.get("world_size") == self.world and len(rngs) == self.world:
            _set_rng_state(rngs[self.rank])
        else:
            self.log(f"warning: checkpoint was written by {st.get('world_size')} process(es), now {self.world}; "
                     "random states are re-seeded")
            seed_everything(self.args.random_seed + self.rank + self.step)
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, module: nn.Module | None = None, dataset=None) -> dict[str, float]:
        """Validation metrics (means over all rows of all ranks), with or without training first.

        ``module``: by default the one the last ``train()`` trained; before any training the task builds it, with
        the weights of the ``--resume`` checkpoint when one is named. ``dataset``: by default the task's
        validation set. Bad rows are skipped and counted in ``self.report`` (``--strict``: stop at the first).
        """
        if dataset is None:
            dataset = self.task.val_dataset()
            if dataset is None:
                raise TuwenError(f"{self.task.name}: there is no validation data to evaluate on")
        if module is None:
            module = self.module if self.module is not None else self._build_for_eval()
        return self._evaluate(module, dataset)

    def _build_for_eval(self) -> nn.Module:
        seed_everything(self.args.random_seed)
        module = self.task.build_module().to(self.device)
        found = self._resume_state()
        if found is not None:
            path, st = found
            if FS.is_dcp(path):
                FS.load(path, module, None)  # the full weights from the shards, on any number of processes
            else:
                self._load_module_state(module, st, path)
            self.step = st["step"]
            self.log(f"evaluating {path} (step {self.step})")
        self.module = module
        return module

    @torch.no_grad()
    def _evaluate(self, module: nn.Module, val_ds) -> dict[str, float]:
        # evaluation and sample images must not move the training run's random streams: otherwise the weights
        # would depend on how often it evaluates (--save_checkpoint_steps)
        state = _rng_state()
        try:
            return self._evaluate_inner(module, val_ds)
        finally:
            _set_rng_state(state)

    def _evaluate_inner(self, module: nn.Module, val_ds) -> dict[str, float]:
        m = unwrap(module)
        was_training = m.training
        m.eval()
        idx = _shard_indices(len(val_ds))
        loader = DataLoader(torch.utils.data.Subset(val_ds, idx), batch_size=self.args.micro_batch_size,
                            shuffle=False, num_workers=0, collate_fn=self.task.collate)
        sums: dict[str, list[float]] = {}
        first_batch = None
        from tqdm import tqdm
        for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False, file=sys.stderr,
                          disable=D.progress_disable(self.args.progress)):
            self._note_bad(batch)
            if not batch["size"]:
                continue
            batch = _to_device(batch, self.device)
            first_batch = first_batch or batch
            with D.autocast(self.device, self.amp_dtype):
                res = self.task.eval_step(m, batch)
            for k, (s, n) in res.items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(n)
        keys = sorted(set().union(*D.all_gather_objects(sorted(sums))))
        vec = torch.tensor([v for k in keys for v in sums.get(k, [0.0, 0.0])], dtype=torch.float64)
        vec = D.all_reduce_sum(vec)
        out = {k: (vec[2 * i] / vec[2 * i + 1]).item() for i, k in enumerate(keys) if vec[2 * i + 1] > 0}
        if self.is_main and first_batch is not None:
            self._write_samples(m, first_batch)
        m.train(was_training)
        return out

    def _write_samples(self, module: nn.Module, batch: dict) -> None:
        """The task's sample images for the first validation batch (fixed rows, fixed seeds) as
        ``samples/step-N.png`` in the run folder, and in TensorBoard when it is on."""
        try:
            images = self.task.sample_images(module, batch)
        except Exception as e:  # samples are a view on training, never a reason to stop it
            self.log(f"warning: could not make sample images at step {self.step} ({type(e).__name__}: {e})")
            return
        if not images:
            return
        from ..data.images import make_grid
        grid = make_grid(images)
        path = self.ckpt_dir / SAMPLES_DIR / f"step-{self.step:08d}.png"
        atomic_write(path, lambda t: grid.save(t, format="PNG"))
        self.log_images("samples", images, self.step)

    def _note_bad(self, batch: dict) -> None:
        bads: list[BadRow] = batch.get("bad_rows") or []
        if bads and self.args.strict:
            raise BadRowError(f"{bads[0]} (--strict stops at the first bad row; without it bad rows are skipped "
                              "and reported at the end)")
        self.report.extend(bads)
