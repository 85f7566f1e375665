"""Issue 16: low-precision weights (models/quant.py) and speculative Jacobi decoding (sampling.generate)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from tuwen.errors import TuwenError
from tuwen.models.gpt import GPT, GPTConfig
from tuwen.models.quant import (Bf16Linear, Int8DynLinear, Int8Linear, quantize_weights, resolve_weights_dtype,
                               weights_dtype_of)
from tuwen.sampling import _processed_logprobs, beam_search, generate, score_sequences


def tiny_gpt(seed=0, n_out=64, text=50, P=8, N=24, sharpen=1.0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=n_out + text, block_size=P + N, n_out=n_out, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        m.head.weight.mul_(sharpen)
    return m


# ------------------------------------------------------------------------------------------ low precision

@pytest.mark.parametrize("wd,tol", [("bf16", 2e-2), ("int8", 3e-2), ("w8a8", 5e-2)])
def test_quantized_logits_close_to_fp32(wd, tol):
    m = tiny_gpt(sharpen=20.0)
    x = torch.randint(0, 114, (3, 12))
    with torch.no_grad():
        ref = m(x)
        quantize_weights(m, wd)
        got = m(x)
        with m.fused_qkv():  # low-precision layers fuse q/k/v themselves
            fused = m(x)
    assert weights_dtype_of(m) == wd
    assert all(not isinstance(mod, torch.nn.Linear) for mod in m.modules())
    assert float((got - ref).abs().max()) < tol * float(ref.abs().max())
    torch.testing.assert_close(fused, got, rtol=1e-3, atol=1e-3)
    keys = set(m.state_dict())
    assert "blocks.0.attn.query.weight" in keys and "head.weight" in keys


def test_int8_layer_matches_its_dequantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (40,)
    x = torch.randn(5, 7, 48)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized(), lin.bias), rtol=2e-2, atol=2e-2)
    assert float((q.dequantized() - lin.weight.detach()).abs().max()) <= float(q.scales.max()) / 2 + 1e-6
    b = Bf16Linear.from_linear(lin)
    assert b(x).dtype == torch.float32


def _w8a8_kernels() -> list[str]:
    from tuwen.models.quant import _fbgemm_ok
    return (["fbgemm"] if _fbgemm_ok() else []) + ["int_mm", "float"]


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm", "float"])
def test_w8a8_layer_is_the_integer_product_row_by_row(kernel):
    """Int8DynLinear with each of its kernels (fbgemm's integer linear where this CPU has it, ``torch._int_mm``,
    the float product of the same integers): per-row int8 activations × int8 weights (= the float reference of
    the same integers), each row's output independent of the other rows (bitwise), zero rows give the bias, and
    cat (fused q/k/v) computes the layers side by side."""
    if kernel not in _w8a8_kernels():
        pytest.skip(f"no {kernel} kernel in this torch build / CPU")
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q = Int8DynLinear.from_linear(lin)
    q._kernel = kernel
    assert q.weight.dtype == torch.int8 and q.weight.shape == (40, 48) and q.scales.shape == (40,)
    x = torch.randn(5, 7, 48) * torch.logspace(-3, 2, 5)[:, None, None]  # rows of very different sizes
    x[1, 2] = 0
    with torch.no_grad():
        y = q(x)
        sx = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        xq = torch.round(x / sx)
        ref = (xq.double() @ q.weight.double().t()) * sx.double() * q.scales.double() + lin.bias.double()
        # the kernels may round an activation that sits on a half level the other way: one level of one input
        one_level = sx.double() * q.scales.double().max() * 127
        assert bool(((y.double() - ref).abs() <= one_level + 1e-5).all())
        assert float((y.double() - ref).abs().mean()) < 1e-4 * float(ref.abs().mean())
        assert torch.equal(y[1, 2], lin.bias.float())
        assert float((y - lin(x)).abs().max()) < 3e-2 * float(lin(x).abs().max())  # close to fp32 overall
        x2 = x.reshape(-1, 48)
        for idx in ([0], [3, 17, 30], list(range(34, -1, -1))):  # any subset / order of rows: the same values
            assert torch.equal(q(x2[idx]), y.reshape(-1, 40)[idx])
        assert q(x.bfloat16()).dtype == torch.bfloat16
        other = Int8DynLinear.from_linear(torch.nn.Linear(48, 8))
        both = Int8DynLinear.cat([q, other])
        other._kernel = both._kernel = kernel
        assert isinstance(both, Int8DynLinear) and both.out_features == 48
        assert torch.equal(both(x), torch.cat([y, other(x)], dim=-1))
    assert "int8 weights and activations" in repr(q)


def test_w8a8_kernels_agree_and_the_cpu_picks_the_fastest():
    """The kernels give the same outputs up to an activation rounded the other way; on CPU the layer picks fbgemm
    where it sums exactly, else torch._int_mm; a CPU whose fbgemm saturates (AVX2 without VNNI) is not used."""
    import tuwen.models.quant as Q
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(9, 64)
    outs = {}
    for k in _w8a8_kernels():
        q = Int8DynLinear.from_linear(lin)
        q._kernel = k
        outs[k] = q(x)
    for k, y in outs.items():
        torch.testing.assert_close(y, outs["float"], rtol=0, atol=2e-2 * float(outs["float"].abs().max()))
    auto = Int8DynLinear.from_linear(lin)
    auto(x)
    assert auto._kernel == ("fbgemm" if Q._fbgemm_ok() else "int_mm")
    saved = list(Q._FBGEMM_OK)
    try:
        Q._FBGEMM_OK[:] = [False]
        again = Int8DynLinear.from_linear(lin)
        again(x)
        assert again._kernel == "int_mm"
    finally:
        Q._FBGEMM_OK[:] = saved


def test_fbgemm_probe_refuses_a_missing_or_saturating_kernel(monkeypatch):
    import tuwen.models.quant as Q
    real = Q._fbgemm_op()
    if real is None:
        pytest.skip("no fbgemm in this torch build")

    def saturating(x, scale, zp, packed):  # what a kernel summing pairs of u8 × s8 products in int16 would give
        y = real(x, scale, zp, packed)
        return y.clamp(max=32767.0 / 2)

    for op, ok in ((lambda: None, False), (lambda: saturating, False), (lambda: real, True)):
        monkeypatch.setattr(Q, "_FBGEMM_OK", [])
        monkeypatch.setattr(Q, "_fbgemm_op", op)
        assert Q._fbgemm_ok() is ok


@pytest.mark.parametrize("wd", ["int8", "w8a8"])
def test_fused_low_precision_qkv_is_kept_until_a_weight_changes(wd):
    """GPT.fused_qkv() makes the fused q/k/v layer of low-precision weights once (a w8a8 layer packs its weights
    for the kernel) and keeps it; a weight changed in place or replaced makes a new one with the new values."""
    m = quantize_weights(tiny_gpt(sharpen=20.0), wd)
    x = torch.randint(0, 114, (2, 10))
    with torch.no_grad():
        with m.fused_qkv():
            first = m.blocks[0].attn._fused_qkv
            y0 = m(x)
        with m.fused_qkv():
            assert m.blocks[0].attn._fused_qkv is first
        assert m.blocks[0].attn._fused_qkv is None
        assert not any("fused" in k for k in m.state_dict())
        m.blocks[0].attn.query.weight.mul_(-1)  # in place: the version changes
        with m.fused_qkv():
            assert m.blocks[0].attn._fused_qkv is not first
            y1 = m(x)
        assert not torch.equal(y0, y1)
        torch.testing.assert_close(y1, m(x), rtol=1e-4, atol=1e-4)  # the fused layer has the new weights


def test_quantize_errors_and_resolve():
    m = tiny_gpt()
    assert quantize_weights(m, "fp32") is m and weights_dtype_of(m) == "fp32"
    with pytest.raises(TuwenError, match="expected one of"):
        quantize_weights(m, "int4")
    quantize_weights(m, "int8")
    with pytest.raises(TuwenError, match="already low-precision"):
        quantize_weights(m, "bf16")
    from tuwen.models.quant import _fbgemm_ok
    assert resolve_weights_dtype("auto", "cpu") == ("w8a8" if _fbgemm_ok() else "int8")
    assert resolve_weights_dtype(None, "cuda") is None
    assert resolve_weights_dtype("BF16", "cpu") == "bf16"
    assert resolve_weights_dtype("w8a8", "cpu") == "w8a8"
    assert weights_dtype_of(quantize_weights(tiny_gpt(), "w8a8")) == "w8a8"
    with pytest.raises(TuwenError, match="--weights_dtype"):
        resolve_weights_dtype("half", "cpu", "--weights_dtype")


@pytest.mark.parametrize("wd", ["int8", "w8a8"])
def test_int8_generate_seed_per_image_invariance(wd):
    m = quantize_weights(tiny_gpt(sharpen=20.0), wd)
    pre = torch.randint(64, 114, (4, 8))
    allb = generate(m, prefix_ids=pre, num_tokens=24, seeds=[5, 6, 7, 8], top_k=10)
    for b in range(4):
        one = generate(m, prefix_ids=pre[b:b + 1], num_tokens=24, seeds=[5 + b], top_k=10)
        assert torch.equal(one[0], allb[b])


@pytest.mark.parametrize("wd", ["int8", "w8a8"])
def test_quantized_beam_search(wd):
    """Beam search (KV cache reordered between beams) on quantised weights: width 1 is greedy, scores equal the
    teacher-forced scores, a row's beams do not depend on the batch."""
    m = quantize_weights(tiny_gpt(sharpen=20.0), wd)
    pre = torch.randint(64, 114, (3, 8))
    greedy = generate(m, prefix_ids=pre, num_tokens=10, seeds=0, top_k=1)
    one, _ = beam_search(m, prefix_ids=pre, max_new_tokens=10, num_beams=1)
    assert torch.equal(one[:, 0], greedy)
    ids, scores = beam_search(m, prefix_ids=pre, max_new_tokens=10, num_beams=3, length_penalty=0.0)
    tf = torch.stack([score_sequences(m, prefix_ids=pre[b:b + 1], target_ids=ids[b, :1])[0] for b in range(3)])
    torch.testing.assert_close(tf, scores[:, 0], atol=2e-3, rtol=1e-4)
    ids1, _ = beam_search(m, prefix_ids=pre[1:2], max_new_tokens=10, num_beams=3, length_penalty=0.0)
    assert torch.equal(ids1[0], ids[1])


