"""``tuwen data``: write the synthetic set, validate tables/folders, score images with the attribute checker.

    tuwen data synth --out DIR [--size 64] [--n 20000] [--lang zh|en] [--seed 0] [--video --frame_num 4]
                     [--holdout [default|red:triangle,...]] [--format png|jpeg]
    tuwen data validate FILE[,FILE2] --input_schema idx:str:1,text:str:1,imgbase64:str:1 [--strict] ...
    tuwen data score OUTPUTS.tsv|FOLDER [--attributes DIR/test.attributes.jsonl]

Heavy imports stay inside the handlers so that ``tuwen --help`` is fast.
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

from ..errors import TuwenError

_IMAGE_NAME = re.compile(r"^(img|image)|base64", re.IGNORECASE)
_TEXT_NAME = re.compile(r"text|caption|sentence|query|prompt", re.IGNORECASE)
_B64 = re.compile(r"^(data:image/[a-z]+;base64,)?[A-Za-z0-9+/_=\-]+$")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="synthetic data set, table validation, attribute checker",
                              description="Write the embedded synthetic data set, validate EasyNLP tables and "
                                          "image folders, score generated images with the attribute checker.")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    s = sub.add_parser("synth", help="write the synthetic shapes data set as EasyNLP TSVs",
                       description="Write train/val/test TSVs of coloured shapes with Chinese or English captions "
                                   "(plus test_prompts.tsv, per-split attributes.jsonl and meta.json). "
                                   "Deterministic: the same seed writes byte-identical files.")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64; 32–256 work)")
    s.add_argument("--n", type=int, default=20000, help="number of images/clips over all splits (default 20000)")
    s.add_argument("--lang", choices=("zh", "en"), default="zh", help="caption language (default zh)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--video", action="store_true",
                   help="write clips (idx \\t JSON list of base64 frames \\t text) of one moving shape")
    s.add_argument("--frame_num", type=int, default=4, help="frames per clip with --video (default 4)")
    s.add_argument("--holdout", nargs="?", const="default", default=None, metavar="PAIRS",
                   help="keep (colour, shape) pairs out of train/val/test and write them to holdout.tsv; "
                        "alone: red:triangle,yellow:circle,blue:square,purple:rectangle")
    s.add_argument("--format", dest="image_format", choices=("png", "jpeg", "jpg"), default="png",
                   help="image encoding (default png)")
    s.add_argument("--jpeg_quality", type=int, default=90)
    s.add_argument("--splits", default="0.9,0.05,0.05", help="train,val,test fractions (default 0.9,0.05,0.05)")
    s.add_argument("--plain_captions", action="store_true",
                   help="one caption template only (default: a few paraphrases)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    s.add_argument("--preview", action="store_true", help="also write preview.png (a grid of the first images)")
    s.set_defaults(func=cmd_synth)

    v = sub.add_parser("validate", help="read every row of TSV files / image folders and report bad rows",
                       description="Read every row, decode every image (frame lists too) and check that text "
                                   "columns are non-empty. Exit status: 0 all rows good, 1 some rows bad, "
                                   "2 usage error.")
    v.add_argument("tables", help="TSV files and/or image folders (name.jpg + name.txt), comma-separated")
    v.add_argument("--input_schema", default=None, help="name:type:len,... (required for TSV files)")
    v.add_argument("--first_sequence", default=None)
    v.add_argument("--second_sequence", default=None)
    v.add_argument("--skip_first_line", action="store_true", help="the first line of each file is a header")
    v.add_argument("--strict", action="store_true", help="stop at the first bad row")
    v.add_argument("--image_columns", default=None,
                   help="comma-separated image columns (default: detected from names and values)")
    v.add_argument("--text_columns", default=None,
                   help="comma-separated columns that must be non-empty (default: the sequence columns that "
                        "are not images, else columns named like text/caption)")
    v.add_argument("--max_listed", type=int, default=20, help="bad rows listed (all are counted; default 20)")
    v.add_argument("--app_name", default=None,
                   help="check rows with the rules of this task, as its training does: text2image_generation, clip, "
                        "image2text_generation, video2text_generation or vq (e.g. text→image takes one image per "
                        "row, not a list of frames). Without it: every image and frame list must decode")
    from .common import add_reader_flags
    add_reader_flags(v)
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("score", aliases=["checker"],
                       help="score generated images (folder or predict TSV) with the attribute checker",
                       description="Judge images of the synthetic domain: is the <colour> <shape> at <position> "
                                   "(or moving in <direction>) that the caption describes there? Input: a predict "
                                   "output TSV (idx \\t text \\t gen_imgbase64, where the image field may be a JSON "
                                   "list of base64 PNGs), a synthetic TSV (video: idx \\t frames \\t text), or a "
                                   "folder of images with name.txt captions.")
    c.add_argument("input", help="TSV file(s) (comma-separated) or an image folder")
    c.add_argument("--input_schema", default=None,
                   help="default: idx,text,gen_imgbase64 (or idx,imgbase64,text when the 2nd column holds images)")
    c.add_argument("--text_column", default=None, help="caption column (default: text)")
    c.add_argument("--image_column", default=None, help="image column (default: first column named img*/*base64*)")
    c.add_argument("--skip_first_line", action="store_true")
    c.add_argument("--attributes", default=None,
                   help="attributes.jsonl written by `data synth`: judge against these (by idx) instead of "
                        "parsing captions")
    c.add_argument("--prompts", default=None,
                   help="for a folder without .txt files: idx \\t text TSV; image name.png or name_K.png "
                        "gets the text of idx 'name'")
    c.add_argument("--show", type=int, default=5, help="list this many failed objects (default 5)")
    c.add_argument("--json", action="store_true", help="print the scores as JSON")
    c.set_defaults(func=cmd_score)

    from .data_tools import add_tool_parsers  # clean, split, convert, stats
    add_tool_parsers(sub)


# ----------------------------------------------------------------------------------------------- synth

def cmd_synth(args) -> int:
    from ..data import synth

    try:
        splits = tuple(float(x) for x in args.splits.split(","))
    except ValueError:
        raise TuwenError(f"--splits {args.splits!r}: expected three comma-separated fractions") from None
    if args.n < 1:
        raise TuwenError(f"--n {args.n}: must be at least 1")
    if not 8 <= args.size <= 4096:
        raise TuwenError(f"--size {args.size}: use 8 to 4096 pixels (32, 64, 128, 256 are typical)")
    if args.video and args.frame_num < 2:
        raise TuwenError(f"--frame_num {args.frame_num}: a clip needs at least 2 frames")
    try:
        hold = synth.parse_holdout(args.holdout)
    except ValueError as e:
        raise TuwenError(f"--holdout: {e}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TuwenError(f"--out {out}: exists and is not a folder")
    t0 = time.time()
    try:
        meta = synth.write_dataset(out, n=args.n, size=args.size, lang=args.lang, seed=args.seed,
                                   video=args.video, frame_num=args.frame_num, splits=splits,
                                   image_format=args.image_format, holdout=hold,
                                   paraphrase=not args.plain_captions, workers=args.workers,
                                   jpeg_quality=args.jpeg_quality, progress=True)
    except ValueError as e:
        raise TuwenError(str(e)) from None
    except OSError as e:
        raise TuwenError(f"--out {out}: cannot write ({e.strerror or e})") from None
    dt = time.time() - t0
    what = f"{args.frame_num}-frame clips" if args.video else "images"
    print(f"wrote {args.n} {what} ({args.size}×{args.size} {meta['image_format']}, {args.lang} captions, "
          f"seed {args.seed}) to {out} in {dt:.1f} s")
    layout = "idx \\t imgbase64 (JSON list of frames) \\t text" if args.video else "idx \\t text \\t imgbase64"
    for split, files in meta["files"].items():
        for f in files:
            name = Path(f).name
            if name.endswith(".tsv") and not name.endswith("_prompts.tsv"):
                print(f"  {name:<26} {meta['counts'][split]:>7} rows   {layout}")
            elif name.endswith("_prompts.tsv"):
                print(f"  {name:<26} {meta['counts'][split]:>7} rows   idx \\t text (predict input)")
            else:
                print(f"  {name:<26} {meta['counts'][split]:>7} rows   attributes per idx (for the checker)")
    print(f"  {'meta.json':<26}                vocabulary, counts, schema")
    if hold:
        pairs = ", ".join(f"{c} {s}" for c, s in hold)
        print(f"held out of train/val/test: {pairs}; holdout.tsv: every row has at least one of them")
    if args.preview:
        from ..data.images import make_grid
        if args.video:
            frames, _, _ = synth.make_video_sample(f"{args.seed}:preview", args.size, args.lang, args.frame_num)
            imgs = frames
        else:
            imgs = [synth.make_sample(f"{args.seed}:preview:{i}", args.size, args.lang)[0] for i in range(16)]
        make_grid(imgs, cols=min(len(imgs), 4 if not args.video else len(imgs))).save(out / "preview.png")
        print(f"  {'preview.png':<26}                a few samples")
    d = str(out)
    print(f"use: --tables {d}/train.tsv,{d}/val.tsv --input_schema {meta['input_schema']} "
          f"--first_sequence {meta['first_sequence']} --second_sequence {meta['second_sequence']}")
    return 0


# ----------------------------------------------------------------------------------------------- validate

_OBJ_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _reason(e: Exception) -> str:
    """An image error's message without Python object reprs (PIL names the BytesIO it could not identify)."""
    return _OBJ_REPR.sub("", str(e)).replace("cannot identify image file", "not a known image format")


