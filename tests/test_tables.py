"""Table and folder readers: byte-order marks, caption-less image folders."""
from __future__ import annotations

from PIL import Image

from tuwen.data.tables import BadRow, Table, open_source


def test_utf8_bom_is_not_part_of_the_first_idx(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_bytes("\ufeffa1\t红色\n\ufeffa2\t蓝色\n".encode("utf-8"))
    t = Table(p, "idx:str:1,text:str:1")
    assert t.row(0) == {"idx": "a1", "text": "红色"}
    assert t.row(1)["idx"] == "\ufeffa2"  # only the file's first bytes are a BOM


def test_image_folder_without_captions(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"im{i}.png")
    strict = open_source(str(tmp_path), None)
    assert all(isinstance(strict.row(i), BadRow) for i in range(len(strict)))
    src = open_source(str(tmp_path), None, require_text=False)
    rows = [src.row(i) for i in range(len(src))]
    assert [r["idx"] for r in rows] == ["im0", "im1", "im2"] and all(r["text"] == "" for r in rows)
