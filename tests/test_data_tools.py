"""``tuwen data clean|split|convert|stats`` and the course project's flags (open_clip, DALLE-pytorch, launcher)."""
from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from tuwen.cli import build_parser, main
from tuwen.data import formats
from tuwen.data.tables import open_source


@pytest.fixture(autouse=True)
def _reset_options():
    yield
    formats.set_reader_options(table_format=None, separator=None, image_key=None, caption_key=None, img_root=None)


DIRT = [  # (caption, image size or None for a broken file, rule that removes it)
    ("红烧肉真好吃", (64, 64), None),
    ("奶油蛋糕", (200, 50), "aspect_ratio"),
    ("面条" * 20, (64, 64), "text_too_long"),
    ("牛肉面#特价", (64, 64), "drop_pattern"),
    ("一辆红色汽车", (64, 64), "no_keyword"),
    ("一碗米饭", (20, 20), "image_too_small"),
    ("饺子", (64, 64), None),
    ("饺子", (64, 64), "duplicate"),
    ("", (64, 64), "empty_text"),
    ("包子", None, "bad_image"),
    ("鸡蛋面", (96, 64), None),
]


@pytest.fixture
def wukong(tmp_path):
    (tmp_path / "imgs").mkdir()
    lines = ["filepath,title"]
    for k, (text, size, _) in enumerate(DIRT):
        p = tmp_path / "imgs" / f"{k}.jpg"
        if size:
            Image.new("RGB", size, ((6 if k == 7 else k) * 20, 40, 0)).save(p, quality=95)
        else:
            p.write_bytes(b"not a jpeg")
        lines.append(f"imgs/{k}.jpg,{text}")
    lines.append("imgs/x.jpg")  # a row with a missing field
    (tmp_path / "w.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "food.txt").write_text("肉\n蛋糕\n面\n米饭\n饺子\n包子\n", encoding="utf-8")
    return tmp_path


def test_clean_removes_each_kind_of_dirt_and_reports_it(wukong, capsys):
    out = wukong / "clean.tsv"
    rc = main(["data", "clean", str(wukong / "w.csv"), "--out", str(out), "--keywords", str(wukong / "food.txt"),
               "--max_text_len", "32", "--drop_pattern", "[#@]", "--max_aspect", "3", "--min_size", "32",
               "--dedupe", "--report", str(wukong / "rep.json")])
    assert rc == 0
    rep = json.loads((wukong / "rep.json").read_text())
    expected = {r for _, _, r in DIRT if r} | {"bad_row"}
    assert set(rep["removed"]) == expected and all(v == 1 for v in rep["removed"].values())
    assert rep["rows"] == 12 and rep["kept"] == 3
    assert rep["examples"]["bad_row"][0].startswith(f"{wukong / 'w.csv'}:13:")
    printed = capsys.readouterr().out
    assert "12 rows read, 3 kept" in printed and "image_too_small" in printed
    src = open_source(str(out), "idx:str:1,text:str:1,imgbase64:str:1")
    assert [src.row(i)["text"] for i in range(len(src))] == ["红烧肉真好吃", "饺子", "鸡蛋面"]


def test_split_9_to_1_in_the_input_format_and_grouped(wukong, tmp_path, capsys):
    lines = ["filepath,title,shop"] + [f"imgs/{k % 3}.jpg,菜{k},s{k % 7}" for k in range(40)]
    (wukong / "many.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["data", "split", str(wukong / "many.csv"), "--ratio", "9:1", "--out", str(tmp_path / "sp")]) == 0
    tr = open_source(str(tmp_path / "sp" / "train.csv"), None)
    va = open_source(str(tmp_path / "sp" / "val.csv"), None)
    assert (len(tr), len(va)) == (36, 4)
    assert {tr.row(i)["title"] for i in range(36)} | {va.row(i)["title"] for i in range(4)} == {f"菜{k}" for k in range(40)}
    assert va.row(0)["shop"].startswith("s") and va.row(0)["image"].exists()  # paths still resolve
    # the same seed gives the same split
    main(["data", "split", str(wukong / "many.csv"), "--ratio", "9:1", "--out", str(tmp_path / "sp2")])
    assert (tmp_path / "sp" / "val.csv").read_text() == (tmp_path / "sp2" / "val.csv").read_text()
    main(["data", "split", str(wukong / "many.csv"), "--ratio", "0.8", "--by", "shop", "--out", str(tmp_path / "g")])
    tr = open_source(str(tmp_path / "g" / "train.csv"), None)
    va = open_source(str(tmp_path / "g" / "val.csv"), None)
    shops_tr = {tr.row(i)["shop"] for i in range(len(tr))}
    shops_va = {va.row(i)["shop"] for i in range(len(va))}
    assert shops_tr and shops_va and not shops_tr & shops_va  # grouped: no shop on both sides


def test_split_tsv_copies_lines_exactly(tmp_path):
    lines = [f"{k}\t文本{k}\tAAAA" for k in range(20)]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    main(["data", "split", str(tmp_path / "t.tsv"), "--input_schema", "idx,text,imgbase64", "--out",
          str(tmp_path / "o")])
    got = (tmp_path / "o" / "train.tsv").read_text().splitlines() + (tmp_path / "o" / "val.tsv").read_text().splitlines()
    assert sorted(got) == sorted(lines) and len((tmp_path / "o" / "val.tsv").read_text().splitlines()) == 2


@pytest.mark.parametrize("chain", [("folder", "webdataset", "parquet", "jsonl", "csv", "tsv")])
def test_convert_round_trip_through_every_format(wukong, tmp_path, chain):
    pytest.importorskip("pyarrow")
    good = wukong / "good"
    good.mkdir()
    for k in (0, 6, 10):
        (good / f"{k}.jpg").write_bytes((wukong / "imgs" / f"{k}.jpg").read_bytes())
        (good / f"{k}.txt").write_text(DIRT[k][0], encoding="utf-8")
    names = {"webdataset": str(tmp_path / "s.tar"), "parquet": str(tmp_path / "d.parquet"),
             "jsonl": str(tmp_path / "d.jsonl"), "csv": str(tmp_path / "d.csv"), "tsv": str(tmp_path / "d.tsv")}
    prev = str(good)
    for fmt in chain[1:]:
        extra = ["--shard_size", "2"] if fmt == "webdataset" else []
        assert main(["data", "convert", prev, names[fmt], *extra]) == 0
        prev = names[fmt] if fmt != "webdataset" else str(tmp_path / "s-{000000..000001}.tar")
    src = open_source(names["tsv"], "idx:str:1,text:str:1,imgbase64:str:1")
    rows = [src.row(i) for i in range(len(src))]
    assert [r["idx"] for r in rows] == ["0", "10", "6"] and [r["text"] for r in rows] == ["红烧肉真好吃", "鸡蛋面", "饺子"]
    import base64
    assert base64.b64decode(rows[0]["imgbase64"]) == (wukong / "imgs" / "0.jpg").read_bytes()  # bytes not re-encoded


def test_stats_prints_histograms_and_writes_a_plot(wukong, tmp_path, capsys):
    plot = tmp_path / "s.png"
    assert main(["data", "stats", str(wukong / "w.csv"), "--plot", str(plot), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rows"] == 12 and st["unreadable_rows"] == 1 and st["unreadable_images"] == 1
    assert st["duplicate_images"] == 1 and st["aspect_ratio"][">3"] == 1
    assert Image.open(plot).size[0] > 100


# ----------------------------------------------------------------------------------------------- flags

def _all_parsers(p: argparse.ArgumentParser):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                yield from _all_parsers(sp)


def test_no_parser_matches_flag_prefixes():
    from tuwen.cli.easynlp import build_parser as easynlp_parser
    parsers = list(_all_parsers(build_parser())) + [easynlp_parser()]
    assert len(parsers) > 20 and all(p.allow_abbrev is False for p in parsers)


def test_open_clip_flags_on_the_clip_app():
    from tuwen.cli.easynlp import parse
    a = parse(["--mode=train", "--app_name=clip", "--train-data", "t.csv", "--val-data", "v.csv",
               "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", ",", "--batch-size=64",
               "--lr", "1e-4", "--wd=0.1", "--epochs=30", "--workers=4", "--warmup", "100", "--save-frequency", "10",
               "--model", "RN50", "--dataset-type", "csv"])
    assert (a.tables, a.micro_batch_size, a.learning_rate, a.weight_decay, a.epoch_num, a.num_workers) == \
        ("t.csv,v.csv", 64, 1e-4, 0.1, 30, 4)
    assert (a.warmup_steps, a.save_checkpoint_epochs, a.user_defined_parameters, a.table_format) == \
        (100, 10, "vision=RN50", "csv")
    o = formats.reader_options()
    assert (o.image_key, o.caption_key, o.separator) == ("filepath", "title", ",")


def test_lr_is_never_taken_for_lr_schedule(capsys):
    from tuwen.cli.easynlp import parse
    assert parse(["--mode=train", "--app_name=clip", "--lr=1e-4"]).lr_schedule == "linear"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["vq", "train", "--tables", "x", "--lr_sch", "cosine"])


def test_train_dalle_flags_on_text2image():
    from tuwen.cli.easynlp import parse
    a = parse(["--mode=train", "--app_name=text2image_generation", "--image_text_folder=./DALLE.train.jsonl",
               "--vae_path=my vae", "--chinese", "--amp", "--checkpoint_dir=out"])
    assert a.tables == "./DALLE.train.jsonl" and a.use_amp and a.user_defined_parameters == "vqgan_ckpt_path='my vae'"
    from tuwen.errors import TuwenError
    with pytest.raises(TuwenError, match="--vae_path is for"):
        parse(["--mode=train", "--app_name=clip", "--vae_path=v"])


def test_train_vae_flags_map_to_vqgan_settings():
    from tuwen.cli.vq import dalle_vae_overrides
    from tuwen.models.vqgan import PRESETS, VQGANConfig
    ns = build_parser().parse_args(["vq", "train", "--image_folder", "imgs", "--image_size", "64", "--num_tokens",
                                    "1024", "--emb_dim", "256", "--num_layers", "3", "--batch_size", "64"])
    assert ns.size == 64 and ns.micro_batch_size == 64 and ns.image_folder == "imgs"
    ov = dalle_vae_overrides(ns, PRESETS["tiny"], {}, 64)
    cfg = VQGANConfig.preset("tiny", resolution=64, **ov)
    assert cfg.n_embed == 1024 and cfg.embed_dim == 256
    assert len(cfg.ch_mult) == 4 and cfg.attn_resolutions == [8]  # 3 down-sampling levels: 64 px → 8×8 codes


def test_launcher_local_rank_flag_is_accepted(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rc = main(["--local-rank=0", "--mode=train", "--app_name=clip", "--tables", "/nonexistent.csv",
               "--checkpoint_dir", "/tmp/x"])
    err = capsys.readouterr().err
    assert rc == 2 and "unrecognized" not in err and "does not exist" in err
    import os
    assert os.environ["LOCAL_RANK"] == "0"
    monkeypatch.delenv("LOCAL_RANK")
    assert main(["data", "stats", "--local_rank", "1", "/nonexistent.csv"]) == 2
    assert os.environ["LOCAL_RANK"] == "1"


def test_open_clip_warmup_and_save_frequency_reach_the_trainer(tmp_path):
    from tuwen.cli.common import train_args_from
    from tuwen.cli.easynlp import parse
    a = parse(["--mode=train", "--app_name=clip", "--warmup", "10", "--save-frequency", "2",
               f"--checkpoint_dir={tmp_path}"])
    t = train_args_from(a, default_lr=1e-4)
    assert (t.warmup_steps, t.save_checkpoint_epochs) == (10, 2)
    from tuwen.errors import TuwenError
    with pytest.raises(TuwenError, match="--save-frequency 0: must be ≥ 1"):
        train_args_from(parse(["--mode=train", "--app_name=clip", "--save-frequency", "0",
                               f"--checkpoint_dir={tmp_path}"]), default_lr=1e-4)


def test_vq_train_on_a_caption_less_folder_with_train_vae_flags(tmp_path):
    (tmp_path / "imgs").mkdir()
    for k in range(4):
        Image.new("RGB", (40, 40), (60 * k, 20, 200 - 40 * k)).save(tmp_path / "imgs" / f"{k}.png")
    rc = main(["vq", "train", "--image_folder", str(tmp_path / "imgs"), "--image_size", "16", "--num_tokens", "32",
               "--emb_dim", "8", "--num_layers", "2", "--batch_size", "2", "--max_steps", "1", "--checkpoint_dir",
               str(tmp_path / "vq"), "--no_tensorboard", "--no_progress", "--arch", "ch=32", "z_channels=8"])
    assert rc == 0
    cfg = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert (cfg["n_embed"], cfg["embed_dim"], len(cfg["ch_mult"]), cfg["resolution"]) == (32, 8, 3, 16)
