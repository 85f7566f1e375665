"""Writers for every layout ``tuwen.data.formats`` reads (``tuwen data convert|split|clean``).

A row is written as a ``Sample``: key, caption, image (bytes, a base64 string or a ``Path``) and the other fields
of the input (kept, never dropped). Image bytes are copied as they are (no re-encoding). CSV/JSONL outputs keep an
image path as a path (rewritten relative to the output's folder) and bytes as base64; TSV is EasyNLP's
``idx \\t text \\t imgbase64``; WebDataset writes ``key.jpg|png`` + ``key.txt`` (+ ``key.json`` with the other
fields) in shards of ``shard_size`` samples; Parquet writes ``idx, image (binary), caption`` + the other fields in
row groups of ``row_group_size``; a folder gets ``key.ext`` + ``key.txt``. Files appear atomically (written to a
temporary name, renamed on ``close``).
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from ..errors import TuwenError
from .images import b64decode_any

OUT_FORMATS = ("tsv", "csv", "jsonl", "webdataset", "parquet", "folder")
EXT = {"tsv": ".tsv", "csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet", "webdataset": ".tar", "folder": ""}


@dataclasses.dataclass
class Sample:
    key: str
    text: str
    image: Any                       # bytes | base64 str | Path
    fields: dict = dataclasses.field(default_factory=dict)

    def image_bytes(self) -> bytes:
        if isinstance(self.image, (bytes, bytearray)):
            return bytes(self.image)
        if isinstance(self.image, Path):
            try:
                return self.image.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read image file {self.image}: {e.strerror}") from None
        if isinstance(self.image, str):
            return b64decode_any(self.image)
        raise ValueError(f"cannot write an image of type {type(self.image).__name__} (video frame lists are not "
                         f"converted)")


def image_ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data.startswith(b"GIF8"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "img"


def format_of_output(out: str, to: str | None = None) -> str:
    if to:
        if to not in OUT_FORMATS:
            raise TuwenError(f"--to {to!r}: use one of {', '.join(OUT_FORMATS)}")
        return to
    suffix = Path(out).suffix.lower()
    fmt = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
           ".tar": "webdataset", "": "folder"}.get(suffix)
    if fmt is None:
        raise TuwenError(f"{out}: cannot tell the output format from {suffix!r}; name it .tsv .csv .jsonl .parquet "
                         f".tar (WebDataset shards) or a folder, or pass --to")
    return fmt


def safe_key(key: str) -> str:
    """A WebDataset/folder key: no dots (the key ends at the first dot), no path separators."""
    return re.sub(r"[^\w\-]+", "_", str(key), flags=re.UNICODE).strip("_") or "row"


def _one_line(text: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", text)


class Writer:
    """Base: ``write(sample)``, ``close() -> [paths written]``."""

    def __init__(self, out: Path, text_name: str = "caption", image_name: str = "image",
                 field_names: list[str] | None = None):
        self.out = Path(out)
        self.text_name, self.image_name = text_name, image_name
        self.field_names = [f for f in (field_names or []) if f not in (text_name, image_name)]
        self.count = 0
        self.paths: list[Path] = []
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def write(self, s: Sample) -> None:
        raise NotImplementedError

    def close(self) -> list[str]:
        return [str(p) for p in self.paths]

    def _image_ref(self, s: Sample) -> str:
        """CSV/JSONL: a path relative to the output's folder, or base64."""
        if isinstance(s.image, Path):
            return os.path.relpath(s.image.resolve(), self.out.parent.resolve())
        if isinstance(s.image, str):
            return s.image
        return base64.b64encode(s.image_bytes()).decode("ascii")


class _TextFile(Writer):
    def __init__(self, out, **kw):
        super().__init__(out, **kw)
        self.tmp = self.out.with_name(self.out.name + ".part")
        self.f = open(self.tmp, "w", encoding="utf-8", newline="")

    def close(self) -> list[str]:
        self.f.close()
        os.replace(self.tmp, self.out)
        self.paths = [self.out]
        return super().close()


class TsvWriter(_TextFile):
    """EasyNLP ``idx \\t text \\t imgbase64`` (schema idx:str:1,text:str:1,imgbase64:str:1)."""

    def write(self, s: Sample) -> None:
        b64 = s.image if isinstance(s.image, str) else base64.b64encode(s.image_bytes()).decode("ascii")
        self.f.write(f"{_one_line(s.key)}\t{_one_line(s.text)}\t{b64}\n")
        self.count += 1


class CsvWriter(_TextFile):
    def __init__(self, out, sep: str = ",", **kw):
        super().__init__(out, **kw)
        self.w = csv.writer(self.f, delimiter=sep, lineterminator="\n")
        self.w.writerow(self.field_names + [self.image_name, self.text_name])

    def write(self, s: Sample) -> None:
        self.w.writerow([s.fields.get(k, "") for k in self.field_names] + [self._image_ref(s), s.text])
        self.count += 1


class JsonlWriter(_TextFile):
    def write(self, s: Sample) -> None:
        rec = {k: s.fields[k] for k in self.field_names if k in s.fields}
        rec.update({k: v for k, v in s.fields.items() if k not in rec and k not in (self.image_name, self.text_name)})
        rec[self.image_name] = self._image_ref(s)
        rec[self.text_name] = s.text
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.count += 1


