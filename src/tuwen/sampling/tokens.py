"""Logits → tokens with a counter-based RNG (row, step, vocabulary index → noise), and a model's saved
sampling settings (``SamplingParams``). See the package docstring."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import torch

from ..config import BaseConfig
from ..errors import TuwenError

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
    logits, idx, lo, greedy = _filter(logits, temperature, top_k, top_p, allowed)
    if greedy is not None:
        return greedy
    index = (torch.arange(logits.shape[-1], device=logits.device) if idx is None else idx) + lo
    return _pick(logits + gumbel_noise(seeds, step, index), idx, lo)


def _filter(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, allowed: Allowed):
    """The candidates of :func:`sample_tokens`: ``allowed`` → temperature → top-k → top-p. Returns (logits [B, K],
    their vocabulary indices [B, K] or None when all V remain, the ``allowed`` offset, the greedy choice or None)."""
    logits, lo = _restrict(logits.float(), allowed)
    if temperature == 0 or top_k == 1:
        return logits, None, lo, logits.argmax(dim=-1) + lo
    if temperature != 1.0:
        logits = logits / temperature
    idx = None
    if top_k is not None and top_k < logits.shape[-1]:
        logits, idx = logits.topk(top_k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        if idx is None:
            logits, idx = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the better candidates
        logits = logits.masked_fill(mass_before > top_p, float("-inf"))
    return logits, idx, lo, None


def _pick(noisy: torch.Tensor, idx: torch.Tensor | None, lo: int) -> torch.Tensor:
    """argmax of logits + Gumbel noise → vocabulary ids [B]."""
    choice = noisy.argmax(dim=-1)
    return choice + lo if idx is None else idx.gather(1, choice[:, None])[:, 0] + lo


def _sample_keyed(logits: torch.Tensor, seed_keys: torch.Tensor, step: int | torch.Tensor, table: torch.Tensor, *,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  allowed: Allowed = None) -> torch.Tensor:
    """:func:`sample_tokens` with the step-independent work done once per decode: ``seed_keys`` =
    ``_seed_keys(seeds)``, ``table`` = ``_index_table(V)``. Same tokens, about half the small tensor ops per
    step (the per-step cost that dominates small models)."""
    logits, idx, lo, greedy = _filter(logits, temperature, top_k, top_p, allowed)
    if greedy is not None:
        return greedy
    ikeys = table[lo:lo + logits.shape[-1]] if idx is None else table[idx + lo]  # [V] or [B, K]
    h = hash32(_step_keys(seed_keys, step)[:, None] ^ ikeys)
    u = ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)  # as uniform_noise
    return _pick(logits - u.log_().neg_().log_(), idx, lo)  # logits + Gumbel, as gumbel_noise


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
