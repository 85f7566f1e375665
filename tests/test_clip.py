"""CLIP: loss, temperature clamp, cross-rank gather, Chinese-CLIP/HF BERT layouts, retrieval metrics, EasyNLP CLI.

Also a torchrun worker: ``python -m torch.distributed.run --nproc_per_node=2 tests/test_clip.py --dist-worker OUT``.
"""
import base64
import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from tuwen.errors import TuwenError
from tuwen.metrics.retrieval import image_text_retrieval, retrieval_metrics, retrieval_ranks
from tuwen.models.clip import CLIP, LOGIT_SCALE_MAX
from tuwen.training.tasks.clip import CLIPTrainModule, CLIPTrainTask, clip_loss
from tuwen.text.tokenizer import TextTokenizer

COLORS = {"红色": (220, 40, 40), "绿色": (40, 170, 60), "蓝色": (40, 60, 220), "黄色": (235, 200, 30)}
SHAPES = ["圆形", "正方形"]


def _tok() -> TextTokenizer:
    texts = [f"一个{c}的{s}" for c in COLORS for s in SHAPES] + ["a red circle", "左上角有一个"]
    return TextTokenizer.train(texts, vocab_size=200)


def _png_b64(color, shape, size=32, jitter=0) -> str:
    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    box = (6 + jitter, 6 + jitter, size - 8 + jitter, size - 8 + jitter)
    (d.ellipse if shape == "圆形" else d.rectangle)(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_tsv(path: Path, n: int, bad_rows=()) -> Path:
    lines = []
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(n):
        c, s = combos[i % len(combos)]
        field = "not*base64!" if i in bad_rows else _png_b64(COLORS[c], s, jitter=i % 3)
        lines.append(f"{i}\t一个{c}的{s}\t{field}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ loss

def test_loss_matches_hand_computation_and_is_symmetric():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    out = clip_loss(img, txt, torch.tensor(2.0), gather=False)

    def ce(logits, label):
        return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))
    i2t = (ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)) / 2
    t2i = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert out["acc_i2t"].item() == 1.0 and out["acc_t2i"].item() == 1.0
    swapped = clip_loss(txt, img, torch.tensor(2.0), gather=False)
    assert swapped["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-6)


def test_loss_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    ref = clip_loss(img, txt, torch.tensor(14.3), gather=False)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(14.3), gather=False)["loss"]
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)


def test_temperature_init_and_clamp():
    tok = _tok()
    model = CLIP.build(tok)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    task = CLIPTrainTask(lambda: model, tok, None)
    module = task.build_module()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    task.after_step(module, 1)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX) == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    task.after_step(module, 2)
    assert model.logit_scale.item() == 0.0


def test_training_module_forward_backward():
    tok = _tok()
    torch.manual_seed(0)
    model = CLIP.build(tok)
    mod = CLIPTrainModule(model).train()
    texts = [f"一个{c}的圆形" for c in COLORS]
    batch = {"pixels": torch.randint(0, 255, (4, 32, 32, 3), dtype=torch.uint8), "input_ids": model.tokenize(texts)}
    out = mod(batch)
    out["loss"].backward()
    assert model.logit_scale.grad is not None and model.visual.conv1.weight.grad is not None
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    # activation checkpointing changes memory, not results
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.visual.set_grad_checkpointing(True)
    model.bert.set_grad_checkpointing(True)
    mod(batch)["loss"].backward()
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    frozen = CLIPTrainModule(CLIP.build(tok), freeze_vision=True).train()
    assert not frozen.clip.visual.training and not any(p.requires_grad for p in frozen.clip.visual.parameters())


# ------------------------------------------------------------------ gather across ranks (torchrun, gloo)

