"""EasyNLP TSV tables (``idx \\t text \\t base64``) and image folders, streamed through a byte-offset index.

* ``parse_schema("idx:str:1,text:str:1,imgbase64:str:1")`` → columns (``int``/``float`` with len>1 are lists).
* ``Table(paths, schema)``: random access to rows of one or more files without reading them into memory; only
  the start offset of every line is kept (``rows.LineIndex``: 4 bytes a row for a file under 4 GiB, at most 12;
  ``Table.index_nbytes``). Blank lines are not rows.
* ``ImageFolder(dir)``: ``name.jpg`` + ``name.txt`` pairs as rows.
* A row that cannot be used becomes a ``BadRow`` (file, line, reason) instead of an exception; ``BadRowReport``
  counts them and lists the first N. ``--strict`` turns the first one into a ``TuwenError``.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import TuwenError
from .images import IMAGE_EXTS, looks_like_base64_image  # noqa: F401  (IMAGE_EXTS re-exported)
from .rows import _CHUNK, BadRow, LineIndex, RowSource, _index_lines  # noqa: F401  (re-exported: BadRow)

TYPES = {"str": str, "int": int, "float": float}


# ----------------------------------------------------------------------------------------------- schema

@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str = "str"
    length: int = 1


def parse_schema(text: str | Sequence[Column], flag: str = "--input_schema") -> list[Column]:
    """Parse EasyNLP's ``name:type:len,...``; ``name`` alone means ``name:str:1``."""
    if not isinstance(text, str):
        return list(text)
    cols: list[Column] = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        parts = item.split(":")
        if len(parts) > 3:
            raise TuwenError(f"{flag}: {item!r} is not name:type:len")
        name = parts[0].strip()
        typ = parts[1].strip() if len(parts) > 1 and parts[1].strip() else "str"
        if typ not in TYPES:
            raise TuwenError(f"{flag}: column {name!r} has type {typ!r}; use one of str, int, float")
        try:
            length = int(parts[2]) if len(parts) > 2 and parts[2].strip() else 1
        except ValueError:
            raise TuwenError(f"{flag}: column {name!r} has length {parts[2]!r}; expected an integer") from None
        if length < 1:
            raise TuwenError(f"{flag}: column {name!r} has length {length}; must be ≥ 1")
        if not name:
            raise TuwenError(f"{flag}: empty column name in {text!r}")
        if any(c.name == name for c in cols):
            raise TuwenError(f"{flag}: column {name!r} appears twice")
        cols.append(Column(name, typ, length))
    if not cols:
        raise TuwenError(f"{flag}: no columns in {text!r}")
    return cols


def schema_str(cols: Sequence[Column]) -> str:
    return ",".join(f"{c.name}:{c.type}:{c.length}" for c in cols)


def require_columns(cols: Sequence[Column], names: dict[str, str | None]) -> None:
    """Check that flags such as ``--first_sequence`` name columns of the schema."""
    have = [c.name for c in cols]
    for flag, name in names.items():
        if name and name not in have:
            raise TuwenError(f"{flag}={name!r} is not a column of --input_schema ({', '.join(have)})")


# ----------------------------------------------------------------------------------------------- bad rows

class BadRowError(TuwenError):
    """Raised under ``--strict`` at the first bad row."""


