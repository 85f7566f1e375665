"""What every decoding loop shares: prefix batches, classifier-free-guidance inputs, output-id checks, the
per-row token picker and the next input id."""
from __future__ import annotations

import contextlib

import torch

from ..errors import TuwenError
from ..models.gpt import GPT

from .tokens import Allowed, _index_table, _sample_keyed, _seed_keys


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
