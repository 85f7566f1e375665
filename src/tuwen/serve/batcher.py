"""Continuous batching of text→image decoding across requests (``tuwen serve``).

One worker thread owns the GPT. Every image being sampled is a *task* holding one row of a preallocated KV cache
(two rows with classifier-free guidance: conditional and unconditional prompt). Each loop iteration

1. admits waiting tasks while fewer than ``max_batch`` images decode, prefills their prompts in one forward (a
   small cache, then copied into free rows) and samples their first code;
2. runs **one decode step for every running task at once**: each row feeds its last code at its own position
   (``GPT.forward(start_pos=LongTensor[B])``, per-row positions and attention masks), so a task admitted while
   others are half-way joins them at the next step;
3. samples each row's next code with :class:`tuwen.sampling.TokenPicker` — the picker of
   :func:`tuwen.sampling.generate` — grouped by sampling settings, with the task's own seed and its own step
   index, so a code depends only on (seed, step, logits of that row): never on what the row was batched with;
4. hands finished tasks (and, for streaming requests, partial code grids every few grid rows) to the listener and
   frees their rows at once (the last rows move into the holes, so running rows stay ``0 … A-1``).

Same seed ⇒ same codes as ``TextToImage.generate`` (the server computes image k of a prompt with
``image_seed(seed, key, k)``, exactly as ``tuwen generate`` does). Memory is bounded: the cache grows to at
most ``2 · max_batch`` rows (as many as the busiest moment needed) and at most ``max_queue`` images wait.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import Callable, Sequence

import torch

from ..errors import TuwenError
from ..models.gpt import KVCache
from ..runtime import amp_dtype, autocast
from ..sampling import TokenPicker

__all__ = ["Batcher", "QueueFull", "Ticket", "SamplingKey"]


@dataclasses.dataclass(frozen=True)
class SamplingKey:
    """The sampling settings of one image; rows with equal keys are sampled together."""

    top_k: int | None
    top_p: float | None
    temperature: float
    guidance_scale: float | None


class QueueFull(Exception):
    """More images are waiting than ``max_queue`` allows; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int, waiting: int):
        super().__init__(f"the queue is full ({waiting} images waiting); retry in about {retry_after} s")
        self.retry_after, self.waiting = retry_after, waiting


#: listener(k, codes [img_len] (CPU LongTensor), rows_done, final) — called from the worker thread
Listener = Callable[[int, torch.Tensor, int, bool], None]
#: on_error(message) — called from the worker thread when the model failed on this request's rows
ErrorListener = Callable[[str], None]


class Ticket:
    """One request's images in the batcher (``cancel()`` drops them from the queue and the running batch)."""

    def __init__(self, batcher: "Batcher", n: int, listener: Listener, on_error: ErrorListener | None,
                 preview_every: int):
        self._batcher = batcher
        self.n, self.listener, self.on_error = n, listener, on_error
        self.preview_every = preview_every  # codes between partial grids (0: none)
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_admitted: float | None = None

    def cancel(self) -> None:
        self._batcher.cancel(self)


class _Task:
    __slots__ = ("ticket", "k", "seed", "text_ids", "key", "codes", "last", "rows")

    def __init__(self, ticket: Ticket, k: int, seed: int, text_ids: torch.Tensor, key: SamplingKey):
        self.ticket, self.k, self.seed, self.text_ids, self.key = ticket, k, seed, text_ids, key
        self.codes: list[int] = []  # sampled so far; len(codes) = index of the next code
        self.last = 0               # input id fed at the next step (= codes[-1] + token_offset, which is 0)
        self.rows: list[int] = []   # cache rows: [cond] or [cond, uncond]


