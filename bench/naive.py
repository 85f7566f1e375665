"""EasyNLP's text→image decoding loop, kept as the baseline of the benchmarks and of the equivalence tests.

No KV cache: every step runs the full forward over the whole growing sequence (the head over every position)
and samples the last position with tuwen's sampling rule (:func:`tuwen.sampling.sample_tokens` through the same
CFG/EOS picker), so the same seeds give the same tokens as :func:`tuwen.sampling.generate` up to float noise.

    from naive import generate_naive        # with bench/ on sys.path
"""
from __future__ import annotations

import torch

from tuwen.errors import TuwenError
from tuwen.models.gpt import GPT
from tuwen.runtime import autocast
# the sampler's own argument checks and token picker, so that the two loops differ only in how logits are computed
from tuwen.sampling import (Allowed, Seeds, _cfg_inputs, _check_offsets, _check_sampling_args, _eval_mode, _feed,
                            _Picker, _prefix_batch, as_seeds)


@torch.inference_mode()
def generate_naive(model: GPT, *, prefix_ids: torch.Tensor | None = None, prefix_embeds: torch.Tensor | None = None,
                   num_tokens: int, seeds: Seeds, top_k: int | None = None, top_p: float | None = None,
                   temperature: float = 1.0, allowed: Allowed = None, guidance_scale: float | None = None,
                   uncond_prefix_ids: torch.Tensor | None = None, uncond_prefix_embeds: torch.Tensor | None = None,
                   token_offset: int = 0, eos_id: int | None = None, pad_id: int = 0,
                   amp_dtype: torch.dtype | None = None, return_logprobs: bool = False):
    """EasyNLP's decoding loop: no KV cache, a full forward over the growing sequence (head over every
    position) each step. Same arguments and sampling rule as :func:`tuwen.sampling.generate` (same seeds → same tokens up to
    float noise); for benchmarks and equivalence tests."""
    B, P = _prefix_batch(model, prefix_ids, prefix_embeds)
    if num_tokens < 1 or P + num_tokens - 1 > model.config.block_size:
        raise TuwenError(f"prefix ({P}) + num_tokens ({num_tokens}) - 1 must be in 1..block_size "
                         f"({model.config.block_size})")
    _check_sampling_args(temperature, top_k, top_p)
    allowed = _check_offsets(model, token_offset, allowed, pad_id, eos_id)
    dev = model.tok_emb.weight.device
    doubled = guidance_scale is not None
    ids, emb = _cfg_inputs(model, prefix_ids, prefix_embeds, guidance_scale, uncond_prefix_ids,
                           uncond_prefix_embeds, B)
    picker = _Picker(B, as_seeds(seeds, B, dev), guidance_scale=guidance_scale, temperature=temperature,
                     top_k=top_k, top_p=top_p, allowed=allowed, eos_id=eos_id, pad_id=pad_id,
                     return_logprobs=return_logprobs)
    out = torch.full((B, num_tokens), pad_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros(B, num_tokens, dtype=torch.float32, device=dev) if return_logprobs else None
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    seq = ids if ids is not None else torch.zeros(2 * B if doubled else B, 0, dtype=torch.long, device=dev)
    with _eval_mode(model), autocast(dev, amp_dtype):
        for s in range(num_tokens):
            logits = model(seq if seq.shape[1] else None, emb)[:, -1]  # full head, like EasyNLP
            tok, logp = picker(logits, s, finished)
            out[:, s] = tok
            if logprobs is not None:
                logprobs[:, s] = logp
            if eos_id is not None and bool(finished.all()):
                break
            seq = torch.cat([seq, _feed(tok, token_offset, doubled)], dim=1)
    return (out, logprobs) if return_logprobs else out
