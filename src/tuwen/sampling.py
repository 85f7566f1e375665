"""The one sampler for the GPT: text→image codes and captions.

* :func:`sample_tokens` — temperature → top-k → top-p (the taming/LlamaGen order), an ``allowed`` range or
  mask, then a Gumbel-max draw with a **counter-based RNG**: the noise of row ``b`` at decode step ``s`` for
  vocabulary entry ``i`` is a 32-bit integer hash of ``(seeds[b], s, i)`` computed with int64 tensor ops on
  the logits' device. So a row's tokens depend only on its own seed and logits, never on the batch size, its
  position in the batch, other rows or the device's RNG; no ``torch.Generator``, no host sync, CUDA-graph safe.
  ``argmax(logits + Gumbel)`` is an exact sample of ``softmax(logits)``.
* :func:`generate` — prefill the prefix once, then one token per step through a preallocated
  :class:`~tuwen.models.gpt.KVCache`; classifier-free guidance by batch doubling; per-row EOS; on CUDA the
  decode step (forward + sampling) is captured once in a CUDA graph and replayed.
* ``bench/naive.py``'s ``generate_naive`` — EasyNLP's loop (no cache, full forward over the growing sequence
  every step) with the same sampling rule: same seeds → same tokens as :func:`generate` up to float noise.
* :func:`beam_search` — KV-cached beam search with per-row finishing and HF-style length-normalised scores.
* :func:`score_sequences` — teacher-forced ``sum log p(target | prefix)`` per row (caption reranking, bits/token).
* :class:`SamplingParams` — a model's saved sampling defaults; each call may replace any of them.

Token spaces: the model *outputs* ids in ``0..n_out-1`` (its head). Returned tokens, ``eos_id``, ``pad_id`` and
``allowed`` are in that output space; the id fed back as the next *input* is ``token + token_offset``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from .config import BaseConfig
from .errors import TuwenError
from .models.gpt import GPT, KVCache
from .runtime import autocast

__all__ = ["sample_tokens", "generate", "beam_search", "score_sequences", "as_seeds", "uniform_noise",
           "gumbel_noise", "hash32", "SamplingParams"]

#: one seed per row: a LongTensor [B], a list, or an int s (row i gets s + i)
Seeds = int | Sequence[int] | torch.Tensor
#: output ids a sampler may emit: a (lo, hi) range, a bool mask [n_out] or [B, n_out], or None (all)
Allowed = tuple[int, int] | torch.Tensor | None

# ------------------------------------------------------------------------------------------ counter-based RNG

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 without int64 overflow (c split into 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' lowbias32) of int64 values in [0, 2^32); same result on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """[B] int64 keys in [0, 2^32) from the seeds alone (the step-independent half of :func:`_row_keys`)."""
    k = hash32((seeds & _M32) ^ 0x2545F491)
    return hash32(k ^ ((seeds >> 32) & _M32))


def _step_keys(seed_keys: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """:func:`_row_keys` from precomputed :func:`_seed_keys`; ``step``: int, [1] or [B] device tensor."""
    return hash32(seed_keys ^ (step & _M32) if isinstance(step, torch.Tensor) else seed_keys ^ (int(step) & _M32))


def _row_keys(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """[B] int64 keys in [0, 2^32) from (seed, step); ``step`` may be a device tensor (CUDA graph)."""
    return _step_keys(_seed_keys(seeds), step)


def _index_keys(index: torch.Tensor) -> torch.Tensor:
    return hash32((index & _M32) ^ 0x1B873593)


_INDEX_TABLES: dict[tuple[str, int], torch.Tensor] = {}


def _index_table(n: int, device: torch.device) -> torch.Tensor:
    """``_index_keys(arange(n))`` on ``device``, computed once per (device, n): a gather replaces the hash of the
    candidates' ids at every decode step (same values). Call it outside CUDA-graph capture."""
    key = (str(device), n)
    t = _INDEX_TABLES.get(key)
    if t is None:
        if len(_INDEX_TABLES) > 16:
            _INDEX_TABLES.clear()
        t = _INDEX_TABLES[key] = _index_keys(torch.arange(n, device=device))
    return t


def uniform_noise(seeds: torch.Tensor, step: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1), [B, K]: one per (row seed, step, vocabulary index). ``index``: [K] or [B, K]."""
    h = hash32(_row_keys(seeds, step)[:, None] ^ _index_keys(index))  # [B, K]
    # 23 random bits + 1/2: exactly representable in float32, never 0 or 1
    return ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def gumbel_noise(seeds: torch.Tensor, step: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [B, K] from :func:`uniform_noise`."""
    return -torch.log(-torch.log(uniform_noise(seeds, step, index)))


