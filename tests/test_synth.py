"""The synthetic data set (tuwen.data.synth) and its attribute checker (tuwen.data.checker)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tuwen.data import checker, synth
from tuwen.data.images import decode_frames, open_image
from tuwen.data.synth import ObjectSpec
from tuwen.data.tables import Table


def _jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _samples(n: int, size: int, seed: int = 1000):
    return [synth.make_sample(seed + i, size) for i in range(n)]


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------------------- generator

def test_make_sample_is_deterministic_and_well_formed():
    a = synth.make_sample(7, 64)
    b = synth.make_sample(7, 64)
    assert a[1] == b[1] and a[2] == b[2]
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert synth.make_sample(8, 64)[2] != a[2]
    for size in (32, 64, 128, 256):
        img, text, attrs = synth.make_sample(random.Random(3), size)
        assert img.size == (size, size) and img.mode == "RGB"
    for i in range(300):
        attrs = synth.sample_attrs(i)
        objs = attrs["objects"]
        assert 1 <= len(objs) <= 2
        assert len({o["position"] for o in objs}) == len(objs)  # never two objects in a cell
        assert len({o["color"] for o in objs}) == len(objs)     # nor two of one colour
        for o in objs:
            assert o["color"] in synth.COLORS and o["shape"] in synth.SHAPES and o["position"] in synth.POSITIONS
    assert {len(synth.sample_attrs(i)["objects"]) for i in range(50)} == {1, 2}
    assert len(synth.sample_attrs(0, n_objects=2)["objects"]) == 2


def test_captions_examples():
    objs = [ObjectSpec("red", "circle", "top_left"), ObjectSpec("blue", "square", "bottom_right")]
    assert synth.caption(objs[:1]) == "左上角有一个红色的圆形"
    assert synth.caption(objs) == "左上角有一个红色的圆形，右下角有一个蓝色的正方形"
    assert synth.caption(objs[:1], "en") == "a red circle in the top left"
    assert synth.caption(objs, "en") == "a red circle in the top left and a blue square in the bottom right"
    v = [ObjectSpec("red", "circle", None, "right")]
    assert synth.video_caption(v) == "一个红色的圆形从左向右移动"
    assert synth.video_caption(v, "en") == "a red circle moves from left to right"


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_caption_round_trip(lang):
    for i in range(400):
        _, text, attrs = synth.make_sample(i, 16, lang)
        want = [ObjectSpec(o["color"], o["shape"], o["position"]) for o in attrs["objects"]]
        assert synth.parse_caption(text) == want, text
    for i in range(200):
        attrs = synth.sample_video_attrs(i)
        for _ in range(3):
            text = synth.video_caption(attrs, lang, random.Random(i * 7 + _))
            o = attrs["objects"][0]
            assert synth.parse_caption(text) == [ObjectSpec(o["color"], o["shape"], None, o["direction"])], text


def test_parse_caption_synonyms_and_garbage():
    p = synth.parse_caption
    assert p("一个红色的圆形在左上角") == [ObjectSpec("red", "circle", "top_left")]
    assert p("画面中央是一个蓝色方块") == [ObjectSpec("blue", "square", "center")]
    assert p("右下方有一个紫色的长方形") == [ObjectSpec("purple", "rectangle", "bottom_right")]
    assert p("There is a Green triangle in the upper right.") == [ObjectSpec("green", "triangle", "top_right")]
    assert p("a yellow rectangle at the bottom and a cyan circle on the left") == [
        ObjectSpec("yellow", "rectangle", "bottom"), ObjectSpec("cyan", "circle", "left")]
    assert p("黄色的三角形向上移动") == [ObjectSpec("yellow", "triangle", None, "up")]
    assert p("a blue square moving down") == [ObjectSpec("blue", "square", None, "down")]
    assert p("a red circle moves from top to bottom") == [ObjectSpec("red", "circle", None, "down")]
    for bad in ("", "   ", "一只猫坐在沙发上", "a cat on a sofa", "红色的圆形", "左上角有一个圆形",
                "左上角有一个红色的圆形，右下角有一个正方形", "a red circle moves from left to left", None):
        assert p(bad) is None, bad


def test_render_given_attributes_and_holdout_parsing():
    specs = [ObjectSpec("green", "triangle", "center"), {"color": "blue", "shape": "rectangle", "position": "top"}]
    img = synth.render(specs, 64)
    assert img.size == (64, 64)
    assert all(r.ok for r in checker.check(img, specs))
    img2 = synth.render(specs, 64, rng=5)
    assert all(r.ok for r in checker.check(img2, specs))
    assert synth.render(synth.parse_caption("左下角有一个黄色的圆形"), 32).size == (32, 32)
    with pytest.raises(ValueError):
        synth.render([{"color": "pink", "shape": "circle", "position": "top"}], 64)
    assert synth.parse_holdout("default") == synth.DEFAULT_HOLDOUT
    assert synth.parse_holdout("red:circle, blue/square") == (("red", "circle"), ("blue", "square"))
    assert synth.parse_holdout(None) == ()
    with pytest.raises(ValueError):
        synth.parse_holdout("red:hexagon")


def test_write_dataset_layout_determinism_and_holdout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    meta = synth.write_dataset(a, n=120, size=32, seed=3, holdout="default", workers=1)
    synth.write_dataset(b, n=120, size=32, seed=3, holdout="default", workers=2)
    assert _digest(a) == _digest(b)  # byte-identical whatever the number of workers
    assert meta["counts"] == {"train": 108, "val": 6, "test": 6, "holdout": 6}
    names = {p.name for p in a.iterdir()}
    assert {"train.tsv", "val.tsv", "test.tsv", "test_prompts.tsv", "train.attributes.jsonl",
            "val.attributes.jsonl", "test.attributes.jsonl", "holdout.tsv", "holdout_prompts.tsv",
            "holdout.attributes.jsonl", "meta.json"} <= names
    t = Table(str(a / "train.tsv"), "idx:str:1,text:str:1,imgbase64:str:1")
    assert len(t) == 108
    attrs = synth.read_attributes(a / "train.attributes.jsonl")
    held = set(synth.DEFAULT_HOLDOUT)
    for i in range(len(t)):
        row = t.row(i)
        assert open_image(row["imgbase64"]).size == (32, 32)
        at = attrs[row["idx"]]
        assert at["text"] == row["text"]
        assert synth.parse_caption(row["text"]) == synth.object_specs(at)
        assert not any((o["color"], o["shape"]) in held for o in at["objects"])
    hold = synth.read_attributes(a / "holdout.attributes.jsonl")
    assert all(any((o["color"], o["shape"]) in held for o in at["objects"]) for at in hold.values())
    ids = [json.loads(line)["idx"] for s in ("train", "val", "test", "holdout")
           for line in open(a / f"{s}.attributes.jsonl", encoding="utf-8")]
    assert len(ids) == len(set(ids))  # ids unique across splits
    prompts = [line.rstrip("\n").split("\t") for line in open(a / "test_prompts.tsv", encoding="utf-8")]
    assert [p[0] for p in prompts] == list(synth.read_attributes(a / "test.attributes.jsonl"))
    c = tmp_path / "c"
    synth.write_dataset(c, n=120, size=32, seed=4, workers=1)
    assert (c / "train.tsv").read_bytes() != (a / "train.tsv").read_bytes()


def test_write_dataset_video_and_jpeg(tmp_path):
    meta = synth.write_dataset(tmp_path, n=20, size=32, seed=0, video=True, frame_num=5, image_format="jpeg",
                               lang="en")
    assert meta["input_schema"] == "idx:str:1,imgbase64:str:1,text:str:1"
    t = Table(str(tmp_path / "train.tsv"), meta["input_schema"])
    row = t.row(0)
    frames = decode_frames(row["imgbase64"])
    assert len(frames) == 5
    imgs = [open_image(f) for f in frames]
    assert imgs[0].size == (32, 32)
    assert base64.b64decode(frames[0])[:2] == b"\xff\xd8"  # JPEG
    spec = synth.parse_caption(row["text"])
    assert spec and spec[0].direction
    assert all(r.ok for r in checker.check_video(imgs, spec))


def test_write_dataset_speed(tmp_path):
    import time
    t0 = time.time()
    synth.write_dataset(tmp_path, n=2000, size=64, seed=0)
    assert time.time() - t0 < 15  # 20000 images take ~5 s on 2 cores


# ----------------------------------------------------------------------------------------------- checker

@pytest.mark.parametrize("size", [32, 64])
def test_checker_on_own_images(size):
    samples = _samples(150, size)
    imgs = [s[0] for s in samples]
    attrs = [s[2] for s in samples]
    res = checker.score(imgs, attrs, shuffled=True)
    assert res["object"] >= 0.98 and res["image"] >= 0.97, res
    assert res["color"] == 1.0
    # attributes of another image: far below (chance for a random object is 1/216)
    assert res["shuffled"]["object"] < 0.15, res["shuffled"]
    assert res["shuffled"]["color"] < 0.5
    # robust to JPEG and a mild blur
    for name, f in (("jpeg75", _jpeg), ("blur", lambda im: im.filter(ImageFilter.GaussianBlur(1.0))),
                    ("jpeg+blur", lambda im: _jpeg(im).filter(ImageFilter.GaussianBlur(0.7)))):
        r = checker.score([f(im) for im in imgs], attrs)
        assert r["object"] >= 0.98, (name, r)
    # captions work as targets too
    assert checker.score(imgs[:30], [s[1] for s in samples[:30]])["object"] >= 0.98


def test_checker_noise_and_blank_images_score_zero():
    rng = np.random.default_rng(0)
    attrs = [s[2] for s in _samples(40, 64)]
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in attrs]
    assert checker.score(noise, attrs)["object"] <= 0.02
    small_noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in attrs]
    assert checker.score(small_noise, attrs)["object"] <= 0.02
    blank = [Image.new("RGB", (64, 64), (248, 248, 246))] * len(attrs)
    r = checker.score(blank, attrs)
    assert r["color"] == 0.0 and r["object"] == 0.0


def test_checker_judges_each_attribute():
    img = synth.render([ObjectSpec("red", "circle", "top_left"), ObjectSpec("blue", "square", "bottom_right")], 64)
    [r] = checker.check(img, [ObjectSpec("red", "circle", "top_left")])
    assert r.ok and r.found["shape"] == "circle"
    [r] = checker.check(img, [ObjectSpec("red", "triangle", "top_left")])
    assert r.color and not r.shape and r.position and not r.ok
    [r] = checker.check(img, [ObjectSpec("red", "circle", "center")])
    assert r.color and r.shape and not r.position
    [r] = checker.check(img, [ObjectSpec("green", "circle", "top_left")])
    assert not r.color and not r.ok and r.found is None
    # arrays of any size and dtype work
    arr = np.asarray(synth.render([ObjectSpec("yellow", "rectangle", "left")], 200))
    assert checker.check(arr, "左侧有一个黄色的长方形")[0].ok
    assert checker.check(arr.astype(np.float32) / 255.0, "左侧有一个黄色的长方形")[0].ok
    wide = Image.fromarray(arr).resize((120, 60))
    assert checker.check(wide, [ObjectSpec("yellow", "rectangle", "left")])[0].color
    with pytest.raises(ValueError):
        checker.check(img, "一只猫")


def test_checker_counts_unparseable_captions_as_wrong():
    samples = _samples(10, 32)
    texts = [s[1] for s in samples]
    texts[0] = "一只猫"
    r = checker.score([s[0] for s in samples], texts)
    assert r["unparsed"] == 1 and r["image"] == pytest.approx(0.9)


@pytest.mark.parametrize("size", [32, 64])
def test_check_video_direction(size):
    clips = [synth.make_video_sample(i, size) for i in range(60)]
    res = checker.score([c[0] for c in clips], [c[2] for c in clips], shuffled=True)
    assert res["direction"] >= 0.98 and res["object"] >= 0.98, res
    assert res["shuffled"]["object"] < 0.15
    rev = checker.score([c[0][::-1] for c in clips], [c[2] for c in clips])
    assert rev["direction"] <= 0.02
    blurred = [[f.filter(ImageFilter.GaussianBlur(1.0)) for f in c[0]] for c in clips]
    assert checker.score(blurred, [c[1] for c in clips])["object"] >= 0.98
    still = [[c[0][0]] * len(c[0]) for c in clips]
    assert checker.score(still, [c[2] for c in clips])["direction"] <= 0.02


def test_score_captions():
    refs = [synth.make_sample(i, 8)[2] for i in range(50)]
    texts = [synth.caption(r, "en") for r in refs]
    r = checker.score_captions(texts, refs)
    assert r["parsed"] == 1.0 and r["object"] == 1.0 and r["caption"] == 1.0
    shuffled = checker.score_captions(texts[1:] + texts[:1], refs)
    assert shuffled["object"] < 0.2
    r = checker.score_captions(["一只猫"] * 50, refs)
    assert r["parsed"] == 0.0 and r["object"] == 0.0
    vids = [synth.sample_video_attrs(i) for i in range(20)]
    r = checker.score_captions([synth.video_caption(v) for v in vids], vids)
    assert r["direction"] == 1.0 and r["caption"] == 1.0