def _dist_worker(out_dir: str) -> None:
    import torch.distributed as dist

    from tuwen import runtime as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [4, 2]                                      # unequal on purpose (padding path)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    fi, ft = img.clone().requires_grad_(), txt.clone().requires_grad_()
    full = clip_loss(fi, ft, scale, gather=False)["loss"]
    full.backward()
    li, lt = img[lo:hi].clone().requires_grad_(), txt[lo:hi].clone().requires_grad_()
    loss = clip_loss(li, lt, scale, gather=True)["loss"]
    loss.backward()
    mean_loss = D.all_reduce_sum(loss.detach().clone()) / world
    res = {"loss_diff": abs(mean_loss.item() - full.item()), "full": full.item(),
           "grad_diff": max((li.grad / world - fi.grad[lo:hi]).abs().max().item(),
                            (lt.grad / world - ft.grad[lo:hi]).abs().max().item())}

    # DDP over the real training module: averaged gradients == single-process gradients on the whole batch
    tok = _tok()
    torch.manual_seed(1)
    model = CLIP.build(tok)
    ref = copy.deepcopy(model)
    texts = [f"一个{c}的{s}" for c in COLORS for s in SHAPES][:6]
    pixels = torch.randint(0, 255, (6, 32, 32, 3), dtype=torch.uint8, generator=g)
    ids = model.tokenize(texts)
    ref_mod = CLIPTrainModule(ref).train()
    from tuwen.models.vit import uint8_to_input
    ri = F.normalize(ref.image_features(uint8_to_input(pixels)), dim=-1)
    rt = F.normalize(ref.text_features(ids), dim=-1)
    clip_loss(ri, rt, ref.logit_scale.exp(), gather=False)["loss"].backward()
    ddp = torch.nn.parallel.DistributedDataParallel(CLIPTrainModule(model).train())
    out = ddp({"pixels": pixels[lo:hi], "input_ids": ids[lo:hi]})
    out["loss"].backward()
    diffs = [(p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref_mod.clip.parameters())]
    res["ddp_grad_diff"] = max(diffs)
    res["ddp_grad_scale"] = max(q.grad.abs().max().item() for q in ref_mod.clip.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gather_two_ranks_equals_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           __file__, "--dist-worker", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["loss_diff"] < 1e-5, res
        assert res["grad_diff"] < 1e-5, res
        assert res["ddp_grad_diff"] < 1e-4 * max(1.0, res["ddp_grad_scale"]), res


# ------------------------------------------------------------------ retrieval metrics

def test_retrieval_metrics_on_known_matrix():
    sim = np.array([[0.9, 0.1, 0.3],
                    [0.2, 0.5, 0.8],
                    [0.4, 0.4, 0.4]])
    assert retrieval_ranks(sim).tolist() == [1, 2, 3]          # ties count against the query
    m = retrieval_metrics(sim, ks=(1, 2, 3))
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@2"] == pytest.approx(2 / 3) and m["R@3"] == 1.0
    assert m["mean_rank"] == 2.0 and m["median_rank"] == 2.0
    # several correct candidates: identical ids
    ids = ["a", "b", "a"]
    assert retrieval_ranks(sim, ids, ids).tolist() == [1, 2, 2]
    assert retrieval_ranks(np.zeros((2, 2))).tolist() == [2, 2]   # constant scores: never lucky
    # both directions from features; a perfect embedding gives R@1 = 1
    f = torch.eye(4)
    r = image_text_retrieval(f, f)
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_median_rank"] == 1.0
    with pytest.raises(ValueError):
        retrieval_ranks(np.zeros((2, 3)))


# ------------------------------------------------------------------ checkpoint layouts

def _write_vocab(path: Path) -> Path:
    toks = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 5)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    toks += list("一个红色绿蓝黄的圆形正方左上角有") + ["a", "red", "circle"]
    path.write_text("\n".join(toks) + "\n", encoding="utf-8")
    return path


