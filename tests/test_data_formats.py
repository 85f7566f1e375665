"""Every data layout (CSV with a header, JSONL, WebDataset shards, Parquet, folders) read through ``open_source``:
good rows, bad rows as ``file:row: reason``, equal two-rank sharding with uneven shards, exact resume."""
from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tuwen.data import formats
from tuwen.data.formats import StreamingRows, expand_braces, shard_plan
from tuwen.data.images import load_image
from tuwen.data.tables import BadRow, RowDataset, open_source
from tuwen.errors import TuwenError


def png(color, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
CAPS = ["红色", "绿色", "蓝色", "黄色", "青色"]


@pytest.fixture(autouse=True)
def _reset_options():
    formats.set_reader_options(table_format=None, separator=None, image_key=None, caption_key=None, img_root=None)
    yield
    formats.set_reader_options(table_format=None, separator=None, image_key=None, caption_key=None, img_root=None)


def write_images(d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    names = []
    for k, c in enumerate(COLORS):
        (d / f"{k}.png").write_bytes(png(c))
        names.append(f"imgs/{k}.png")
    return names


def write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for field, data in s.items():
                if field == "__key__":
                    continue
                data = data if isinstance(data, bytes) else data.encode()
                ti = tarfile.TarInfo(f"{s['__key__']}.{field}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def first_pixel(row, col="imgbase64"):
    return tuple(load_image(row[col], 8)[0, 0])


def test_brace_expansion():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a;b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_csv_open_clip_layout_with_relative_paths_and_quotes(tmp_path):
    names = write_images(tmp_path / "imgs")
    lines = ["filepath,title"] + [f'{n},"{c}, 好吃"' for n, c in zip(names, CAPS)]
    lines[2] = f'{names[1]},"多行\n标题"'  # a quoted newline stays inside the record
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = open_source(str(tmp_path / "train.csv"), None, text_col="text", image_col="imgbase64")
    assert len(src) == 5
    r = src.row(0)
    assert r["title"] == "红色, 好吃" and r["text"] == "红色, 好吃" and first_pixel(r) == COLORS[0]
    assert src.row(1)["text"] == "多行\n标题"
    assert src.location(2) == (str(tmp_path / "train.csv"), 5)  # line numbers count the quoted newline
    assert first_pixel(src.row(4)) == COLORS[4]


def test_csv_flags_chosen_columns_separator_and_img_root(tmp_path):
    write_images(tmp_path / "pics")
    (tmp_path / "d.csv").write_text("a;b;c\nx;0.png;红\ny;1.png;绿\n", encoding="utf-8")
    formats.set_reader_options(separator=";", image_key="b", caption_key="c", img_root=str(tmp_path / "pics"))
    src = open_source(str(tmp_path / "d.csv"), None, text_col="text", image_col="imgbase64")
    r = src.row(1)
    assert r["text"] == "绿" and first_pixel(r) == COLORS[1]
    formats.set_reader_options(caption_key="nope")
    with pytest.raises(TuwenError, match="--csv-caption-key 'nope' is not a column"):
        open_source(str(tmp_path / "d.csv"), None)


def test_tsv_with_header_via_table_format(tmp_path):
    b64 = base64.b64encode(png(COLORS[2])).decode()
    (tmp_path / "t.tsv").write_text(f"title\tfilepath\n\"蓝\t{b64}\n", encoding="utf-8")
    with pytest.raises(TuwenError, match="--input_schema is required"):
        open_source(str(tmp_path / "t.tsv"), None)
    formats.set_reader_options(table_format="csv")
    src = open_source(str(tmp_path / "t.tsv"), None, text_col="text", image_col="imgbase64")
    assert src.row(0)["text"] == '"蓝' and first_pixel(src.row(0)) == COLORS[2]


def test_csv_bad_rows_name_file_and_line(tmp_path):
    write_images(tmp_path / "imgs")
    (tmp_path / "b.csv").write_text("filepath,title\nimgs/0.png,红\nimgs/1.png\nhttp://x/a.jpg,网\n"
                                    "imgs/missing.png,无\n", encoding="utf-8")
    src = open_source(str(tmp_path / "b.csv"), None, text_col="text", image_col="imgbase64")
    ds = RowDataset(src, lambda r, i: {"px": load_image(r["imgbase64"], 8)})
    out = [ds[i] for i in range(len(ds))]
    assert not isinstance(out[0], BadRow)
    assert str(out[1]).startswith(f"{tmp_path / 'b.csv'}:3: expected 2 ','-separated fields")
    assert str(out[2]).startswith(f"{tmp_path / 'b.csv'}:4: image is a URL")
    assert str(out[3]).startswith(f"{tmp_path / 'b.csv'}:5: cannot read image file")


def test_csv_header_must_be_a_header(tmp_path):
    b64 = base64.b64encode(png(COLORS[0])).decode()
    (tmp_path / "n.csv").write_text(f"1,红,{b64}\n", encoding="utf-8")
    with pytest.raises(TuwenError, match="is data, not a header"):
        open_source(str(tmp_path / "n.csv"), None)


def test_jsonl_dalle_layout_and_bad_lines(tmp_path):
    names = write_images(tmp_path / "imgs")
    lines = [json.dumps({"filepath": n, "title": c}, ensure_ascii=False) for n, c in zip(names, CAPS)]
    lines[2] = "{not json"
    lines[3] = "[1, 2]"
    lines.insert(1, "")  # blank lines are not rows
    (tmp_path / "DALLE.train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = open_source(str(tmp_path / "DALLE.train.jsonl"), None, text_col="text", image_col="imgbase64")
    assert len(src) == 5
    assert src.row(0)["text"] == "红色" and first_pixel(src.row(0)) == COLORS[0]
    assert str(src.row(2)).startswith(f"{tmp_path / 'DALLE.train.jsonl'}:4: invalid JSON")
    assert str(src.row(3)) == f"{tmp_path / 'DALLE.train.jsonl'}:5: a JSON list, not an object"
    assert src.row(4)["text"] == "青色"


def test_jsonl_default_keys_image_caption_with_base64(tmp_path):
    b64 = base64.b64encode(png(COLORS[3])).decode()
    (tmp_path / "a.jsonl").write_text(json.dumps({"image": b64, "caption": "黄", "id": 7}) + "\n")
    r = open_source(str(tmp_path / "a.jsonl"), None, text_col="text", image_col="imgbase64").row(0)
    assert r["text"] == "黄" and r["idx"] == "7" and first_pixel(r) == COLORS[3]


def make_shards(d: Path, sizes: list[int]) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    n, keys = 0, []
    for s, size in enumerate(sizes):
        samples = []
        for j in range(size):
            key = f"{n:05d}"
            samples.append({"__key__": key, "jpg": png(COLORS[n % 5]), "txt": CAPS[n % 5],
                            "json": json.dumps({"n": n})})
            keys.append(key)
            n += 1
        write_tar(d / f"{s:03d}.tar", samples)
    return keys


def test_webdataset_brace_pattern_good_and_bad_samples(tmp_path):
    make_shards(tmp_path / "shards", [3, 2])
    with tarfile.open(tmp_path / "shards" / "001.tar", "a") as tf:  # a sample without an image, one with bad JSON
        for name, data in (("zz1.txt", "无图".encode()), ("zz2.jpg", png(COLORS[0])), ("zz2.json", b"{bad")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    src = open_source(str(tmp_path / "shards" / "{000..001}.tar"), None, text_col="text", image_col="imgbase64")
    assert len(src) == 7 and src.shard_sizes() == [3, 4]
    r = src.row(4)
    assert r["text"] == CAPS[4] and r["idx"] == "00004" and r["n"] == 4 and first_pixel(r) == COLORS[4]
    assert str(src.row(5)).startswith(f"{tmp_path / 'shards' / '001.tar'}:3: sample 'zz1' has no image")
    assert "invalid JSON" in str(src.row(6)) and ":4:" in str(src.row(6))
    assert len(open_source(str(tmp_path / "shards"), None)) == 7  # a folder of shards


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 3), (3, 2)])
def test_shard_plan_equal_counts_with_uneven_shards(world, workers):
    sizes = [7, 1, 0, 12, 3]
    total = sum(sizes)
    per_rank = -(-total // world)
    seen = []
    for rank in range(world):
        rows = []
        for w in range(workers):
            plan = shard_plan(sizes, rank, world, w, workers, epoch=1, seed=3)
            rows += [(s, r) for s, a, b in plan for r in range(a, b)]
        assert len(rows) == per_rank  # every rank the same number of rows: no DDP hang
        seen += rows
    assert {x for x in seen} == {(s, r) for s, n in enumerate(sizes) for r in range(n)}  # every row read
    assert len(seen) - total == per_rank * world - total  # only the wrap-around padding repeats
    assert shard_plan(sizes, 0, world, epoch=1, seed=3) != shard_plan(sizes, 0, world, epoch=2, seed=3)


def test_streaming_rows_two_ranks_and_exact_resume(tmp_path):
    make_shards(tmp_path / "s", [5, 1, 3])
    src = open_source(str(tmp_path / "s" / "{000..002}.tar"), None)
    ranks = [StreamingRows(src, rank=r, world=2, seed=1) for r in range(2)]
    a, b = [[row["idx"] for row in s] for s in ranks]
    assert len(a) == len(b) == 5 and set(a) | set(b) == {f"{i:05d}" for i in range(9)}
    ranks[0].set_epoch(0, start=3)
    assert [row["idx"] for row in ranks[0]] == a[3:]
    ranks[0].set_epoch(0)
    assert list(ranks[0].indices(0, 2)) + list(ranks[0].indices(1, 2)) == list(ranks[0].indices())


@pytest.fixture
def parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    imgs = [png(c) for c in COLORS] + [b"", b"not an image"]
    caps = CAPS + ["空", "坏"]
    tbl = pa.table({"key": [f"k{i}" for i in range(7)], "image": pa.array(imgs, pa.binary()), "caption": caps})
    pq.write_table(tbl, tmp_path / "d.parquet", row_group_size=3)
    return tmp_path / "d.parquet"


def test_parquet_bytes_and_bad_rows(parquet_file):
    src = open_source(str(parquet_file), None, text_col="text", image_col="imgbase64")
    assert len(src) == 7
    r = src.row(4)
    assert r["text"] == "青色" and r["idx"] == "k4" and first_pixel(r) == COLORS[4]
    assert str(src.row(5)) == f"{parquet_file}:6: image is empty (0 bytes)"
    ds = RowDataset(src, lambda r, i: {"px": load_image(r["imgbase64"], 8)})
    assert str(ds[6]).startswith(f"{parquet_file}:7: undecodable image")
    assert [src.row(i)["idx"] for i in (6, 0, 3)] == ["k6", "k0", "k3"]  # random access over row groups


def test_parquet_missing_pyarrow_is_a_clear_error(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(TuwenError, match=r"pip install 'tuwen\[parquet\]'"):
        open_source(str(tmp_path / "x.parquet"), None)


def test_image_folder_without_captions_for_image_only_work(tmp_path):
    write_images(tmp_path / "imgs")
    src = open_source(str(tmp_path / "imgs"), None, image_col="imgbase64", require_text=False)
    assert len(src) == 5 and first_pixel(src.row(2)) == COLORS[2]


def _trainer_rows(src, n_steps, resume_dir=None, stop=None):
    """The rows a trainer would see: EpochSampler over the source, two ranks, resumed at ``stop``."""
    from tuwen.training.trainer import EpochSampler
    seen = {}
    for rank in range(2):
        s = EpochSampler(len(src), shuffle=True, seed=5, rank=rank, world=2)
        s.set_epoch(1)
        full = [src.row(i)["idx"] for i in s]
        s.set_epoch(1, start=stop)
        resumed = [src.row(i)["idx"] for i in s]
        assert resumed == full[stop:]
        seen[rank] = full
    return seen


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "webdataset", "parquet"])
def test_every_format_shards_evenly_and_resumes_exactly_in_the_trainer_sampler(tmp_path, fmt):
    names = write_images(tmp_path / "imgs")
    rows = [(f"r{i}", names[i % 5], CAPS[i % 5]) for i in range(11)]  # 11 rows: uneven over 2 ranks
    if fmt == "csv":
        path = tmp_path / "d.csv"
        path.write_text("idx,filepath,title\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows), encoding="utf-8")
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"idx": a, "filepath": b, "title": c}) + "\n" for a, b, c in rows))
    elif fmt == "webdataset":
        (tmp_path / "s").mkdir()
        write_tar(tmp_path / "s" / "0.tar", [{"__key__": a, "png": (tmp_path / b).read_bytes(), "txt": c}
                                            for a, b, c in rows[:8]])
        write_tar(tmp_path / "s" / "1.tar", [{"__key__": a, "png": (tmp_path / b).read_bytes(), "txt": c}
                                            for a, b, c in rows[8:]])
        path = tmp_path / "s" / "{0..1}.tar"
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"idx": [r[0] for r in rows], "image": [(tmp_path / r[1]).read_bytes() for r in rows],
                                 "caption": [r[2] for r in rows]}), path, row_group_size=4)
    src = open_source(str(path), None, text_col="text", image_col="imgbase64")
    assert len(src) == 11
    seen = _trainer_rows(src, 0, stop=2)
    assert len(seen[0]) == len(seen[1]) == 6
    assert set(seen[0]) | set(seen[1]) == {r[0] for r in rows}
    r = src.row(3)
    assert r["text"] == CAPS[3] and first_pixel(r) == COLORS[3]
