"""Extra caption-free images for an image tokenizer, offline, from Debian's ``openclipart-png`` package.

A VQGAN needs no captions, so a small captioned set (the tuxpaint stamps, 600 training images, mostly earth-toned
animals and plants) can be widened with any images in the style of the target set. Open Clip Art's 8 000 PNGs
are saturated, flat-coloured drawings on transparent backgrounds — the hues the stamps' tokenizer loses.

    apt-get download openclipart-png
    python scripts/make_clipart_images.py --deb openclipart-png_*.deb --out runs/clipart/64.tsv --n 1200 --size 64

Each image is rendered exactly like the stamps (``make_stamps_set.on_white``: cropped to its opaque part, centred
on white with a small margin, Lanczos to S×S) and written as an EasyNLP TSV row ``idx \\t text \\t imgbase64``
(text = the file's folder and name, for reference only). ``--n`` images are drawn at random (``--seed``) from the
files that open; files that do not decode, are smaller than ``--min_side`` pixels or larger than ``--max_pixels``, are
skipped and counted.
The images are data you build; do not commit them.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_stamps_set import extract, on_white, png_b64  # noqa: E402  (this folder's sibling script)

CLIPART_SUBDIR = "usr/share/openclipart/png"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--deb", type=Path, help="openclipart-png_*.deb (from apt-get download openclipart-png)")
    src.add_argument("--root", type=Path, help="an extracted folder of PNGs (searched recursively)")
    ap.add_argument("--out", type=Path, required=True, help="the TSV to write")
    ap.add_argument("--n", type=int, default=1200, help="how many images (0: all)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--min_side", type=int, default=32, help="skip images whose longer side is smaller")
    ap.add_argument("--max_pixels", type=int, default=40_000_000, help="skip larger images (not decoded)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.deb is not None:
        if not args.deb.is_file():
            sys.exit(f"--deb {args.deb}: no such file (run: apt-get download openclipart-png)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        root = extract(args.deb, args.out.parent / "_extracted", CLIPART_SUBDIR)
    else:
        root = args.root
    if not root.is_dir():
        sys.exit(f"{root}: not a folder of PNGs")
    files = sorted(root.rglob("*.png"))
    if not files:
        sys.exit(f"{root}: no .png files")
    random.Random(args.seed).shuffle(files)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, {"unreadable": 0, "too small": 0, "too large": 0}
    from PIL import Image
    with open(args.out, "w", encoding="utf-8") as f:
        for path in files:
            if args.n and written >= args.n:
                break
            try:
                with Image.open(path) as im:
                    if im.width * im.height > args.max_pixels:  # before decoding: a few are 100 M pixels
                        skipped["too large"] += 1
                        continue
                    im.load()
                    img = im.convert("RGBA")
            except (OSError, ValueError, Image.DecompressionBombError):
                skipped["unreadable"] += 1
                continue
            if max(img.size) < args.min_side:
                skipped["too small"] += 1
                continue
            name = str(path.relative_to(root).with_suffix(""))
            f.write(f"clipart-{written:05d}\t{name}\t{png_b64(on_white(img, args.size))}\n")
            written += 1
    print(f"{args.out}: {written} images from {len(files)} files under {root}; skipped {skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