@pytest.mark.parametrize("wd", ["int8", "w8a8"])
def test_text2image_from_pretrained_weights_dtype(tmp_path, wd):
    from tuwen.models.text2image import TextToImage
    from tuwen.pipelines import demo_model_path

    m = TextToImage.from_pretrained(demo_model_path(), weights_dtype=wd)
    assert weights_dtype_of(m.gpt) == wd
    ref = TextToImage.from_pretrained(demo_model_path())
    assert weights_dtype_of(ref.gpt) == "fp32"
    a = m.generate(["左上角有一个红色的圆形"], seed=0, top_k=1, return_codes=True)
    b = ref.generate(["左上角有一个红色的圆形"], seed=0, top_k=1, return_codes=True)
    # greedy paths split at the first near-tie and differ after it; the image-level guard is in README "Speed"
    assert float((a == b).float().mean()) >= 0.5 and torch.equal(a[..., :4], b[..., :4])
    with pytest.raises(TuwenError, match="weights_dtype"):
        TextToImage.from_pretrained(demo_model_path(), weights_dtype="fp8")


# ------------------------------------------------------------------------------------------ speculative

@pytest.mark.parametrize("k", [1, 3, 7])
def test_speculative_greedy_equals_one_by_one(k):
    m = tiny_gpt(sharpen=40.0)
    pre = torch.randint(64, 114, (5, 8))
    ref = generate(m, prefix_ids=pre, num_tokens=24, seeds=0, top_k=1)
    st: dict = {}
    got = generate(m, prefix_ids=pre, num_tokens=24, seeds=0, top_k=1, speculative=k, stats=st)
    assert torch.equal(got, ref)
    assert 1.0 <= st["tokens_per_step"] <= k + 1
    uncond = torch.full((1, 8), 64)
    ref = generate(m, prefix_ids=pre, num_tokens=24, seeds=0, top_k=1, guidance_scale=2.0, uncond_prefix_ids=uncond,
                   allowed=(0, 40))
    got = generate(m, prefix_ids=pre, num_tokens=24, seeds=0, top_k=1, guidance_scale=2.0, uncond_prefix_ids=uncond,
                   allowed=(0, 40), speculative=k)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("opts", [dict(top_k=20), dict(top_p=0.8, temperature=0.7),
                                  dict(top_k=10, guidance_scale=1.5), dict(top_k=10, weights="int8"),
                                  dict(top_k=10, weights="w8a8")])
