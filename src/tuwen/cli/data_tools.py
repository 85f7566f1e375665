"""``tuwen data clean|split|convert|stats``: any input layout in (EasyNLP TSV, CSV, JSONL, WebDataset, Parquet,
image folders), any layout out (``tuwen.data.writers``), streamed row by row with bounded memory.

    tuwen data clean IN --out OUT [--keywords words.txt] [--max_text_len 32] [--min_text_len N]
                     [--drop_pattern REGEX] [--max_aspect 3] [--min_size 64] [--dedupe] [--report r.json]
    tuwen data split IN --ratio 9:1 --out DIR [--seed 0] [--by FIELD | --stratify FIELD]
    tuwen data convert IN OUT [--to FORMAT] [--shard_size 1000]
    tuwen data stats IN [--plot stats.png] [--json]
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import TuwenError

RULES = ("bad_row", "empty_text", "no_keyword", "text_too_short", "text_too_long", "drop_pattern", "bad_image",
         "image_too_small", "aspect_ratio", "duplicate")


def add_tool_parsers(sub) -> None:
    from .common import add_reader_flags

    def inputs(q, what="input"):
        q.add_argument("input", help=f"{what}: EasyNLP TSV (with --input_schema), .csv, .jsonl, WebDataset .tar "
                                     f"shards (a/{{000..009}}.tar or a folder of .tar), .parquet, or an image folder")
        q.add_argument("--input_schema", default=None, help="EasyNLP TSV columns, e.g. idx:str:1,text:str:1,"
                                                             "imgbase64:str:1")
        q.add_argument("--first_sequence", "--text_column", dest="text_column", default="text",
                       help="caption column (default text; CSV/JSONL/Parquet: caption, text or title)")
        q.add_argument("--second_sequence", "--image_column", dest="image_column", default="imgbase64",
                       help="image column (default imgbase64; CSV/JSONL/Parquet: image, filepath, …)")
        q.add_argument("--skip_first_line", action="store_true", help="EasyNLP TSV: the first line is a header")
        q.add_argument("--strict", action="store_true", help="stop at the first unreadable row")
        q.add_argument("--max_listed", type=int, default=10, help="unreadable rows listed (all are counted)")
        add_reader_flags(q)

    def outputs(q):
        q.add_argument("--to", default=None, choices=["tsv", "csv", "jsonl", "webdataset", "parquet", "folder"],
                       help="output format (default: from the output name: .tsv .csv .jsonl .parquet, .tar = "
                            "WebDataset shards name-000000.tar…, no suffix = a folder of jpg+txt)")
        q.add_argument("--shard_size", type=int, default=1000, help="WebDataset: samples per shard (default 1000)")
        q.add_argument("--row_group_size", type=int, default=256, help="Parquet: rows per row group (default 256)")

    c = sub.add_parser("clean", help="filter a data set with the Wukong rules; report what each rule removed",
                       description="Keep the rows that pass every rule (the course project's Wukong cleaning: "
                                   "keywords, caption length ≤ 32, no special characters, aspect ratio ≤ 3, no tiny "
                                   "images) and write them in any format; print how many rows each rule removed, "
                                   "with examples.")
    inputs(c)
    c.add_argument("--out", required=True, help="output (.tsv, .csv, .jsonl, .parquet, name.tar for shards, folder)")
    outputs(c)
    c.add_argument("--keywords", default=None, help="file of keywords, one a line: keep captions containing one")
    c.add_argument("--min_text_len", type=int, default=1, help="drop captions shorter than this (characters)")
    c.add_argument("--max_text_len", type=int, default=None, help="drop captions longer than this (the seed: 32)")
    c.add_argument("--drop_pattern", default=None,
                   help=r"drop captions matching this regex, e.g. '[#@&*{}<>|~^\\]|https?://|[\x00-\x1f]'")
    c.add_argument("--max_aspect", type=float, default=None, help="drop images with long/short side above this (3)")
    c.add_argument("--min_size", type=int, default=None, help="drop images whose shorter side is below this (px)")
    c.add_argument("--dedupe", action="store_true", help="drop rows whose image bytes repeat an earlier row's")
    c.add_argument("--verify_images", action="store_true",
                   help="decode every image fully (default: read the header only — fast, finds most broken files)")
    c.add_argument("--report", default=None, help="also write the report as JSON here")
    c.add_argument("--examples", type=int, default=3, help="examples listed per rule (default 3)")
    c.set_defaults(func=cmd_clean)

    s = sub.add_parser("split", help="split a data set into DIR/train.EXT and DIR/val.EXT (e.g. 9:1)",
                       description="Random split, reproducible by --seed; --by FIELD keeps rows sharing a value on "
                                   "one side (grouped); --stratify FIELD splits each value in the ratio. The output "
                                   "has the input's format (EasyNLP TSV lines are copied byte for byte).")
    inputs(s)
    s.add_argument("--ratio", default="9:1", help="train:val, e.g. 9:1, 0.9, 95:5 (default 9:1)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--by", default=None, help="group by this field: all its rows go to the same side")
    g.add_argument("--stratify", default=None, help="split every value of this field in the ratio")
    outputs(s)
    s.set_defaults(func=cmd_split)

    v = sub.add_parser("convert", help="convert between TSV, CSV, JSONL, WebDataset, Parquet and image folders",
                       description="Read any layout, write any other (image bytes copied, not re-encoded). "
                                   "Example: tuwen data convert photos/ shards/train.tar --shard_size 1000")
    inputs(v)
    v.add_argument("output", help="output (.tsv, .csv, .jsonl, .parquet, name.tar for shards, folder)")
    outputs(v)
    v.set_defaults(func=cmd_convert)

    t = sub.add_parser("stats", help="rows, caption length and image size histograms, duplicates (+ a PNG plot)",
                       description="Count rows, unreadable rows, caption lengths, image sizes and aspect ratios "
                                   "(read from image headers), duplicate images and captions.")
    inputs(t)
    t.add_argument("--plot", default=None, help="PNG plot of the histograms (default: INPUT_NAME.stats.png here)")
    t.add_argument("--no_plot", action="store_true")
    t.add_argument("--json", action="store_true", help="print the figures as JSON")
    t.add_argument("--limit", type=int, default=None, help="look at the first N rows only")
    t.set_defaults(func=cmd_stats)


# ----------------------------------------------------------------------------------------------- input

class Input:
    """The source, its format and how its rows become ``Sample``s."""

    def __init__(self, args):
        from ..data.formats import detect_format, reader_options
        from ..data.tables import open_source

        self.args = args
        self.fmt = detect_format(args.input.split(",")[0], reader_options().table_format)
        self.text_col, self.image_col = args.text_column, args.image_column
        self.src = open_source(args.input, args.input_schema, args.skip_first_line, text_col=self.text_col,
                               image_col=self.image_col, flag="input", require_text=False)
        for col, flag in ((self.text_col, "--first_sequence"), (self.image_col, "--second_sequence")):
            if col not in self.src.columns:
                raise TuwenError(f"{flag}={col!r} is not a column of {args.input} ({', '.join(self.src.columns)})")
        parts = getattr(self.src, "sources", [self.src])
        first = parts[0]
        self.text_name = getattr(first, "text_key", None) if self.fmt in ("csv", "jsonl", "parquet") else None
        self.image_name = getattr(first, "image_key", None) if self.fmt in ("csv", "jsonl", "parquet") else None
        skip = {self.text_col, self.image_col, "idx", "texts", "__key__", self.text_name, self.image_name,
                "txt", "jpg", "jpeg", "png", "webp", "bmp", "gif", "cls"}
        self.field_names = [c for c in self.src.columns if c not in skip]
        # the row id is kept when the input has one (a TSV/folder/shard key, or an id column)
        self.has_id = self.fmt in ("tsv", "webdataset", "folder") or getattr(first, "id_key", None) is not None
        if self.has_id:
            self.field_names.insert(0, "idx")

    def names_for(self, fmt: str) -> dict:
        text = self.text_name or ("title" if fmt == "csv" else "caption")
        image = self.image_name or ("filepath" if fmt == "csv" else "image")
        return dict(text_name=text, image_name=image, field_names=self.field_names)

    def sample(self, row: dict, i: int):
        from ..data.writers import Sample

        fields = {k: row[k] for k in self.field_names if k in row and isinstance(row[k], (str, int, float, bool))}
        if self.has_id:
            fields["idx"] = str(row.get("idx", i))
        text = row.get(self.text_col)
        return Sample(key=str(row.get("idx", i)), text="" if text is None else str(text), image=row[self.image_col],
                      fields=fields)

    def rows(self, indices=None, desc="reading"):
        """(index, row | BadRow) over the source (or ``indices``), with a progress bar on a terminal."""
        from tqdm import tqdm

        from ..data.tables import BadRow, BadRowError

        it = range(len(self.src)) if indices is None else indices
        for i in tqdm(it, desc=desc, unit="row", disable=None, total=len(it)):
            r = self.src.row(i)
            if isinstance(r, BadRow) and self.args.strict:
                raise BadRowError(f"{r} (--strict stops at the first bad row)")
            yield i, r


def _out_format(out: str, to: str | None) -> str:
    from ..data.writers import format_of_output

    return format_of_output(out, to)


def _writer(inp: Input, out, fmt: str, args):
    from ..data.writers import open_writer

    return open_writer(out, fmt, shard_size=args.shard_size, row_group_size=args.row_group_size,
                       **inp.names_for(fmt))


def _describe_written(w, fmt: str) -> str:
    if fmt == "webdataset":
        return f"{w.count} rows in {len(w.paths)} shard(s): {w.pattern_string()}"
    return f"{w.count} rows → {', '.join(str(p) for p in w.paths)}"


# ----------------------------------------------------------------------------------------------- convert

def cmd_convert(args) -> int:
    from ..data.tables import BadRow, BadRowReport

    inp = Input(args)
    fmt = _out_format(args.output, args.to)
    report = BadRowReport(args.max_listed)
    w = _writer(inp, args.output, fmt, args)
    try:
        for i, r in inp.rows(desc="converting"):
            if isinstance(r, BadRow):
                report.add(r)
                continue
            try:
                s = inp.sample(r, i)
                if not (fmt in ("csv", "jsonl") and isinstance(s.image, Path)):  # bytes are copied: check them
                    image_size_of(s.image_bytes())
                w.write(s)
            except ValueError as e:
                report.add(inp.src.bad(i, str(e)))
    finally:
        w.close()
    print(_describe_written(w, fmt))
    if report.count:
        print(report.summary(len(inp.src)), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- clean

def image_size_of(data: bytes, verify: bool = False) -> tuple[int, int]:
    """(width, height) from the header (``verify``: decode fully). ValueError with the reason if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if verify:
                im.load()
    except Exception as e:  # PIL raises many types for broken files
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))[:80] or type(e).__name__
        raise ValueError(f"undecodable image ({reason})") from None
    return size


