"""KV-cached beam search and teacher-forced sequence scoring."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..errors import TuwenError
from ..models.gpt import GPT, KVCache
from ..runtime import autocast

from .plumbing import _check_offsets, _eval_mode, _prefix_batch
from .tokens import Allowed


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
