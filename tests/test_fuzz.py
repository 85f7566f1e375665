"""The fuzz table (bench/fuzz_rows.py, small): every bad row reported with file:line by validate, training and
predict; no good row lost; no traceback; bounded memory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_fuzz_table_small(tmp_path, capsys):
    import fuzz_rows

    rc = fuzz_rows.main(["--rows", "150", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads((tmp_path / "fuzz_result.json").read_text())
    assert res["ok"] and dict(res["rows"])["tracebacks"] == "0"
