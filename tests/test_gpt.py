"""GPT (models/gpt.py): shapes, minGPT equivalence, KV-cache equivalence, EasyNLP names, param groups."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tuwen.errors import TuwenError
from tuwen.hub import load_state_dict_checked
from tuwen.models.gpt import GPT, GPTConfig, KVCache


def tiny(**kw) -> GPTConfig:
    fields = dict(vocab_size=50, block_size=32, n_out=40, n_layer=2, n_head=2, n_embd=32)
    fields.update(kw)
    return GPTConfig(**fields)


def make(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def mingpt_reference(sd: dict, cfg: GPTConfig, idx, prefix=None):
    """taming/EasyNLP minGPT forward written out: explicit softmax + tril mask, exact GELU."""
    x = F.embedding(idx, sd["tok_emb.weight"])
    if prefix is not None:
        if "prefix_proj.weight" in sd:
            prefix = F.linear(prefix, sd["prefix_proj.weight"], sd["prefix_proj.bias"])
        x = torch.cat([prefix, x], dim=1)
    B, T, C = x.shape
    nh, hd = cfg.n_head, C // cfg.n_head
    x = x + sd["pos_emb"][:, :T]
    mask = torch.tril(torch.ones(T, T)).view(1, 1, T, T)

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd.get(name + ".bias"))

    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln1.weight"], sd[p + "ln1.bias"])
        k = lin(h, p + "attn.key").view(B, T, nh, hd).transpose(1, 2)
        q = lin(h, p + "attn.query").view(B, T, nh, hd).transpose(1, 2)
        v = lin(h, p + "attn.value").view(B, T, nh, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(mask == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + lin(y, p + "attn.proj")
        h = F.layer_norm(x, (C,), sd[p + "ln2.weight"], sd[p + "ln2.bias"])
        x = x + lin(F.gelu(lin(h, p + "mlp.0")), p + "mlp.2")
    x = F.layer_norm(x, (C,), sd["ln_f.weight"], sd["ln_f.bias"])
    return F.linear(x, sd["head.weight"])


# ------------------------------------------------------------------------------------------------ config

def test_config_presets_roundtrip_and_validation(tmp_path):
    c = GPTConfig.preset("base", vocab_size=37512, block_size=288, n_out=16384)
    assert (c.n_layer, c.n_head, c.n_embd) == (12, 12, 768)
    assert (GPTConfig.preset("large", vocab_size=10, block_size=8, n_out=10).n_layer,) == (24,)
    assert GPTConfig.preset("tiny", vocab_size=10, block_size=8, n_out=10).n_embd == 64
    d = c.to_dict()
    assert d["model_type"] == "gpt"
    assert GPTConfig.from_dict(d) == c
    c.save(tmp_path / "config.json")
    assert GPTConfig.load(tmp_path / "config.json") == c
    with pytest.raises(TuwenError, match="divisible"):
        GPTConfig(vocab_size=10, block_size=8, n_out=10, n_head=5, n_embd=32)
    with pytest.raises(TuwenError, match="unknown GPT preset"):
        GPTConfig.preset("gigantic", vocab_size=10, block_size=8, n_out=10)
    with pytest.raises(TuwenError, match="unknown key"):
        GPTConfig.from_dict({**d, "n_unmasked": 0})


# ------------------------------------------------------------------------------------------------ shapes

def test_shapes_logits_start_hidden():
    m = make(n_prefix_embd=12)
    idx = torch.randint(0, 50, (3, 7))
    pre = torch.randn(3, 4, 12)
    assert m(idx).shape == (3, 7, 40)
    assert m(idx, pre).shape == (3, 11, 40)
    assert m(None, pre).shape == (3, 4, 40)
    assert m(idx, pre, logits_start=-1).shape == (3, 1, 40)
    assert m(idx, pre, logits_start=3).shape == (3, 8, 40)
    logits, hidden = m(idx, pre, logits_start=4, return_hidden=True)
    assert logits.shape == (3, 7, 40) and hidden.shape == (3, 11, 32)
    assert torch.allclose(logits, m.head(hidden[:, 4:]), atol=1e-6)
    assert m(idx, logits_start=None) is None
    with pytest.raises(TuwenError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TuwenError, match="n_prefix_embd"):
        m(idx, torch.randn(3, 4, 9))
    with pytest.raises(TuwenError):
        m()


def test_prefix_without_projection_takes_n_embd_features():
    m = make()  # n_prefix_embd = 0: EasyNLP mingpt_i2t style, prefix already n_embd wide
    assert not hasattr(m, "prefix_proj")
    assert m(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 5, 32)).shape == (2, 8, 40)
    with pytest.raises(TuwenError, match="no prefix_proj"):
        m(None, torch.randn(2, 5, 12))


# ------------------------------------------------------------------------------------------------ equivalence

@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_mingpt_reference(dtype, atol):
    m = make(seed=1, n_prefix_embd=12).to(dtype)
    sd = {k: v for k, v in m.state_dict().items()}
    idx = torch.randint(0, 50, (2, 9))
    pre = torch.randn(2, 3, 12, dtype=dtype)
    with torch.no_grad():
        assert torch.allclose(m(idx), mingpt_reference(sd, m.config, idx), atol=atol, rtol=0)
        assert torch.allclose(m(idx, pre), mingpt_reference(sd, m.config, idx, pre), atol=atol, rtol=0)


def _cached_logits(m, idx, pre, chunks, static=False):
    """Feed [pre][idx] through the cache in chunks (first chunk includes the prefix)."""
    B = idx.shape[0]
    P = pre.shape[1] if pre is not None else 0
    cache = KVCache.for_model(m, B, max_len=P + idx.shape[1] + 2)
    outs, pos, i = [], 0, 0
    for n in chunks:
        part = idx[:, i:i + n]
        if i == 0 and pre is not None:
            x = m(part, pre, cache=cache, start_pos=0)
            pos += P + n
        else:
            sp = torch.tensor([pos]) if static else pos
            x = m(part, cache=cache, start_pos=sp)
            pos += n
        outs.append(x)
        i += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_cached_equals_full_forward(static, with_prefix):
    m = make(seed=2, n_prefix_embd=12)
    idx = torch.randint(0, 50, (3, 10))
    pre = torch.randn(3, 4, 12) if with_prefix else None
    with torch.inference_mode():
        full = m(idx, pre)
        step_by_step = _cached_logits(m, idx, pre, [1] * 10, static)
        chunked = _cached_logits(m, idx, pre, [3, 1, 4, 2], static)  # multi-token chunks after cached positions
        with m.fused_qkv():
            fused = _cached_logits(m, idx, pre, [2] + [1] * 8, static)
    for got in (step_by_step, chunked, fused):
        assert got.shape == full.shape
        assert torch.allclose(got, full, atol=2e-5, rtol=0), (got - full).abs().max()


def test_fused_qkv_is_inference_only_and_scoped():
    m = make(seed=3)
    idx = torch.randint(0, 50, (2, 6))
    ref = m(idx).detach()
    with m.fused_qkv():
        with m.fused_qkv():  # nesting keeps the copy
            pass
        assert m.blocks[0].attn._fused_qkv is not None
        with torch.no_grad():
            assert torch.allclose(m(idx), ref, atol=1e-6)
        out = m(idx)  # grad enabled: uses the parameters, gradients flow
        out.sum().backward()
        assert m.blocks[0].attn.query.weight.grad is not None
    assert m.blocks[0].attn._fused_qkv is None


def test_kvcache_reorder_and_repeat():
    m = make()
    c = KVCache.for_model(m, 2, max_len=5)
    assert c.k.shape == (2, 2, 2, 5, 16) and c.batch_size == 2 and c.max_len == 5
    c.k[:, 0] = 1.0
    c.k[:, 1] = 2.0
    r = c.repeat_interleave(3)
    assert r.batch_size == 6 and r.k[:, :3].eq(1).all() and r.k[:, 3:].eq(2).all()
    c.reorder_(torch.tensor([1, 1]), length=3)
    assert c.k[:, :, :, :3].eq(2).all() and c.k[:, 0, :, 3:].eq(1).all()
    with pytest.raises(TuwenError):
        KVCache.for_model(m, 1, max_len=33)


# ------------------------------------------------------------------------------------------------ weights

EASYNLP_KEYS_2_LAYERS = ["tok_emb.weight", "pos_emb"] + [
    f"blocks.{i}.{name}"
    for i in range(2)
    for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
                 "attn.key.weight", "attn.key.bias", "attn.query.weight", "attn.query.bias",
                 "attn.value.weight", "attn.value.bias", "attn.proj.weight", "attn.proj.bias",
                 "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
] + ["ln_f.weight", "ln_f.bias", "head.weight"]


def test_state_dict_names_match_easynlp():
    m = make()
    sd = m.state_dict()
    assert sorted(sd) == sorted(EASYNLP_KEYS_2_LAYERS)
    assert sd["pos_emb"].shape == (1, 32, 32)
    assert sd["tok_emb.weight"].shape == (50, 32)
    assert sd["head.weight"].shape == (40, 32)
    assert sd["blocks.0.mlp.0.weight"].shape == (128, 32)
    assert isinstance(m.blocks[0].mlp[1], torch.nn.GELU) and m.blocks[0].mlp[1].approximate == "none"
    assert sorted(make(n_prefix_embd=8).state_dict()) == sorted(EASYNLP_KEYS_2_LAYERS + ["prefix_proj.weight",
                                                                                        "prefix_proj.bias"])


def test_loads_easynlp_style_state_dict():
    src = make(seed=5)
    # what an EasyNLP pytorch_model.bin holds: transformer.* (+ attn.mask buffers) and first_stage_model.*
    easy = {f"transformer.{k}": v.clone() for k, v in src.state_dict().items()}
    for i in range(2):
        easy[f"transformer.blocks.{i}.attn.mask"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    easy["first_stage_model.quantize.embedding.weight"] = torch.zeros(4, 4)
    gpt_sd = {k[len("transformer."):]: v for k, v in easy.items() if k.startswith("transformer.")}
    dst = make(seed=6)
    load_state_dict_checked(dst, gpt_sd, "pytorch_model.bin", ignore=GPT.LEGACY_BUFFER_SUFFIXES)
    idx = torch.randint(0, 50, (1, 5))
    assert torch.equal(dst(idx), src(idx))
    assert "blocks.0.attn.mask" not in GPT.drop_legacy_buffers(gpt_sd)
    dst2 = make(seed=7)
    dst2.load_state_dict(GPT.drop_legacy_buffers(gpt_sd), strict=True)


def test_save_and_from_pretrained(tmp_path):
    m = make(seed=8, n_prefix_embd=6)
    m.save_pretrained(tmp_path / "gpt")
    m2 = GPT.from_pretrained(tmp_path / "gpt")
    assert m2.config == m.config and not m2.training
    idx = torch.randint(0, 50, (2, 4))
    assert torch.equal(m2(idx), m(idx))


def test_base_param_count():
    # EasyNLP ARTIST base: 12 layers, 768, vocab 37512, block 288, image-only head 16384 → 126.7 M
    cfg = GPTConfig.preset("base", vocab_size=37512, block_size=288, n_out=16384)
    with torch.device("meta"):
        m = GPT(cfg)
    C = 768
    per_block = 2 * 2 * C + 4 * (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    expected = 37512 * C + 288 * C + 12 * per_block + 2 * C + 16384 * C
    assert m.num_params() == expected == 126_669_312
    with torch.device("meta"):
        large = GPT(GPTConfig.preset("large", vocab_size=37512, block_size=288, n_out=16384))
    assert round(large.num_params() / 1e6, 1) == 357.8  # EasyNLP reference figure for large


def test_param_groups_decay_only_linear_weights():
    m = make(n_prefix_embd=4)
    decay, no_decay = m.configure_param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert d.isdisjoint(nd) and d | nd == set(names.values())
    assert d == {n for n in names.values() if n.endswith("weight") and ("attn." in n or "mlp." in n
                                                                       or n in ("head.weight", "prefix_proj.weight"))}
    assert {"pos_emb", "tok_emb.weight", "ln_f.weight", "blocks.0.ln1.weight", "blocks.0.attn.key.bias"} <= nd


def test_init_and_training_step_with_dropout():
    m = GPT(tiny(embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)).train()
    assert torch.all(m.blocks[0].ln1.weight == 1) and torch.all(m.blocks[0].attn.key.bias == 0)
    assert abs(float(m.blocks[0].mlp[0].weight.detach().std()) - 0.02) < 0.005
    idx = torch.randint(0, 40, (4, 12))
    logits = m(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 40), idx[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