def as_seeds(seeds: Seeds, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """int64 seeds [B]. An int ``s`` gives row i the seed ``s + i``."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return torch.arange(batch_size, dtype=torch.long, device=device) + seeds
    t = torch.as_tensor(seeds, dtype=torch.long).reshape(-1).to(device)
    if t.numel() != batch_size:
        raise TuwenError(f"seeds: expected {batch_size} seeds (one per row), got {t.numel()}")
    return t


# ------------------------------------------------------------------------------------------ logits → token

def _check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0 or not math.isfinite(temperature):
        raise TuwenError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise TuwenError(f"top_k must be >= 1 (1 = greedy) or None, got {top_k}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise TuwenError(f"top_p must be in [0, 1] or None, got {top_p}")


def _restrict(logits: torch.Tensor, allowed: Allowed) -> tuple[torch.Tensor, int]:
    """Apply ``allowed``: a (lo, hi) range slices the logits (returns the offset lo); a bool mask sets -inf."""
    if allowed is None:
        return logits, 0
    if isinstance(allowed, torch.Tensor):
        return logits.masked_fill(~allowed.to(device=logits.device, dtype=torch.bool), float("-inf")), 0
    lo, hi = allowed
    return logits[:, lo:hi], lo


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor, *,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  allowed: Allowed = None) -> torch.Tensor:
    """One token per row from ``logits`` [B, V] → LongTensor [B] (ids in 0..V-1).

    Order: ``allowed`` (range (lo, hi) or bool mask [V]/[B, V]) → temperature → top-k → top-p (nucleus,
    HF semantics: keep the smallest prefix of the sorted distribution whose mass reaches top_p, at least one
    token) → Gumbel-max with noise hash(seeds[b], step, vocab index). ``temperature == 0`` or ``top_k == 1``
    is greedy (argmax). No host sync; ``step`` may be a device tensor.
    """
    logits, lo = _restrict(logits.float(), allowed)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1) + lo
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    idx = None  # [B, K] vocabulary indices of the candidates when they are a subset (top-k / sorted)
    if top_k is not None and top_k < V:
        logits, idx = logits.topk(top_k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        if idx is None:
            logits, idx = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the better candidates
        logits = logits.masked_fill(mass_before > top_p, float("-inf"))
    index = (torch.arange(V, device=logits.device) if idx is None else idx) + lo
    choice = (logits + gumbel_noise(seeds, step, index)).argmax(dim=-1)  # [B]
    return choice + lo if idx is None else idx.gather(1, choice[:, None])[:, 0] + lo


def _sample_keyed(logits: torch.Tensor, seed_keys: torch.Tensor, step: int | torch.Tensor, table: torch.Tensor, *,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  allowed: Allowed = None) -> torch.Tensor:
    """:func:`sample_tokens` with the step-independent work done once per decode: ``seed_keys`` =
    ``_seed_keys(seeds)``, ``table`` = ``_index_table(V)``. Same tokens, about half the small tensor ops per
    step (the per-step cost that dominates small models)."""
    logits, lo = _restrict(logits.float(), allowed)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1) + lo
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    idx = None
    if top_k is not None and top_k < V:
        logits, idx = logits.topk(top_k, dim=-1)
    if top_p is not None and top_p < 1.0:
        if idx is None:
            logits, idx = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))
    ikeys = table[lo:lo + V] if idx is None else table[idx + lo]  # [V] or [B, K]
    h = hash32(_step_keys(seed_keys, step)[:, None] ^ ikeys)
    u = ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)  # as uniform_noise
    choice = (logits - u.log_().neg_().log_()).argmax(dim=-1)  # logits + Gumbel, as gumbel_noise
    if idx is None:
        return choice + lo
    return idx.gather(1, choice[:, None])[:, 0] + lo


# ------------------------------------------------------------------------------------------ shared plumbing

@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _prefix_batch(model: GPT, prefix_ids, prefix_embeds, what: str = "prefix") -> tuple[int, int]:
    """(batch size, prefix length) of a prefix given as ids [B, P1] and/or embeddings [B, P0, D]."""
    if prefix_ids is None and prefix_embeds is None:
        raise TuwenError(f"{what}: give prefix_ids and/or prefix_embeds (at least one position to condition on)")
    B, P = None, 0
    if prefix_embeds is not None:
        if prefix_embeds.dim() != 3:
            raise TuwenError(f"{what}_embeds must be [batch, length, features], got {tuple(prefix_embeds.shape)}")
        B, P = prefix_embeds.shape[0], prefix_embeds.shape[1]
    if prefix_ids is not None:
        if prefix_ids.dim() != 2:
            raise TuwenError(f"{what}_ids must be [batch, length], got shape {tuple(prefix_ids.shape)}")
        if B is not None and prefix_ids.shape[0] != B:
            raise TuwenError(f"{what}_ids has {prefix_ids.shape[0]} rows but {what}_embeds has {B}")
        B, P = prefix_ids.shape[0], P + prefix_ids.shape[1]
    if P == 0:
        raise TuwenError(f"{what}: empty prefix; give at least one position to condition on")
    return B, P


def _cfg_inputs(model: GPT, prefix_ids, prefix_embeds, guidance_scale, uncond_prefix_ids, uncond_prefix_embeds, B):
    """Inputs of the (possibly doubled) batch: rows [cond; uncond] when guidance_scale is given."""
    dev = model.tok_emb.weight.device
    ids = prefix_ids.to(dev) if prefix_ids is not None else None
    emb = prefix_embeds.to(dev) if prefix_embeds is not None else None
    if guidance_scale is None:
        return ids, emb
    if ids is not None:
        if uncond_prefix_ids is None:
            raise TuwenError("guidance_scale needs uncond_prefix_ids (the unconditional prefix, same length)")
        u = uncond_prefix_ids.to(dev)
        u = u.expand(B, -1) if u.dim() == 2 and u.shape[0] == 1 else u
        if tuple(u.shape) != tuple(ids.shape):
            raise TuwenError(f"uncond_prefix_ids has shape {tuple(u.shape)}, expected {tuple(ids.shape)} or "
                             f"[1, {ids.shape[1]}]")
        ids = torch.cat([ids, u])
    if emb is not None:
        if uncond_prefix_embeds is None:
            raise TuwenError("guidance_scale needs uncond_prefix_embeds (the unconditional prefix features)")
        u = uncond_prefix_embeds.to(dev)
        u = u.expand(B, -1, -1) if u.dim() == 3 and u.shape[0] == 1 else u
        if tuple(u.shape) != tuple(emb.shape):
            raise TuwenError(f"uncond_prefix_embeds has shape {tuple(u.shape)}, expected {tuple(emb.shape)}")
        emb = torch.cat([emb, u.to(emb.dtype)])
    return ids, emb


def _check_offsets(model: GPT, token_offset: int, allowed: Allowed, pad_id: int, eos_id: int | None) -> Allowed:
    """Validate ids/offset/allowed; returns ``allowed`` with a mask moved to the model's device (as bool) once,
    so that no host→device copy happens inside the decode loop (or a CUDA graph)."""
    cfg = model.config
    if isinstance(allowed, torch.Tensor):
        if allowed.shape[-1] != cfg.n_out or allowed.dim() not in (1, 2):
            raise TuwenError(f"allowed mask must be [n_out={cfg.n_out}] or [batch, n_out], got "
                             f"{tuple(allowed.shape)}")
        allowed = allowed.to(device=model.tok_emb.weight.device, dtype=torch.bool)
    elif allowed is not None:
        allowed = (int(allowed[0]), int(allowed[1]))
    hi = allowed[1] if isinstance(allowed, tuple) else cfg.n_out
    if isinstance(allowed, tuple) and not 0 <= allowed[0] < allowed[1] <= cfg.n_out:
        raise TuwenError(f"allowed range {allowed} must satisfy 0 <= lo < hi <= n_out ({cfg.n_out})")
    if token_offset < 0 or token_offset + hi > cfg.vocab_size:
        raise TuwenError(f"token_offset {token_offset}: sampled ids (< {hi}) + offset must be valid input ids "
                         f"(< vocab_size {cfg.vocab_size})")
    for name, v in (("pad_id", pad_id), ("eos_id", eos_id)):
        if v is not None and not 0 <= v < cfg.n_out:
            raise TuwenError(f"{name} {v} is not an output id (0..{cfg.n_out - 1})")
    return allowed


class _Picker:
    """Logits of the (possibly doubled) batch → this step's tokens, identically in every decode path.

    Mixes CFG halves (``u + s * (c - u)``), samples, forces ``pad_id`` on finished rows, updates ``finished``
    in place and optionally gathers log p(token) under the mixed (pre-temperature) distribution.
    """

    def __init__(self, B, seeds, *, guidance_scale, temperature, top_k, top_p, allowed, eos_id, pad_id,
                 return_logprobs, forced=None):
        self.B, self.seeds = B, seeds
        self.seed_keys = _seed_keys(seeds)  # the seeds' half of the RNG keys, once per decode
        self.table: torch.Tensor | None = None  # _index_table(V), fetched on the first (eager) call
        self.forced = forced  # [B, num_tokens] output ids to emit instead of sampling (-1: sample), or None
        self.scale = guidance_scale
        self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.return_logprobs = return_logprobs

    def __call__(self, logits: torch.Tensor, step: int | torch.Tensor, finished: torch.Tensor):
        logits = logits.float()  # [Bx, V]
        if self.scale is not None:
            cond, uncond = logits.chunk(2)
            logits = uncond + self.scale * (cond - uncond)  # [B, V]
        if self.table is None or self.table.shape[0] != logits.shape[-1]:
            self.table = _index_table(logits.shape[-1], logits.device)
        tok = _sample_keyed(logits, self.seed_keys, step, self.table, **self.kw)
        if self.forced is not None:
            f = self.forced[:, step] if isinstance(step, int) else self.forced.index_select(1, step.reshape(1))[:, 0]
            tok = torch.where(f >= 0, f, tok)
        logp = None
        if self.eos_id is not None:
            tok = torch.where(finished, self.pad_id, tok)
        if self.return_logprobs:
            logp = logits.log_softmax(dim=-1).gather(1, tok[:, None])[:, 0]
            logp = logp.masked_fill(finished, 0.0)
        if self.eos_id is not None:
            finished |= tok == self.eos_id
        return tok, logp


#: public name of the token picker: tuwen.serve's continuous batcher samples each group of rows with it, so that
#: its tokens are exactly those of :func:`generate` (per-row ``step`` tensors are fine: the RNG is per row)
TokenPicker = _Picker


def _feed(tok: torch.Tensor, token_offset: int, doubled: bool) -> torch.Tensor:
    x = (tok + token_offset)[:, None]  # [B, 1]
    return torch.cat([x, x]) if doubled else x


# ------------------------------------------------------------------------------------------ generate

class _StaticDecoder:
    """Fixed-shape decode step (forward of one token at a device-tensor position + sampling), capturable in a
    CUDA graph. State lives in preallocated tensors that the step updates in place."""

    def __init__(self, model, cache, picker, *, P, num_tokens, token_offset, doubled, out, logprobs, finished):
        self.model, self.cache, self.picker = model, cache, picker
        self.P, self.num_tokens = P, num_tokens
        self.token_offset, self.doubled = token_offset, doubled
        self.out, self.logprobs, self.finished = out, logprobs, finished
        dev = out.device
        self.tok_in = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=dev)  # token at position pos
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)

    def start(self, first_tok: torch.Tensor) -> None:
        self.tok_in.copy_(_feed(first_tok, self.token_offset, self.doubled))
        self.pos.fill_(self.P)

    def step(self) -> None:
        logits = self.model(self.tok_in, cache=self.cache, start_pos=self.pos, logits_start=-1)[:, -1]
        s = self.pos - (self.P - 1)  # [1]: index of the token sampled now (1 … num_tokens-1)
        tok, logp = self.picker(logits, s, self.finished)
        self.out.index_copy_(1, s, tok[:, None])
        if self.logprobs is not None:
            self.logprobs.index_copy_(1, s, logp[:, None])
        self.tok_in.copy_(_feed(tok, self.token_offset, self.doubled))
        self.pos += 1

    def snapshot(self):
        ts = [self.tok_in, self.pos, self.finished, self.out] + ([self.logprobs] if self.logprobs is not None else [])
        saved = [t.clone() for t in ts]

        def restore():
            for t, s in zip(ts, saved):
                t.copy_(s)
        return restore


def _run_static(dec: _StaticDecoder, n_steps: int, use_graph: bool, amp_ctx_factory, check_every: int) -> None:
    """Run ``n_steps`` decode steps; with ``use_graph`` capture one step in a CUDA graph and replay it."""
    graph = None
    if use_graph:
        restore = dec.snapshot()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), amp_ctx_factory():
                for _ in range(2):  # warm-up (lazy init of kernels/workspaces) outside the capture
                    dec.step()
            torch.cuda.current_stream().wait_stream(stream)
            restore()  # warm-up wrote only future cache slots, which are rewritten before being read
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), amp_ctx_factory():
                dec.step()
            restore()  # capture does not run kernels, but be safe
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly instead")
            torch.cuda.synchronize()
            restore()
            graph = None
    for i in range(n_steps):
        if graph is not None:
            graph.replay()
        else:
            with amp_ctx_factory():
                dec.step()
        if dec.picker.eos_id is not None and (i + 1) % check_every == 0 and bool(dec.finished.all()):
            break  # remaining columns of out are already pad


@torch.inference_mode()
def generate(model: GPT, *, prefix_ids: torch.Tensor | None = None, prefix_embeds: torch.Tensor | None = None,
             num_tokens: int, seeds: Seeds, top_k: int | None = None, top_p: float | None = None,
             temperature: float = 1.0, allowed: Allowed = None, guidance_scale: float | None = None,
             uncond_prefix_ids: torch.Tensor | None = None, uncond_prefix_embeds: torch.Tensor | None = None,
             token_offset: int = 0, eos_id: int | None = None, pad_id: int = 0,
             use_cuda_graph: bool | str = "auto", static_cache: bool | None = None,
             amp_dtype: torch.dtype | None = None, return_logprobs: bool = False,
             forced: torch.Tensor | None = None, speculative: int | None = None, stats: dict | None = None):
    """Sample ``num_tokens`` tokens per row after the prefix → LongTensor [B, num_tokens] (output ids).

    prefix_ids [B, P1] (input ids) and/or prefix_embeds [B, P0, n_prefix_embd] (placed first) are prefilled
    once into a KV cache; then one token per step. seeds: LongTensor [B] / list (one per row) or an int s
    (row i gets s + i); a row's tokens depend only on its seed and its logits.
    guidance_scale: classifier-free guidance with uncond_prefix_ids/_embeds ([B, …] or [1, …], same length as
    the conditional prefix): both run in one doubled batch, logits = u + scale·(c − u), both halves are fed
    the same token. token_offset: added to each sampled id before it is fed back as input. eos_id: a row that
    emitted it emits ``pad_id`` afterwards; the loop stops when every row is done.
    use_cuda_graph: "auto" = on CUDA capture the decode step in a CUDA graph (eager fallback if capture
    fails); static_cache (default: same as the graph choice) forces the fixed-shape masked decode step (the
    one the graph captures; also runs on CPU, for testing). amp_dtype: autocast dtype (e.g. torch.bfloat16
    on CUDA; faster still is a model already cast to bf16). return_logprobs: also return log p(token) [B, T]
    under the model (after CFG, before temperature/top-k/top-p; 0 after EOS).
    forced: LongTensor [num_tokens] or [B, num_tokens] of output ids emitted *instead of* sampling where >= 0
    (-1: sample); known tokens inside the generated span (CogView's super-resolution windows, image completion)
    are fed through the same cache, and every sampled token sees all known tokens before it.
    speculative: ``k`` ≥ 1 turns on speculative Jacobi decoding (:func:`_generate_speculative`): k guessed tokens
    verified per forward, the same distribution as one-by-one sampling (not the same tokens for a seed: the
    random numbers are used differently), rows still independent of the batch; eager (no CUDA graph); not with
    return_logprobs or forced. ``stats``: a dict it fills (``tokens_per_step``: tokens per decode forward).
    """
    B, P = _prefix_batch(model, prefix_ids, prefix_embeds)
    cfg = model.config
    if num_tokens < 1:
        raise TuwenError(f"num_tokens must be >= 1, got {num_tokens}")
    if P + num_tokens - 1 > cfg.block_size:
        raise TuwenError(f"prefix ({P}) + num_tokens ({num_tokens}) - 1 = {P + num_tokens - 1} positions exceed "
                         f"the model's block_size ({cfg.block_size})")
    _check_sampling_args(temperature, top_k, top_p)
    allowed = _check_offsets(model, token_offset, allowed, pad_id, eos_id)
    if use_cuda_graph not in ("auto", True, False):
        raise TuwenError(f"use_cuda_graph must be 'auto', True or False, got {use_cuda_graph!r}")
    dev = model.tok_emb.weight.device
    if use_cuda_graph is True and dev.type != "cuda":
        raise TuwenError("use_cuda_graph=True needs the model on a CUDA device")
    use_graph = dev.type == "cuda" and use_cuda_graph in ("auto", True)
    static = use_graph if static_cache is None else bool(static_cache)
    if use_graph and not static:
        raise TuwenError("a CUDA graph needs the static cache (static_cache=True or None)")

    doubled = guidance_scale is not None
    ids, emb = _cfg_inputs(model, prefix_ids, prefix_embeds, guidance_scale, uncond_prefix_ids,
                           uncond_prefix_embeds, B)
    Bx = 2 * B if doubled else B
    seeds_t = as_seeds(seeds, B, dev)
    if forced is not None:
        forced = torch.as_tensor(forced, dtype=torch.long).to(dev)
        forced = forced.expand(B, -1) if forced.dim() == 1 else forced
        if tuple(forced.shape) != (B, num_tokens):
            raise TuwenError(f"forced must be [num_tokens={num_tokens}] or [{B}, {num_tokens}], got "
                             f"{tuple(forced.shape)}")
        if int(forced.max()) + token_offset >= cfg.vocab_size:
            raise TuwenError(f"forced ids must be < {cfg.vocab_size - token_offset} (or -1 to sample)")
    if speculative is not None:
        if isinstance(speculative, bool) or not isinstance(speculative, int) or not 1 <= speculative <= 63:
            raise TuwenError(f"speculative must be an integer in 1..63 (guessed tokens per step), got {speculative!r}")
        if return_logprobs or forced is not None:
            raise TuwenError("speculative decoding does not take return_logprobs or forced tokens; leave one off")
        if P + num_tokens > cfg.block_size:
            warnings.warn(f"speculative decoding needs one spare position (prefix {P} + {num_tokens} tokens ≤ "
                          f"block_size {cfg.block_size}); decoding one token per step instead")
        elif num_tokens > 1:
            with _eval_mode(model), model.fused_qkv(dtype=amp_dtype):
                return _generate_speculative(
                    model, ids=ids, emb=emb, B=B, P=P, num_tokens=num_tokens, seeds=seeds_t, window=speculative + 1,
                    guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                    allowed=allowed, token_offset=token_offset, eos_id=eos_id, pad_id=pad_id, amp_dtype=amp_dtype,
                    stats=stats)
    picker = _Picker(B, seeds_t, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                     top_p=top_p, allowed=allowed, eos_id=eos_id, pad_id=pad_id, return_logprobs=return_logprobs,
                     forced=forced)
    out = torch.full((B, num_tokens), pad_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros(B, num_tokens, dtype=torch.float32, device=dev) if return_logprobs else None
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    cache_dtype = amp_dtype if amp_dtype is not None else model.tok_emb.weight.dtype
    cache = KVCache.for_model(model, Bx, max_len=P + num_tokens - 1, dtype=cache_dtype)

    with _eval_mode(model), model.fused_qkv(dtype=amp_dtype):
        with autocast(dev, amp_dtype):
            logits = model(ids, emb, cache=cache, start_pos=0, logits_start=-1)[:, -1]  # prefill
            tok, logp = picker(logits, 0, finished)
        out[:, 0] = tok
        if logprobs is not None:
            logprobs[:, 0] = logp
        if num_tokens == 1 or (eos_id is not None and bool(finished.all())):
            return (out, logprobs) if return_logprobs else out

        if static:
            dec = _StaticDecoder(model, cache, picker, P=P, num_tokens=num_tokens, token_offset=token_offset,
                                 doubled=doubled, out=out, logprobs=logprobs, finished=finished)
            dec.start(tok)
            amp_factory = (lambda: autocast(dev, amp_dtype, cache_enabled=not use_graph))
            _run_static(dec, num_tokens - 1, use_graph, amp_factory, check_every=16 if dev.type == "cuda" else 1)
        else:
            with autocast(dev, amp_dtype):
                for s in range(1, num_tokens):
                    x = _feed(tok, token_offset, doubled)
                    logits = model(x, cache=cache, start_pos=P + s - 1, logits_start=-1)[:, -1]
                    tok, logp = picker(logits, s, finished)
                    out[:, s] = tok
                    if logprobs is not None:
                        logprobs[:, s] = logp
                    if eos_id is not None and bool(finished.all()):
                        break
    return (out, logprobs) if return_logprobs else out


# ------------------------------------------------------------------------------------------ beam search

def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``seq`` (generated tokens only)."""
    if n <= 0 or len(seq) + 1 < n:
        return []
    if n == 1:
        return list(set(seq))
    key = tuple(seq[len(seq) - n + 1:])
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == key]


def _beam_logprobs(logits: torch.Tensor, allowed: Allowed) -> torch.Tensor:
    """[N, V] logits → log-probs over the whole output vocabulary, ids outside ``allowed`` at -inf."""
    logits = logits.float()
    if isinstance(allowed, tuple):
        masked = torch.full_like(logits, float("-inf"))
        masked[:, allowed[0]:allowed[1]] = logits[:, allowed[0]:allowed[1]]
        logits = masked
    elif allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.log_softmax(dim=-1)


def _ban(logp: torch.Tensor, seqs: list[list[int]], t: int, eos_id: int | None, min_new_tokens: int,
         no_repeat_ngram_size: int) -> None:
    """In place on logp [B*K, V]: no eos before min_new_tokens, no repeated n-gram of a beam's tokens."""
    if eos_id is not None and t < min_new_tokens:
        logp[:, eos_id] = float("-inf")
    if no_repeat_ngram_size > 0:
        for r, seq in enumerate(seqs):
            banned = _banned_ngram_tokens(seq, no_repeat_ngram_size)
            if banned:
                logp[r, banned] = float("-inf")


class _Hypotheses:
    """The finished hypotheses of one row: at most ``K`` (score, tokens), best first."""

    def __init__(self, K: int):
        self.K, self.items = K, []

    def add(self, score: float, seq: list[int]) -> None:
        self.items.append((score, seq))
        self.items.sort(key=lambda h: -h[0])
        del self.items[self.K:]

    @property
    def full(self) -> bool:
        return len(self.items) >= self.K


def _select_row(top_scores: list[float], top_ids: list[int], V: int, K: int, t: int, row_seqs: list[list[int]],
                hyps: _Hypotheses, eos_id: int | None, pad_id: int, length_penalty: float, early_stopping: bool):
    """One row's beams after step ``t`` from its 2K best (beam, token) candidates, best first.

    A candidate ending in eos becomes a hypothesis when it ranks among the K best; the others fill the K beams
    (dead beams at -inf when too few are left). Returns (scores [K], tokens [K], source beam in the row [K], done).
    """
    scores, tokens, src = [float("-inf")] * K, [pad_id] * K, [0] * K
    j = 0
    for rank in range(2 * K):
        score, flat = top_scores[rank], top_ids[rank]
        if score == float("-inf"):
            break
        beam, tok = flat // V, flat % V
        if eos_id is not None and tok == eos_id:
            if rank < K:
                hyps.add(score / (t + 1) ** length_penalty, row_seqs[beam] + [tok])
            continue
        scores[j], tokens[j], src[j] = score, tok, beam
        j += 1
        if j == K:
            break
    if not hyps.full:
        done = j == 0
    elif early_stopping or j == 0:
        done = True
    else:  # HF's heuristic: done when no running beam can beat the worst hypothesis
        done = hyps.items[-1][0] >= max(scores) / (t + 1) ** length_penalty
    return scores, tokens, src, done


def _best_hypotheses(hyps: list[_Hypotheses], done: list[bool], beam_scores: torch.Tensor, seqs: list[list[int]],
                     R: int, T: int, pad_id: int, length_penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The R best hypotheses per row → (ids [B, R, T], scores [B, R]); running beams of rows that were not done
    at the last step become hypotheses."""
    B, K = beam_scores.shape
    for b in range(B):
        if not done[b]:
            for k in range(K):
                s = float(beam_scores[b, k])
                if s != float("-inf"):
                    seq = seqs[b * K + k]
                    hyps[b].add(s / len(seq) ** length_penalty, seq)
    out = torch.full((B, R, T), pad_id, dtype=torch.long)
    scores = torch.full((B, R), float("-inf"))
    for b in range(B):
        for r, (s, seq) in enumerate(hyps[b].items[:R]):
            out[b, r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            scores[b, r] = s
    return out, scores


@torch.inference_mode()
def beam_search(model: GPT, *, prefix_ids: torch.Tensor | None = None, prefix_embeds: torch.Tensor | None = None,
                max_new_tokens: int, num_beams: int, eos_id: int | None = None, pad_id: int = 0,
                length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, num_return_sequences: int = 1,
                min_new_tokens: int = 0, early_stopping: bool = True, token_offset: int = 0,
                allowed: Allowed = None, amp_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search with a KV cache → ``(ids [B, R, max_new_tokens], scores [B, R])``, best first.

    Each row keeps ``num_beams`` running beams; a beam whose next token is ``eos_id`` becomes a finished
    hypothesis (eos included in ids, then ``pad_id``). Score = sum log p / length ** length_penalty, length =
    number of generated tokens including eos (HF style). A row is done when it has ``num_beams`` hypotheses
    (``early_stopping=True``) or when no running beam can beat its worst one (HF's heuristic, False); rows
    finish independently. At max_new_tokens the running beams become hypotheses. ``num_beams=1`` is greedy
    decoding. no_repeat_ngram_size bans repeating an n-gram of the generated tokens; min_new_tokens bans eos
    before that many tokens. The cache is prefilled once per row and reordered on beam selection.
    """
    B, P = _prefix_batch(model, prefix_ids, prefix_embeds)
    cfg = model.config
    K, T, R = num_beams, max_new_tokens, num_return_sequences
    if K < 1 or T < 1:
        raise TuwenError(f"num_beams and max_new_tokens must be >= 1, got {K} and {T}")
    if not 1 <= R <= K:
        raise TuwenError(f"num_return_sequences ({R}) must be in 1..num_beams ({K})")
    if P + T - 1 > cfg.block_size:
        raise TuwenError(f"prefix ({P}) + max_new_tokens ({T}) - 1 exceeds block_size ({cfg.block_size})")
    allowed = _check_offsets(model, token_offset, allowed, pad_id, eos_id)
    dev = model.tok_emb.weight.device
    ids = prefix_ids.to(dev) if prefix_ids is not None else None
    emb = prefix_embeds.to(dev) if prefix_embeds is not None else None

    hyps = [_Hypotheses(K) for _ in range(B)]
    done = [False] * B
    with _eval_mode(model), model.fused_qkv(dtype=amp_dtype), autocast(dev, amp_dtype):
        cache = KVCache.for_model(model, B, max_len=P + T - 1, dtype=amp_dtype or model.tok_emb.weight.dtype)
        logits = model(ids, emb, cache=cache, start_pos=0, logits_start=-1)[:, -1]  # [B, V]
        if K > 1:
            cache = cache.repeat_interleave(K)
        logp = _beam_logprobs(logits, allowed).repeat_interleave(K, dim=0)  # [B*K, V]
        V = logp.shape[-1]
        beam_scores = torch.zeros(B, K, device=dev)
        beam_scores[:, 1:] = float("-inf")  # all beams start equal: take the first K tokens from beam 0 only
        seqs: list[list[int]] = [[] for _ in range(B * K)]

        for t in range(T):
            _ban(logp, seqs, t, eos_id, min_new_tokens, no_repeat_ngram_size)
            cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)
            top_scores, top_ids = cand.topk(2 * K, dim=1)  # [B, 2K], sorted
            top_scores_l, top_ids_l = top_scores.tolist(), top_ids.tolist()
            rows = []  # per row: (scores [K], tokens [K], source beams in the row [K])
            for b in range(B):
                if done[b]:
                    rows.append(([0.0] * K, [pad_id] * K, [0] * K))
                    continue
                *row, done[b] = _select_row(top_scores_l[b], top_ids_l[b], V, K, t, seqs[b * K:(b + 1) * K],
                                            hyps[b], eos_id, pad_id, length_penalty, early_stopping)
                rows.append(row)
            src_flat = [b * K + s for b, (_, _, src) in enumerate(rows) for s in src]
            tok_flat = [x for _, toks, _ in rows for x in toks]
            seqs = [seqs[s] + [x] for s, x in zip(src_flat, tok_flat)]
            beam_scores = torch.tensor([sc for sc, _, _ in rows], device=dev)
            if all(done) or t == T - 1:
                break
            if K > 1:
                cache.reorder_(torch.tensor(src_flat, device=dev), length=P + t)
            x = torch.tensor(tok_flat, device=dev)[:, None] + token_offset
            logits = model(x, cache=cache, start_pos=P + t, logits_start=-1)[:, -1]
            logp = _beam_logprobs(logits, allowed)

    out, scores = _best_hypotheses(hyps, done, beam_scores, seqs, R, T, pad_id, length_penalty)
    return out.to(dev), scores.to(dev)


# ------------------------------------------------------------------------------------------ scoring

@torch.inference_mode()
def score_sequences(model: GPT, *, prefix_ids: torch.Tensor | None = None, prefix_embeds: torch.Tensor | None = None,
                    target_ids: torch.Tensor, target_mask: torch.Tensor | None = None, token_offset: int = 0,
                    per_token: bool = False, amp_dtype: torch.dtype | None = None,
                    max_logits_elements: int = 1 << 25) -> torch.Tensor:
    """Teacher-forced ``sum_t log p(target_t | prefix, target_<t)`` per row → [B] (float32).

    target_ids [B, T] are output ids (fed back as ``target + token_offset``); target_mask [B, T] (bool/0-1)
    selects the tokens that count (e.g. up to and including EOS). ``per_token=True`` returns the masked
    log-probs [B, T] instead of their sum. One forward per chunk of rows, chunks sized so that the logits hold
    at most ``max_logits_elements`` values.
    """
    B, P = _prefix_batch(model, prefix_ids, prefix_embeds)
    if target_ids.dim() != 2 or target_ids.shape[0] != B:
        raise TuwenError(f"target_ids must be [batch={B}, length], got shape {tuple(target_ids.shape)}")
    T = target_ids.shape[1]
    if P + T - 1 > model.config.block_size:
        raise TuwenError(f"prefix ({P}) + target ({T}) - 1 exceeds block_size ({model.config.block_size})")
    dev = model.tok_emb.weight.device
    target = target_ids.to(dev)
    inp = target[:, :-1] + token_offset
    if prefix_ids is not None:
        inp = torch.cat([prefix_ids.to(dev), inp], dim=1)
    emb = prefix_embeds.to(dev) if prefix_embeds is not None else None
    chunk = max(1, max_logits_elements // max(1, T * model.config.n_out))
    rows = []
    with _eval_mode(model), autocast(dev, amp_dtype):
        for i in range(0, B, chunk):
            sl = slice(i, i + chunk)
            x = inp[sl] if inp.shape[1] else None
            logits = model(x, emb[sl] if emb is not None else None, logits_start=P - 1)  # [b, T, n_out]
            rows.append(-F.cross_entropy(logits.float().transpose(1, 2), target[sl], reduction="none"))
    logp = torch.cat(rows)  # [B, T]
    if target_mask is not None:
        logp = logp * target_mask.to(dev, logp.dtype)
    return logp if per_token else logp.sum(dim=1)


# ----------------------------------------------------------------------------------------------- parameters

@dataclasses.dataclass
class SamplingParams(BaseConfig):
    """How to pick tokens: a model folder saves its defaults, and each call may replace any of them.

    ``params.replace(top_k=None)`` switches top-k off; a field that is not named keeps its value. Text→image uses
    top_k/top_p/temperature/guidance_scale; captioning also num_beams/length_penalty/no_repeat_ngram_size.
    """

    model_type: ClassVar[str] = "sampling"

    top_k: int | None = None             # keep the k most likely tokens (None: all)
    top_p: float | None = None           # nucleus: smallest set with this much probability (None: off)
    temperature: float = 1.0
    guidance_scale: float | None = None  # classifier-free guidance (None or 1: off)
    num_beams: int = 1                   # captioning: beam search when > 1
    length_penalty: float = 1.0          # beam search: score / length ** length_penalty
    no_repeat_ngram_size: int = 0        # captioning: forbid repeating n-grams of this size (0: off)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_sampling_args(self.temperature, self.top_k, self.top_p)
        if self.num_beams < 1:
            raise TuwenError(f"num_beams must be ≥ 1, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise TuwenError(f"no_repeat_ngram_size must be ≥ 0, got {self.no_repeat_ngram_size}")

    def replace(self, **changes) -> "SamplingParams":
        """A copy with ``changes`` applied; unknown names are an error that lists the known ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TuwenError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------ speculative Jacobi

_SJD_STEP = 0x40000000  # RNG "steps" of speculative decoding: 4 per iteration, apart from generate's steps


def _processed_logprobs(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                        allowed: Allowed) -> torch.Tensor:
    """[N, V] logits → [N, V] log-probs of the distribution :func:`sample_tokens` draws from (temperature,
    top-k, top-p and ``allowed`` applied; excluded ids at -inf; greedy = one-hot)."""
    logits = logits.float()
    if isinstance(allowed, tuple):
        logits = torch.full_like(logits, float("-inf")).index_copy_(
            1, torch.arange(allowed[0], allowed[1], device=logits.device), logits[:, allowed[0]:allowed[1]])
    elif allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0 or top_k == 1:
        return torch.full_like(logits, float("-inf")).scatter_(1, logits.argmax(dim=-1, keepdim=True), 0.0)
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if (top_k is not None and top_k < V) or (top_p is not None and top_p < 1.0):
        vals, idx = logits.topk(top_k, dim=-1) if top_k is not None and top_k < V else \
            logits.sort(dim=-1, descending=True)
        if top_p is not None and top_p < 1.0:
            probs = vals.softmax(dim=-1)
            vals = vals.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter_(1, idx, vals)
    return logits.log_softmax(dim=-1)


def _candidates(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                allowed: Allowed) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] logits → the distribution :func:`sample_tokens` draws from, restricted to its candidates:
    (log-probs [N, C], output ids [N, C]). C = 1 (greedy), top_k, or every allowed id; ids that ``allowed`` or
    top-p exclude are at -inf. Same rule as :func:`_processed_logprobs` without the dense [N, V] result."""
    logits, lo = _restrict(logits.float(), allowed)
    N, V = logits.shape
    if temperature == 0 or top_k == 1:
        return logits.new_zeros(N, 1), logits.argmax(dim=-1, keepdim=True) + lo
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < V:
        vals, ids = logits.topk(top_k, dim=-1)  # sorted, descending
    elif top_p is not None and top_p < 1.0:
        vals, ids = logits.sort(dim=-1, descending=True)
    else:
        vals, ids = logits, torch.arange(V, device=logits.device).expand(N, V)
    if top_p is not None and top_p < 1.0:
        probs = vals.softmax(dim=-1)
        vals = vals.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))
    return vals.log_softmax(dim=-1), ids + lo


def _generate_speculative(model: GPT, *, ids, emb, B: int, P: int, num_tokens: int, seeds: torch.Tensor,
                          window: int, guidance_scale, temperature, top_k, top_p, allowed, token_offset: int,
                          eos_id, pad_id: int, amp_dtype, stats: dict | None) -> torch.Tensor:
    """Speculative Jacobi decoding (SJD, arXiv 2410.01699): ``window - 1`` guessed tokens are verified in one
    forward pass of ``window`` positions per row; each guess ``d`` (drawn from a known distribution ``q``) is
    accepted with probability ``min(1, p(d) / q(d))`` where ``p`` is the model's distribution given the accepted
    prefix; at the first rejection the token is drawn from ``norm(max(0, p - q))`` (speculative sampling), so
    every token has exactly the distribution of one-by-one sampling. When all guesses are accepted the last
    position's ``p`` gives one more token: 1 … ``window`` tokens per forward. The next guesses are drawn from
    the distributions this forward computed further along (conditioned on the old guesses: the Jacobi step).

    Every distribution is kept as its candidates only (:func:`_candidates`: the top-k ids, or all allowed ids
    without top-k), so with top-k the verification, residuals and random numbers cost O(window · k) per row, not
    O(window · vocabulary): a step costs little more than the model's forward over ``window`` positions.

    Rows keep their own positions (per-row positions of the KV cache), iteration counter and counter-based
    random numbers, so a row's tokens depend only on its seed and its logits, not on the batch. Positions past
    the end go to one scratch slot of the cache that no real position attends to.
    """
    dev = seeds.device
    N, L = num_tokens, window
    doubled = guidance_scale is not None
    Bx = 2 * B if doubled else B
    trash = P + N - 1  # scratch position: after every real one
    cache_dtype = amp_dtype if amp_dtype is not None else model.tok_emb.weight.dtype
    cache = KVCache.for_model(model, Bx, max_len=P + N, dtype=cache_dtype)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed)
    V = model.config.n_out

    def mixed(logits):  # [Bx, T, V] → [B, T, V] float (CFG)
        logits = logits.float()
        if doubled:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        return logits

    def cands(logits):  # [B, T, V] → candidates: log-probs [B, T, C], ids [B, T, C]
        b, t, v = logits.shape
        al = allowed.repeat_interleave(t, dim=0) if isinstance(allowed, torch.Tensor) and allowed.dim() == 2 \
            else allowed
        lp, ix = _candidates(logits.reshape(b * t, v), **{**kw, "allowed": al})
        return lp.view(b, t, -1), ix.view(b, t, -1)

    vkeys = _index_keys(torch.arange(L * V, device=dev))  # [L*V]: (slot, id) → key, shared by every row
    slots = torch.arange(L, device=dev)

    def draw(it: int, purpose: int, lp: torch.Tensor, ix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-max draw per (row, slot) from candidates lp/ix [B, n, C] → (ids [B, n], their log-probs)."""
        rk = _row_keys(seeds, _SJD_STEP + 4 * it + purpose)  # [B]
        keys = vkeys[ix + (slots[:ix.shape[1], None] * V)]  # [B, n, C]
        u = ((hash32(rk[:, None, None] ^ keys) >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)
        j = (lp - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)  # [B, n, 1]
        return ix.gather(2, j)[..., 0], lp.gather(2, j)[..., 0]

    out = torch.full((B, N), pad_id, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    with autocast(dev, amp_dtype):
        lp0, ix0 = cands(mixed(model(ids, emb, cache=cache, start_pos=0, logits_start=-1)))  # [B, 1, C]
    C = lp0.shape[-1]
    # token 0: an exact draw from the prefill's distribution; guesses for 1 … L-1 drawn from it as well
    tok0 = draw(0, 1, lp0, ix0)[0][:, 0]  # [B]
    out[:, 0] = tok0
    lq, iq = lp0.expand(B, L - 1, C).contiguous(), ix0.expand(B, L - 1, C).contiguous()  # guesses' distributions
    draft, lq_d = draw(0, 2, lq, iq)  # [B, L-1] guesses and log q(guess)
    n = torch.ones(B, dtype=torch.long, device=dev)  # tokens fixed per row
    row_iters = torch.zeros(B, dtype=torch.long, device=dev)  # forwards each row needed
    last = tok0
    q_dense = torch.zeros(B, L - 1, V, device=dev)  # scratch: q scattered over the vocabulary
    it = 0
    while True:
        if bool((n >= N).all()):
            break
        it += 1
        row_iters += n < N
        feed = torch.cat([last[:, None], draft], dim=1) + token_offset  # [B, L]: token n-1, guesses n … n+L-2
        pos = P + n[:, None] - 1 + slots  # [B, L]
        pos = torch.where(n[:, None] + slots <= N - 1, pos, trash)  # slots predicting past the end: scratch
        if doubled:
            feed, pos = torch.cat([feed, feed]), torch.cat([pos, pos])
        with autocast(dev, amp_dtype):
            lp, ix = cands(mixed(model(feed, cache=cache, start_pos=pos, logits_start=0)))  # [B, L, C]
        # verify guesses: slot j's guess (token n+j) against p_j = (lp[:, j], ix[:, j]); p(guess) = 0 off-candidates
        hit = ix[:, :L - 1] == draft[:, :, None]  # [B, L-1, C]
        lp_d = torch.where(hit, lp[:, :L - 1], float("-inf")).amax(dim=2)  # [B, L-1]
        u = uniform_noise(seeds, _SJD_STEP + 4 * it, slots[:L - 1])  # [B, L-1]
        ok = torch.log(u) < lp_d - lq_d
        r = torch.where(ok.all(dim=1), L - 1, (~ok).long().argmax(dim=1))  # first rejection (L-1: none)
        # the token at slot r: from norm(max(0, p - q)) after a rejection, from p after L-1 acceptances;
        # max(0, p - q) lives on p's candidates: q at those ids through a dense scatter of q
        q_dense.zero_().scatter_(2, iq, lq.exp())
        p = lp[:, :L - 1].exp()
        res = (p - q_dense.gather(2, ix[:, :L - 1])).clamp_min(0.0)  # [B, L-1, C]
        res_lp = torch.where(res.sum(-1, keepdim=True) > 1e-12, res.log(), lp[:, :L - 1])
        fixed = draw(it, 1, torch.cat([res_lp, lp[:, L - 1:]], dim=1), ix)[0]  # [B, L]
        new = torch.where(slots[None] < r[:, None], torch.cat([draft, draft[:, :1]], dim=1), fixed)  # [B, L]
        a = torch.minimum(r + 1, (N - n).clamp_min(0))  # tokens gained, capped at the end
        keep = slots[None] < a[:, None]  # [B, L]
        col = (n[:, None] + slots).clamp_max(N - 1)
        out[rows[:, None].expand(B, L)[keep], col[keep]] = new[keep]
        last = torch.where(a > 0, new.gather(1, (a - 1).clamp_min(0)[:, None])[:, 0], last)
        # next guesses: token n' + k drawn from this forward's distribution at slot min(a + k, L-1)
        src = (a[:, None] + slots[None, :L - 1]).clamp_max(L - 1)[:, :, None].expand(B, L - 1, C)  # [B, L-1, C]
        lq, iq = lp.gather(1, src), ix.gather(1, src)
        draft, lq_d = draw(it, 2, lq, iq)
        n = n + a
    if stats is not None:  # tokens per decode forward (the prefill's token not counted), mean over rows
        stats.update(forwards=it + 1, rows=B, num_tokens=N,
                     tokens_per_step=float(((N - 1) / row_iters.clamp_min(1).float()).mean()))
    if eos_id is not None:  # a row that emitted eos emits pad afterwards
        hit = (out == eos_id).long().cumsum(dim=1)
        out = torch.where((hit - (out == eos_id).long()) > 0, pad_id, out)
    return out
