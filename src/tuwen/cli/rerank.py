"""``tuwen rerank``: CogView-style post-selection of generated images with a CLIP or a captioner.

Input (CogView's ``post-selection`` format): one query a line, ``text<TAB>img1<TAB>img2 …``; image paths are
relative to the input file's folder or absolute. Output: one line per usable input line, in input order,
``text<TAB>s1<TAB>s2 …`` — the text first (so every line says what it scores), then one score per image in the
line's image order (``nan`` for an image that cannot be read; higher = better). Problems are listed as
``file:line: reason`` on stderr; the other lines are still scored. ``--ranked`` adds, after the scores, the
1-based image positions best-first (ties by position).
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "rerank", help="score generated images against their prompt (CLIP or caption score) and rank them",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="post-selection file: text<TAB>img1<TAB>img2 … per line")
    p.add_argument("--scorer", required=True,
                   help="clip:DIR (cosine similarity) or caption:DIR (sum of log p(text | image), CogView)")
    p.add_argument("--output", default="-", help="where to write text<TAB>scores… lines (default: stdout)")
    p.add_argument("--ranked", action="store_true",
                   help="append the image positions (1-based) best-first after the scores, separated by '|'")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max_bad_listed", type=int, default=20)
    p.add_argument("--no_progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import io

    from ..data.tables import BadRowReport
    from ..errors import TuwenError
    from ..hub import atomic_write_text
    from ..rerank import load_scorer, order_by_score, rerank_file

    if args.batch_size < 1:
        raise TuwenError("--batch_size must be ≥ 1")
    scorer = load_scorer(args.scorer, device=args.device, batch_size=args.batch_size, flag="--scorer")
    report = BadRowReport(args.max_bad_listed)
    buf = io.StringIO()
    res = rerank_file(scorer, args.input, buf, batch_size=args.batch_size, report=report, progress=args.progress)
    text = buf.getvalue()
    if args.ranked:
        lines = []
        for line in text.splitlines():
            parts = line.split("\t")
            scores = [float(s) for s in parts[1:]]
            order = order_by_score(scores)
            lines.append(line + "\t|\t" + "\t".join(str(i + 1) for i in order))
        text = "".join(ln + "\n" for ln in lines)
    if args.output in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(args.output, text)
    print(f"scored {res['images']} image(s) on {res['lines']} line(s) with {scorer.name}"
          + (f" -> {args.output}" if args.output not in (None, "-") else ""), file=sys.stderr)
    if report.count:
        print(report.summary(), file=sys.stderr)
    return 0