def _looks_like_image(value) -> bool:
    if isinstance(value, Path):
        return True
    if not isinstance(value, str):
        return False
    s = value.strip()
    if s.startswith("["):
        return True
    return len(s) >= 64 and _B64.match(s[:512]) is not None


def _detect_columns(source, args) -> tuple[list[str], list[str]]:
    """(image columns, text columns) of a source, from flags, column names and the first rows' values."""
    from ..data.tables import BadRow

    cols = list(source.columns)
    if args.image_columns:
        image_cols = [c.strip() for c in args.image_columns.split(",") if c.strip()]
        for c in image_cols:
            if c not in cols:
                raise TuwenError(f"--image_columns: {c!r} is not a column ({', '.join(cols)})")
    else:
        image_cols = [c for c in cols if _IMAGE_NAME.search(c)]
        seqs = [c for c in (args.first_sequence, args.second_sequence)
                if c and c not in image_cols and not _TEXT_NAME.search(c)]
        if seqs:
            votes, seen = Counter(), 0
            for i in range(min(len(source), 200)):
                row = source.row(i)
                if isinstance(row, BadRow):
                    continue
                seen += 1
                for c in seqs:
                    votes[c] += _looks_like_image(row.get(c))
                if seen >= 20:
                    break
            image_cols += [c for c in seqs if seen and votes[c] * 2 > seen]
    if args.text_columns:
        text_cols = [c.strip() for c in args.text_columns.split(",") if c.strip()]
        for c in text_cols:
            if c not in cols:
                raise TuwenError(f"--text_columns: {c!r} is not a column ({', '.join(cols)})")
    else:
        seqs = [c for c in (args.first_sequence, args.second_sequence) if c]
        text_cols = [c for c in seqs if c not in image_cols]
        if not seqs:
            text_cols = [c for c in cols if _TEXT_NAME.search(c) and c not in image_cols]
    return image_cols, text_cols