def _ref_text(sd: dict, ids: torch.Tensor, heads: int, prefix: str = "bert.") -> torch.Tensor:
    """Chinese-CLIP's BertModel forward written out (additive −10000 mask, post-LN, erf GELU), [CLS] hidden state."""
    def w(k):
        return sd[prefix + k]

    def ln(x, k):
        return F.layer_norm(x, x.shape[-1:], w(k + ".weight"), w(k + ".bias"), eps=1e-12)

    T = ids.shape[1]
    x = w("embeddings.word_embeddings.weight")[ids] + w("embeddings.position_embeddings.weight")[:T] \
        + w("embeddings.token_type_embeddings.weight")[0]
    x = ln(x, "embeddings.LayerNorm")
    ext = (1.0 - (ids != 0).float())[:, None, None, :] * -10000.0
    L = len({k.split(".")[3] for k in sd if k.startswith(prefix + "encoder.layer.")})
    B, _, C = x.shape
    d = C // heads
    for i in range(L):
        p = f"encoder.layer.{i}."

        def lin(h, k):
            return h @ w(p + k + ".weight").T + w(p + k + ".bias")
        q, k_, v = (lin(x, f"attention.self.{n}").view(B, T, heads, d).transpose(1, 2) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k_.transpose(-1, -2) / math.sqrt(d) + ext, -1)
        ctx = (att @ v).transpose(1, 2).reshape(B, T, C)
        a = ln(lin(ctx, "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = F.gelu(lin(a, "intermediate.dense"))
        x = ln(lin(h, "output.dense") + a, p + "output.LayerNorm")
    return x[:, 0]


def test_chinese_clip_checkpoint_loads(tmp_path):
    from tuwen.models.clip import convert_chinese_clip, load_chinese_clip

    vocab = _write_vocab(tmp_path / "vocab.txt")
    tok = TextTokenizer.from_pretrained(vocab)
    torch.manual_seed(0)
    src = CLIP.build(tok, vision="tiny", text="tiny")
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.bert.pooler.dense.weight"] = torch.zeros(64, 64)      # present in some exports; dropped
    sd["module.bert.pooler.dense.bias"] = torch.zeros(64)
    torch.save({"epoch": 3, "step": 10, "name": "test", "state_dict": sd}, tmp_path / "clip_cn_tiny.pt")
    model = load_chinese_clip(tmp_path / "clip_cn_tiny.pt", vocab, vision_heads=2, text_heads=2)
    assert model.config.text.num_attention_heads == 2 and model.config.vision.heads == 2
    assert model.config.image_resize == "squash" and model.config.context_length == 52
    texts = ["一个红色的圆形", "a red circle", "蓝色正方形"]
    ids = model.tokenize(texts)
    assert ids[0, 0].item() == tok.cls_id and ids[:, -1].eq(0).all()
    with torch.no_grad():
        got = model.encode_text(texts, normalize=False)
        want = _ref_text(src.state_dict(), ids, heads=2) @ src.text_projection
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model.encode_image(x), src.encode_image(x))
    out = convert_chinese_clip(tmp_path / "clip_cn_tiny.pt", vocab, tmp_path / "converted", text_heads=2,
                               vision_heads=2)
    again = CLIP.from_pretrained(out)
    assert (out / "vocab.txt").exists() and again.config.image_resize == "squash"
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(texts), model.encode_text(texts))
    # wrong vocabulary size is a user error
    big = tmp_path / "big.txt"
    big.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"t{i}" for i in range(500)]) + "\n")
    with pytest.raises(TuwenError, match="vocab"):
        load_chinese_clip(tmp_path / "clip_cn_tiny.pt", big)
    # default head count: width // 64 (the rule of every released Chinese-CLIP model)
    assert load_chinese_clip(tmp_path / "clip_cn_tiny.pt", vocab).config.text.num_attention_heads == 1


def test_hf_bert_weights_load_into_text_tower(tmp_path):
    from tuwen.convert.clip import bert_state_dict, load_bert_into
    from tuwen.models.text_encoder import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig.preset("tiny", vocab_size=30, num_attention_heads=4))
    sd = {f"bert.{k}": v for k, v in enc.state_dict().items()}
    sd["bert.embeddings.position_ids"] = torch.arange(64)[None]
    sd["bert.pooler.dense.weight"] = torch.zeros(64, 64)
    sd["cls.predictions.bias"] = torch.zeros(30)
    sd = {(k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
           if "embeddings" in k else k): v for k, v in sd.items()}                      # TF-style names too
    d = tmp_path / "roberta"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "hidden_act": "gelu",
                                               "num_hidden_layers": 2}))
    sd2, cfg = bert_state_dict(d)
    assert (cfg.num_attention_heads, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size) == (4, 2, 30, 256)
    fresh = TextEncoder(cfg)
    load_bert_into(fresh, sd2, str(d))
    ids = torch.tensor([[2, 5, 7, 3, 0, 0], [2, 9, 3, 0, 0, 0]])
    with torch.no_grad():
        want = _ref_text({f"bert.{k}": v for k, v in enc.state_dict().items()}, ids, heads=4)
        torch.testing.assert_close(fresh.eval().pooled(ids), want, atol=2e-5, rtol=1e-4)


def test_state_dict_names_follow_chinese_clip():
    model = CLIP.build(_tok())
    keys = set(model.state_dict())
    for k in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
              "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.self.value.bias",
              "bert.encoder.layer.0.attention.output.dense.weight", "bert.encoder.layer.0.attention.output.LayerNorm.bias",
              "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.output.dense.weight",
              "bert.encoder.layer.0.output.LayerNorm.weight", "visual.conv1.weight", "visual.class_embedding",
              "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "text_projection", "logit_scale"):
        assert k in keys, k


# ------------------------------------------------------------------ EasyNLP-style commands

def _cli(*argv):
    from tuwen.cli import main
    return main(list(argv))


