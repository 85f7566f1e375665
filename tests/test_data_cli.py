"""``tuwen data synth | validate | score``."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from tuwen.cli import main
from tuwen.data import synth
from tuwen.data.images import encode_png_b64
from tuwen.data.tables import Table

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _png_b64(seed=0, size=32) -> str:
    return encode_png_b64(synth.make_sample(seed, size)[0])


# ----------------------------------------------------------------------------------------------- synth

def test_synth_writes_tables_that_read_back(tmp_path, capsys):
    out = tmp_path / "syn"
    rc, text, _ = run(capsys, "data", "synth", "--out", out, "--n", 200, "--size", 32, "--seed", 1, "--preview")
    assert rc == 0
    assert "train.tsv" in text and "180 rows" in text and "--input_schema " + SCHEMA in text
    t = Table(f"{out}/train.tsv,{out}/val.tsv", SCHEMA)
    assert len(t) == 190
    row = t.row(0)
    assert synth.parse_caption(row["text"]) is not None
    assert Image.open(io.BytesIO(base64.b64decode(row["imgbase64"]))).size == (32, 32)
    assert (out / "preview.png").exists() and (out / "test_prompts.tsv").exists()
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["counts"]["test"] == 10 and meta["seed"] == 1
    rc, text, _ = run(capsys, "data", "validate", f"{out}/train.tsv,{out}/val.tsv,{out}/test.tsv",
                      "--input_schema", SCHEMA, "--first_sequence", "text", "--second_sequence", "imgbase64")
    assert rc == 0, text
    assert "200 rows, 200 good, 0 bad" in text and "32×32 (200)" in text
    # same seed → byte-identical; English, JPEG, holdout, video variants run
    out2 = tmp_path / "syn2"
    assert run(capsys, "data", "synth", "--out", out2, "--n", 200, "--size", 32, "--seed", 1)[0] == 0
    assert (out / "train.tsv").read_bytes() == (out2 / "train.tsv").read_bytes()
    rc, text, _ = run(capsys, "data", "synth", "--out", tmp_path / "en", "--n", 40, "--size", 32, "--lang", "en",
                      "--format", "jpeg", "--holdout", "red:circle", "--plain_captions")
    assert rc == 0 and "holdout.tsv" in text and "red circle" in text
    en_prompts = (tmp_path / "en" / "test_prompts.tsv").read_text(encoding="utf-8").splitlines()
    assert en_prompts and all(line.split("\t")[1].startswith("a ") for line in en_prompts)
    rc, text, _ = run(capsys, "data", "synth", "--out", tmp_path / "vid", "--n", 20, "--size", 32, "--video",
                      "--frame_num", 3)
    assert rc == 0 and "3-frame clips" in text
    rc, text, _ = run(capsys, "data", "validate", tmp_path / "vid" / "train.tsv", "--input_schema",
                      "idx:str:1,imgbase64:str:1,text:str:1", "--first_sequence", "imgbase64",
                      "--second_sequence", "text")
    assert rc == 0 and "frames per row: 3 (18)" in text


def test_synth_usage_errors(tmp_path, capsys):
    rc, _, err = run(capsys, "data", "synth", "--out", tmp_path / "x", "--n", 0)
    assert rc == 2 and "--n" in err
    rc, _, err = run(capsys, "data", "synth", "--out", tmp_path / "x", "--holdout", "red:hexagon")
    assert rc == 2 and "--holdout" in err
    rc, _, err = run(capsys, "data", "synth", "--out", tmp_path / "x", "--splits", "0.9,x")
    assert rc == 2 and "--splits" in err
    (tmp_path / "file").write_text("x")
    rc, _, err = run(capsys, "data", "synth", "--out", tmp_path / "file")
    assert rc == 2 and "not a folder" in err
    rc, text, _ = run(capsys, "data")
    assert rc == 1 and "synth" in text


# ----------------------------------------------------------------------------------------------- validate

@pytest.fixture
def bad_table(tmp_path):
    good = _png_b64(1)
    png = base64.b64decode(good)
    truncated = base64.b64encode(png[: len(png) // 2]).decode()
    lines = [
        f"0\t上方有一个红色的圆形\t{good}".encode(),                    # line 1 good
        "1\t下方有一个蓝色的正方形\t!!not*base64!!".encode(),            # line 2 bad base64
        f"2\t中间有一个绿色的三角形\t{truncated}".encode(),              # line 3 truncated image
        "3\tonly two columns".encode(),                                  # line 4 wrong column count
        f"4\t \t{good}".encode(),                                        # line 5 empty text
        b"5\t\xff\xfe broken\t" + good.encode(),                         # line 6 invalid UTF-8
        b"",                                                             # line 7 blank: not a row
        f"6\t左侧有一个黄色的长方形\t{good}".encode(),                  # line 8 good
        f"7\t右侧有一个紫色的圆形\t{base64.b64encode(b'not an image at all').decode()}".encode(),  # 9
    ]
    p = tmp_path / "bad.tsv"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_validate_reports_every_bad_row(bad_table, capsys):
    rc, text, _ = run(capsys, "data", "validate", bad_table, "--input_schema", SCHEMA,
                      "--first_sequence", "text", "--second_sequence", "imgbase64")
    assert rc == 1
    assert "8 rows, 2 good, 6 bad" in text
    f = str(bad_table)
    expect = {2: "base64", 3: "truncated", 4: "expected 3 tab-separated columns", 5: "'text' is empty",
              6: "invalid UTF-8", 9: "undecodable image"}
    for line, reason in expect.items():
        hits = [ln for ln in text.splitlines() if ln.strip().startswith(f"{f}:{line}:")]
        assert hits and reason in hits[0], (line, reason, text)
    assert f"{f}:1:" not in text and f"{f}:8:" not in text
    # all bad rows are counted even when fewer are listed
    rc, text, _ = run(capsys, "data", "validate", bad_table, "--input_schema", SCHEMA, "--max_listed", 2)
    assert rc == 1 and "6 bad" in text and "and 4 more" in text
    assert f"{f}:2:" in text and f"{f}:3:" in text and f"{f}:4:" not in text


def test_validate_strict_stops_at_first(bad_table, capsys):
    rc, text, _ = run(capsys, "data", "validate", bad_table, "--input_schema", SCHEMA, "--strict")
    assert rc == 1
    assert f"{bad_table}:2:" in text and f"{bad_table}:3:" not in text and "--strict" in text


def test_validate_image_column_detection(tmp_path, capsys):
    good = _png_b64(2)
    p = tmp_path / "t.tsv"
    p.write_text(f"a\tpic\tcap\n1\t{good}\thello\n2\tnot-an-image-but-long-enough-to-look-like-base64-"
                 f"{'A' * 80}\tworld\n3\t{good}\t\n", encoding="utf-8")
    # the 2nd column is detected from its values; the header line is skipped
    rc, text, _ = run(capsys, "data", "validate", p, "--input_schema", "id:str:1,pic:str:1,cap:str:1",
                      "--first_sequence", "pic", "--second_sequence", "cap", "--skip_first_line")
    assert rc == 1 and "image columns (decoded): pic" in text
    assert f"{p}:3: column 'pic'" in text and f"{p}:4: column 'cap' is empty" in text
    # --image_columns overrides; an unknown column is a usage error
    rc, text, _ = run(capsys, "data", "validate", p, "--input_schema", "id:str:1,pic:str:1,cap:str:1",
                      "--skip_first_line", "--image_columns", "pic", "--text_columns", "cap")
    assert rc == 1 and "3 rows, 1 good, 2 bad" in text
    rc, _, err = run(capsys, "data", "validate", p, "--input_schema", "id:str:1,pic:str:1,cap:str:1",
                     "--image_columns", "nope")
    assert rc == 2 and "--image_columns" in err


def test_validate_video_frames_and_usage_errors(tmp_path, capsys):
    frames = [_png_b64(i) for i in range(3)]
    bad = frames[:1] + ["@@@"] + frames[2:]
    p = tmp_path / "v.tsv"
    p.write_text(f"0\t{json.dumps(frames)}\t一个红色的圆形从左向右移动\n"
                 f"1\t{json.dumps(bad)}\t一个红色的圆形从左向右移动\n"
                 f"2\t[broken json\t一个红色的圆形从左向右移动\n", encoding="utf-8")
    rc, text, _ = run(capsys, "data", "validate", p, "--input_schema", "idx:str:1,imgbase64:str:1,text:str:1")
    assert rc == 1
    assert f"{p}:2: column 'imgbase64' frame 1: bad base64" in text
    assert f"{p}:3: column 'imgbase64'" in text
    rc, _, err = run(capsys, "data", "validate", tmp_path / "missing.tsv", "--input_schema", SCHEMA)
    assert rc == 2 and "does not exist" in err
    rc, _, err = run(capsys, "data", "validate", p)
    assert rc == 2 and "--input_schema" in err
    rc, _, err = run(capsys, "data", "validate", p, "--input_schema", "idx:str:1,img:blob:1")
    assert rc == 2 and "blob" in err
    rc, _, err = run(capsys, "data", "validate", p, "--input_schema", SCHEMA, "--first_sequence", "caption")
    assert rc == 2 and "--first_sequence" in err


def test_validate_image_folder(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        img, text, _ = synth.make_sample(i, 32)
        img.save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(text, encoding="utf-8")
    synth.make_sample(9, 32)[0].save(d / "nocaption.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "broken.txt").write_text("下方有一个红色的圆形", encoding="utf-8")
    (d / "empty.png").write_bytes((d / "0.png").read_bytes())
    (d / "empty.txt").write_text("\n", encoding="utf-8")
    rc, text, _ = run(capsys, "data", "validate", d)
    assert rc == 1
    assert "6 rows, 3 good, 3 bad" in text
    assert "nocaption" in text and "broken.jpg" in text and "'text' is empty" in text


# ----------------------------------------------------------------------------------------------- score

def test_score_predict_outputs_and_folders(tmp_path, capsys):
    rows = []
    for i in range(12):
        _, text, attrs = synth.make_sample(100 + i, 64)
        imgs = [synth.render(attrs, 64), synth.render(attrs, 64, rng=i)]
        if i % 4 == 0:  # a wrong second candidate
            imgs[1] = synth.render([{"color": "green" if attrs["objects"][0]["color"] != "green" else "red",
                                     "shape": "circle", "position": "center"}], 64)
        rows.append(f"{i}\t{text}\t{json.dumps([encode_png_b64(im) for im in imgs])}")
    rows.append("12\t一只猫\t" + json.dumps([_png_b64(0)]))
    p = tmp_path / "outputs.tsv"
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    rc, text, _ = run(capsys, "data", "score", p)
    assert rc == 0
    assert "scored 24 images" in text and "object" in text and "best of n" in text
    assert "caption not in the synthetic vocabulary" in text
    rc, text, _ = run(capsys, "data", "score", p, "--json")
    res = json.loads(text)
    assert res["n_images"] == 24 and res["best_of_n"] == 1.0
    assert 0.8 < res["object"] < 1.0 and res["shuffled"]["object"] < 0.3
    assert res["chance"]["color"] == pytest.approx(1 / 6)

    # a synthetic TSV scored against its attributes (the `checker` alias)
    out = tmp_path / "syn"
    synth.write_dataset(out, n=60, size=32, seed=0, workers=1)
    rc, text, _ = run(capsys, "data", "checker", out / "test.tsv", "--attributes", out / "test.attributes.jsonl",
                      "--json")
    assert rc == 0 and json.loads(text)["object"] == 1.0

    # clips
    synth.write_dataset(tmp_path / "vid", n=20, size=32, seed=0, video=True, workers=1)
    rc, text, _ = run(capsys, "data", "score", tmp_path / "vid" / "train.tsv")
    assert rc == 0 and "clips" in text and "direction" in text

    # a folder: name.png + name.txt, or name_K.png with --prompts
    d = tmp_path / "gen"
    d.mkdir()
    prompts = []
    for i in range(4):
        img, text, _ = synth.make_sample(200 + i, 64)
        if i < 2:
            img.save(d / f"{i}.png")
            (d / f"{i}.txt").write_text(text, encoding="utf-8")
        else:
            img.save(d / f"p{i}_0.png")
            prompts.append(f"p{i}\t{text}")
    (tmp_path / "prompts.tsv").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    rc, text, _ = run(capsys, "data", "score", d, "--prompts", tmp_path / "prompts.tsv", "--json")
    assert rc == 0 and json.loads(text)["n_images"] == 4 and json.loads(text)["object"] == 1.0
    rc, text, _ = run(capsys, "data", "score", d)
    assert rc == 0 and "no caption for p2_0.png" in text

    rc, _, err = run(capsys, "data", "score", tmp_path / "nope.tsv")
    assert rc == 2 and "does not exist" in err