def test_speculative_seed_per_image_invariance(opts):
    opts = dict(opts)
    m = tiny_gpt(sharpen=10.0)
    if (wd := opts.pop("weights", None)):
        quantize_weights(m, wd)
    if "guidance_scale" in opts:
        opts["uncond_prefix_ids"] = torch.full((1, 8), 64)
    pre = torch.randint(64, 114, (5, 8))
    allb = generate(m, prefix_ids=pre, num_tokens=24, seeds=[10, 11, 12, 13, 14], speculative=4, **opts)
    for b in (0, 3):
        one = generate(m, prefix_ids=pre[b:b + 1], num_tokens=24, seeds=[10 + b], speculative=4, **opts)
        assert torch.equal(one[0], allb[b])
    rev = generate(m, prefix_ids=pre.flip(0), num_tokens=24, seeds=[14, 13, 12, 11, 10], speculative=4, **opts)
    assert torch.equal(rev.flip(0), allb)


def test_speculative_errors():
    m = tiny_gpt()
    pre = torch.randint(64, 114, (1, 8))
    with pytest.raises(TuwenError, match="speculative"):
        generate(m, prefix_ids=pre, num_tokens=4, seeds=0, speculative=0)
    with pytest.raises(TuwenError, match="return_logprobs"):
        generate(m, prefix_ids=pre, num_tokens=4, seeds=0, speculative=2, return_logprobs=True)
    with pytest.warns(UserWarning, match="spare position"):  # 8 + 25 - 1 = block_size: no scratch slot
        out = generate(m, prefix_ids=pre, num_tokens=25, seeds=0, speculative=2)
    assert out.shape == (1, 25)