class Cleaner:
    """The Wukong rules, applied in order; ``check(sample) -> rule name | None``."""

    def __init__(self, args):
        self.keywords: list[str] = []
        if args.keywords:
            p = Path(args.keywords)
            if not p.is_file():
                raise TuwenError(f"--keywords {p}: no such file (one keyword a line)")
            self.keywords = [w.strip() for w in p.read_text(encoding="utf-8").splitlines() if w.strip()]
            if not self.keywords:
                raise TuwenError(f"--keywords {p}: no keywords in it")
        try:
            self.pattern = re.compile(args.drop_pattern) if args.drop_pattern else None
        except re.error as e:
            raise TuwenError(f"--drop_pattern {args.drop_pattern!r}: not a regular expression ({e})") from None
        for flag, v in (("--max_text_len", args.max_text_len), ("--min_size", args.min_size)):
            if v is not None and v < 1:
                raise TuwenError(f"{flag} {v}: must be ≥ 1")
        if args.max_aspect is not None and args.max_aspect < 1:
            raise TuwenError(f"--max_aspect {args.max_aspect}: must be ≥ 1 (long side / short side)")
        self.a = args
        self.seen: set[int] = set()

    def check(self, s) -> tuple[str | None, str]:
        a, text = self.a, s.text.strip()
        if not text:
            return "empty_text", ""
        if self.keywords and not any(k in text for k in self.keywords):
            return "no_keyword", ""
        if len(text) < a.min_text_len:
            return "text_too_short", f"{len(text)} characters"
        if a.max_text_len is not None and len(text) > a.max_text_len:
            return "text_too_long", f"{len(text)} characters"
        if self.pattern and (m := self.pattern.search(text)):
            return "drop_pattern", f"matched {m.group(0)!r}"
        # an image that cannot be read is never kept
        try:
            data = s.image_bytes()
            w, h = image_size_of(data, a.verify_images)
        except ValueError as e:
            return "bad_image", str(e)
        if a.min_size and min(w, h) < a.min_size:
            return "image_too_small", f"{w}×{h}"
        if a.max_aspect and max(w, h) / max(1, min(w, h)) > a.max_aspect:
            return "aspect_ratio", f"{w}×{h} = {max(w, h) / max(1, min(w, h)):.1f}"
        if a.dedupe:
            d = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
            if d in self.seen:
                return "duplicate", "same image bytes as an earlier row"
            self.seen.add(d)
        return None, ""


