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


class LineIndex:
    """Where the rows of a text file are: the byte offset and 1-based line number of row ``j``, compactly.

    Offsets are ``uint32`` when the file is under 4 GiB (else ``int64``). Line numbers differ from ``j + 1`` only
    by the blank lines skipped before the row, so only the rows where that difference steps are stored (nothing for
    a file without blank lines); when blank lines are so frequent that the steps would cost more, the numbers are
    stored densely as ``uint32``. In memory: 4 bytes a row for a file under 4 GiB without blank lines, at most
    8 (12 over 4 GiB) — ``nbytes`` says how much.
    """

    def __init__(self, starts: np.ndarray, lines: np.ndarray, size: int):
        n = len(starts)
        self._n = n
        self._starts = np.asarray(starts, dtype=np.uint32 if size < 2 ** 32 else np.int64)
        lines = np.asarray(lines, dtype=np.int64)
        big = bool(n) and int(lines[-1]) >= 2 ** 32
        d = lines - np.arange(n, dtype=np.int64)                    # lines skipped before row j, plus 1
        at = np.concatenate([[0], np.flatnonzero(np.diff(d)) + 1]) if n else np.zeros(0, np.int64)
        if len(at) * 2 <= n or big:                                  # sparse steps: (row, offset) pairs
            self._at = at.astype(np.uint32 if n < 2 ** 32 else np.int64)
            self._off = d[at].astype(np.int64 if big else np.uint32)
            self._dense = None
        else:                                                       # many blank lines: every line number
            self._at = self._off = None
            self._dense = lines.astype(np.uint32)

    def __len__(self) -> int:
        return self._n

    def start(self, j: int) -> int:
        return int(self._starts[j])

    def line(self, j: int) -> int:
        if self._dense is not None:
            return int(self._dense[j])
        k = int(np.searchsorted(self._at, j, side="right")) - 1
        return j + int(self._off[k])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._starts, self._at, self._off, self._dense) if a is not None)