def cmd_validate(args) -> int:
    from ..data.images import ImageDecodeError, decode_frames, open_image
    from ..data.tables import BadRowError, BadRowReport, open_source, parse_schema, require_columns, validate

    schema = parse_schema(args.input_schema) if args.input_schema else None
    if schema is not None:
        require_columns(schema, {"--first_sequence": args.first_sequence,
                                 "--second_sequence": args.second_sequence})
    if args.max_listed < 0:
        raise TuwenError(f"--max_listed {args.max_listed}: must be ≥ 0")
    source = open_source(args.tables, schema, skip_first_line=args.skip_first_line, flag="tables")
    for flag, col in (("--first_sequence", args.first_sequence), ("--second_sequence", args.second_sequence)):
        if col and col not in source.columns:
            raise TuwenError(f"{flag}={col!r} is not a column of {args.tables} ({', '.join(source.columns)})")
    rules = None
    if args.app_name:
        from ..data.rules import rules_for
        rules = rules_for(args.app_name)
        seqs = {"--first_sequence": args.first_sequence, "--second_sequence": args.second_sequence}
        image_col = seqs[rules.image_flag] or ("imgbase64" if "imgbase64" in source.columns else "image")
        text_col = seqs[rules.text_flag] or "text"
        for flag, col in ((rules.image_flag, image_col), (rules.text_flag, text_col if rules.text else None)):
            if col and col not in source.columns:
                raise TuwenError(f"{flag}={col!r} is not a column of {args.tables} ({', '.join(source.columns)})")
        image_cols, text_cols = [image_col], ([text_col] if rules.text else [])
    else:
        image_cols, text_cols = _detect_columns(source, args)
    sizes: Counter = Counter()
    frame_counts: Counter = Counter()

    def transform(row: dict, i: int):
        if rules is not None:
            from ..data.rules import check_image_field, check_text_field
            for c in text_cols:
                check_text_field(row.get(c), c, rules)
            for c in image_cols:
                check_image_field(row.get(c), c, rules)
        for c in text_cols:
            if not str(row.get(c, "")).strip():
                raise ValueError(f"column {c!r} is empty")
        for c in image_cols:
            value = row.get(c)
            if isinstance(value, (Path, bytes)):  # CSV/JSONL paths, Parquet/WebDataset bytes
                frames = [value]
            elif isinstance(value, list):  # a frame list from a JSONL/CSV reader
                frames = value
            else:
                try:
                    frames = decode_frames(value or "")
                except ImageDecodeError as e:
                    raise ValueError(f"column {c!r}: {e}") from None
                if not frames:
                    raise ValueError(f"column {c!r}: empty frame list")
            multi = len(frames) > 1 or (isinstance(value, str) and value.strip().startswith("["))
            for k, f in enumerate(frames):
                try:
                    img = open_image(f)
                except ImageDecodeError as e:
                    where = f" frame {k}" if multi else ""
                    raise ValueError(f"column {c!r}{where}: {_reason(e)}") from None
                sizes[img.size] += 1
            if multi:
                frame_counts[len(frames)] += 1
        return None

    report = BadRowReport(max_listed=args.max_listed)
    name = args.tables
    total = len(source)
    try:
        good, report = validate(source, transform, strict=args.strict, report=report, progress=True)
    except BadRowError as e:
        print(f"{name}: stopped at the first bad row (--strict)")
        print(f"  {str(e).split(' (--strict')[0]}")
        return 1
    bad = report.count
    print(f"{name}: {total} rows, {good} good, {bad} bad")
    print(f"  columns: {', '.join(source.columns)}")
    print(f"  image columns (decoded): {', '.join(image_cols) or 'none'}; "
          f"text columns (must be non-empty): {', '.join(text_cols) or 'none'}")
    if sizes:
        common = ", ".join(f"{w}×{h} ({n})" for (w, h), n in sizes.most_common(3))
        more = f", {len(sizes) - 3} other sizes" if len(sizes) > 3 else ""
        print(f"  image sizes: {common}{more}")
    if frame_counts:
        print("  frames per row: " + ", ".join(f"{k} ({n})" for k, n in sorted(frame_counts.items())))
    if bad:
        print(f"bad rows ({bad}):")
        for b in sorted(report.listed, key=lambda b: (b.file, b.line)):
            print(f"  {b}")
        if bad > len(report.listed):
            print(f"  … and {bad - len(report.listed)} more (--max_listed to list more)")
        return 1
    if total == 0:
        print("no rows found")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- score