def cmd_clean(args) -> int:
    from ..data.tables import BadRow

    inp = Input(args)
    rules = Cleaner(args)
    fmt = _out_format(args.out, args.to)
    counts: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    w = _writer(inp, args.out, fmt, args)
    total = 0
    try:
        for i, r in inp.rows(desc="cleaning"):
            total += 1
            if isinstance(r, BadRow):
                rule, why = "bad_row", r.reason
            else:
                s = inp.sample(r, i)
                rule, why = rules.check(s)
                if rule is None:
                    try:
                        w.write(s)
                        continue
                    except ValueError as e:
                        rule, why = "bad_image", str(e)
            counts[rule] += 1
            if len(examples[rule]) < args.examples:
                f, line = inp.src.location(i)
                text = "" if isinstance(r, BadRow) else str(r.get(inp.text_col, ""))[:40]
                examples[rule].append(f"{f}:{line}: {text!r}" + (f" ({why})" if why else ""))
    finally:
        w.close()
    kept = w.count
    report = {"input": args.input, "output": [str(p) for p in w.paths], "rows": total, "kept": kept,
              "removed": {r: counts[r] for r in RULES if counts[r]}, "examples": {r: examples[r] for r in RULES
                                                                                  if examples[r]}}
    print(format_clean_report(report))
    if fmt == "webdataset":
        print(f"shards: {w.pattern_string()}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def format_clean_report(rep: dict) -> str:
    total = max(rep["rows"], 1)
    lines = [f"{rep['rows']} rows read, {rep['kept']} kept ({100 * rep['kept'] / total:.1f} %), "
             f"{rep['rows'] - rep['kept']} removed:", f"  {'rule':<16} {'removed':>8} {'%':>6}  examples"]
    for rule, n in rep["removed"].items():
        ex = rep["examples"].get(rule, [])
        lines.append(f"  {rule:<16} {n:>8} {100 * n / total:>5.1f}%  {ex[0] if ex else ''}")
        lines += [f"  {'':<16} {'':>8} {'':>6}  {e}" for e in ex[1:]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- split

def parse_ratio(text: str) -> float:
    """'9:1' / '90:10' / '0.9' → the train fraction."""
    try:
        if ":" in text:
            a, b = (float(x) for x in text.split(":"))
            frac = a / (a + b)
        else:
            frac = float(text)
    except (ValueError, ZeroDivisionError):
        raise TuwenError(f"--ratio {text!r}: write train:val, e.g. 9:1, or a train fraction such as 0.9") from None
    if not 0 < frac < 1:
        raise TuwenError(f"--ratio {text!r}: both sides need rows (the train fraction must be between 0 and 1)")
    return frac


def assign_split(keys: list, frac: float, seed: int, mode: str = "random") -> list[bool]:
    """True = validation. ``mode``: random (by row), by (groups of equal key stay together), stratify (each key
    split in the ratio). Deterministic in (keys, frac, seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(keys)
    val = [False] * n
    if mode == "random":
        for i in rng.permutation(n)[:round(n * (1 - frac))]:
            val[int(i)] = True
        return val
    groups: dict = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    names = sorted(groups, key=str)
    if mode == "by":
        target = round(n * (1 - frac))
        got = 0
        for j in rng.permutation(len(names)):
            if got >= target:
                break
            for i in groups[names[int(j)]]:
                val[i] = True
            got += len(groups[names[int(j)]])
        return val
    for name in names:  # stratify
        idx = groups[name]
        for j in rng.permutation(len(idx))[:round(len(idx) * (1 - frac))]:
            val[idx[int(j)]] = True
    return val


def cmd_split(args) -> int:
    from ..data.tables import BadRow, BadRowReport, Table

    frac = parse_ratio(args.ratio)
    inp = Input(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TuwenError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    fmt = args.to or inp.fmt
    report = BadRowReport(args.max_listed)
    field = args.by or args.stratify
    n = len(inp.src)
    if field:
        if field not in inp.src.columns:
            raise TuwenError(f"--{'by' if args.by else 'stratify'} {field!r} is not a column of {args.input} "
                             f"({', '.join(inp.src.columns)})")
        keys = []
        for i, r in inp.rows(desc="grouping"):
            keys.append(None if isinstance(r, BadRow) else str(r.get(field)))
        val = assign_split(keys, frac, args.seed, "by" if args.by else "stratify")
    else:
        val = assign_split(list(range(n)), frac, args.seed)
    from ..data.writers import EXT

    names = {}
    raw_tsv = fmt == "tsv" and isinstance(inp.src, Table)
    if raw_tsv:  # EasyNLP lines are copied as they are
        files = {side: open(out / f"{side}.tsv.part", "wb") for side in ("train", "val")}
        counts = Counter()
        for i in range(n):
            r = inp.src.row(i)
            if isinstance(r, BadRow):
                report.add(r)
                continue
            side = "val" if val[i] else "train"
            line = inp.src.raw(i)
            files[side].write(line if line.endswith(b"\n") else line + b"\n")
            counts[side] += 1
        for side, f in files.items():
            f.close()
            Path(f.name).replace(out / f"{side}.tsv")
            names[side] = f"{out / (side + '.tsv')} ({counts[side]} rows)"
    else:
        writers = {side: _writer(inp, out / (side + EXT[fmt]), fmt, args) for side in ("train", "val")}
        try:
            for i, r in inp.rows(desc="splitting"):
                if isinstance(r, BadRow):
                    report.add(r)
                    continue
                try:
                    writers["val" if val[i] else "train"].write(inp.sample(r, i))
                except ValueError as e:
                    report.add(inp.src.bad(i, str(e)))
        finally:
            for w in writers.values():
                w.close()
        for side, w in writers.items():
            names[side] = (f"{w.pattern_string()} ({w.count} rows)" if fmt == "webdataset"
                           else f"{', '.join(str(p) for p in w.paths)} ({w.count} rows)")
    print(f"train: {names['train']}\nval:   {names['val']}")
    if report.count:
        print(report.summary(n), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- stats

LEN_BINS = (0, 8, 16, 24, 32, 48, 64, 128)
SIZE_BINS = (0, 64, 128, 256, 384, 512, 768, 1024, 2048)


def _bin(v: float, edges) -> str:
    for lo, hi in zip(edges, edges[1:]):
        if v < hi:
            return f"{lo}-{hi - 1}"
    return f"≥{edges[-1]}"


def cmd_stats(args) -> int:
    from ..data.tables import BadRow

    inp = Input(args)
    n = len(inp.src) if args.limit is None else min(args.limit, len(inp.src))
    lens, sizes, aspect = Counter(), Counter(), Counter()
    img_seen, txt_seen = set(), set()
    dup_img = dup_txt = bad = bad_img = 0
    for i, r in inp.rows(range(n), desc="stats"):
        if isinstance(r, BadRow):
            bad += 1
            continue
        s = inp.sample(r, i)
        t = s.text.strip()
        lens[_bin(len(t), LEN_BINS)] += 1
        h = hash(t)
        dup_txt += h in txt_seen
        txt_seen.add(h)
        try:
            data = s.image_bytes()
            w, hh = image_size_of(data)
        except ValueError:
            bad_img += 1
            continue
        sizes[_bin(min(w, hh), SIZE_BINS)] += 1
        ar = max(w, hh) / max(1, min(w, hh))
        aspect["≤1.5" if ar <= 1.5 else "1.5-3" if ar <= 3 else ">3"] += 1
        d = hashlib.blake2b(data, digest_size=8).digest()
        dup_img += d in img_seen
        img_seen.add(d)
    order = lambda c, edges: {k: c[k] for k in [_bin(e, edges) for e in edges] if k in c}  # noqa: E731
    stats = {"input": args.input, "format": inp.fmt, "rows": n, "unreadable_rows": bad, "unreadable_images": bad_img,
             "caption_length": order(lens, LEN_BINS), "image_short_side": order(sizes, SIZE_BINS),
             "aspect_ratio": {k: aspect[k] for k in ("≤1.5", "1.5-3", ">3") if k in aspect},
             "duplicate_images": dup_img, "duplicate_captions": dup_txt}
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=1))
    else:
        print(f"{args.input} ({inp.fmt}): {n} rows, {bad} unreadable rows, {bad_img} unreadable images, "
              f"{dup_img} duplicate images, {dup_txt} duplicate captions")
        for title, key in (("caption length (characters)", "caption_length"),
                           ("image shorter side (px)", "image_short_side"), ("aspect ratio", "aspect_ratio")):
            print(f"{title}:")
            top = max(stats[key].values(), default=1)
            for k, v in stats[key].items():
                print(f"  {k:>9} {v:>8}  {'#' * max(1, round(30 * v / top))}")
    if not args.no_plot:
        path = Path(args.plot or (Path(args.input.split(",")[0].rstrip("/")).name.split("{")[0].rstrip(".-_")
                                  or "data") + ".stats.png")
        plot_histograms(stats, path)
        print(f"plot: {path}", file=sys.stderr)
    return 0


def plot_histograms(stats: dict, path: Path) -> None:
    """Three small bar charts in one PNG, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    panels = [("caption length", stats["caption_length"]), ("image short side", stats["image_short_side"]),
              ("aspect ratio", stats["aspect_ratio"])]
    W, H, pad = 300, 200, 24
    img = Image.new("RGB", (W * len(panels), H), "white")
    d = ImageDraw.Draw(img)
    for p, (title, hist) in enumerate(panels):
        x0 = p * W
        d.text((x0 + pad, 4), f"{title} (n={sum(hist.values())})", fill="black")
        if not hist:
            continue
        top = max(hist.values())
        bw = (W - 2 * pad) / len(hist)
        for j, (k, v) in enumerate(hist.items()):
            bh = (H - 3 * pad) * v / top
            bx = x0 + pad + j * bw
            d.rectangle([bx + 2, H - 2 * pad - bh, bx + bw - 2, H - 2 * pad], fill=(70, 110, 180))
            d.text((bx + 2, H - 2 * pad + 2), str(k)[:7], fill="black")
            d.text((bx + 2, H - 2 * pad - bh - 12), str(v), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