class BadRowReport:
    """Counts bad rows and keeps the first ``max_listed`` (sorted by file/line when printed)."""

    def __init__(self, max_listed: int = 20):
        self.max_listed = max_listed
        self.count = 0
        self.listed: list[BadRow] = []
        self._seen: set[tuple[str, int]] = set()

    def add(self, bad: BadRow) -> None:
        key = (bad.file, bad.line)
        if key in self._seen:  # the same row seen again (a later epoch) is one bad row
            return
        self._seen.add(key)
        self.count += 1
        if len(self.listed) < self.max_listed:
            self.listed.append(bad)

    def extend(self, bads: Iterable[BadRow]) -> None:
        for b in bads:
            self.add(b)

    def state(self) -> dict:
        return {"count": self.count, "listed": [dataclasses.astuple(b) for b in self.listed],
                "seen": sorted(self._seen)}

    def load_state(self, state: dict) -> None:
        self.count = state["count"]
        self.listed = [BadRow(*t) for t in state["listed"]]
        self._seen = {tuple(t) for t in state["seen"]}

    def merge_states(self, states: Iterable[dict]) -> None:
        """Combine the reports of several ranks (each row counted once)."""
        for st in states:
            listed = {(b[0], b[1]): BadRow(*b) for b in st["listed"]}
            for key in st["seen"]:
                key = tuple(key)
                if key not in self._seen:
                    self._seen.add(key)
                    self.count += 1
                    if key in listed and len(self.listed) < self.max_listed:
                        self.listed.append(listed[key])

    def summary(self, total: int | None = None) -> str:
        if not self.count:
            return "no bad rows"
        of = f" of {total}" if total else ""
        lines = [f"skipped {self.count} bad row(s){of}:"]
        for b in sorted(self.listed, key=lambda b: (b.file, b.line)):
            lines.append(f"  {b}")
        if self.count > len(self.listed):
            lines.append(f"  … and {self.count - len(self.listed)} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- sources

class Table(RowSource):
    """One or more EasyNLP TSV files as one sequence of rows, read lazily by byte offset."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], schema: str | Sequence[Column],
                 skip_first_line: bool = False, flag: str = "--tables", warn: Callable[[str], None] | None = None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [p for p in str(paths).split(",") if p.strip()]
        self.paths = [Path(p).expanduser() for p in paths]
        if not self.paths:
            raise TuwenError(f"{flag}: no file given")
        self.schema = parse_schema(schema)
        self.columns = [c.name for c in self.schema]
        self.skip_first_line = skip_first_line
        self._index: list[LineIndex] = []       # one a file: byte offset and line number of every row
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
        for k, p in enumerate(self.paths):
            if not p.exists():
                raise TuwenError(f"{flag}: {p} does not exist")
            if p.is_dir():
                raise TuwenError(f"{flag}: {p} is a folder; pass TSV files (or use an image folder where supported)")
            starts, lines = _index_lines(p)
            if skip_first_line and len(starts):
                starts, lines = starts[1:], lines[1:]
            self._index.append(LineIndex(starts, lines, p.stat().st_size))
            if len(starts):
                n = self._read(k, int(starts[0])).count(b"\t") + 1
                if n > len(self.schema):
                    warn(f"{p} has {n} columns but --input_schema names {len(self.schema)} "
                         f"({','.join(self.columns)}); the extra columns are ignored")
        self._cum = np.cumsum([0] + [len(ix) for ix in self._index])

    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def index_nbytes(self) -> int:
        """Bytes of memory the row index holds (``len(self)`` rows; 4 a row for files under 4 GiB)."""
        return sum(ix.nbytes for ix in self._index) + self._cum.nbytes

    def _locate(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._cum, i, side="right") - 1)
        return k, i - int(self._cum[k])

    def location(self, i: int) -> tuple[str, int]:
        k, j = self._locate(i)
        return str(self.paths[k]), self._index[k].line(j)

    def _read(self, k: int, offset: int) -> bytes:
        if self._pid != os.getpid():  # forked DataLoader worker: do not share file positions
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = open(self.paths[k], "rb")
        f.seek(offset)
        return f.readline()

    def raw(self, i: int) -> bytes:
        k, j = self._locate(i)
        return self._read(k, self._index[k].start(j))

    def raw_offset(self, i: int) -> int:
        """The byte offset of row ``i`` in its file."""
        k, j = self._locate(i)
        return self._index[k].start(j)

    def row(self, i: int) -> dict | BadRow:
        raw = self.raw(i)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self.bad(i, f"invalid UTF-8 at byte {e.start}")
        line = line.rstrip("\n").rstrip("\r")
        if line.startswith("\ufeff") and self.raw_offset(i) == 0:  # a UTF-8 byte-order mark opens the file
            line = line[1:]
        fields = line.split("\t")
        if len(fields) < len(self.schema):
            return self.bad(i, f"expected {len(self.schema)} tab-separated columns ({','.join(self.columns)}), "
                               f"got {len(fields)}")
        out: dict[str, Any] = {}
        for col, field in zip(self.schema, fields):
            if col.type == "str":
                out[col.name] = field
                continue
            conv = TYPES[col.type]
            try:
                if col.length == 1:
                    out[col.name] = conv(field.strip())
                else:
                    vals = [conv(v) for v in field.split(",") if v.strip() != ""]
                    if len(vals) != col.length:
                        return self.bad(i, f"column {col.name!r}: expected {col.length} values, got {len(vals)}")
                    out[col.name] = vals
            except ValueError:
                return self.bad(i, f"column {col.name!r}: {field[:40]!r} is not {col.type}")
        return out

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_handles"] = {}
        return st

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}


class ImageFolder(RowSource):
    """A folder of ``name.jpg`` + ``name.txt`` pairs (any common image extension), searched recursively.

    Each row has the id column (``idx``), the text column (the caption file's first non-empty line; all lines in
    ``texts``) and the image column (a ``Path``, decoded later like a base64 field).
    """

    def __init__(self, root: str | os.PathLike, idx_col: str = "idx", text_col: str = "text",
                 image_col: str = "image", require_text: bool = True):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise TuwenError(f"{self.root}: not a folder")
        self.idx_col, self.text_col, self.image_col = idx_col, text_col, image_col
        self.columns = [idx_col, text_col, image_col]
        self.require_text = require_text
        images: dict[Path, Path] = {}
        texts: set[Path] = set()
        for p in sorted(self.root.rglob("*")):
            if not p.is_file():
                continue
            stem = p.with_suffix("")
            if p.suffix.lower() in IMAGE_EXTS:
                images.setdefault(stem, p)
            elif p.suffix.lower() == ".txt":
                texts.add(stem)
        self.items: list[tuple[Path, Path | None, Path | None]] = []  # (stem, image, text)
        for stem in sorted(set(images) | (texts if require_text else set())):
            self.items.append((stem, images.get(stem), stem.with_suffix(".txt") if stem in texts else None))
        if not self.items:
            raise TuwenError(f"{self.root}: no images found (looked for {', '.join(IMAGE_EXTS)} files)")

    def __len__(self) -> int:
        return len(self.items)

    def location(self, i: int) -> tuple[str, int]:
        stem, img, txt = self.items[i]
        return str(img or txt or stem), 0

    def row(self, i: int) -> dict | BadRow:
        stem, img, txt = self.items[i]
        if img is None:
            return self.bad(i, f"caption file without an image (no {stem.name}.jpg/.png/...)")
        text, texts = "", []
        if txt is not None:
            try:
                texts = [t.strip() for t in txt.read_text(encoding="utf-8").splitlines() if t.strip()]
            except UnicodeDecodeError as e:
                return BadRow(str(txt), 0, f"invalid UTF-8 at byte {e.start}")
            text = texts[0] if texts else ""
        elif self.require_text:
            return self.bad(i, f"image without a caption file ({stem.name}.txt)")
        return {self.idx_col: str(stem.relative_to(self.root)), self.text_col: text, "texts": texts,
                self.image_col: img}


class ConcatSource(RowSource):
    def __init__(self, sources: Sequence[RowSource]):
        self.sources = list(sources)
        self.columns = self.sources[0].columns
        self._cum = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _loc(self, i: int) -> tuple[RowSource, int]:
        k = int(np.searchsorted(self._cum, i, side="right") - 1)
        return self.sources[k], i - int(self._cum[k])

    def row(self, i: int):
        s, j = self._loc(i)
        return s.row(j)

    def location(self, i: int):
        s, j = self._loc(i)
        return s.location(j)


def open_source(tables: str | Sequence[str], schema: str | Sequence[Column] | None, skip_first_line: bool = False,
                idx_col: str = "idx", text_col: str = "text", image_col: str = "image",
                flag: str = "--tables", require_text: bool = True) -> RowSource:
    """TSV files, image folders, CSV/JSONL/WebDataset/Parquet (comma-separated; see ``tuwen.data.formats``) as
    one RowSource.

    ``require_text=False``: image folders without ``.txt`` captions are read too (image-only work: VQ training,
    encoding); their rows have an empty text."""
    if isinstance(tables, str):
        tables = [t for t in tables.split(",") if t.strip()]
    if not tables:
        raise TuwenError(f"{flag}: no input given")
    sources: list[RowSource] = []
    pending: list[str] = []

    from .formats import detect_format, open_table, reader_options

    forced = reader_options().table_format

    def flush():
        if pending:
            if schema is None:
                raise TuwenError("--input_schema is required for headerless EasyNLP TSV input (e.g. "
                                 "idx:str:1,text:str:1,imgbase64:str:1); a CSV/TSV with a header line needs "
                                 "--table_format csv (or a .csv name); .jsonl, .tar and .parquet are read as such")
            sources.append(Table(list(pending), schema, skip_first_line, flag=flag))
            pending.clear()

    for t in tables:
        fmt = detect_format(t, forced)
        if fmt == "folder":
            flush()
            sources.append(ImageFolder(t, idx_col, text_col, image_col, require_text=require_text))
        elif fmt != "tsv":  # CSV with a header, JSONL, WebDataset shards, Parquet (tuwen.data.formats)
            flush()
            sources.append(open_table(t, fmt, idx_col, text_col, image_col, flag=flag))
        else:
            pending.append(t)
    flush()
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def check_columns(source: RowSource, text_col: str | None, image_col: str | None, text_flag: str,
                  image_flag: str, sample: int = 20) -> None:
    """Stop early when the column flags are swapped or wrong: a text column that holds base64 images, or an image
    column that holds plain text. Looks at the first ``sample`` good rows (cheap; runs before any vocabulary or
    model is built)."""
    cols = getattr(source, "columns", [])
    text_col = text_col if text_col in cols else None
    image_col = image_col if image_col in cols else None
    if not (text_col or image_col):
        return
    rows = []
    for i in range(min(len(source), sample * 10)):
        r = source.row(i)
        if not isinstance(r, BadRow):
            rows.append(r)
            if len(rows) >= sample:
                break
    if not rows:
        return
    half = len(rows) / 2
    if text_col and sum(looks_like_base64_image(r.get(text_col)) for r in rows) > half:
        raise TuwenError(f"{text_flag}={text_col!r} names a column that holds base64 images, not text"
                         + (f"; the images are in it and the text is probably in {image_flag}={image_col!r}: "
                            f"swap the two flags" if image_col else "") + " (see --input_schema)")

    def textlike(v) -> bool:
        if not isinstance(v, str):
            return False
        s = v.strip()
        return 0 < len(s) < 200 and not looks_like_base64_image(s) and not s.startswith("[") and \
            not Path(s).suffix.lower() in IMAGE_EXTS
    if image_col and sum(textlike(r.get(image_col)) for r in rows) > half:
        raise TuwenError(f"{image_flag}={image_col!r} names a column that holds text, not images (base64, a path "
                         f"or a JSON list of frames)"
                         + (f"; swap it with {text_flag}={text_col!r}" if text_col else "")
                         + " (see --input_schema)")


# ----------------------------------------------------------------------------------------------- datasets

class RowDataset:
    """Map-style dataset: ``transform(row, index)`` (or ``transform(row, index, epoch)``) applied to each row;
    any failure becomes a ``BadRow``.

    ``transform`` raises ``ValueError`` (``ImageDecodeError`` is one) with the reason for rows it cannot use.
    The trainer sets ``epoch`` before each epoch, so random augmentation can be seeded by (seed, epoch, index)
    and does not depend on worker processes or on resuming.
    """

    def __init__(self, source: RowSource, transform: Callable[..., dict], indices: Sequence[int] | None = None):
        import inspect

        self.source = source
        self.transform = transform
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.epoch = 0
        try:
            params = inspect.signature(transform).parameters.values()
            self._pass_epoch = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3
        except (TypeError, ValueError):
            self._pass_epoch = False

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        j = int(i if self.indices is None else self.indices[i])
        row = self.source.row(j)
        if isinstance(row, BadRow):
            return row
        try:
            return self.transform(row, j, self.epoch) if self._pass_epoch else self.transform(row, j)
        except (ValueError, KeyError, OSError) as e:
            reason = str(e) if not isinstance(e, KeyError) else f"missing column {e}"
            return self.source.bad(j, reason or type(e).__name__)


def collate_skip_bad(samples: list) -> dict:
    """Stack good samples (tensors stacked, other values listed) and keep the bad rows in ``batch['bad_rows']``."""
    import torch

    good = [s for s in samples if not isinstance(s, BadRow)]
    bad = [s for s in samples if isinstance(s, BadRow)]
    batch: dict[str, Any] = {"bad_rows": bad, "size": len(good)}
    if good:
        for k in good[0]:
            vals = [g[k] for g in good]
            if isinstance(vals[0], torch.Tensor):
                batch[k] = torch.stack(vals)
            elif isinstance(vals[0], np.ndarray):
                batch[k] = torch.from_numpy(np.stack(vals))
            elif isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool):
                batch[k] = torch.tensor(vals)
            else:
                batch[k] = vals
    return batch


def validate(source: RowSource, transform: Callable[[dict, int], Any] | None, strict: bool = False,
             report: BadRowReport | None = None, progress: bool = False) -> tuple[int, BadRowReport]:
    """Read (and transform) every row; return (number of good rows, report). ``strict`` raises at the first bad."""
    report = report or BadRowReport()
    ds = RowDataset(source, transform or (lambda r, i: r))
    it: Iterable[int] = range(len(ds))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="validating", unit="row", disable=None)
    good = 0
    for i in it:
        s = ds[i]
        if isinstance(s, BadRow):
            if strict:
                raise BadRowError(f"{s} (--strict stops at the first bad row; without it bad rows are skipped)")
            report.add(s)
        else:
            good += 1
    return good, report
