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

from .beam import beam_search, score_sequences
from .decode import generate
from .plumbing import (TokenPicker, _cfg_inputs, _check_offsets, _eval_mode, _feed, _Picker,  # noqa: F401
                       _prefix_batch)
from .speculative import _candidates, _generate_speculative, _processed_logprobs  # noqa: F401
from .tokens import (Allowed, SamplingParams, Seeds, _check_sampling_args, _mul32, _restrict,  # noqa: F401
                     as_seeds, gumbel_noise, hash32, sample_tokens, uniform_noise)

__all__ = ["sample_tokens", "generate", "beam_search", "score_sequences", "as_seeds", "uniform_noise",
           "gumbel_noise", "hash32", "SamplingParams"]
