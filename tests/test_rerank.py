"""Reranking: deterministic order, CLIP scorer (batched), caption scorer (faked Captioner), ``tuwen rerank``."""
import json
import math
import sys
import types

import pytest
import torch
from PIL import Image

from tuwen.errors import TuwenError
from tuwen.models.clip import CLIP
from tuwen.rerank import ClipScorer, load_scorer, order_by_score, parse_rerank_line, rerank
from tuwen.text.tokenizer import TextTokenizer


class FixedScorer:
    name = "fixed"

    def __init__(self, values):
        self.values, self.calls = values, []

    def score(self, texts, images):
        self.calls.append((list(texts), len(images)))
        return [self.values[im] for im in images]


def test_rerank_order_is_deterministic():
    assert order_by_score([0.5, 0.9, 0.5, float("nan"), 0.9, -1.0]) == [1, 4, 0, 2, 5, 3]
    sc = FixedScorer({"a": 0.2, "b": 0.7, "c": 0.7, "d": 0.1})
    kept, scores = rerank(sc, "一只猫", ["a", "b", "c", "d"], keep=2)
    assert kept == [1, 2] and scores == [0.2, 0.7, 0.7, 0.1]
    assert sc.calls == [(["一只猫"] * 4, 4)]                      # one batched call
    res = rerank(sc, "一只猫", ["d", "c", "b", "a"])
    assert res.indices == [1, 2, 3, 0] and len(res.scores) == 4
    assert rerank(sc, "x", []) == ([], [])
    with pytest.raises(TuwenError, match="keep"):
        rerank(sc, "x", ["a"], keep=0)
    for _ in range(3):                                            # same answer every time
        assert rerank(sc, "x", ["b", "c", "b", "c"], keep=3).indices == [0, 1, 2]


def _clip(tmp_path):
    tok = TextTokenizer.train(["红色的圆形", "蓝色的正方形", "a red circle"], vocab_size=120)
    torch.manual_seed(0)
    model = CLIP.build(tok)
    d = tmp_path / "clip"
    model.save_pretrained(d)
    return d


def _images(n):
    colors = [(200, 30, 30), (30, 30, 200), (30, 180, 40), (240, 220, 10), (0, 0, 0), (255, 255, 255)]
    return [Image.new("RGB", (40 + i, 32), colors[i % len(colors)]) for i in range(n)]


def test_clip_scorer_is_cosine_and_batch_independent(tmp_path):
    d = _clip(tmp_path)
    scorer = load_scorer(f"clip:{d}", device="cpu", batch_size=2)
    assert isinstance(scorer, ClipScorer)
    imgs = _images(5)
    texts = ["红色的圆形", "蓝色的正方形", "红色的圆形", "a red circle", "蓝色的正方形"]
    s_small = scorer.score(texts, imgs)
    s_big = ClipScorer(scorer.model, batch_size=64).score(texts, imgs)
    assert s_small == pytest.approx(s_big, abs=1e-5)
    sim = scorer.model.similarity(imgs, texts)
    assert s_small == pytest.approx([sim[i, i].item() for i in range(5)], abs=1e-5)
    assert scorer.score("红色的圆形", imgs[:2]) == pytest.approx([sim[0, 0].item(), sim[1, 0].item()], abs=1e-5)
    # a bare folder is recognised from config.json
    assert isinstance(load_scorer(str(d), device="cpu"), ClipScorer)
    with pytest.raises(TuwenError, match="texts for"):
        scorer.score(["a", "b"], imgs)


class FakeCaptioner:
    calls = []

    @classmethod
    def from_pretrained(cls, path, device=None):
        return cls()

    def eval(self):
        return self

    def log_likelihood(self, images, texts):
        FakeCaptioner.calls.append(len(images))
        # "log p(text | image)": the darker the image, the more likely; longer texts are less likely
        return torch.tensor([-len(t) - sum(im.getpixel((0, 0))) / 255.0 for im, t in zip(images, texts)])