def test_cli_train_evaluate_predict(tmp_path, capsys):
    train = make_tsv(tmp_path / "train.tsv", 48, bad_rows={5})
    val = make_tsv(tmp_path / "val.tsv", 16, bad_rows={3})
    ck = tmp_path / "ck"
    common = ["--app_name=clip", "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
              "--second_sequence=imgbase64"]
    rc = _cli("--mode=train", *common, f"--tables={train},{val}", f"--checkpoint_dir={ck}", "--micro_batch_size=16",
              "--max_steps=6", "--learning_rate=2e-3", "--num_workers=0", "--no_tensorboard", "--no_progress",
              "--logging_steps=3", "--user_defined_parameters=vision=tiny text=tiny context_length=16 embed_dim=32")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "built a vocabulary" in err and "train.tsv:6: bad base64" in err
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["model_type"] == "clip" and cfg["embed_dim"] == 32 and cfg["context_length"] == 16
    assert (ck / "vocab.txt").exists()
    log = [json.loads(x) for x in (ck / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(0 <= r["scale"] <= 100 for r in log)

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(COLORS) + "\n", encoding="utf-8")
    rc = _cli("--mode=evaluate", *common, f"--tables={val}", f"--checkpoint_dir={ck}",
              f"--outputs={tmp_path / 'm.json'}",
              f"--user_defined_parameters=class_prompts={classes} prompt_template=一个{{}}的物体")
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["evaluated"] == 15 and m["bad_rows"] == 1 and m["unique_texts"] == 8
    for k in ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_mean_rank",
              "text_to_image_median_rank"):
        assert k in m
    assert 0 <= m["mean_recall"] <= 1
    assert m["zeroshot_classes"] == 4 and m["zeroshot_rows"] == 15 and 0 <= m["zeroshot_top1"] <= 1
    assert "val.tsv:4: bad base64" in cap.err and "image to text: R@1" in cap.err

    out = tmp_path / "pred.tsv"
    rc = _cli("--mode=predict", *common, f"--tables={val}", f"--checkpoint_dir={ck}", f"--outputs={out}",
              "--output_schema=idx,text,score,logit,text_embedding,image_feat")
    assert rc == 0, capsys.readouterr().err
    rows = [ln.split("\t") for ln in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 15 and rows[0][0] == "0" and rows[0][1] == "一个红色的圆形"
    assert -1 <= float(rows[0][2]) <= 1 and len(json.loads(rows[0][4])) == 32 and len(json.loads(rows[0][5])) == 32
    model = CLIP.from_pretrained(ck)
    row0 = val.read_text().splitlines()[0].split("\t")
    want = model.similarity([Image.open(io.BytesIO(base64.b64decode(row0[2])))], [row0[1]]).item()
    assert float(rows[0][2]) == pytest.approx(want, abs=1e-4)


def test_cli_train_from_openai_vit_frozen(tmp_path, capsys):
    from tuwen.models.vit import ViTConfig, VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=8, width=128, layers=1, heads=2, output_dim=32))
    torch.save({f"visual.{k}": v.half() for k, v in vit.state_dict().items()}, tmp_path / "ViT-mini.pt")
    train = make_tsv(tmp_path / "train.tsv", 16)
    ck = tmp_path / "ck"
    rc = _cli("--mode=train", "--app_name=clip", f"--tables={train}", f"--checkpoint_dir={ck}",
              "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--micro_batch_size=8", "--max_steps=2",
              "--num_workers=0", "--no_tensorboard", "--no_progress",
              f"--user_defined_parameters=vit_ckpt_path={tmp_path / 'ViT-mini.pt'} freeze_vision=true text=tiny "
              f"context_length=16")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "image tower initialised from" in err and "no --input_schema" not in err
    model = CLIP.from_pretrained(ck)
    assert model.config.embed_dim == 32 and model.config.vision.width == 128
    for k, v in vit.state_dict().items():          # frozen: still the checkpoint's (fp16-rounded) weights
        torch.testing.assert_close(model.visual.state_dict()[k], v.half().float())


def test_cli_user_errors(tmp_path, capsys):
    train = make_tsv(tmp_path / "t.tsv", 4)
    rc = _cli("--mode=train", "--app_name=clip", f"--tables={train}", f"--checkpoint_dir={tmp_path / 'ck'}",
              "--user_defined_parameters=vision=tiny colour=red")
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key 'colour'" in err and "known keys" in err
    rc = _cli("--mode=train", "--app_name=clip", f"--tables={train}", f"--checkpoint_dir={tmp_path / 'ck'}",
              "--input_schema=idx:str:1,caption:str:1,img:str:1", "--first_sequence=text")
    assert rc == 2 and "--first_sequence='text' is not a column" in capsys.readouterr().err
    rc = _cli("--mode=evaluate", "--app_name=clip", f"--tables={train}", f"--checkpoint_dir={tmp_path / 'none'}")
    assert rc == 2 and "no such file" in capsys.readouterr().err


if __name__ == "__main__" and "--dist-worker" in sys.argv:
    _dist_worker(sys.argv[sys.argv.index("--dist-worker") + 1])