def _exact_sequence_probs(m, pre, n_tok, **kw):
    """Probability of every sequence of n_tok tokens under the processed distribution (enumeration)."""
    V = m.config.n_out
    probs = {}
    for seq in itertools.product(range(V), repeat=n_tok):
        x = torch.cat([pre, torch.tensor([seq[:-1]], dtype=torch.long)], dim=1) if n_tok > 1 else pre
        with torch.no_grad():
            logits = m(x, logits_start=pre.shape[1] - 1)[0]  # [n_tok, V]
        lp = _processed_logprobs(logits, allowed=None, **kw)
        probs[seq] = math.exp(sum(float(lp[t, s]) for t, s in enumerate(seq)))
    return probs


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=None, top_p=None),
                                dict(temperature=0.8, top_k=3, top_p=None),
                                dict(temperature=1.0, top_k=None, top_p=0.8)])
def test_speculative_same_distribution(kw):
    """Chi-square goodness of fit of 6000 speculative samples of 3 tokens (4 codes: 64 sequences) against the
    exact distribution; the one-by-one sampler passes the same test."""
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=4 + 6, block_size=5 + 3, n_out=4, n_layer=1, n_head=1, n_embd=16)).eval()
    with torch.no_grad():
        m.head.weight.mul_(60.0)  # far from uniform, so that guesses are often rejected
    pre = torch.tensor([[4, 5, 6, 7, 8]])
    exact = _exact_sequence_probs(m, pre, 3, **kw)
    assert abs(sum(exact.values()) - 1) < 1e-4
    R = 6000
    rows = pre.expand(R, -1)
    for spec in (2, None):
        out = generate(m, prefix_ids=rows, num_tokens=3, seeds=torch.arange(R) * 7919 + 3, speculative=spec, **kw)
        counts = {}
        for row in out.tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        assert all(exact[s] > 0 for s in counts), "a sequence with probability 0 was drawn"
        cells = [(counts.get(s, 0), R * p) for s, p in exact.items() if R * p >= 5]
        chi2 = sum((o - e) ** 2 / e for o, e in cells)
        dof = len(cells) - 1
        # p < 0.001 threshold (Wilson–Hilferty approximation of the chi-square quantile)
        z = 3.09
        crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
        assert chi2 < crit, (spec, chi2, crit, dof)


# ------------------------------------------------------------------------------------------ per-step overhead

@pytest.mark.parametrize("kw", [dict(top_k=7), dict(top_p=0.7, temperature=0.8), dict(), dict(top_k=5, allowed=(3, 40)),
                                dict(top_k=1), dict(allowed=torch.arange(64) % 3 == 0, top_k=9)])
def test_keyed_picker_equals_sample_tokens(kw):
    """The decode loop's picker (seed keys and index-key table computed once) draws exactly sample_tokens' tokens,
    for int steps and per-row step tensors (tuwen.serve)."""
    from tuwen.sampling import TokenPicker, sample_tokens

    torch.manual_seed(3)
    B = 6
    seeds = torch.tensor([0, 1, 2**40 + 5, -3, 77, 123456789])
    picker = TokenPicker(B, seeds, guidance_scale=None, temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k"),
                         top_p=kw.get("top_p"), allowed=kw.get("allowed"), eos_id=None, pad_id=0,
                         return_logprobs=False)
    fin = torch.zeros(B, dtype=torch.bool)
    for step in (0, 5, torch.tensor([9]), torch.tensor([1, 2, 3, 4, 5, 6])):
        logits = torch.randn(B, 64) * 3
        got, _ = picker(logits, step, fin)
        if isinstance(step, torch.Tensor) and step.numel() == B:
            ref = torch.cat([sample_tokens(logits[b:b + 1], seeds[b:b + 1], step[b:b + 1], **kw) for b in range(B)])
        else:
            ref = sample_tokens(logits, seeds, step, **kw)
        assert torch.equal(got, ref), (step, got, ref)


# ------------------------------------------------------------------------------------------ VQGAN decode

def test_vqgan_decode_channels_last_matches_nchw():
    """CPU decode runs channels-last: same images as the NCHW decoder up to float rounding, returned as NCHW."""
    from tuwen.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny")).eval()
    codes = torch.randint(0, 512, (3, 4, 4))
    out = vq.decode(codes)
    with torch.no_grad():
        ref = vq.decode_latent(vq.quantize.embed(codes)).clamp(-1, 1)
    assert out.is_contiguous() and out.shape == (3, 3, 32, 32)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
    low = vq.decode(codes, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and float((low - ref).abs().mean()) < 0.05
