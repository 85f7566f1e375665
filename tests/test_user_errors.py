"""Mistakes a user can make end in one line naming the flag, before any expensive work."""
from __future__ import annotations

import pytest

from tuwen.cli import main


@pytest.fixture(scope="module")
def synth_tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(d), "--size", "32", "--n", "40", "--workers", "0"]) == 0
    return d


SCHEMA = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1"


@pytest.mark.parametrize("app,first,second,flag", [
    ("text2image_generation", "imgbase64", "text", "--first_sequence='imgbase64'"),  # T2I: first = text
    ("clip", "imgbase64", "text", "--first_sequence='imgbase64'"),                   # CLIP: first = text
    ("image2text_generation", "text", "imgbase64", "--second_sequence='imgbase64'"),  # I2T: first = image
])
def test_swapped_column_flags_stop_before_training(synth_tables, tmp_path, capsys, app, first, second, flag):
    tables = f"{synth_tables / 'train.tsv'},{synth_tables / 'val.tsv'}"
    rc = main(["--mode=train", f"--app_name={app}", f"--tables={tables}", SCHEMA, f"--first_sequence={first}",
               f"--second_sequence={second}", f"--checkpoint_dir={tmp_path / 'ck'}",
               "--user_defined_parameters=vqgan_ckpt_path=none" if app == "text2image_generation" else
               "--epoch_num=1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "holds base64 images, not text" in err and flag in err and "swap" in err
    assert not (tmp_path / "ck" / "vocab.txt").exists()


def test_validate_applies_the_task_rules(tmp_path, capsys):
    """A JSON list of frames passes a plain validate (it decodes) but is a video row for text→image."""
    import base64
    import io
    import json

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="PNG")
    one = base64.b64encode(buf.getvalue()).decode()
    t = tmp_path / "t.tsv"
    t.write_text(f"a\t红色\t{one}\nb\t视频\t{json.dumps([one, one])}\nc\t\t{one}\n", encoding="utf-8")
    args = ["data", "validate", str(t), SCHEMA, "--first_sequence=text", "--second_sequence=imgbase64"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"{t}:3:" in out and f"{t}:2:" not in out
    assert main(args + ["--app_name=text2image_generation"]) == 1
    out = capsys.readouterr().out
    assert f"{t}:2: column 'imgbase64': a list of 2 frames (a video row)" in out and f"{t}:3: empty text" in out
    assert main(["data", "validate", str(t), SCHEMA, "--first_sequence=imgbase64", "--second_sequence=text",
                 "--app_name=video2text_generation"]) == 1
    out = capsys.readouterr().out
    assert f"{t}:2:" not in out and f"{t}:3: empty text" in out


def test_weights_dtype_is_not_silently_ignored_by_other_apps(tmp_path, capsys):
    rc = main(["--mode=predict", "--app_name=image2text_generation", f"--tables={tmp_path / 'x.tsv'}",
               "--weights_dtype", "int8", f"--checkpoint_dir={tmp_path}"])
    assert rc == 2 and "--weights_dtype int8: low-precision weights apply to text→image" in capsys.readouterr().err