class WebDatasetWriter(Writer):
    """``OUT-000000.tar``, ``OUT-000001.tar``, … (OUT given as ``name.tar``) or ``DIR/000000.tar`` (a folder)."""

    def __init__(self, out, shard_size: int = 1000, **kw):
        super().__init__(out, **kw)
        if shard_size < 1:
            raise TuwenError("--shard_size must be ≥ 1")
        self.shard_size = shard_size
        if self.out.suffix.lower() == ".tar":
            self.pattern = str(self.out.with_suffix("")) + "-{:06d}.tar"
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.pattern = str(self.out / "{:06d}.tar")
        self.tf: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.keys: set[str] = set()

    def _add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
        self.tf.addfile(ti, io.BytesIO(data))

    def _finish_shard(self) -> None:
        if self.tf is not None:
            self.tf.close()
            final = Path(str(self.tmp)[:-len(".part")])
            os.replace(self.tmp, final)
            self.paths.append(final)
            self.tf = None

    def write(self, s: Sample) -> None:
        if self.count % self.shard_size == 0:
            self._finish_shard()
            self.tmp = Path(self.pattern.format(len(self.paths)) + ".part")
            self.tf = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        data = s.image_bytes()
        key = safe_key(s.key)
        if key in self.keys:  # keys must be unique for readers that group by key
            key = f"{key}_{self.count}"
        self.keys.add(key)
        self._add(f"{key}.{image_ext(data)}", data)
        self._add(f"{key}.txt", s.text.encode("utf-8"))
        meta = {"idx": s.key, **{k: v for k, v in s.fields.items() if k not in (self.image_name, self.text_name)}}
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self.count += 1

    def close(self) -> list[str]:
        self._finish_shard()
        return super().close()

    def pattern_string(self) -> str:
        """The brace pattern that reads the shards back (``name-{000000..000003}.tar``)."""
        n = len(self.paths)
        return self.pattern.replace("{:06d}", f"{{000000..{n - 1:06d}}}" if n > 1 else "000000")


class ParquetWriter(Writer):
    def __init__(self, out, row_group_size: int = 256, **kw):
        super().__init__(out, **kw)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise TuwenError("writing Parquet needs pyarrow: pip install 'tuwen[parquet]'") from None
        self.pa, self.pq = pa, pq
        self.row_group_size = max(1, row_group_size)
        cols = [("idx", pa.string()), (self.image_name, pa.binary()), (self.text_name, pa.string())]
        cols += [(k, pa.string()) for k in self.field_names if k != "idx"]
        self.schema = pa.schema(cols)
        self.tmp = self.out.with_name(self.out.name + ".part")
        self.w = pq.ParquetWriter(self.tmp, self.schema)
        self.buf: dict[str, list] = {c: [] for c in self.schema.names}

    def _flush(self) -> None:
        if self.buf["idx"]:
            self.w.write_table(self.pa.table(self.buf, schema=self.schema), row_group_size=self.row_group_size)
            self.buf = {c: [] for c in self.schema.names}

    def write(self, s: Sample) -> None:
        self.buf["idx"].append(s.key)
        self.buf[self.image_name].append(s.image_bytes())
        self.buf[self.text_name].append(s.text)
        for k in self.schema.names[3:]:
            v = s.fields.get(k)
            self.buf[k].append(None if v is None else str(v))
        self.count += 1
        if len(self.buf["idx"]) >= self.row_group_size:
            self._flush()

    def close(self) -> list[str]:
        self._flush()
        self.w.close()
        os.replace(self.tmp, self.out)
        self.paths = [self.out]
        return super().close()


class FolderWriter(Writer):
    def __init__(self, out, **kw):
        super().__init__(out, **kw)
        self.out.mkdir(parents=True, exist_ok=True)
        self.keys: set[str] = set()

    def write(self, s: Sample) -> None:
        data = s.image_bytes()
        key = safe_key(s.key)
        if key in self.keys:
            key = f"{key}_{self.count}"
        self.keys.add(key)
        (self.out / f"{key}.{image_ext(data)}").write_bytes(data)
        (self.out / f"{key}.txt").write_text(s.text + "\n", encoding="utf-8")
        self.count += 1

    def close(self) -> list[str]:
        self.paths = [self.out]
        return super().close()


def open_writer(out: str | Path, fmt: str, *, shard_size: int = 1000, row_group_size: int = 256,
                text_name: str = "caption", image_name: str = "image", field_names: list[str] | None = None,
                csv_separator: str = ",") -> Writer:
    kw = dict(text_name=text_name, image_name=image_name, field_names=field_names)
    if fmt == "tsv":
        return TsvWriter(out, **kw)
    if fmt == "csv":
        return CsvWriter(out, sep=csv_separator, **kw)
    if fmt == "jsonl":
        return JsonlWriter(out, **kw)
    if fmt == "webdataset":
        return WebDatasetWriter(out, shard_size=shard_size, **kw)
    if fmt == "parquet":
        return ParquetWriter(out, row_group_size=row_group_size, **kw)
    if fmt == "folder":
        return FolderWriter(out, **kw)
    raise TuwenError(f"unknown output format {fmt!r}; use one of {', '.join(OUT_FORMATS)}")
