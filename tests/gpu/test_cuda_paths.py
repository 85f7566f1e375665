"""CUDA-only checks of the decode paths (issue 16); skipped where no CUDA device is present.

Run on a GPU machine: ``python -m pytest -q tests/gpu`` (bench/gpu_check.sh runs them with the benches).
"""
from __future__ import annotations

import pytest
import torch

from tuwen.models.gpt import GPT, GPTConfig
from tuwen.models.quant import quantize_weights
from tuwen.sampling import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=512 + 100, block_size=16 + 64, n_out=512, n_layer=2, n_head=2, n_embd=64))
    with torch.no_grad():
        m.head.weight.mul_(20)
    return m.cuda().to(dtype).eval()


def test_graph_equals_eager_and_cpu_greedy():
    m = _model()
    pre = torch.randint(512, 612, (4, 16), device="cuda")
    kw = dict(prefix_ids=pre, num_tokens=64, seeds=[1, 2, 3, 4], top_k=1)
    g = generate(m, **kw, use_cuda_graph=True)
    e = generate(m, **kw, use_cuda_graph=False, static_cache=True)
    d = generate(m, **kw, use_cuda_graph=False)
    assert torch.equal(g, e) and torch.equal(e, d)
    c = generate(m.cpu(), **{**kw, "prefix_ids": pre.cpu()})
    assert float((c == g.cpu()).float().mean()) > 0.9


def test_graph_seed_per_image_invariance_bf16():
    m = _model(torch.bfloat16)
    pre = torch.randint(512, 612, (6, 16), device="cuda")
    allb = generate(m, prefix_ids=pre, num_tokens=64, seeds=list(range(6)), top_k=20)
    for b in (0, 5):
        one = generate(m, prefix_ids=pre[b:b + 1], num_tokens=64, seeds=[b], top_k=20)
        assert float((one[0] == allb[b]).float().mean()) > 0.9  # bf16 kernels may differ with the batch size


def test_speculative_greedy_cuda():
    m = _model()
    pre = torch.randint(512, 612, (3, 16), device="cuda")
    ref = generate(m, prefix_ids=pre, num_tokens=63, seeds=0, top_k=1)
    got = generate(m, prefix_ids=pre, num_tokens=63, seeds=0, top_k=1, speculative=4)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("wd", ["bf16", "int8", "w8a8"])
def test_low_precision_weights_cuda(wd):
    m = _model()
    x = torch.randint(0, 612, (2, 20), device="cuda")
    with torch.no_grad():
        ref = m(x)
        quantize_weights(m, wd)
        got = m(x)
    assert float((got - ref).abs().max()) < 5e-2 * float(ref.abs().max())
    out = generate(m, prefix_ids=x[:, :16] % 100 + 512, num_tokens=8, seeds=0, top_k=5)
    assert out.shape == (2, 8)
    if wd == "w8a8":  # _int_mm on CUDA (small batches padded to 17 rows): exact integers, rows independent
        assert m.blocks[0].mlp[0]._kernel is True, "torch._int_mm was not used on CUDA"
        one = generate(m, prefix_ids=x[1:2, :16] % 100 + 512, num_tokens=32, seeds=[1], top_k=5)
        both = generate(m, prefix_ids=x[:, :16] % 100 + 512, num_tokens=32, seeds=[0, 1], top_k=5)
        assert float((one[0] == both[1]).float().mean()) > 0.9  # fp32 attention kernels may differ with the batch