def _split_images(value) -> list:
    """An image field: a path, a JSON/Python list of base64 strings, ';'-separated base64, or one base64."""
    from ..data.images import decode_frames

    if isinstance(value, Path):
        return [value]
    s = (value or "").strip()
    if s.startswith("["):
        return decode_frames(s)
    if ";" in s:
        return [p for p in s.split(";") if p.strip()]
    return [s] if s else []


def _guess_schema(path: str, skip_first_line: bool) -> str:
    with open(path, "rb") as f:
        line = f.readline()
        if skip_first_line:
            line = f.readline()
    fields = line.decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
    if len(fields) == 3:
        if _looks_like_image(fields[1]) and not _looks_like_image(fields[2]):
            return "idx:str:1,imgbase64:str:1,text:str:1"
        return "idx:str:1,text:str:1,gen_imgbase64:str:1"
    if len(fields) == 2:
        if _looks_like_image(fields[0]):
            return "gen_imgbase64:str:1,text:str:1"
        return "text:str:1,gen_imgbase64:str:1"
    raise TuwenError(f"{path}: cannot guess the columns of a {len(fields)}-column file; pass --input_schema "
                     "(e.g. idx:str:1,text:str:1,gen_imgbase64:str:1)")


def _folder_items(root: Path, prompts: dict[str, str] | None, attrs: dict | None):
    from ..data.pngmeta import folder_prompts, image_files, png_prompt
    from ..data.tables import IMAGE_EXTS

    items = []
    generated = folder_prompts(root)  # tuwen generate / demo: prompts.json names each image's prompt
    for p in image_files(root, IMAGE_EXTS):  # grids/ and preview.png are not images to score
        stem = p.stem
        target = None
        txt = p.with_suffix(".txt")
        if txt.exists():
            try:
                target = next((t.strip() for t in txt.read_text(encoding="utf-8").splitlines() if t.strip()), "")
            except UnicodeDecodeError as e:
                target = None
                items.append((str(p), p, None, f"{txt}: invalid UTF-8 at byte {e.start}"))
                continue
        for k in (stem, stem.rsplit("_", 1)[0] if "_" in stem else None):
            if target is None and k is not None:
                if attrs is not None and k in attrs:
                    target = attrs[k]
                elif prompts is not None and k in prompts:
                    target = prompts[k]
        if target is None and prompts is None and attrs is None:
            target = generated.get(p.relative_to(root).as_posix()) or png_prompt(p)
        if target is None:
            items.append((str(p), p, None, f"no caption for {p.name} (add {p.stem}.txt or pass --prompts)"))
        else:
            items.append((str(p), p, target, None))
    return items


