"""The TSV row index (``Table`` / ``rows.LineIndex``): bytes a row in memory, and the offsets and line numbers it
gives back, with and without blank lines, a header, and offsets past 4 GiB."""
import numpy as np
import pytest

from tuwen.data.rows import LineIndex
from tuwen.data.tables import Table


def _write(path, lines):
    path.write_bytes("".join(lines).encode("utf-8"))
    return path


def _expected(path):
    """(offset, 1-based line) of every non-blank line, the slow obvious way."""
    out, pos = [], 0
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if raw not in (b"", b"\r"):
            out.append((pos, n))
        pos += len(raw) + 1
    return out


def _check(table, path):
    want = _expected(path)
    assert len(table) == len(want)
    for i in list(range(min(len(want), 50))) + list(range(len(want) - 50, len(want))):
        assert (table.raw_offset(i), table.location(i)) == (want[i][0], (str(path), want[i][1])), i


def test_index_is_4_bytes_a_row_without_blank_lines(tmp_path):
    n = 20_000
    p = _write(tmp_path / "t.tsv", [f"{i}\t文本{i}\tQUJD\n" for i in range(n)])
    t = Table(p, "idx:str:1,text:str:1,img:str:1")
    _check(t, p)
    per_row = t.index_nbytes / len(t)
    print(f"index: {t.index_nbytes} bytes for {len(t)} rows = {per_row:.3f} bytes a row")
    assert 4.0 <= per_row <= 4.01          # uint32 offsets; line numbers cost nothing (no blank lines)
    assert t.row(n - 1) == {"idx": str(n - 1), "text": f"文本{n - 1}", "img": "QUJD"}


@pytest.mark.parametrize("every", [97, 2])
def test_index_with_blank_lines_and_a_header_stays_under_12_bytes(tmp_path, every):
    lines = ["idx\ttext\n"]
    for i in range(5_000):
        lines.append(f"{i}\tx{i}\n")
        if i % every == 0:
            lines.append("\n" if i % 3 else "\r\n")      # blank lines ("" and "\r") are not rows
    p = _write(tmp_path / "b.tsv", lines)
    t = Table(p, "idx:str:1,text:str:1", skip_first_line=True)
    want = _expected(p)[1:]
    assert len(t) == 5_000 and t.location(0) == (str(p), 2)
    for i in range(0, 5_000, 7):
        assert (t.raw_offset(i), t.location(i)[1]) == want[i]
    per_row = t.index_nbytes / len(t)
    assert per_row <= (4.2 if every == 97 else 8.01)       # sparse steps / dense uint32 line numbers
    assert t.row(4_999) == {"idx": "4999", "text": "x4999"}


def test_line_index_past_4_gib_and_many_files(tmp_path):
    n = 1_000
    starts = np.arange(n, dtype=np.int64) * (2 ** 23)        # offsets up to ~8 GiB
    lines = np.arange(1, n + 1, dtype=np.int64) * 2          # a blank line before every row: dense numbers
    ix = LineIndex(starts, lines, size=int(starts[-1]) + 100)
    assert ix.nbytes / n <= 12
    assert [ix.start(j) for j in (0, 1, n - 1)] == [0, 2 ** 23, (n - 1) * 2 ** 23]
    assert [ix.line(j) for j in (0, 1, n - 1)] == [2, 4, 2 * n]
    assert LineIndex(np.zeros(0, np.int64), np.zeros(0, np.int64), 0).nbytes == 0
    # two files: rows run on from one to the next, each with its own line numbers
    a = _write(tmp_path / "a.tsv", ["0\ta\n", "\n", "1\tb\n"])
    b = _write(tmp_path / "b.tsv", ["2\tc\n"])
    t = Table([a, b], "idx:str:1,text:str:1")
    assert [t.location(i) for i in range(3)] == [(str(a), 1), (str(a), 3), (str(b), 1)]
    assert t.index_nbytes / len(t) <= 12 + 24 / len(t)      # + the per-file row counts


def test_csv_and_jsonl_indexes_are_compact_too(tmp_path):
    from tuwen.data.formats import CsvTable, JsonlTable

    n = 5_000
    c = _write(tmp_path / "t.csv", ["filepath,title\n"] + [f'{i}.jpg,"a ""quoted""\ntitle {i}"\n' for i in range(n)])
    t = CsvTable(c)
    assert len(t) == n and t.location(n - 1) == (str(c), 2 + 2 * (n - 1))      # two lines a record
    assert (t._index.nbytes + t._ends.nbytes) / n <= 12                           # starts, steps, ends
    j = _write(tmp_path / "t.jsonl", [f'{{"image": "{i}.jpg", "caption": "c{i}"}}\n' + ("\n" if i == 7 else "")
                                      for i in range(n)])
    t = JsonlTable(j)
    assert len(t) == n and t.location(8) == (str(j), 10) and t._index.nbytes / n <= 4.01
    assert t._parse(7) == {"image": "7.jpg", "caption": "c7"} and t._parse(n - 1)["caption"] == f"c{n - 1}"
