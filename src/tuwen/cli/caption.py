"""``tuwen caption IMAGE... --model DIR``: one-off captions of images (or videos) with a trained captioner.

    tuwen caption a.png b.jpg --model runs/cap                    # greedy, one caption each
    tuwen caption a.png --model runs/cap --beams 4 -n 3           # the 3 best of a 4-beam search
    tuwen caption a.png --model runs/cap --top_k 20 -n 5 --seed 1 # 5 sampled captions
    tuwen caption --model runs/v2t --frames f0.png,f1.png,f2.png,f3.png   # one video (repeat --frames for more)

For a video model a positional input may also be a folder of frames (sorted by name) or comma-separated frames.
Output: ``input<TAB>caption`` per caption (``--json``: one JSON list of ``{"input", "gen_text"}``).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("caption", help="caption images or videos with a trained captioner",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*",
                   help="image files, folders of images, globs ('imgs/*.png'), or .txt lists of image paths (one a "
                        "line, CogView's image2text input); for a video model: frame folders / a,b,c lists")
    p.add_argument("--model", required=True, help="captioner folder (tuwen or EasyNLP mingpt_i2t)")
    p.add_argument("--frames", action="append", default=[], metavar="F0,F1,...",
                   help="one video as comma-separated frame files, in time order (repeatable)")
    p.add_argument("--frame_num", type=int, default=None, help="EasyNLP video models: frames per clip (default 3)")
    p.add_argument("--beams", type=int, default=None, help="beam width (default: the model's, usually 1)")
    p.add_argument("--length_penalty", type=float, default=None)
    p.add_argument("--no_repeat_ngram_size", type=int, default=None)
    p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens (1 = greedy)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("-n", "--num", type=int, default=1, help="captions per input (EasyNLP max_generated_num)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON instead of TSV lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import TuwenError
    from ..data.images import frames_of
    from ..models.captioner import Captioner
    from ..runtime import init_distributed

    over = {}
    if args.frame_num is not None:
        over["frame_num"] = args.frame_num
    model = Captioner.from_pretrained(args.model, device=init_distributed(args.device), **over)
    video = model.config.video
    # video: every positional input is one clip (a folder of frames, "a.png,b.png" or a single frame)
    inputs = [frames_of(x) for x in args.images] if video else expand_image_args(args.images)
    if args.frames:
        if not video:
            raise TuwenError(f"--frames: {args.model} captions still images, not videos; pass the images as arguments")
        inputs += [[f.strip() for f in spec.split(",") if f.strip()] for spec in args.frames]
    if not inputs:
        raise TuwenError("no input: give image files" + (" or --frames a.png,b.png,..." if video else ""))
    if args.num < 1:
        raise TuwenError("-n must be >= 1")
    kw = {k: v for k, v in (("num_beams", args.beams), ("length_penalty", args.length_penalty),
                            ("no_repeat_ngram_size", args.no_repeat_ngram_size), ("top_k", args.top_k),
                            ("top_p", args.top_p), ("temperature", args.temperature)) if v is not None}
    results = []
    for s in range(0, len(inputs), args.batch_size):
        chunk = inputs[s:s + args.batch_size]
        pv = model.pixel_values(chunk)
        caps = model.generate(pixel_values=pv, num_return_sequences=args.num, seed=args.seed,
                              keys=list(range(s, s + len(chunk))), **kw)
        for x, group in zip(chunk, caps):
            name = ",".join(map(str, x)) if isinstance(x, list) else str(x)
            results.append({"input": name, "gen_text": group})
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
    else:
        for r in results:
            for c in r["gen_text"]:
                sys.stdout.write(f"{r['input']}\t{c}\n")
    return 0


def expand_image_args(args: list[str]) -> list[str]:
    """Still-image inputs → image paths: a file as it is, a folder's images (sorted; grids left out), a glob's
    matches, a ``.txt`` list (one path a line, relative to the list's folder when not found as given; CogView's
    image2text input). A path that does not exist is an error naming it (and the list line)."""
    import glob
    import re
    from pathlib import Path

    from ..data.pngmeta import image_files
    from ..data.tables import IMAGE_EXTS
    from ..errors import TuwenError

    out: list[str] = []
    for a in args:
        p = Path(a).expanduser()
        if p.is_dir():
            found = image_files(p, IMAGE_EXTS)
            if not found:
                raise TuwenError(f"{a}: a folder with no images ({', '.join(sorted(IMAGE_EXTS))})")
            out += [str(f) for f in found]
        elif p.is_file() and p.suffix.lower() == ".txt":
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise TuwenError(f"{a}: not UTF-8 text (byte {e.start}); a list holds one image path a line") from None
            n = 0
            for lineno, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                q = Path(line).expanduser()
                if not q.is_file() and not q.is_absolute() and (p.parent / q).is_file():
                    q = p.parent / q
                if not q.is_file():
                    raise TuwenError(f"{a}:{lineno}: {line}: no such image file")
                out.append(str(q))
                n += 1
            if not n:
                raise TuwenError(f"{a}: an empty list (one image path a line)")
        elif p.is_file():
            out.append(str(p))
        elif any(c in a for c in "*?["):
            found = sorted(glob.glob(str(p), recursive=True))
            found = [f for f in found if Path(f).is_file()]
            if not found:
                raise TuwenError(f"{a}: no file matches this pattern")
            out += found
        elif len(a) > 256 and re.fullmatch(r"[A-Za-z0-9+/=_-]+", a):
            out.append(a)  # a base64 image given on the command line
        else:
            raise TuwenError(f"{a}: no such file or folder")
    return out
