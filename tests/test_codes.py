"""``tuwen vq`` CLI (import / encode / decode / tokenize) and the code-shard format (``tuwen.data.codes``)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tuwen.cli import main
from tuwen.data.codes import CodeShards, code_dtype, tokenize_source
from tuwen.data.images import load_image
from tuwen.data.tables import Table
from tuwen.models.vqgan import VQGAN, VQGANConfig

SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny taming-layout checkpoint, 7 small PNGs and an EasyNLP TSV with two bad rows."""
    d = tmp_path_factory.mktemp("vq")
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("tiny", resolution=32, attn_resolutions=[4])).eval()
    sd = dict(vq.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    torch.save({"state_dict": sd, "global_step": 3}, d / "last.ckpt")
    rng = np.random.default_rng(0)
    files, lines = [], []
    for i in range(7):
        small = (rng.random((3, 4, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small).resize((48, 40), Image.BILINEAR)
        p = d / f"img{i}.png"
        img.save(p)
        files.append(p)
        lines.append(f"id{i}\t第{i}张图 picture {i}\t{base64.b64encode(_png_bytes(img)).decode()}")
    good_idx = [f"id{i}" for i in range(7)]
    lines.insert(2, "bad1\tnot an image\t!!!not-base64!!!")                         # file line 3
    truncated = base64.b64encode(_png_bytes(Image.open(files[0]))[:60]).decode()
    lines.insert(5, f"bad2\ttruncated\t{truncated}")                                # file line 6
    (d / "t.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"dir": d, "vq": vq, "files": files, "tsv": d / "t.tsv", "good": good_idx}


def _codes_of(vq, files) -> np.ndarray:
    arr = np.stack([load_image(p.read_bytes(), 32) for p in files])
    return vq.encode(arr).flatten(1).numpy()


def _close(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to one uint8 level (conv kernels round differently for different batch sizes)."""
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1


def _tokenize(ws, out, *extra) -> int:
    return main(["vq", "tokenize", "--model", str(ws["dir"] / "model"), "--tables", str(ws["tsv"]),
                 "--input_schema", SCHEMA, "--first_sequence", "text", "--second_sequence", "imgbase64",
                 "--out", str(out), "--batch_size", "2", "--shard_size", "3", "--num_workers", "0", *extra])


@pytest.fixture(scope="module")
def model_dir(ws):
    assert main(["vq", "import", str(ws["dir"] / "last.ckpt"), str(ws["dir"] / "model"), "--resolution", "32"]) == 0
    return ws["dir"] / "model"


def test_import_encode_decode(ws, model_dir, tmp_path, capsys):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "vqgan" and cfg["resolution"] == 32 and cfg["attn_resolutions"] == [4]
    ref = _codes_of(ws["vq"], ws["files"])

    # image files → .npy (+ ids); a file given on the command line that does not exist is an error naming it,
    # before anything is written (issue 12 item 4)
    out = tmp_path / "c.npy"
    files = [str(p) for p in ws["files"][:3]]
    assert main(["vq", "encode", "--model", str(model_dir), *files, str(tmp_path / "missing.png"), "--out", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "missing.png: no such image file" in err and not out.exists()
    assert main(["vq", "encode", "--model", str(model_dir), *files, "--out", str(out), "--device", "cpu"]) == 0
    arr = np.load(out)
    assert arr.shape == (3, 4, 4) and arr.dtype == np.uint16
    assert np.array_equal(arr.reshape(3, -1), ref[:3])
    assert (tmp_path / "c.ids.txt").read_text().split() == ["img0.png", "img1.png", "img2.png"]

    # TSV → .tsv codes, bad rows skipped with file:line
    out_tsv = tmp_path / "c.tsv"
    assert main(["vq", "encode", "--model", str(model_dir), "--tables", str(ws["tsv"]), "--input_schema", SCHEMA,
                 "--second_sequence", "imgbase64", "--out", str(out_tsv), "--num_workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{ws['tsv']}:3: bad base64" in err and f"{ws['tsv']}:6:" in err
    rows = [ln.split("\t") for ln in out_tsv.read_text().splitlines()]
    assert [r[0] for r in rows] == ws["good"]
    assert np.array_equal(np.array([[int(c) for c in r[1].split()] for r in rows]), ref)

    # decode → PNGs named after the ids, equal to the API's decode
    dec = tmp_path / "dec"
    assert main(["vq", "decode", "--model", str(model_dir), "--codes", str(out), "--out", str(dec)]) == 0
    assert sorted(p.name for p in dec.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    api = ws["vq"].decode_to_pil(torch.from_numpy(ref[:1]))[0]
    assert _close(Image.open(dec / "img0.png"), api)
    dec2 = tmp_path / "dec2"
    assert main(["vq", "decode", "--model", str(model_dir), "--codes", str(out_tsv), "--out", str(dec2),
                 "--limit", "2"]) == 0
    assert sorted(p.name for p in dec2.iterdir()) == ["id0.png", "id1.png"]
    assert _close(Image.open(dec2 / "id0.png"), api)
    # the taming checkpoint itself also works as --model
    assert main(["vq", "encode", "--model", str(ws["dir"] / "last.ckpt"), str(ws["files"][0]),
                 "--out", str(tmp_path / "d.tsv")]) == 0


def test_cli_errors(ws, model_dir, tmp_path, capsys):
    assert main(["vq", "encode", "--model", str(model_dir), str(ws["files"][0]), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["vq", "encode", "--model", str(tmp_path / "nope"), str(ws["files"][0]),
                 "--out", str(tmp_path / "x.npy")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["vq", "import", str(ws["tsv"]), str(tmp_path / "m")]) == 2
    assert "t.tsv" in capsys.readouterr().err
    assert main(["vq", "tokenize", "--model", str(model_dir), "--tables", str(ws["tsv"]), "--input_schema", SCHEMA,
                 "--second_sequence", "image", "--out", str(tmp_path / "tok")]) == 2
    assert "--second_sequence='image' is not a column" in capsys.readouterr().err
    (tmp_path / "codes.npy").write_bytes(b"junk")
    assert main(["vq", "decode", "--model", str(model_dir), "--codes", str(tmp_path / "codes.npy"),
                 "--out", str(tmp_path / "o")]) == 2


def test_tokenize_reader_bad_rows_and_strict(ws, model_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    assert _tokenize(ws, out) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad row(s) of 9" in err and f"{ws['tsv']}:3: bad base64" in err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 7 and meta["num_shards"] == 3 and meta["grid"] == [4, 4] and meta["n_embed"] == 512
    assert meta["dtype"] == "uint16" and meta["bad_rows"] == 2 and meta["source"]["tables"] == [str(ws["tsv"])]
    assert [s["count"] for s in meta["shards"]] == [2, 2, 3]  # rows 0-2 (one bad), 3-5 (one bad), 6-8
    ds = CodeShards(out)
    assert len(ds) == 7 and ds.grid == (4, 4)
    item = ds[3]
    assert item["idx"] == "id3" and item["text"] == "第3张图 picture 3"
    assert item["codes"].dtype == torch.long and item["codes"].shape == (16,)
    ref = _codes_of(ws["vq"], ws["files"])
    assert np.array_equal(np.stack([ds[i]["codes"].numpy() for i in range(len(ds))]), ref)
    assert [ds[i]["idx"] for i in range(7)] == ws["good"] and ds[-1]["idx"] == "id6"
    with pytest.raises(IndexError):
        ds[7]
    # usable from DataLoader workers-style pickling
    import pickle
    assert pickle.loads(pickle.dumps(ds))[2]["idx"] == "id2"
    # decode straight from the folder
    assert main(["vq", "decode", "--model", str(model_dir), "--codes", str(out), "--out", str(tmp_path / "d"),
                 "--limit", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["id0.png", "id1.png", "id2.png"]

    capsys.readouterr()
    assert _tokenize(ws, tmp_path / "strict", "--strict") == 2
    assert f"{ws['tsv']}:3: bad base64" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "meta.json").exists()


def test_tokenize_resume(ws, model_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    assert _tokenize(ws, out) == 0
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    # a shard whose run died after writing its .npy but before its .json is redone; the others are kept
    (out / "shard-00001.json").unlink()
    (out / "shard-00001.npy").write_bytes(b"half written")
    capsys.readouterr()
    assert _tokenize(ws, out) == 0
    assert "2 shard(s) already complete" in capsys.readouterr().err
    for name in ("shard-00000.npy", "shard-00002.npy", "shard-00000.tsv"):
        assert (out / name).stat().st_mtime_ns == files[name][0], name
    for name in ("shard-00001.npy", "shard-00001.tsv", "meta.json"):
        assert (out / name).read_bytes() == files[name][1], name
    # different arguments: everything is redone, stale shard files go away
    assert _tokenize(ws, out, "--shard_size", "5") == 0
    assert sorted(p.name for p in out.glob("shard-*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    assert len(CodeShards(out)) == 7
    assert not list(out.glob(".*.tmp"))


def test_tokenize_by_rank_matches_single_process(ws, tmp_path):
    vq = ws["vq"]
    src = Table(str(ws["tsv"]), SCHEMA)
    kw = dict(image_col="imgbase64", text_col="text", batch_size=1, shard_size=2, fingerprint_extra="x",
              log=lambda m: None)
    single = tokenize_source(vq, src, tmp_path / "one", **kw)
    assert tokenize_source(vq, src, tmp_path / "two", rank=1, world=2, **kw) is None
    assert sorted(p.name for p in (tmp_path / "two").glob("*.npy")) == ["shard-00001.npy", "shard-00003.npy"]
    assert not (tmp_path / "two" / "meta.json").exists()
    meta = tokenize_source(vq, src, tmp_path / "two", rank=0, world=2, **kw)
    assert meta["count"] == single["count"] == 7 and meta["_report"].count == 2
    a, b = CodeShards(tmp_path / "one"), CodeShards(tmp_path / "two")
    for i in range(7):
        assert a[i]["idx"] == b[i]["idx"] and torch.equal(a[i]["codes"], b[i]["codes"])


def test_code_dtype_and_missing_meta(tmp_path):
    assert code_dtype(16384) == np.uint16 and code_dtype(65535) == np.uint16 and code_dtype(65536) == np.int32
    from tuwen.errors import TuwenError
    with pytest.raises(TuwenError, match="not a tokenized data set"):
        CodeShards(tmp_path)
    np.save(tmp_path / "shard-00000.npy", np.zeros((1, 4), np.uint16))
    with pytest.raises(TuwenError, match="has not finished"):
        CodeShards(tmp_path)