class Batcher:
    """Continuous batching decoder over a :class:`~tuwen.models.text2image.TextToImage` (see the module doc)."""

    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 64, on_step=None):
        if max_batch < 1 or max_queue < 1:
            raise TuwenError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be ≥ 1")
        self.model = model
        self.gpt = model.gpt
        cfg = model.config
        self.P, self.N = cfg.text_len, cfg.img_len
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.device = self.gpt.tok_emb.weight.device
        self.amp = amp_dtype(self.device, self.gpt.tok_emb.weight.dtype)
        # rows grow on demand (doubling) up to 2·max_batch (every image with guidance takes two)
        self.cache = KVCache.for_model(self.gpt, min(8, 2 * self.max_batch), max_len=self.P + self.N - 1,
                                       dtype=self.amp or self.gpt.tok_emb.weight.dtype)
        self.uncond = model.uncond_ids(1)[0]  # [P]
        self.on_step = on_step  # on_step(rows, images, seconds) after every decode step (metrics)
        self._rows: list[tuple[_Task, bool]] = []  # cache row r → (task, is_uncond); rows 0 … A-1 are in use
        self._active: list[_Task] = []
        self._pending: collections.deque[_Task] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self.images_done = 0
        self.steps = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=256)  # finish times (images/s)

    # ------------------------------------------------------------------------------------------ client side

    def submit(self, text_ids: torch.Tensor, seeds: Sequence[int], key: SamplingKey, listener: Listener,
               on_error: ErrorListener | None = None, preview_every: int = 0) -> Ticket:
        """Queue ``len(seeds)`` images of one prompt (``text_ids`` [text_len], the model's offset ids).
        Raises :class:`QueueFull` when they would not fit in ``max_queue``."""
        n = len(seeds)
        if n < 1:
            raise TuwenError("submit: no images asked for")
        ids = text_ids.reshape(-1).to(self.device)
        if ids.numel() != self.P:
            raise TuwenError(f"submit: text_ids must have text_len={self.P} ids, got {ids.numel()}")
        ticket = Ticket(self, n, listener, on_error, preview_every)
        with self._cv:
            if self._stop:
                raise TuwenError("the server is shutting down")
            if len(self._pending) + n > self.max_queue:
                raise QueueFull(self.retry_after(len(self._pending) + n), len(self._pending))
            self._pending.extend(_Task(ticket, k, int(s), ids, key) for k, s in enumerate(seeds))
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request: its waiting images leave the queue now, its running rows at the next step."""
        with self._cv:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            self._pending = collections.deque(t for t in self._pending if t.ticket is not ticket)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    def images_per_second(self, window: float = 60.0) -> float:
        now = time.monotonic()
        recent = [t for t in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return len(recent) / max(now - recent[0], 1e-3)

    def retry_after(self, waiting: int) -> int:
        """Seconds until about ``waiting`` queued images could start (from the recent throughput)."""
        rate = self.images_per_second()
        return max(1, min(600, int(round(waiting / rate)) if rate > 0 else 5))

    # ------------------------------------------------------------------------------------------ worker

    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tuwen-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """Stop starting decode steps (running and waiting images stay; requests still queue) until resume()."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify()

    def _run(self) -> None:
        with torch.inference_mode(), self.gpt.fused_qkv(dtype=self.amp):
            while True:
                with self._cv:
                    while not self._stop and (self._paused or not self._pending and not self._active):
                        self._cv.wait(0.5 if self._paused else None)
                    if self._stop:
                        return
                    new = []
                    while self._pending and len(self._active) + len(new) < self.max_batch:
                        new.append(self._pending.popleft())
                try:
                    self._drop_cancelled()
                    if new:
                        self._prefill(new)
                    if self._active:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a model failure fails the running requests, not the server
                    traceback.print_exc()
                    self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        failed = {t.ticket for t in self._active}
        self._active, self._rows = [], []
        for ticket in failed:
            if ticket.on_error is not None and not ticket.cancelled:
                ticket.on_error(message)

    def _drop_cancelled(self) -> None:
        gone = [t for t in self._active if t.ticket.cancelled]
        if gone:
            self._release(gone)

    def _release(self, tasks: list[_Task]) -> None:
        """Free the rows of ``tasks``; the last running rows move into the holes (rows stay 0 … A-1)."""
        ids = {id(t) for t in tasks}
        self._active = [t for t in self._active if id(t) not in ids]
        freed = sorted(r for t in tasks for r in t.rows)
        A = len(self._rows)
        A_new = A - len(freed)
        freed_set = set(freed)
        holes = [r for r in freed if r < A_new]
        movers = [r for r in range(A_new, A) if r not in freed_set]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            self.cache.k[:, dst] = self.cache.k[:, src]
            self.cache.v[:, dst] = self.cache.v[:, src]
            for h, m in zip(holes, movers):
                task, uncond = self._rows[m]
                self._rows[h] = (task, uncond)
                task.rows[1 if uncond else 0] = h
        del self._rows[A_new:]

    def _pick(self, tasks: list[_Task], logits: torch.Tensor, row_of: Callable[[_Task, int], int]) -> list[int]:
        """Sample each task's next code from ``logits`` (rows given by ``row_of(task, 0|1)``), grouped by
        sampling settings, with the picker of ``generate``; returns the codes in ``tasks`` order."""
        out = [0] * len(tasks)
        groups: dict[SamplingKey, list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault(t.key, []).append(i)
        for key, members in groups.items():
            cond = [row_of(tasks[i], 0) for i in members]
            rows = cond + ([row_of(tasks[i], 1) for i in members] if key.guidance_scale is not None else [])
            g = len(members)
            seeds = torch.tensor([tasks[i].seed for i in members], dtype=torch.long, device=self.device)
            steps = torch.tensor([len(tasks[i].codes) for i in members], dtype=torch.long, device=self.device)
            picker = TokenPicker(g, seeds, guidance_scale=key.guidance_scale, temperature=key.temperature,
                                 top_k=key.top_k, top_p=key.top_p, allowed=None, eos_id=None, pad_id=0,
                                 return_logprobs=False)
            idx = torch.tensor(rows, device=self.device)
            tok, _ = picker(logits.index_select(0, idx), steps, torch.zeros(g, dtype=torch.bool, device=self.device))
            for i, c in zip(members, tok.tolist()):
                out[i] = c
        return out

    def _prefill(self, new: list[_Task]) -> None:
        live = [t for t in new if not t.ticket.cancelled]
        if not live:
            return
        now = time.monotonic()
        for t in live:
            if t.ticket.first_admitted is None:
                t.ticket.first_admitted = now
        cond = [t.text_ids for t in live]
        unc = [self.uncond for t in live if t.key.guidance_scale is not None]
        ids = torch.stack(cond + unc)  # [n_rows, P]: [cond rows; uncond rows], as generate() lays them out
        n_rows = ids.shape[0]
        tmp = KVCache.for_model(self.gpt, n_rows, max_len=self.P, dtype=self.cache.k.dtype)
        with autocast(self.device, self.amp):
            logits = self.gpt(ids, cache=tmp, start_pos=0, logits_start=-1)[:, -1]  # [n_rows, V]
        # local row of each task's prompt(s) in this prefill batch
        local: dict[int, list[int]] = {}
        u = len(live)
        for i, t in enumerate(live):
            local[id(t)] = [i]
            if t.key.guidance_scale is not None:
                local[id(t)].append(u)
                u += 1
        codes = self._pick(live, logits, lambda t, h: local[id(t)][h])
        # move the prefilled keys/values into free cache rows A … A+n_rows-1
        A = len(self._rows)
        self._ensure_rows(A + n_rows)
        self.cache.k[:, A:A + n_rows, :, :self.P] = tmp.k
        self.cache.v[:, A:A + n_rows, :, :self.P] = tmp.v
        self._rows.extend([(None, False)] * n_rows)
        for t in live:
            t.rows = [A + r for r in local[id(t)]]
            for h, r in enumerate(t.rows):
                self._rows[r] = (t, h == 1)
        self._active.extend(live)
        self._record(live, codes)

    def _ensure_rows(self, n: int) -> None:
        have = self.cache.batch_size
        if n <= have:
            return
        rows = min(2 * self.max_batch, max(n, 2 * have))
        new = KVCache.for_model(self.gpt, rows, max_len=self.cache.max_len, dtype=self.cache.k.dtype)
        A = len(self._rows)
        new.k[:, :A] = self.cache.k[:, :A]
        new.v[:, :A] = self.cache.v[:, :A]
        self.cache = new

    def _step(self) -> None:
        t0 = time.perf_counter()
        rows = self._rows
        A = len(rows)
        last = [t.last for t, _ in rows]
        pos = [self.P + len(t.codes) - 1 for t, _ in rows]  # position of the fed code
        tok_in = torch.tensor(last, dtype=torch.long, device=self.device)[:, None]  # [A, 1]
        start = torch.tensor(pos, dtype=torch.long, device=self.device)  # [A]
        view = self.cache.narrow(A, max(pos) + 1)
        with autocast(self.device, self.amp):
            logits = self.gpt(tok_in, cache=view, start_pos=start, logits_start=-1)[:, -1]  # [A, V]
        tasks = list(self._active)
        codes = self._pick(tasks, logits, lambda t, h: t.rows[h])
        self.steps += 1
        self._record(tasks, codes)
        if self.on_step is not None:
            self.on_step(A, len(tasks), time.perf_counter() - t0)

    def _record(self, tasks: list[_Task], codes: list[int]) -> None:
        done = []
        for t, c in zip(tasks, codes):
            t.codes.append(c)
            t.last = c  # token_offset 0: image codes are their own input ids
            n = len(t.codes)
            if n == self.N:
                done.append(t)
            elif t.ticket.preview_every and n % t.ticket.preview_every == 0 and not t.ticket.cancelled:
                part = torch.tensor(t.codes + [0] * (self.N - n), dtype=torch.long)
                t.ticket.listener(t.k, part, n, False)
        if done:
            self._release(done)
            now = time.monotonic()
            for t in done:
                self.images_done += 1
                self._recent.append(now)
                if not t.ticket.cancelled:
                    t.ticket.listener(t.k, torch.tensor(t.codes, dtype=torch.long), self.N, True)
