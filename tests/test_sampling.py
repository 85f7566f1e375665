"""sampling.py: counter-based RNG, logits processing, generate (cached / static / naive), CFG, EOS, beam
search, sequence scoring."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from tuwen.errors import TuwenError
from tuwen.models.gpt import GPT, GPTConfig
from tuwen.sampling import (
    _mul32,
    as_seeds,
    beam_search,
    generate,
    hash32,
    sample_tokens,
    score_sequences,
    uniform_noise,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from naive import generate_naive  # noqa: E402  (EasyNLP's decoding loop, a benchmark baseline)


def tiny_model(seed=0, **kw) -> GPT:
    fields = dict(vocab_size=60, block_size=48, n_out=40, n_layer=2, n_head=2, n_embd=32)
    fields.update(kw)
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**fields)).eval()
    with torch.no_grad():  # sharper than the N(0, 0.02) init, so that sampling choices are not near-uniform
        m.head.weight.mul_(40.0)
    return m


def prompts(B, P=5, seed=0, lo=40, hi=60):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (B, P), generator=g)


# ------------------------------------------------------------------------------------------------ RNG

def test_mul32_and_hash32_exact_without_overflow():
    rnd = random.Random(0)
    xs = [0, 1, 2**31, 2**32 - 1] + [rnd.randrange(2**32) for _ in range(200)]
    t = torch.tensor(xs, dtype=torch.long)
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF):
        assert _mul32(t, c).tolist() == [(x * c) % 2**32 for x in xs]

    def ref_hash(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    assert hash32(t).tolist() == [ref_hash(x) for x in xs]


def test_uniform_noise_range_and_moments():
    u = uniform_noise(torch.arange(64), 3, torch.arange(4096))
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    # seeds ≥ 2^32 and negative seeds are fine and distinct
    big = uniform_noise(torch.tensor([2**40 + 1, 1, -1, -(2**40)]), 0, torch.arange(8))
    assert len({tuple(r) for r in big.tolist()}) == 4


def test_as_seeds():
    assert as_seeds(7, 3, "cpu").tolist() == [7, 8, 9]
    assert as_seeds([5, 1], 2, "cpu").tolist() == [5, 1]
    with pytest.raises(TuwenError, match="expected 3 seeds"):
        as_seeds([1, 2], 3, "cpu")


def test_row_tokens_independent_of_batch_size_and_position():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 300, generator=g) * 2
    kw = dict(temperature=0.9, top_k=50, top_p=0.95)
    for step in (0, 17):
        alone = sample_tokens(row, torch.tensor([1234]), step, **kw)
        batch8 = torch.randn(8, 300, generator=g)
        batch8[5] = row[0]
        seeds8 = torch.randint(0, 10**6, (8,), generator=g)
        seeds8[5] = 1234
        in8 = sample_tokens(batch8, seeds8, step, **kw)[5]
        batch64 = torch.randn(64, 300, generator=g)
        batch64[40] = row[0]
        seeds64 = torch.randint(0, 10**6, (64,), generator=g)
        seeds64[40] = 1234
        in64 = sample_tokens(batch64, seeds64, step, **kw)[40]
        assert int(alone) == int(in8) == int(in64)
        # the same with the full vocabulary (no top-k / top-p)
        assert int(sample_tokens(row, torch.tensor([1234]), step)) == int(sample_tokens(batch64, seeds64, step)[40])


def test_generate_row_invariance_and_seed_sensitivity():
    m = tiny_model()
    p = prompts(64, seed=1)
    seeds = torch.arange(1000, 1064)
    kw = dict(num_tokens=12, top_k=20, temperature=1.0)
    full = generate(m, prefix_ids=p, seeds=seeds, **kw)
    alone = generate(m, prefix_ids=p[5:6], seeds=seeds[5:6], **kw)
    in8 = generate(m, prefix_ids=p[:8], seeds=seeds[:8], **kw)
    assert torch.equal(alone[0], in8[5]) and torch.equal(alone[0], full[5])
    other = generate(m, prefix_ids=p[5:6], seeds=[99], **kw)
    assert not torch.equal(other[0], alone[0])
    again = generate(m, prefix_ids=p[5:6], seeds=seeds[5:6], **kw)
    assert torch.equal(again, alone)
    # the same prompt with 8 different seeds gives 8 different samples
    many = generate(m, prefix_ids=p[5:6].expand(8, -1), seeds=7, **kw)
    assert len({tuple(r) for r in many.tolist()}) == 8


def _chi2(counts, probs, n):
    exp = probs * n
    return float(((counts - exp) ** 2 / exp).sum())


def test_sampler_distribution_matches_softmax():
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.5]])
    n = 40000
    seeds = torch.arange(n)
    tok = sample_tokens(logits.expand(n, -1), seeds, 0)
    counts = torch.bincount(tok, minlength=6).float()
    assert _chi2(counts, logits.softmax(-1)[0], n) < 25  # 5 dof: p(χ² > 25) ≈ 1e-4
    # temperature + top-k: the renormalised softmax over the k best of logits / T
    tok = sample_tokens(logits.expand(n, -1), seeds, 5, temperature=0.5, top_k=3)
    counts = torch.bincount(tok, minlength=6).float()
    probs = torch.zeros(6)
    keep = torch.tensor([3, 0, 1])
    probs[keep] = (logits[0, keep] / 0.5).softmax(-1)
    assert counts[[2, 4, 5]].sum() == 0
    assert _chi2(counts[keep], probs[keep], n) < 20
    # across steps with one seed the stream is also distributed as softmax
    steps = torch.stack([sample_tokens(logits, torch.tensor([3]), s) for s in range(n // 4)])[:, 0]
    counts = torch.bincount(steps, minlength=6).float()
    assert _chi2(counts, logits.softmax(-1)[0], n // 4) < 25


def test_greedy_variants_equal_uncached_argmax():
    m = tiny_model(seed=1)
    p = prompts(3, seed=2)
    T = 10
    seq = p.clone()
    with torch.no_grad():
        for _ in range(T):
            nxt = m(seq)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    ref = seq[:, p.shape[1]:]
    for kw in (dict(top_k=1), dict(temperature=0.0), dict(top_k=1, top_p=0.5, temperature=0.3)):
        assert torch.equal(generate(m, prefix_ids=p, num_tokens=T, seeds=0, **kw), ref)
        assert torch.equal(generate_naive(m, prefix_ids=p, num_tokens=T, seeds=0, **kw), ref)
        assert torch.equal(generate(m, prefix_ids=p, num_tokens=T, seeds=0, static_cache=True, **kw), ref)
    logits = torch.randn(16, 9)
    assert torch.equal(sample_tokens(logits, torch.arange(16), 0, top_p=0.0), logits.argmax(-1))


def test_top_k_top_p_allowed_never_emit_excluded_tokens():
    g = torch.Generator().manual_seed(3)
    B, V = 512, 30
    logits = torch.randn(B, V, generator=g) * 2
    seeds = torch.arange(B)
    tok = sample_tokens(logits, seeds, 1, top_k=4)
    top4 = logits.topk(4, -1).indices
    assert (top4 == tok[:, None]).any(-1).all()
    # nucleus: the smallest prefix of the sorted distribution whose mass reaches p
    tok = sample_tokens(logits, seeds, 2, top_p=0.6)
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    keep_n = ((probs.cumsum(-1) - probs) <= 0.6).sum(-1)
    for b in range(B):
        assert int(tok[b]) in order[b, :keep_n[b]].tolist()
    tok = sample_tokens(logits, seeds, 3, top_k=10, top_p=0.5, temperature=1.5)
    assert (logits.topk(10, -1).indices == tok[:, None]).any(-1).all()
    # allowed range and mask
    tok = sample_tokens(logits, seeds, 4, allowed=(10, 20))
    assert ((tok >= 10) & (tok < 20)).all()
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[1, 7, 29]] = True
    tok = sample_tokens(logits, seeds, 5, allowed=mask, top_k=2)
    assert set(tok.tolist()) <= {1, 7, 29}
    # greedy within the allowed range picks the best allowed id
    tok = sample_tokens(logits, seeds, 6, allowed=(10, 20), top_k=1)
    assert torch.equal(tok, logits[:, 10:20].argmax(-1) + 10)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=8), dict(top_p=0.9, temperature=0.8), dict(top_k=12, top_p=0.7)])
def test_naive_cached_static_same_tokens(kw):
    m = tiny_model(seed=4)
    p = prompts(4, seed=5)
    seeds = torch.tensor([3, 1, 4, 1])
    a = generate(m, prefix_ids=p, num_tokens=20, seeds=seeds, **kw)
    b = generate_naive(m, prefix_ids=p, num_tokens=20, seeds=seeds, **kw)
    c = generate(m, prefix_ids=p, num_tokens=20, seeds=seeds, static_cache=True, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_prefix_embeds_and_token_offset():
    m = tiny_model(seed=5, n_prefix_embd=12, n_out=20)
    feats = torch.randn(3, 6, 12)
    ids = prompts(3, P=2, seed=6)
    kw = dict(num_tokens=15, seeds=[5, 6, 7], top_k=10, token_offset=40)
    a = generate(m, prefix_embeds=feats, prefix_ids=ids, **kw)
    b = generate_naive(m, prefix_embeds=feats, prefix_ids=ids, **kw)
    c = generate(m, prefix_embeds=feats, static_cache=True, **kw)
    d = generate_naive(m, prefix_embeds=feats, **kw)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert a.max() < 20
    # token_offset: the fed-back ids are token + offset — check against a manual loop
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(5):
            nxt = m(seq, feats)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None] + 40], 1)
    g = generate(m, prefix_embeds=feats, prefix_ids=ids, num_tokens=5, seeds=0, top_k=1, token_offset=40)
    assert torch.equal(g, seq[:, 2:] - 40)


def test_cfg_scale_one_equals_conditional_and_matches_naive():
    m = tiny_model(seed=6)
    p = prompts(3, seed=7)
    unc = torch.full((1, 5), 41)
    kw = dict(num_tokens=16, seeds=[11, 12, 13], top_k=10)
    cond = generate(m, prefix_ids=p, **kw)
    cfg1 = generate(m, prefix_ids=p, guidance_scale=1.0, uncond_prefix_ids=unc, **kw)
    assert torch.equal(cond, cfg1)
    cfg3 = generate(m, prefix_ids=p, guidance_scale=3.0, uncond_prefix_ids=unc.expand(3, -1), **kw)
    cfg3n = generate_naive(m, prefix_ids=p, guidance_scale=3.0, uncond_prefix_ids=unc, **kw)
    cfg3s = generate(m, prefix_ids=p, guidance_scale=3.0, uncond_prefix_ids=unc, static_cache=True, **kw)
    assert torch.equal(cfg3, cfg3n) and torch.equal(cfg3, cfg3s)
    assert not torch.equal(cfg3, cond)
    # greedy CFG = argmax of u + s (c - u) with both halves fed the same token
    seq_c, seq_u = p.clone(), unc.expand(3, -1).clone()
    with torch.no_grad():
        for _ in range(6):
            lc, lu = m(seq_c)[:, -1], m(seq_u)[:, -1]
            nxt = (lu + 3.0 * (lc - lu)).argmax(-1)[:, None]
            seq_c, seq_u = torch.cat([seq_c, nxt], 1), torch.cat([seq_u, nxt], 1)
    g = generate(m, prefix_ids=p, guidance_scale=3.0, uncond_prefix_ids=unc, num_tokens=6, seeds=0, top_k=1)
    assert torch.equal(g, seq_c[:, 5:])
    with pytest.raises(TuwenError, match="uncond_prefix_ids"):
        generate(m, prefix_ids=p, guidance_scale=2.0, **kw)


def _expected_after_eos(free: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    out = free.clone()
    for r in range(out.shape[0]):
        hits = (out[r] == eos).nonzero()
        if len(hits):
            out[r, int(hits[0]) + 1:] = pad
    return out


@pytest.mark.parametrize("static", [False, True])
def test_eos_stops_rows_independently(static):
    m = tiny_model(seed=7)
    p = prompts(6, seed=8)
    seeds = torch.arange(6) + 100
    free = generate(m, prefix_ids=p, num_tokens=24, seeds=seeds, top_k=6)
    # the most frequent token of row 0 as EOS: it occurs in some rows but not necessarily all
    eos = int(free[0].bincount().argmax())
    pad = (eos + 1) % 40
    got = generate(m, prefix_ids=p, num_tokens=24, seeds=seeds, top_k=6, eos_id=eos, pad_id=pad,
                   static_cache=static)
    assert torch.equal(got, _expected_after_eos(free, eos, pad))
    naive = generate_naive(m, prefix_ids=p, num_tokens=24, seeds=seeds, top_k=6, eos_id=eos, pad_id=pad)
    assert torch.equal(naive, got)


def test_eos_loop_ends_when_all_rows_done():
    m = tiny_model(seed=8)
    p = prompts(2, seed=9)
    free = generate(m, prefix_ids=p, num_tokens=20, seeds=[1, 2], top_k=1)
    eos = int(free[0, 3])
    last = max(int((free[r] == eos).nonzero()[0]) if (free[r] == eos).any() else 19 for r in range(2))
    calls = []
    orig = m.forward

    def counting_forward(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    m.forward = counting_forward
    try:
        got = generate(m, prefix_ids=p, num_tokens=20, seeds=[1, 2], top_k=1, eos_id=eos, pad_id=0)
    finally:
        del m.forward
    assert torch.equal(got, _expected_after_eos(free, eos, 0))
    assert len(calls) == last + 1  # prefill + one forward per token after the first, up to the last EOS


def test_return_logprobs_and_score_sequences_agree():
    m = tiny_model(seed=9, n_prefix_embd=8)
    p = prompts(3, seed=10)
    feats = torch.randn(3, 2, 8)
    tok, lp = generate(m, prefix_ids=p, prefix_embeds=feats, num_tokens=10, seeds=[1, 2, 3], top_k=5,
                       return_logprobs=True)
    assert lp.shape == (3, 10) and (lp <= 0).all()
    s = score_sequences(m, prefix_ids=p, prefix_embeds=feats, target_ids=tok)
    assert torch.allclose(s, lp.sum(1), atol=1e-4)
    per = score_sequences(m, prefix_ids=p, prefix_embeds=feats, target_ids=tok, per_token=True,
                          max_logits_elements=1)  # one row per chunk
    assert torch.allclose(per, lp, atol=1e-5)
    mask = torch.zeros(3, 10)
    mask[:, :4] = 1
    assert torch.allclose(score_sequences(m, prefix_ids=p, prefix_embeds=feats, target_ids=tok, target_mask=mask),
                          lp[:, :4].sum(1), atol=1e-5)


def test_errors():
    m = tiny_model()
    p = prompts(1)
    with pytest.raises(TuwenError, match="block_size"):
        generate(m, prefix_ids=p, num_tokens=45, seeds=0)
    with pytest.raises(TuwenError, match="prefix"):
        generate(m, num_tokens=3, seeds=0)
    with pytest.raises(TuwenError, match="top_k"):
        generate(m, prefix_ids=p, num_tokens=3, seeds=0, top_k=0)
    with pytest.raises(TuwenError, match="token_offset"):
        generate(m, prefix_ids=p, num_tokens=3, seeds=0, token_offset=30)
    with pytest.raises(TuwenError, match="CUDA"):
        generate(m, prefix_ids=p, num_tokens=3, seeds=0, use_cuda_graph=True)


# ------------------------------------------------------------------------------------------------ beam search

class MarkovGPT(GPT):
    """A GPT whose next-token log-probs depend only on the last input token (a fixed table); ignores the cache."""

    def __init__(self, table: torch.Tensor):
        V = table.shape[0]
        super().__init__(GPTConfig(vocab_size=V, block_size=32, n_out=V, n_layer=1, n_head=1, n_embd=8))
        self.register_buffer("table", table.log())

    def forward(self, idx=None, prefix_embeds=None, *, cache=None, start_pos=0, logits_start=0, return_hidden=False):
        return self.table[idx][:, logits_start:]


def test_beam_search_beats_greedy_on_constructed_case():
    # from 0: greedy takes 1 (0.5) but 1 leads to a flat distribution; 2 (0.4) leads to a sure path
    table = torch.tensor([
        [0.01, 0.50, 0.40, 0.09],
        [0.30, 0.25, 0.25, 0.20],
        [0.01, 0.01, 0.01, 0.97],
        [0.01, 0.01, 0.01, 0.97],
    ])
    m = MarkovGPT(table).eval()
    p = torch.zeros(1, 1, dtype=torch.long)
    greedy = generate(m, prefix_ids=p, num_tokens=4, seeds=0, top_k=1)
    ids, scores = beam_search(m, prefix_ids=p, max_new_tokens=4, num_beams=3, length_penalty=0.0)
    assert greedy[0, 0] == 1 and ids[0, 0, 0] == 2
    g_score = score_sequences(m, prefix_ids=p, target_ids=greedy)
    b_score = score_sequences(m, prefix_ids=p, target_ids=ids[:, 0])
    assert float(b_score) > float(g_score) + 0.5
    assert torch.allclose(scores[:, 0], b_score, atol=1e-5)
    one, _ = beam_search(m, prefix_ids=p, max_new_tokens=4, num_beams=1)
    assert torch.equal(one[:, 0], greedy)


@pytest.mark.parametrize("use_eos", [False, True])
def test_beam_width_one_is_greedy(use_eos):
    m = tiny_model(seed=10)
    p = prompts(5, seed=11)
    free = generate(m, prefix_ids=p, num_tokens=16, seeds=0, top_k=1)
    if use_eos:
        eos = int(free[1, 4])
        ref = _expected_after_eos(free, eos, 0)
    else:
        eos, ref = None, free
    ids, scores = beam_search(m, prefix_ids=p, max_new_tokens=16, num_beams=1, eos_id=eos, pad_id=0)
    assert ids.shape == (5, 1, 16) and scores.shape == (5, 1)
    assert torch.equal(ids[:, 0], ref)


def test_beam_scores_match_teacher_forced_scores_and_eos_rows_finish_independently():
    m = tiny_model(seed=11, n_prefix_embd=6)
    p = prompts(4, seed=12)
    feats = torch.randn(4, 3, 6)
    free = generate(m, prefix_ids=p, prefix_embeds=feats, num_tokens=12, seeds=0, top_k=1)
    eos = int(free[0, 2])
    lp = 0.7
    ids, scores = beam_search(m, prefix_ids=p, prefix_embeds=feats, max_new_tokens=12, num_beams=4, eos_id=eos,
                              pad_id=0, length_penalty=lp, num_return_sequences=3)
    assert ids.shape == (4, 3, 12)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    for b in range(4):
        for r in range(3):
            seq = ids[b, r]
            hit = (seq == eos).nonzero()
            n = int(hit[0]) + 1 if len(hit) else 12
            assert (seq[n:] == 0).all()
            tf = score_sequences(m, prefix_ids=p[b:b + 1], prefix_embeds=feats[b:b + 1],
                                 target_ids=seq[None, :n])
            assert abs(float(tf) / n ** lp - float(scores[b, r])) < 1e-4  # cache reorder is consistent
    # a row's result does not depend on the other rows of the batch
    ids1, scores1 = beam_search(m, prefix_ids=p[2:3], prefix_embeds=feats[2:3], max_new_tokens=12, num_beams=4,
                                eos_id=eos, pad_id=0, length_penalty=lp, num_return_sequences=3)
    assert torch.equal(ids1[0], ids[2]) and torch.allclose(scores1[0], scores[2], atol=1e-5)


def test_no_repeat_ngram_and_min_new_tokens():
    # a chain that loves to loop 1 → 2 → 1 → 2 …
    table = torch.full((5, 5), 0.01)
    table[0, 1] = table[1, 2] = table[2, 1] = table[3, 4] = table[4, 0] = 0.96
    table = table / table.sum(1, keepdim=True)
    m = MarkovGPT(table).eval()
    p = torch.zeros(1, 1, dtype=torch.long)
    looped, _ = beam_search(m, prefix_ids=p, max_new_tokens=8, num_beams=2)
    assert looped[0, 0].tolist() == [1, 2, 1, 2, 1, 2, 1, 2]
    for n in (2, 3):
        ids, _ = beam_search(m, prefix_ids=p, max_new_tokens=8, num_beams=3, no_repeat_ngram_size=n,
                             num_return_sequences=3)
        for seq in ids[0].tolist():
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams)), seq
    # eos = 2 would end right away (after 1); min_new_tokens forbids it for the first 4 tokens
    ids, _ = beam_search(m, prefix_ids=p, max_new_tokens=8, num_beams=2, eos_id=2, pad_id=0)
    assert ids[0, 0].tolist()[:2] == [1, 2] and ids[0, 0, 2:].eq(0).all()
    ids, _ = beam_search(m, prefix_ids=p, max_new_tokens=8, num_beams=2, eos_id=2, pad_id=0, min_new_tokens=4)
    assert 2 not in ids[0, 0].tolist()[:4]


def test_generate_respects_allowed_range_and_mask():
    m = tiny_model(seed=12)
    p = prompts(4, seed=13)
    for static in (False, True):
        got = generate(m, prefix_ids=p, num_tokens=10, seeds=0, allowed=(5, 15), static_cache=static)
        assert ((got >= 5) & (got < 15)).all()
        mask = torch.zeros(40, dtype=torch.bool)
        mask[[3, 9, 33]] = True
        got = generate(m, prefix_ids=p, num_tokens=10, seeds=0, allowed=mask, top_p=0.9, static_cache=static)
        assert set(got.unique().tolist()) <= {3, 9, 33}
    assert torch.equal(generate(m, prefix_ids=p, num_tokens=10, seeds=0, allowed=(5, 15)),
                       generate_naive(m, prefix_ids=p, num_tokens=10, seeds=0, allowed=(5, 15)))
    with pytest.raises(TuwenError, match="allowed"):
        generate(m, prefix_ids=p, num_tokens=3, seeds=0, allowed=torch.ones(39, dtype=torch.bool))
