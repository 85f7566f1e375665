"""Speculative Jacobi decoding (SJD): guess K codes, verify them in one forward, keep the accepted prefix with
the exact sampling distribution (probabilistic acceptance). Opt-in through ``generate(..., speculative=K)``."""
from __future__ import annotations


import torch

from ..models.gpt import GPT, KVCache
from ..runtime import autocast

from .tokens import Allowed, _index_keys, _restrict, _row_keys, hash32, uniform_noise


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
