"""CogView's ``--offload``: sequential block offload (``tuwen.models.offload``) on the tiny CogView fixtures of
``test_cogview.py``. On CPU the device copies are no-ops but the hooks run; the CUDA test checks what stays on the
GPU (skipped without one)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentencepiece")

from test_cogview import HEADS, cogview_dirs, spm_file  # noqa: E402,F401  (module-scoped fixtures)
from tuwen.models import offload as OF  # noqa: E402
from tuwen.models.cogview import CogView  # noqa: E402


def _folder(cogview_dirs):  # noqa: F811
    return cogview_dirs["root"] / "cogview" / "cogview-base"


def test_offloaded_model_gives_the_same_logits_and_samples(cogview_dirs, monkeypatch):  # noqa: F811
    plain = CogView.from_pretrained(_folder(cogview_dirs), n_head=HEADS, dtype=torch.float32)
    off = CogView.from_pretrained(_folder(cogview_dirs), n_head=HEADS, dtype=torch.float32, device="cpu",
                                  offload=True)
    assert off.offloaded and not plain.offloaded
    moves = []  # every block copy to the device and back goes through _set_data
    real = OF._set_data
    monkeypatch.setattr(OF, "_set_data", lambda *a: (moves.append(a[2]), real(*a))[1])
    seq = plain.vocab.parse_query("[ROI1] 红色的猫 [BASE] [BOI1]") + list(range(10))
    assert torch.equal(off.logits(seq), plain.logits(seq))
    n_block_tensors = sum(1 for _ in OF._tensors(off.gpt.blocks[0]))
    assert len(moves) == 2 * n_block_tensors * len(off.gpt.blocks)  # each block: to the device, then back
    q = plain.vocab.parse_query("[ROI1] 蓝天 [BASE] [BOI1] [MASK]*12")
    with off.gpt.fused_qkv():  # offloaded blocks are not fused (their fused copy would stay on the CPU)
        assert all(b.attn._fused_qkv is None for b in off.gpt.blocks)
    assert torch.equal(off.fill(q, 3, seed=5, top_k=10, max_inference_batch_size=2),
                       plain.fill(q, 3, seed=5, top_k=10, max_inference_batch_size=2))


def test_offload_flag_on_the_command_line(cogview_dirs, tmp_path, monkeypatch, capsys):  # noqa: F811
    from tuwen.cli import main

    made = []
    real = CogView.from_pretrained.__func__
    monkeypatch.setattr(CogView, "from_pretrained",
                        classmethod(lambda cls, *a, **k: made.append(k) or real(cls, *a, **k)))
    folder = str(_folder(cogview_dirs))
    assert main(["generate", "--model", folder, "--num-attention-heads", str(HEADS), "--offload", "--device", "cpu",
                 "--generation-task", "image2text", "--input-source", str(_caption_input(tmp_path)),
                 "--out", str(tmp_path / "o")]) == 0
    assert made[-1]["offload"] is True and str(made[-1]["device"]) == "cpu"
    capsys.readouterr()
    assert main(["generate", "a red circle", "--offload", "--out", str(tmp_path / "t")]) == 2
    assert "--offload is for CogView models" in capsys.readouterr().err


def _caption_input(tmp_path):
    from test_cogview import picture
    picture(3).save(tmp_path / "p.png")
    f = tmp_path / "in.txt"
    f.write_text(f"{tmp_path / 'p.png'}\n", encoding="utf-8")
    return f


def test_offload_keeps_tied_weights_and_non_block_tensors_on_the_device():
    from tuwen.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    g = GPT(GPTConfig(vocab_size=40, block_size=16, n_out=40, n_layer=2, n_head=2, n_embd=16, tie_head=True))
    ref = g(torch.arange(8)[None]).detach()
    OF.offload(g, g.blocks, "cpu")
    assert g.head.weight is g.tok_emb.weight
    assert OF.is_offloaded(g) and OF.is_offloaded(g.blocks[1]) and not OF.is_offloaded(g.tok_emb)
    with torch.inference_mode():
        assert torch.equal(g(torch.arange(8)[None]), ref)
    OF.offload(g, g.blocks, "cpu")  # again: hooks are replaced, not stacked
    assert len(g.blocks[0]._forward_pre_hooks) == 1 and len(g.blocks[0]._forward_hooks) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_on_cuda_keeps_only_non_block_weights_on_the_gpu(cogview_dirs):  # noqa: F811
    plain = CogView.from_pretrained(_folder(cogview_dirs), n_head=HEADS, dtype=torch.bfloat16)
    off = CogView.from_pretrained(_folder(cogview_dirs), n_head=HEADS, device="cuda", offload=True)
    assert off.gpt.tok_emb.weight.dtype == torch.bfloat16  # bf16 on CUDA by default
    blocks = sum(p.numel() * p.element_size() for p in off.gpt.blocks.parameters())
    total = sum(p.numel() * p.element_size() for p in off.gpt.parameters())
    assert OF.resident_bytes(off.gpt, "cuda") == total - blocks
    assert all(p.device.type == "cpu" and p.is_pinned() for p in off.gpt.blocks.parameters())
    seq = plain.vocab.parse_query("[ROI1] 红色的猫 [BASE] [BOI1]") + list(range(10))
    # the same bf16 weights and kernels: equal up to bf16 rounding at most
    torch.testing.assert_close(off.logits(seq).cpu(), plain.to("cuda").logits(seq).cpu(), rtol=1.6e-2, atol=1e-2)
    q = plain.vocab.parse_query("[ROI1] 蓝天 [BASE] [BOI1] [MASK]*12")
    out = off.fill(q, 2, seed=1)  # eager decoding (no CUDA graph), KV cache on the GPU
    assert out.shape == (2, len(q)) and (out[:, -12:] < off.vocab.n_image).all()
    assert OF.resident_bytes(off.gpt, "cuda") == total - blocks  # the blocks went back to the CPU


@pytest.mark.slow  # ~30 s: two 2-process runs
def test_cogview_finetune_with_fsdp_cpu_offload_matches_ddp(cogview_dirs, tmp_path):  # noqa: F811
    """`--fsdp --fsdp_cpu_offload` on the CogView finetuning task (Megatron folder → tuwen folder) under 2 gloo
    processes: the same losses as DDP, and the saved folder holds the same weights."""
    import base64
    import io
    import json
    import os
    import subprocess
    import sys

    from test_cogview import picture
    from test_fsdp import _free_port
    from tuwen.hub import load_weights

    rows = []
    for i, text in enumerate(["红色的猫", "蓝天白云下的城市", "一个漂亮的女孩", "黄色的三角形"]):
        buf = io.BytesIO()
        picture(20 + i, (280, 256)).save(buf, format="PNG")
        rows.append(f"{i}\t{text}\t{base64.b64encode(buf.getvalue()).decode('ascii')}\n")
    (tmp_path / "train.tsv").write_text("".join(rows), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    udp = f"pretrain_model_name_or_path={_folder(cogview_dirs)} n_head={HEADS} txt_loss_scale=0.5"
    logs, runs = {}, {"ddp": [], "fsdp": ["--fsdp", "--fsdp_cpu_offload"]}
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "tuwen", "--mode=train", f"--tables={tmp_path / 'train.tsv'}",
               "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
               "--second_sequence=imgbase64", f"--checkpoint_dir={tmp_path / name}", "--learning_rate=5e-3",
               "--max_steps=3", "--micro_batch_size=2", "--warmup_proportion=0", "--lr_schedule=constant",
               "--logging_steps=1", "--app_name=text2image_generation", f"--user_defined_parameters={udp}",
               "--no_progress", "--data_threads=0", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-4000:]
        logs[name] = [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert "3 with their shards, gradients and optimizer states in CPU memory" in r.stderr  # 2 blocks + root
    assert len(logs["fsdp"]) == 3 and logs["fsdp"][-1]["loss"] < logs["fsdp"][0]["loss"] - 1
    for a, b in zip(logs["fsdp"], logs["ddp"]):
        for k in ("loss", "img_loss", "txt_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir())[-1] == "step-00000003.dcp"
    wf, wd = (load_weights(tmp_path / n / "model.safetensors") for n in runs)
    assert set(wf) == set(wd)
    for k in wd:  # key biases get gradients that are 0 in theory (softmax ignores them): AdamW amplifies the
        if not k.endswith("attn.key.bias"):  # float noise of those to ±lr steps of any sign, so they are not compared
            torch.testing.assert_close(wf[k], wd[k], rtol=1e-4, atol=1e-5, msg=k)
    tuned = CogView.from_pretrained(tmp_path / "fsdp")  # the saved folder loads
    assert tuned.logits([1, 2, 3]).shape == (1, 3, tuned.config.gpt.n_out)