def test_caption_scorer_uses_captioner_log_likelihood(tmp_path, monkeypatch):
    fake = types.ModuleType("tuwen.models.captioner")
    fake.Captioner = FakeCaptioner
    monkeypatch.setitem(sys.modules, "tuwen.models.captioner", fake)
    d = tmp_path / "cap"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "captioner"}))
    FakeCaptioner.calls = []
    scorer = load_scorer(f"caption:{d}", device="cpu", batch_size=8)
    imgs = _images(6)
    kept, scores = rerank(scorer, "猫", imgs, keep=3)
    want = [-1 - sum(im.getpixel((0, 0))) / 255.0 for im in imgs]
    assert scores == pytest.approx(want, abs=1e-5)
    assert kept == [4, 2, 0]              # black, green, then red before blue (equal score: lower index)
    assert FakeCaptioner.calls == [4, 2]                          # batched (batch_size // 2 per call)
    assert isinstance(load_scorer(str(d), device="cpu").score("x", imgs[:1])[0], float)   # bare folder → caption


def test_scorer_spec_errors(tmp_path):
    with pytest.raises(TuwenError, match="no such file"):
        load_scorer(f"clip:{tmp_path}/missing", device="cpu")
    (tmp_path / "x").mkdir()
    with pytest.raises(TuwenError, match="say which scorer"):
        load_scorer(str(tmp_path / "x"), device="cpu")
    with pytest.raises(ValueError, match="no image paths"):
        parse_rerank_line("只有文字")


def test_rerank_cli(tmp_path, capsys):
    from tuwen.cli import main

    d = _clip(tmp_path)
    imgdir = tmp_path / "out"
    imgdir.mkdir()
    for i, im in enumerate(_images(4)):
        im.save(imgdir / f"{i}.png")
    (imgdir / "broken.png").write_bytes(b"not a png")
    lines = [f"红色的圆形\tout/0.png\tout/1.png\t{imgdir / '2.png'}",      # relative and absolute paths
             "no images here",
             "",
             "蓝色的正方形\tout/3.png\tout/broken.png\tout/0.png"]
    inp = tmp_path / "post.tsv"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "scores.tsv"
    rc = main(["rerank", "--input", str(inp), "--scorer", f"clip:{d}", "--output", str(out), "--device", "cpu",
               "--batch_size", "2", "--ranked", "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{inp}:2: no image paths" in err and f"{inp}:4: image 2" in err and "broken.png" in err
    rows = [r.split("\t") for r in out.read_text(encoding="utf-8").splitlines()]
    assert [r[0] for r in rows] == ["红色的圆形", "蓝色的正方形"]
    assert len(rows[0]) == 1 + 3 + 1 + 3 and rows[0][4] == "|"
    assert math.isnan(float(rows[1][2])) and rows[1][-1] == "2"     # the undecodable image ranks last
    model = CLIP.from_pretrained(d)
    want = model.similarity([Image.open(imgdir / "0.png"), Image.open(imgdir / "1.png")], ["红色的圆形"])[:, 0]
    assert [float(x) for x in rows[0][1:3]] == pytest.approx(want.tolist(), abs=1e-5)
    assert sorted(int(x) for x in rows[0][5:]) == [1, 2, 3]
    # a path that does not exist is an error naming the line and the path, before anything is scored
    inp.write_text("蓝色的正方形\tout/3.png\tout/missing.png\n", encoding="utf-8")
    rc = main(["rerank", "--input", str(inp), "--scorer", f"clip:{d}", "--output", str(out), "--device", "cpu"])
    assert rc == 2 and f"{inp}:1: {imgdir / 'missing.png'}" in capsys.readouterr().err
    # stdout by default; a file with no usable line is an error
    bad = tmp_path / "bad.tsv"
    bad.write_text("only text\n", encoding="utf-8")
    rc = main(["rerank", "--input", str(bad), "--scorer", f"clip:{d}", "--device", "cpu"])
    assert rc == 2 and "no usable lines" in capsys.readouterr().err
