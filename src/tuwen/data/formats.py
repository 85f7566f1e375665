"""Every data layout as a ``RowSource``: CSV/TSV with a header, JSONL, WebDataset tar shards and Parquet.

All readers are *map-style* (random access by row number through a small index built at open time: byte offsets
of records, tar member offsets, Parquet row groups), so the trainer's sampler shards them over ranks with equal
counts (no DDP hang with uneven shards) and ``--resume auto`` resumes at the exact row, as for EasyNLP TSVs.
``shard_plan`` / ``StreamingRows`` give the same guarantees to a sequential (iterable) reader.

Picked by extension (``.csv``, ``.jsonl``/``.ndjson``, ``.tar`` and brace patterns ``shards/{00000..00099}.tar``,
``.parquet``; a folder of ``.tar``/``.parquet`` files) or by ``--table_format``; ``.tsv``/``.txt`` stay EasyNLP
headerless tables (``--input_schema``) unless ``--table_format csv`` says they have a header.

Rows keep their own keys and also get the names a task asks for (``text``, ``imgbase64``/``image``, ``idx``),
filled from the caption key (``--csv-caption-key``; else ``caption``, ``text``, ``title``, ``txt``) and the image
key (``--csv-img-key``; else ``image``, ``filepath``, ``jpg``, ``png``, …). An image value is kept as bytes, a
base64 string, or a ``Path`` (relative to the file's folder or ``--img_root_dir``); a URL is a bad row (offline).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import TuwenError
from .images import IMAGE_EXTS, looks_like_base64_image
from .rows import BadRow, LineIndex, RowSource, _index_lines

csv.field_size_limit(2 ** 31 - 1)  # base64 images are far above the 128 KiB default

FORMATS = ("tsv", "csv", "jsonl", "webdataset", "parquet", "folder")
TEXT_KEYS = ("caption", "text", "title", "txt", "sentence", "prompt")
IMAGE_KEYS = ("image", "filepath", "imgbase64", "img", "jpg", "jpeg", "png", "webp", "bmp", "image_path", "path",
              "file_name", "url")
ID_KEYS = ("idx", "id", "key", "__key__", "image_id")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


# ----------------------------------------------------------------------------------------------- options

@dataclasses.dataclass
class ReaderOptions:
    """Set once by the command line (``configure_from_args``); every reader copies them when it is opened."""

    table_format: str | None = None   # force one of FORMATS for every input
    separator: str | None = None      # CSV field separator (default: tab if the header has one, else comma)
    image_key: str | None = None      # --csv-img-key
    caption_key: str | None = None    # --csv-caption-key
    img_root: str | None = None       # --img_root_dir: relative image paths are relative to this


_options = ReaderOptions()


def reader_options() -> ReaderOptions:
    return dataclasses.replace(_options)


def set_reader_options(**kw) -> None:
    global _options
    for k in kw:
        if not hasattr(_options, k):
            raise TypeError(k)
    if kw.get("table_format") and kw["table_format"] not in FORMATS:
        raise TuwenError(f"--table_format {kw['table_format']!r}: use one of {', '.join(FORMATS)}")
    _options = dataclasses.replace(_options, **kw)


def configure_from_args(ns) -> None:
    """Apply the reader flags of a parsed command line (those it has)."""
    kw = {}
    for attr, key in (("table_format", "table_format"), ("csv_separator", "separator"),
                      ("csv_img_key", "image_key"), ("csv_caption_key", "caption_key"), ("img_root_dir", "img_root")):
        if getattr(ns, attr, None) is not None:
            kw[key] = getattr(ns, attr)
    if "separator" in kw:
        kw["separator"] = {"\\t": "\t", "tab": "\t", "TAB": "\t", "comma": ","}.get(kw["separator"], kw["separator"])
        if len(kw["separator"]) != 1:
            raise TuwenError(f"--csv-separator {ns.csv_separator!r}: one character (or \\t)")
    set_reader_options(**kw)


# ----------------------------------------------------------------------------------------------- detection

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` → a/000.tar, a/001.tar, a/002.tar (zero padding kept); ``{a;b}`` lists too."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    if m.group(1) is not None:
        lo, hi = int(m.group(1)), int(m.group(2))
        width = len(m.group(1)) if m.group(1).startswith("0") else 0
        items = [str(v).zfill(width) for v in range(lo, hi + 1)]
    else:
        items = re.split(r"[;|]", m.group(3))
    return [p for it in items for p in expand_braces(head + it + tail)]


def detect_format(path: str, table_format: str | None = None) -> str:
    """Which reader reads ``path`` (an entry of ``--tables``)."""
    if table_format:
        return table_format
    p = Path(expand_braces(path)[0]).expanduser()
    if p.is_dir():
        names = [q.suffix.lower() for q in p.iterdir() if q.is_file()]
        if names and all(s == ".tar" for s in names if s not in (".json", ".txt", ".idx")) and ".tar" in names:
            return "webdataset"
        if ".parquet" in names and not any(s in IMAGE_EXTS for s in names):
            return "parquet"
        return "folder"
    suffix = p.suffix.lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".tar": "webdataset",
            ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "tsv")


def is_self_describing(path: str, table_format: str | None = None) -> bool:
    """True for inputs that name their own columns (no ``--input_schema`` needed)."""
    return detect_format(path, table_format or _options.table_format) != "tsv"


def expand_paths(path: str, exts: tuple[str, ...], flag: str) -> list[Path]:
    """A file, a brace pattern or a folder (its files with these extensions, sorted)."""
    out: list[Path] = []
    for s in expand_braces(path):
        p = Path(s).expanduser()
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in exts)
        elif not p.exists():
            raise TuwenError(f"{flag}: {p} does not exist")
        else:
            out.append(p)
    if not out:
        raise TuwenError(f"{flag}: no {'/'.join(exts)} files in {path}")
    return out


# ----------------------------------------------------------------------------------------------- columns

def image_value(v, base: Path | None):
    """An image field → bytes, base64 string, ``Path`` or a list of them (video frames). ValueError if unusable."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        if not len(v):
            raise ValueError("image is empty (0 bytes)")
        return bytes(v)
    if isinstance(v, dict):  # Hugging Face / Parquet image struct {"bytes": ..., "path": ...}
        if v.get("bytes"):
            return bytes(v["bytes"])
        if v.get("path"):
            return image_value(v["path"], base)
        raise ValueError("image struct has neither bytes nor path")
    if isinstance(v, (list, tuple)):
        return [image_value(x, base) for x in v]
    if v is None:
        raise ValueError("no image (empty field)")
    s = str(v).strip()
    if not s:
        raise ValueError("no image (empty field)")
    if re.match(r"^[a-z][a-z0-9+.-]*://", s, re.I) and not s.lower().startswith("file://"):
        raise ValueError(f"image is a URL ({s[:60]}); tuwen never downloads: fetch the images first and give file "
                         f"paths, base64 or bytes")
    if s.startswith("[") and s.endswith("]"):  # a JSON list of frames
        try:
            frames = json.loads(s)
        except ValueError:
            frames = None
        if isinstance(frames, list):
            return [image_value(x, base) for x in frames]
    if looks_like_base64_image(s):
        return s
    s = s[7:] if s.lower().startswith("file://") else s
    p = Path(s).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _pick(keys: Sequence[str], wanted: str | None, preferred: Sequence[str]) -> str | None:
    if wanted:
        return wanted if wanted in keys else None
    low = {k.lower(): k for k in keys}
    return next((low[k] for k in preferred if k in low), None)


