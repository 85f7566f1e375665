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


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    import io
    import resource

    import pytest

    from tuwen.data.images import ImageDecodeError, load_image, max_image_pixels, open_image, set_max_image_pixels

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # a few KB that would decode to 400 M pixels
    data = buf.getvalue()
    assert len(data) < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageDecodeError, match=r"20000×20000 = 400,000,000 pixels.*--max_image_pixels"):
        open_image(data)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: nothing was decoded
    # a large JPEG whose draft-scaled size fits is still read (the DCT scales it down)
    jbuf = io.BytesIO()
    Image.new("RGB", (4800, 4800), (200, 10, 10)).save(jbuf, format="JPEG")
    assert load_image(jbuf.getvalue(), 64).shape == (64, 64, 3)
    old = max_image_pixels()
    try:
        set_max_image_pixels(100)
        with pytest.raises(ImageDecodeError, match="above the limit of 100"):
            open_image(jbuf.getvalue())
    finally:
        set_max_image_pixels(old)


def test_cli_reports_bombs_as_bad_rows_and_the_flag_raises_the_limit(tmp_path, capsys):
    import base64
    import io

    from tuwen.cli import main
    from tuwen.data.images import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    t = tmp_path / "t.tsv"
    t.write_text(f"a\t红色\t{b64(Image.new('RGB', (16, 16)))}\nb\t蓝色\t{b64(Image.new('1', (5000, 4000)))}\n")
    schema = ["--input_schema", "idx:str:1,text:str:1,imgbase64:str:1"]
    try:
        main(["data", "validate", str(t), *schema])
        err = capsys.readouterr()
        assert f"{t}:2" in err.out + err.err and "5000×4000 = 20,000,000 pixels" in err.out + err.err
        main(["data", "validate", str(t), *schema, "--max_image_pixels", "30000000"])
        err = capsys.readouterr()
        assert "above the limit" not in err.out + err.err and "5000×4000 (1)" in err.out + err.err
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
