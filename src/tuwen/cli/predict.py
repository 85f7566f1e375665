"""Batch prediction over EasyNLP tables, shared by every app.

Rows are sharded over ranks (``torchrun``), processed in batches, and merged back in input order by rank 0.
A row that fails (bad row, or an error while predicting it) is reported as ``file:line: reason`` and the other
rows are still written. Output columns follow ``--output_schema``; lists are written as JSON (parseable by
``json.loads`` and ``ast.literal_eval``), plus ``--append_cols`` copied from the input.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.tables import BadRow, BadRowError, BadRowReport, RowSource
from ..errors import TuwenError
from ..hub import atomic_write_text
from .. import runtime as D


def format_value(v: Any) -> str:
    if isinstance(v, str):
        return v.replace("\t", " ").replace("\r", " ").replace("\n", " ").replace("\x00", "")
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def parse_columns(spec: str | None) -> list[str]:
    return [c.strip() for c in (spec or "").split(",") if c.strip()]


class RowError(ValueError):
    """Raised by a predict function for one row (the message is the reason)."""


def run_predict(source: RowSource, predict_batch: Callable[[list[dict], list[int]], list[dict]],
                outputs: str | None, output_schema: Sequence[str], append_cols: Sequence[str] = (),
                batch_size: int = 8, strict: bool = False, max_listed: int = 20,
                on_result: Callable[[int, dict, dict], None] | None = None,
                progress: bool | None = None, desc: str = "predict") -> tuple[int, BadRowReport]:
    """Run ``predict_batch(rows, indices) -> one dict per row`` over this rank's share of ``source``.

    ``predict_batch`` may raise for the whole batch; then each row is retried alone so that one bad row does not
    lose the others. Returns (rows written, merged bad-row report) on rank 0.
    """
    if not outputs:
        raise TuwenError("--outputs is required for --mode=predict (the TSV file to write)")
    if not output_schema:
        raise TuwenError("--output_schema is required for --mode=predict (e.g. idx,text,gen_imgbase64)")
    missing = [c for c in append_cols if c not in source.columns]
    if missing:
        raise TuwenError(f"--append_cols {','.join(missing)}: not input columns ({', '.join(source.columns)})")
    rank, world = D.rank(), D.world_size()
    mine = list(range(rank, len(source), world))
    report = BadRowReport(max_listed)
    out_path = Path(outputs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part = out_path.with_name(f".{out_path.name}.part{rank}") if world > 1 else None
    results: list[tuple[int, str]] = []

    def emit(i: int, row: dict, pred: dict) -> None:
        vals = []
        for c in output_schema:
            if c in pred:
                vals.append(format_value(pred[c]))
            elif c in row:
                vals.append(format_value(row[c]))
            else:
                raise TuwenError(f"--output_schema: {c!r} is neither an output of this app "
                                 f"({', '.join(sorted(pred))}) nor an input column ({', '.join(source.columns)})")
        vals += [format_value(row.get(c, "")) for c in append_cols]
        results.append((i, "\t".join(vals)))
        if on_result:
            on_result(i, row, pred)

    def fail(i: int, reason: str) -> None:
        bad = source.bad(i, reason)
        if strict:
            raise BadRowError(f"{bad} (--strict stops at the first bad row)")
        report.add(bad)

    from tqdm import tqdm
    bar = tqdm(total=len(mine), desc=desc, unit="row", disable=D.progress_disable(progress),
               file=sys.stderr)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        rows, good = [], []
        for i in idx:
            r = source.row(i)
            if isinstance(r, BadRow):
                if strict:
                    raise BadRowError(f"{r} (--strict stops at the first bad row)")
                report.add(r)
            else:
                rows.append(r)
                good.append(i)
        if rows:
            try:
                preds = predict_batch(rows, good)
                for i, r, p in zip(good, rows, preds):
                    if isinstance(p, Exception):
                        fail(i, str(p))
                    else:
                        emit(i, r, p)
            except (RowError, ValueError) as e:
                if len(rows) == 1:
                    fail(good[0], str(e))
                else:  # isolate the failing row(s)
                    for i, r in zip(good, rows):
                        try:
                            (p,) = predict_batch([r], [i])
                            emit(i, r, p) if not isinstance(p, Exception) else fail(i, str(p))
                        except (RowError, ValueError) as e1:
                            fail(i, str(e1))
        bar.update(len(idx))
    bar.close()

    if world > 1:
        atomic_write_text(part, "".join(json.dumps([i, line], ensure_ascii=False) + "\n" for i, line in results))
        D.barrier()
        states = D.all_gather_objects(report.state())
        if rank == 0:
            merged: list[tuple[int, str]] = []
            for r in range(world):
                p = out_path.with_name(f".{out_path.name}.part{r}")
                merged += [tuple(json.loads(ln)) for ln in p.read_text(encoding="utf-8").splitlines() if ln]
                os.unlink(p)
            merged.sort(key=lambda t: t[0])
            results = merged
            report = BadRowReport(max_listed)
            report.merge_states(states)
        D.barrier()
    if rank == 0:
        atomic_write_text(out_path, "".join(line + "\n" for _, line in results))
        print(f"wrote {len(results)} row(s) to {out_path}", file=sys.stderr)
        if report.count:
            print(report.summary(total=len(source)), file=sys.stderr)
    return len(results), report