class _Named:
    """Fills the names a task asks for (``text_col``, ``image_col``, ``idx_col``) from the keys a file has."""

    def _setup_names(self, keys: Sequence[str], where: str, idx_col: str, text_col: str, image_col: str,
                     opts: ReaderOptions, need_text: bool = False) -> None:
        self.keys = list(keys)
        self.idx_col, self.text_col, self.image_col = idx_col, text_col, image_col
        if opts.caption_key and opts.caption_key not in self.keys:
            raise TuwenError(f"--csv-caption-key {opts.caption_key!r} is not a column of {where} "
                             f"(columns: {', '.join(self.keys) or 'none'})")
        if opts.image_key and opts.image_key not in self.keys:
            raise TuwenError(f"--csv-img-key {opts.image_key!r} is not a column of {where} "
                             f"(columns: {', '.join(self.keys) or 'none'})")
        # a task's default names (text / imgbase64 / image) are filled from what the file calls them; a name the
        # user chose (--first_sequence title) must exist as it is
        self.text_key = text_col if text_col in self.keys else (
            _pick(self.keys, opts.caption_key, TEXT_KEYS) if text_col in TEXT_KEYS or opts.caption_key else None)
        self.image_key = image_col if image_col in self.keys else (
            _pick(self.keys, opts.image_key, IMAGE_KEYS) if image_col in IMAGE_KEYS or opts.image_key else None)
        if opts.caption_key:
            self.text_key = opts.caption_key
        if opts.image_key:
            self.image_key = opts.image_key
        self.id_key = idx_col if idx_col in self.keys else _pick(self.keys, None, ID_KEYS)
        extra = [c for c, k in ((idx_col, True), (text_col, self.text_key), (image_col, self.image_key)) if k]
        self.columns = self.keys + [c for c in extra if c not in self.keys]
        self.image_keys = {k for k in (self.image_key,) if k}

    def _named(self, rec: dict, i: int, base: Path | None) -> dict:
        out = dict(rec)
        for k in self.image_keys:
            out[k] = image_value(rec.get(k), base)
        if self.image_key and self.image_col not in rec:
            out[self.image_col] = out[self.image_key]
        if self.text_key and self.text_col not in rec:
            t = rec.get(self.text_key)
            out[self.text_col] = "" if t is None else str(t)
        if self.idx_col not in rec:
            out[self.idx_col] = str(rec[self.id_key]) if self.id_key and rec.get(self.id_key) is not None else str(i)
        return out


