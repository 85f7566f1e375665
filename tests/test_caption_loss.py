"""The captioning loss: caption + end token by default, EasyNLP's all-positions loss with ``loss_on_padding=true``;
``--mode=evaluate`` scores the first reference of a JSON-list reference field."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tuwen.cli import main as cli_main
from tuwen.models.captioner import CaptionerConfig
from tuwen.models.gpt import GPT
from tuwen.models.vit import ViTConfig, VisionTransformer
from tuwen.text.tokenizer import TextTokenizer
from tuwen.training.tasks.captioning import CaptionTrainModule

CAPS = ["红色", "蓝色的正方形", "绿色的三角形"]
COLORS = [(220, 40, 40), (40, 70, 225), (50, 170, 50)]


def _b64(color, size=32) -> str:
    x = np.full((size, size, 3), 248, np.uint8)
    x[4:20, 4:20] = color
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _module(loss_on_padding: bool):
    tok = TextTokenizer.train(CAPS, vocab_size=60)
    v = ViTConfig.preset("tiny")
    cfg = CaptionerConfig.build(prefix_encoder="vit", img_len=v.num_patches, image_size=32, text_len=10,
                                text_vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, vit=v.to_dict())
    torch.manual_seed(0)
    m = CaptionTrainModule(cfg, GPT(cfg.gpt), VisionTransformer(cfg.vit), end_id=tok.pad_id,
                           loss_on_padding=loss_on_padding)
    ids = torch.tensor([tok.encode(c, 10, pad=True) for c in CAPS])
    pixels = torch.from_numpy(np.stack([np.full((32, 32, 3), c, np.uint8) for c in COLORS]))
    return m, {"pixels": pixels, "text_ids": ids}, tok


@pytest.mark.parametrize("on_padding", [False, True])
def test_loss_positions(on_padding):
    m, batch, tok = _module(on_padding)
    m.eval()
    out = m(batch)
    # the caption positions: up to and including the first [PAD]
    c = m.config
    text = batch["text_ids"]
    is_end = (text == tok.pad_id).int()
    in_cap = (is_end.cumsum(1) - is_end) == 0
    n_cap = int(in_cap.sum())
    assert n_cap == sum(len(tok.encode(t, 10, pad=False)) + 1 for t in CAPS)  # caption tokens + one end token each
    assert n_cap < text.numel()
    # both are reported whatever is trained
    assert float(out["caption_loss"]) != pytest.approx(float(out["loss_all_positions"]))
    trained = out["loss_all_positions"] if on_padding else out["caption_loss"]
    assert float(out["loss"].detach()) == pytest.approx(float(trained), rel=1e-6)
    assert out["loss"].requires_grad
    # gradient: with the default loss, a position after the end token contributes nothing
    m.train()
    m.zero_grad()
    out = m(batch)
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.gpt.parameters())
    assert c.text_len == 10


def _tables(tmp_path, refs_as_list=False):
    rows = []
    for i in range(6):
        text = CAPS[i % 3]
        if refs_as_list:
            text = json.dumps([CAPS[i % 3], "完全不同的一句很长的话" * 2], ensure_ascii=False)
        rows.append(f"{i}\t{_b64(COLORS[i % 3])}\t{text}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "val.tsv").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")


def _train(tmp_path, out, udp=""):
    return cli_main([
        "--mode=train", f"--tables={tmp_path / 'train.tsv'},{tmp_path / 'val.tsv'}",
        "--input_schema=idx:str:1,imgbase64:str:1,text:str:1", "--first_sequence=imgbase64",
        "--second_sequence=text", f"--checkpoint_dir={out}", "--learning_rate=3e-3", "--max_steps=3",
        "--random_seed=1", "--micro_batch_size=6", "--app_name=image2text_generation", "--data_threads=0",
        "--no_progress", f"--user_defined_parameters=img_size=32 text_len=10 n_layer=1 n_head=2 n_embd=32 "
                         f"vit_preset=tiny {udp}"])


@pytest.mark.parametrize("udp,key", [("", "caption_loss"), ("loss_on_padding=true", "loss_all_positions")])
def test_cli_trains_the_chosen_loss(tmp_path, udp, key):
    _tables(tmp_path)
    assert _train(tmp_path, tmp_path / "m", udp) == 0
    log = [json.loads(ln) for ln in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    for rec in log:
        assert rec["loss"] == pytest.approx(rec[key], rel=1e-6)
        assert "caption_loss" in rec and "loss_all_positions" in rec


def test_evaluate_uses_the_first_reference(tmp_path, capsys):
    _tables(tmp_path)
    assert _train(tmp_path, tmp_path / "m") == 0
    capsys.readouterr()
    common = ["--mode=evaluate", "--input_schema=idx:str:1,imgbase64:str:1,text:str:1",
              "--first_sequence=imgbase64", "--second_sequence=text", f"--checkpoint_dir={tmp_path / 'm'}",
              "--micro_batch_size=4", "--app_name=image2text_generation"]
    assert cli_main(common + [f"--tables={tmp_path / 'val.tsv'}"]) == 0
    single = json.loads(capsys.readouterr().out)
    lst = tmp_path / "val_list.tsv"
    lst.write_text("".join(f"{i}\t{_b64(COLORS[i])}\t{json.dumps([CAPS[i], '完全不同的一句很长的话' * 2], ensure_ascii=False)}\n"
                           for i in range(3)), encoding="utf-8")
    assert cli_main(common + [f"--tables={lst}"]) == 0
    listed = json.loads(capsys.readouterr().out)
    for k in ("eval_loss", "caption_loss", "loss_all_positions"):
        assert listed[k] == pytest.approx(single[k], rel=1e-5), k
    assert listed["eval_loss"] == pytest.approx(listed["caption_loss"], rel=1e-6)  # the default loss


def test_evaluate_reports_exact_match(tmp_path, capsys):
    """``exact_match``: the share of images whose caption is one of their references (spaces ignored)."""
    _tables(tmp_path)
    assert _train(tmp_path, tmp_path / "m") == 0
    capsys.readouterr()
    assert cli_main(["--mode=evaluate", "--input_schema=idx:str:1,imgbase64:str:1,text:str:1",
                     "--first_sequence=imgbase64", "--second_sequence=text", f"--checkpoint_dir={tmp_path / 'm'}",
                     "--micro_batch_size=4", "--app_name=image2text_generation",
                     f"--tables={tmp_path / 'val.tsv'}"]) == 0
    res = json.loads(capsys.readouterr().out)
    ex = res["examples"]   # all 3 images
    assert len(ex) == res["n_images"] == 3
    want = sum("".join(e["gen_text"].split()) in {"".join(r.split()) for r in e["references"]} for e in ex) / 3
    assert res["exact_match"] == pytest.approx(want)
    assert res["exact_match_tokenized"] >= res["exact_match"]  # references as the model's tokenizer writes them
    # references set to the model's own captions (spaced out, in a JSON list): all exact
    own = tmp_path / "own.tsv"
    own.write_text("".join(f"{e['idx']}\t{_b64(COLORS[int(e['idx'])])}\t"
                           f"{json.dumps(['别的', ' '.join(e['gen_text'])], ensure_ascii=False)}\n" for e in ex),
                   encoding="utf-8")
    assert cli_main(["--mode=evaluate", "--input_schema=idx:str:1,imgbase64:str:1,text:str:1",
                     "--first_sequence=imgbase64", "--second_sequence=text", f"--checkpoint_dir={tmp_path / 'm'}",
                     "--micro_batch_size=4", "--app_name=image2text_generation", f"--tables={own}"]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == 1.0