def cmd_score(args) -> int:
    from ..data import checker, synth
    from ..data.images import ImageDecodeError, open_image
    from ..data.tables import BadRow, Table, parse_schema

    attrs = None
    if args.attributes:
        try:
            attrs = synth.read_attributes(args.attributes)
        except FileNotFoundError:
            raise TuwenError(f"--attributes {args.attributes}: no such file") from None
        except (ValueError, KeyError) as e:
            raise TuwenError(f"--attributes {args.attributes}: not an attributes.jsonl written by "
                             f"`tuwen data synth` ({e})") from None
    prompts = None
    if args.prompts:
        prompts = {}
        try:
            with open(args.prompts, encoding="utf-8") as f:
                for line in f:
                    parts = line.rstrip("\r\n").split("\t")
                    if len(parts) >= 2:
                        prompts[parts[0]] = parts[1]
        except FileNotFoundError:
            raise TuwenError(f"--prompts {args.prompts}: no such file") from None

    # items: (where, image field, target (caption/attrs), problem)
    items = []
    root = Path(args.input).expanduser()
    if root.is_dir():
        items = _folder_items(root, prompts, attrs)
        if not items:
            raise TuwenError(f"{root}: no images found")
    else:
        paths = [p for p in args.input.split(",") if p.strip()]
        for p in paths:
            if not Path(p).exists():
                raise TuwenError(f"{p} does not exist")
        schema = parse_schema(args.input_schema) if args.input_schema else \
            parse_schema(_guess_schema(paths[0], args.skip_first_line))
        names = [c.name for c in schema]
        text_col = args.text_column or ("text" if "text" in names else None)
        image_col = args.image_column or next((n for n in names if _IMAGE_NAME.search(n)), None)
        if image_col not in names:
            raise TuwenError(f"--image_column: no image column among {', '.join(names)}; name one")
        if attrs is None and text_col not in names:
            raise TuwenError(f"--text_column: no caption column among {', '.join(names)}; name one "
                             "or pass --attributes")
        table = Table(paths, schema, skip_first_line=args.skip_first_line, flag="input")
        for i in range(len(table)):
            row = table.row(i)
            f, line = table.location(i)
            where = f"{f}:{line}"
            if isinstance(row, BadRow):
                items.append((where, None, None, row.reason))
                continue
            target = None
            if attrs is not None and "idx" in row:
                target = attrs.get(str(row["idx"]))
            if target is None and text_col:
                target = row[text_col]
            if target is None:
                items.append((where, None, None, f"idx {row.get('idx')!r} not in --attributes"))
                continue
            items.append((where, row[image_col], target, None))

    images, targets, wheres, problems, groups = [], [], [], [], []
    n_unparsed = 0
    for where, field, target, problem in items:
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        spec = synth.parse_caption(target) if isinstance(target, str) else synth.object_specs(target)
        if spec is None:
            n_unparsed += 1
            problems.append(f"{where}: caption not in the synthetic vocabulary: {str(target)[:60]!r}")
            continue
        video = any(o.direction is not None for o in spec)
        try:
            fields = _split_images(field)
            if not fields:
                raise ImageDecodeError("image field is empty")
            decoded = [open_image(x) for x in fields]
        except ImageDecodeError as e:
            problems.append(f"{where}: {_reason(e)}")
            continue
        cands = [decoded] if video else [[im] for im in decoded]
        groups.append(list(range(len(images), len(images) + len(cands))))
        for c in cands:
            images.append(c if video else c[0])
            targets.append(spec)
            wheres.append(where)
    if not images:
        for p in problems[:args.show or 5]:
            print(f"  {p}", file=sys.stderr)
        raise TuwenError(f"{args.input}: nothing to score ({len(problems)} unusable rows/images)")
    video = any(o.direction is not None for t in targets for o in t)
    mixed = video and not all(any(o.direction is not None for o in t) for t in targets)
    if mixed:
        raise TuwenError(f"{args.input}: mixes clips and still images; score them separately")
    # empirical chance: every image against the objects of the next prompt
    shuffled = [targets[groups[(gi + 1) % len(groups)][0]] for gi, g in enumerate(groups) for _ in g] \
        if len(groups) > 1 else False
    res = checker.score(images, targets, shuffled=shuffled, details=True)
    details = res.pop("details")
    place = "direction" if video else "position"
    res["unusable"] = len(problems)
    if any(len(g) > 1 for g in groups):
        res["best_of_n"] = sum(any(all(o["ok"] for o in details[j]) for j in g) for g in groups) / len(groups)
        res["n_prompts"] = len(groups)
    if args.json:
        print(json.dumps(res, ensure_ascii=False, indent=1))
        return 0
    what = "clips" if video else "images"
    print(f"scored {res['n_images']} {what} ({res['n_objects']} objects) from {args.input}"
          + (f"; {len(problems)} unusable (listed below)" if problems else ""))
    shuf = res.get("shuffled", {})
    print(f"  {'':<10} {'accuracy':>9} {'chance':>8} {'shuffled':>9}")
    for k in ("color", "shape", place, "object", "image"):
        s = f"{shuf[k]:9.3f}" if k in shuf else f"{'-':>9}"
        print(f"  {k:<10} {res[k]:9.3f} {res['chance'][k]:8.3f} {s}")
    if "best_of_n" in res:
        print(f"  best of n  {res['best_of_n']:9.3f}   (a prompt counts when any of its images is right; "
              f"{res['n_prompts']} prompts)")
    if not video:
        print(f"  extra objects per image (colours not asked for): {res['extra_objects']:.2f}")
    shown = 0
    for j, d in enumerate(details):
        for o in d:
            if not o["ok"] and shown < args.show:
                t = o["target"]
                want = f"{t['color']} {t['shape']} " + (t.get("position") or t.get("direction") or "")
                if o["found"] is None:
                    got = "colour not found"
                else:
                    got = f"found {t['color']} {o['found'].get('shape')} " + \
                        str(o["found"].get("position") or o["found"].get("direction"))
                print(f"  miss {wheres[j]}: want {want}; {got}")
                shown += 1
    for p in problems[:args.show]:
        print(f"  unusable {p}")
    if len(problems) > args.show:
        print(f"  … and {len(problems) - args.show} more unusable")
    return 0