# ----------------------------------------------------------------------------------------------- CSV

def _index_records(path: Path, quoted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, first line) of every non-blank record. With ``quoted``, a newline inside double quotes does not
    end a record (RFC 4180: the record ends at a newline preceded by an even number of quote characters)."""
    size = path.stat().st_size
    nls, quotes = [], []
    with open(path, "rb") as f:
        pos = 0
        while buf := f.read(1 << 24):
            a = np.frombuffer(buf, dtype=np.uint8)
            nls.append(np.flatnonzero(a == 10).astype(np.int64) + pos)
            if quoted:
                quotes.append(np.flatnonzero(a == 34).astype(np.int64) + pos)
            pos += len(buf)
    nl = np.concatenate(nls) if nls else np.zeros(0, np.int64)
    line_of_nl = np.arange(len(nl), dtype=np.int64)
    if quoted and quotes:
        q = np.concatenate(quotes)
        keep = np.searchsorted(q, nl) % 2 == 0
        nl, line_of_nl = nl[keep], line_of_nl[keep]
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    lines = np.concatenate([[1], line_of_nl + 2]).astype(np.int64)
    keep = (ends - starts > 1) | ((ends - starts == 1) & (starts < size))
    starts, ends, lines = starts[keep], ends[keep], lines[keep]
    if len(starts):  # one-byte records that are only "\r" are blank
        one = np.flatnonzero(ends - starts == 1)
        if len(one):
            with open(path, "rb") as f:
                blank = []
                for j in one:
                    f.seek(starts[j])
                    blank.append(f.read(1) == b"\r")
            drop = one[np.asarray(blank, bool)]
            mask = np.ones(len(starts), bool)
            mask[drop] = False
            starts, ends, lines = starts[mask], ends[mask], lines[mask]
    return starts, ends, lines


class _ByteRecords:
    """Open file handles per process (forked DataLoader workers do not share file positions)."""

    def _read_range(self, k: int, start: int, end: int) -> bytes:
        if getattr(self, "_pid", None) != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = open(self.paths[k], "rb")
        f.seek(start)
        return f.read(end - start)

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_handles"], st["_pid"] = {}, None
        return st

    def _open_file(self, path, opts: ReaderOptions, flag: str) -> Path:
        """One text file: ``self.paths``, ``self.base`` (image paths are relative to it), checked to exist."""
        self.paths = [Path(path).expanduser()]
        p = self.paths[0]
        if not p.is_file():
            raise TuwenError(f"{flag}: {p} does not exist" if not p.exists() else f"{flag}: {p} is not a file")
        self.base = Path(opts.img_root).expanduser() if opts.img_root else p.parent
        return p


class CsvTable(_ByteRecords, _Named, RowSource):
    """A CSV (or TSV) file whose first record names the columns (open_clip's ``filepath,title``)."""

    def __init__(self, path: str | os.PathLike, idx_col: str = "idx", text_col: str = "text",
                 image_col: str = "image", opts: ReaderOptions | None = None, flag: str = "--tables"):
        opts = opts or reader_options()
        p = self._open_file(path, opts, flag)
        with open(p, "rb") as f:
            head = f.readline().decode("utf-8", errors="replace").lstrip("\ufeff")
        self.sep = opts.separator or ("\t" if "\t" in head else ",")
        self.quoted = self.sep != "\t"  # tab-separated files are split on tabs only (a field may start with ")
        starts, ends, lines = _index_records(p, self.quoted)
        if not len(starts):
            raise TuwenError(f"{flag}: {p} is empty (a CSV needs a header line naming the columns)")
        self._handles, self._pid = {}, os.getpid()
        header = self._fields(self._read_range(0, int(starts[0]), int(ends[0])).decode("utf-8", errors="replace"))
        header = [h.strip().lstrip("\ufeff") for h in header]
        if len(set(header)) != len(header) or not all(header):
            raise TuwenError(f"{p}:{lines[0]}: the header {header!r} has empty or repeated column names")
        if looks_like_base64_image(header[-1]) or any(len(h) > 100 for h in header):
            raise TuwenError(f"{p}:1: the first line is data, not a header naming the columns; add a header "
                             f"(e.g. filepath,title) or read it as an EasyNLP table with --input_schema")
        self.header = header
        size = p.stat().st_size
        self._index = LineIndex(starts[1:], lines[1:], size)      # record starts + line numbers, compact
        self._ends = ends[1:].astype(np.uint32 if size < 2 ** 32 else np.int64)
        self._setup_names(header, str(p), idx_col, text_col, image_col, opts)

    def _fields(self, text: str) -> list[str]:
        text = text.rstrip("\n").rstrip("\r")
        if not self.quoted:
            return text.split(self.sep)
        return next(csv.reader(io.StringIO(text, newline=""), delimiter=self.sep), [])

    def __len__(self) -> int:
        return len(self._index)

    def location(self, i: int) -> tuple[str, int]:
        return str(self.paths[0]), self._index.line(i)

    def row(self, i: int) -> dict | BadRow:
        raw = self._read_range(0, self._index.start(i), int(self._ends[i]))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self.bad(i, f"invalid UTF-8 at byte {e.start}")
        try:
            fields = self._fields(text)
        except csv.Error as e:
            return self.bad(i, f"not valid CSV ({e})")
        if len(fields) != len(self.header):
            name = "tab" if self.sep == "\t" else repr(self.sep)
            return self.bad(i, f"expected {len(self.header)} {name}-separated fields ({','.join(self.header)}), "
                               f"got {len(fields)}")
        try:
            return self._named(dict(zip(self.header, fields)), i, self.base)
        except ValueError as e:
            return self.bad(i, str(e))


# ----------------------------------------------------------------------------------------------- JSONL

class JsonlTable(_ByteRecords, _Named, RowSource):
    """One JSON object a line (DALLE-pytorch / course project ``DALLE.train.jsonl``)."""

    def __init__(self, path: str | os.PathLike, idx_col: str = "idx", text_col: str = "text",
                 image_col: str = "image", opts: ReaderOptions | None = None, flag: str = "--tables"):
        opts = opts or reader_options()
        p = self._open_file(path, opts, flag)
        self._size = p.stat().st_size
        self._index = LineIndex(*_index_lines(p), self._size)     # a line ends where the next begins
        self._handles, self._pid = {}, os.getpid()
        keys: list[str] = []
        for i in range(min(len(self), 50)):  # keys of the first objects
            rec = self._parse(i)
            if isinstance(rec, dict):
                keys += [k for k in rec if k not in keys]
        if not keys and len(self):
            raise TuwenError(f"{p}: no JSON objects in the first lines (one object a line: "
                             f'{{"image": "a.jpg", "caption": "..."}})')
        self._setup_names(keys, str(p), idx_col, text_col, image_col, opts)

    def __len__(self) -> int:
        return len(self._index)

    def location(self, i: int) -> tuple[str, int]:
        return str(self.paths[0]), self._index.line(i)

    def _parse(self, i: int):
        end = self._index.start(i + 1) if i + 1 < len(self._index) else self._size
        raw = self._read_range(0, self._index.start(i), end)
        try:
            rec = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
        except UnicodeDecodeError as e:
            return f"invalid UTF-8 at byte {e.start}"
        except ValueError as e:
            return f"invalid JSON ({e})"
        return rec if isinstance(rec, dict) else f"a JSON {type(rec).__name__}, not an object"

    def row(self, i: int) -> dict | BadRow:
        rec = self._parse(i)
        if isinstance(rec, str):
            return self.bad(i, rec)
        try:
            return self._named(rec, i, self.base)
        except ValueError as e:
            return self.bad(i, str(e))


# ----------------------------------------------------------------------------------------------- WebDataset

def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member path up to the first dot of its file name; the rest is the field."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def index_tar(path: Path) -> tuple[list[str], list[tuple[int, int]], list[str], np.ndarray, np.ndarray]:
    """Scan a tar's headers (member data is skipped, not read).

    Returns (keys, [(first member, member count)] per sample, field name per member, data offset per member,
    size per member)."""
    keys, spans, fields, offs, sizes = [], [], [], [], []
    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                m = tf.next()
                if m is None:
                    break
                tf.members = []  # keep memory bounded: the index below is all we keep
                if not m.isfile() or m.name.split("/")[-1].startswith("."):
                    continue
                key, field = _split_key(m.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                    spans.append((len(fields), 0))
                spans[-1] = (spans[-1][0], spans[-1][1] + 1)
                fields.append(field)
                offs.append(m.offset_data)
                sizes.append(m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TuwenError(f"{path}: not a readable tar file ({e})") from None
    return keys, spans, fields, np.asarray(offs, np.int64), np.asarray(sizes, np.int64)


class WebDataset(_ByteRecords, _Named, RowSource):
    """WebDataset ``.tar`` shards: ``abc.jpg`` + ``abc.txt`` (and/or ``abc.json``) per sample, read by offset."""

    def __init__(self, pattern: str, idx_col: str = "idx", text_col: str = "text", image_col: str = "image",
                 opts: ReaderOptions | None = None, flag: str = "--tables"):
        opts = opts or reader_options()
        self.paths = expand_paths(pattern, (".tar",), flag)
        self._handles, self._pid = {}, os.getpid()
        self.keys_of: list[list[str]] = []
        shard, first, count, fields, offs, sizes, ordinal = [], [], [], [], [], [], []
        base = 0
        for k, p in enumerate(self.paths):
            keys, spans, f, o, s = index_tar(p)
            self.keys_of.append(keys)
            shard += [k] * len(keys)
            first += [base + a for a, _ in spans]
            count += [c for _, c in spans]
            ordinal += list(range(1, len(keys) + 1))
            fields += f
            offs.append(o)
            sizes.append(s)
            base += len(f)
        self._shard = np.asarray(shard, np.int32)
        self._first = np.asarray(first, np.int64)
        self._count = np.asarray(count, np.int32)
        self._ordinal = np.asarray(ordinal, np.int64)
        self._field_names = sorted(set(fields))
        fid = {n: j for j, n in enumerate(self._field_names)}
        self._field = np.asarray([fid[x] for x in fields], np.int16)
        self._off = np.concatenate(offs) if offs else np.zeros(0, np.int64)
        self._size = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        self._sample_start = np.cumsum([0] + [len(k) for k in self.keys_of])
        if not len(self._first):
            raise TuwenError(f"{flag}: {pattern}: no samples in the tar shard(s)")
        # the keys a row has: its fields, plus the keys of its .json (peeked at in the first samples)
        keys = ["__key__"] + [n for n in self._field_names if n != "json"]
        for i in range(min(len(self), 20)):
            rec = self._fields_of(i).get("json")
            if isinstance(rec, dict):
                keys += [k for k in rec if k not in keys]
        self.img_opts = opts
        self._setup_names(keys, pattern, idx_col, text_col, image_col,
                          dataclasses.replace(opts, image_key=None, caption_key=None))
        self.wanted_image = opts.image_key
        self.wanted_text = opts.caption_key

    def __len__(self) -> int:
        return len(self._first)

    def location(self, i: int) -> tuple[str, int]:
        return str(self.paths[int(self._shard[i])]), int(self._ordinal[i])

    def shard_sizes(self) -> list[int]:
        return [len(k) for k in self.keys_of]

    def _fields_of(self, i: int) -> dict[str, Any]:
        k = int(self._shard[i])
        out: dict[str, Any] = {}
        for j in range(int(self._first[i]), int(self._first[i] + self._count[i])):
            name = self._field_names[int(self._field[j])]
            data = self._read_range(k, int(self._off[j]), int(self._off[j] + self._size[j]))
            if name == "json":
                try:
                    out["json"] = json.loads(data.decode("utf-8"))
                except ValueError as e:
                    out["json"] = f"invalid JSON in {self.keys_of[k][int(self._ordinal[i]) - 1]}.json ({e})"
            elif name.split(".")[-1] in WDS_IMAGE_EXTS or name in ("cls", "npy"):
                out[name] = data
            else:
                try:
                    out[name] = data.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    out[name] = data
                    out.setdefault("_error", f"{name}: invalid UTF-8 at byte {e.start}")
        return out

    def row(self, i: int) -> dict | BadRow:
        k = int(self._shard[i])
        key = self.keys_of[k][int(self._ordinal[i]) - 1]
        f = self._fields_of(i)
        meta = f.pop("json", None)
        if isinstance(meta, str):
            return self.bad(i, f"sample {key!r}: {meta}")
        if "_error" in f:
            return self.bad(i, f"sample {key!r}: {f.pop('_error')}")
        rec: dict[str, Any] = {"__key__": key, **(meta if isinstance(meta, dict) else {}), **f}
        img_field = self.wanted_image or next((e for e in f if e.split(".")[-1] in WDS_IMAGE_EXTS), None)
        if img_field is None or img_field not in rec:
            return self.bad(i, f"sample {key!r} has no image ({'/'.join('.' + e for e in WDS_IMAGE_EXTS[:4])}…; "
                               f"it has {', '.join('.' + e for e in f) or 'no files'})")
        txt = rec.get(self.wanted_text) if self.wanted_text else next(
            (rec[t] for t in ("txt", "caption", "text", "title") if isinstance(rec.get(t), str)), None)
        rec[self.image_col] = rec[img_field]
        if self.text_col not in rec or self.wanted_text:
            rec[self.text_col] = "" if txt is None else str(txt)
        rec.setdefault(self.idx_col, key)
        try:
            rec[self.image_col] = image_value(rec[self.image_col], None)
        except ValueError as e:
            return self.bad(i, f"sample {key!r}: {e}")
        return rec


# ----------------------------------------------------------------------------------------------- Parquet

def _pq():
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise TuwenError("reading or writing Parquet needs pyarrow: pip install 'tuwen[parquet]'") from None
    return pq


class ParquetTable(_Named, RowSource):
    """Parquet files (image bytes / path / base64 column + caption column), read one row group at a time.

    Random access reads the row's whole row group (cached: the last ``cache_groups``); write files with small
    row groups (``tuwen data convert`` uses 256 rows) for shuffled training."""

    def __init__(self, pattern: str, idx_col: str = "idx", text_col: str = "text", image_col: str = "image",
                 opts: ReaderOptions | None = None, flag: str = "--tables", cache_groups: int = 4):
        pq = _pq()
        opts = opts or reader_options()
        self.paths = expand_paths(pattern, (".parquet", ".pq"), flag)
        self.base = Path(opts.img_root).expanduser() if opts.img_root else None
        starts, names = [], None
        self._groups: list[tuple[int, int, int]] = []  # (file, group, first row of the group within its file)
        total = 0
        for k, p in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(p).metadata
            except Exception as e:  # pyarrow raises several types for a broken file
                raise TuwenError(f"{flag}: {p} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
            cols = [meta.schema.column(j).path.split(".")[0] for j in range(meta.num_columns)]
            cols = list(dict.fromkeys(cols))
            if names is None:
                names = cols
            elif cols != names:
                raise TuwenError(f"{flag}: {p} has columns {cols}, but {self.paths[0]} has {names}")
            in_file = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    self._groups.append((k, g, in_file))
                    starts.append(total)
                    total += n
                    in_file += n
        self._starts = np.asarray(starts + [total], np.int64)
        self._files: dict[int, Any] = {}
        self._cache: OrderedDict = OrderedDict()
        self.cache_groups = cache_groups
        self._setup_names(names or [], pattern, idx_col, text_col, image_col, opts)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _loc(self, i: int) -> tuple[int, int]:
        g = int(np.searchsorted(self._starts, i, side="right") - 1)
        return g, i - int(self._starts[g])

    def location(self, i: int) -> tuple[str, int]:
        g, j = self._loc(i)
        k, _, first = self._groups[g]
        return str(self.paths[k]), first + j + 1

    def _group(self, g: int):
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        k, rg, _ = self._groups[g]
        if getattr(self, "_pid", None) != os.getpid():
            self._files, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        pf = self._files.get(k)
        if pf is None:
            pf = self._files[k] = _pq().ParquetFile(self.paths[k])
        tbl = pf.read_row_group(rg)
        self._cache[g] = tbl
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return tbl

    def row(self, i: int) -> dict | BadRow:
        g, j = self._loc(i)
        rec = self._group(g).slice(j, 1).to_pylist()[0]
        try:
            return self._named(rec, i, self.base)
        except ValueError as e:
            return self.bad(i, str(e))

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_files"], st["_cache"], st["_pid"] = {}, OrderedDict(), None
        return st


# ----------------------------------------------------------------------------------------------- opening

def open_table(path: str, fmt: str, idx_col: str = "idx", text_col: str = "text", image_col: str = "image",
               flag: str = "--tables") -> RowSource:
    """One ``--tables`` entry in a self-describing format (not EasyNLP TSV, not an image folder)."""
    opts = reader_options()
    cls = {"csv": CsvTable, "jsonl": JsonlTable, "webdataset": WebDataset, "parquet": ParquetTable}.get(fmt)
    if cls is None:
        raise TuwenError(f"--table_format {fmt!r}: use one of {', '.join(FORMATS)}")
    return cls(path, idx_col=idx_col, text_col=text_col, image_col=image_col, opts=opts, flag=flag)


# ----------------------------------------------------------------------------------------------- streaming

def shard_plan(sizes: Sequence[int], rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1,
               epoch: int = 0, seed: int = 0, shuffle_shards: bool = True) -> list[tuple[int, int, int]]:
    """The rows one (rank, DataLoader worker) reads in one epoch, as ``(shard, start, stop)`` ranges.

    Shards are shuffled by (seed, epoch) and concatenated; rank r takes the r-th contiguous slice of
    ``ceil(total / world)`` rows, wrapping around to the start when the total does not divide (like
    ``DistributedSampler``), so **every rank reads the same number of rows** whatever the shard sizes — the
    cause of the DDP hang with uneven WebDataset shards is gone. Within a rank, workers take contiguous slices
    (sizes differ by at most one row). Rows are read sequentially inside each range (streaming-friendly).
    """
    if not 0 <= rank < world or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world}, worker {worker}/{num_workers}")
    order = list(range(len(sizes)))
    if shuffle_shards:
        order = [int(x) for x in np.random.default_rng([seed, epoch]).permutation(len(sizes))]
    total = int(sum(sizes))
    if total == 0:
        return []
    per_rank = -(-total // world)
    lo = rank * per_rank
    # this worker's part of the rank's slice
    w_lo = lo + (per_rank * worker) // num_workers
    w_hi = lo + (per_rank * (worker + 1)) // num_workers
    cum = np.cumsum([0] + [int(sizes[s]) for s in order])
    out: list[tuple[int, int, int]] = []
    pos = w_lo
    while pos < w_hi:
        g = pos % total
        j = int(np.searchsorted(cum, g, side="right") - 1)
        take = min(int(cum[j + 1]) - g, w_hi - pos)
        start = g - int(cum[j])
        out.append((order[j], start, start + take))
        pos += take
    return out


class StreamingRows:
    """An iterable view of a ``RowSource`` with shards (``shard_sizes()``), for ``torch.utils.data.DataLoader``
    as an IterableDataset: every rank yields the same number of rows per epoch, workers split a rank's rows, and
    ``set_epoch(epoch, start)`` skips the first ``start`` rows of this rank (exact mid-epoch resume: the
    position is the count of rows this rank has consumed)."""

    def __init__(self, source: RowSource, rank: int = 0, world: int = 1, seed: int = 0, shuffle_shards: bool = True):
        self.source, self.rank, self.world, self.seed, self.shuffle = source, rank, world, seed, shuffle_shards
        self.sizes = source.shard_sizes() if hasattr(source, "shard_sizes") else [len(source)]
        self._first = np.cumsum([0] + list(self.sizes))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return -(-sum(self.sizes) // self.world)

    def indices(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        plan = shard_plan(self.sizes, self.rank, self.world, 0, 1, self.epoch, self.seed, self.shuffle)
        flat = (int(self._first[s]) + r for s, a, b in plan for r in range(a, b))
        # rows [start:] of this rank, dealt to workers in contiguous blocks
        rows = list(flat)[self.start:] if self.start else list(flat)
        lo, hi = (len(rows) * worker) // num_workers, (len(rows) * (worker + 1)) // num_workers
        return iter(rows[lo:hi])

    def __iter__(self):
        try:
            import torch.utils.data as tud
            info = tud.get_worker_info()
        except ImportError:  # pragma: no cover
            info = None
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in self.indices(w, nw):
            yield self.source.row(i)
