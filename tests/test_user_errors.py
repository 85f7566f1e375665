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
