"""The row interface every reader implements (``RowSource``), the bad-row record (``BadRow``) and the newline
index of text files. Shared by ``tuwen.data.tables`` (EasyNLP TSV, image folders) and ``tuwen.data.formats`` (CSV,
JSONL, WebDataset, Parquet); both re-export these names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that was skipped, with where it is and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


# ----------------------------------------------------------------------------------------------- sources

class RowSource:
    """Random access to rows: ``len(src)``, ``src.row(i) -> dict | BadRow``, ``src.location(i) -> (file, line)``."""

    columns: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, i: int) -> dict | BadRow:
        raise NotImplementedError

    def location(self, i: int) -> tuple[str, int]:
        raise NotImplementedError

    def bad(self, i: int, reason: str) -> BadRow:
        f, line = self.location(i)
        return BadRow(f, line, reason)


_CHUNK = 1 << 24


def _index_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and 1-based line numbers of every non-blank line, by scanning for newlines in 16 MB chunks."""
    offsets: list[np.ndarray] = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10)
            offsets.append(nl.astype(np.int64) + pos)
            pos += len(buf)
    newlines = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    ends = np.concatenate([newlines, [size]]).astype(np.int64)
    keep = starts < size
    starts, ends = starts[keep], ends[keep]
    lines = np.flatnonzero(keep).astype(np.int64) + 1
    # blank lines ("" or "\r") are not rows
    lengths = ends - starts
    nonblank = lengths > 1
    if np.any(lengths == 1):
        with open(path, "rb") as f:
            for j in np.flatnonzero(lengths == 1):
                f.seek(starts[j])
                nonblank[j] = f.read(1) not in (b"\r",)
    return starts[nonblank], lines[nonblank]
