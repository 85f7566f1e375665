"""``generate``: prefill once, then one token per step through a KV cache (a CUDA graph on CUDA)."""
from __future__ import annotations

import warnings

import torch

from ..errors import TuwenError
from ..models.gpt import GPT, KVCache
from ..runtime import autocast

from .plumbing import (_cfg_inputs, _check_offsets, _eval_mode, _feed, _Picker, _prefix_batch)
from .tokens import Allowed, Seeds, _check_sampling_args, as_seeds
from .speculative import _generate_speculative


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
