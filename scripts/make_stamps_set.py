"""Build a real, Chinese-captioned image set offline from Debian's ``tuxpaint-stamps-default`` package.

The package holds ~960 stamps (drawings and photos of animals, food, vehicles, people, plants, ...) as PNG or SVG,
each with a ``name.txt`` of descriptions in many languages (``zh_CN.utf8=…``; the first line is English).

    apt-get download tuxpaint-stamps-default          # (or give the .deb / an extracted folder)
    python scripts/make_stamps_set.py --deb tuxpaint-stamps-default_*.deb --out runs/stamps [--sizes 64,128]
        [--lang zh|en] [--val 0.1 --test 0.1]

Writes, for every size S: ``OUT/S/{train,val,test}.tsv`` (EasyNLP ``idx \\t text \\t imgbase64``: the schema
``idx:str:1,text:str:1,imgbase64:str:1`` for text→image and, with ``--first_sequence=imgbase64
--second_sequence=text``, for captioning), ``OUT/S/{split}_prompts.tsv`` (``idx \\t text``), and
``OUT/stamps.json`` (counts, what was skipped and why, the folder of every split). Each stamp is cropped to its
opaque part, centred on white with a small margin, and resized (Lanczos) to S×S. ``*_mirror`` files (tuxpaint's
mirrored twins) are skipped. SVGs are rasterised with cairosvg when it is installed (``pip install cairosvg``;
it needs the libcairo2 system library), otherwise skipped and counted. The split is by stamp folder
(e.g. ``animals/birds``): a folder's stamps all go to one split, chosen by a hash of its path, so test images
come from folders never seen in training. The images are data you build; do not commit them.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

STAMPS_SUBDIR = "usr/share/tuxpaint/stamps"


def read_caption(txt: Path, lang: str) -> str | None:
    """The stamp's description: ``zh_CN.utf8=`` (lang zh) or the first, English line (lang en); None if absent."""
    lines = [ln.strip() for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        return None
    if lang == "en":
        text = lines[0] if "=" not in lines[0].split(" ")[0] else None
    else:
        text = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("zh_CN.utf8=")), None)
    if not text:
        return None
    text = " ".join(text.replace("\t", " ").split())
    return text.rstrip("。.！!").strip() or None


def load_stamp(path: Path) -> Image.Image:
    """RGBA image of a PNG or SVG stamp (SVG rendered with cairosvg, longest side 512 px)."""
    if path.suffix.lower() == ".svg":
        import cairosvg  # optional: only for SVG stamps
        png = cairosvg.svg2png(url=str(path), output_width=512)
        img = Image.open(io.BytesIO(png))
        if img.height > img.width:  # tall drawing: render again with the height fixed
            img = Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), output_height=512)))
    else:
        img = Image.open(path)
    img.load()
    return img.convert("RGBA")


def on_white(img: Image.Image, size: int, margin: float = 0.04) -> Image.Image:
    """Crop to the opaque part, centre on a white square with ``margin`` on each side, resize to size×size."""
    bbox = img.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if bbox:
        img = img.crop(bbox)
    side = int(round(max(img.size) * (1 + 2 * margin))) or 1
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def find_stamps(root: Path) -> list[tuple[str, str, Path]]:
    """(folder relative to root, stamp name, image path) for every stamp; PNG preferred when both exist."""
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = Path(d, f)
            if p.suffix.lower() in (".png", ".svg"):
                rel = str(Path(d).relative_to(root))
                found.setdefault((rel, p.stem), {})[p.suffix.lower()] = p
    return [(rel, name, exts.get(".png") or exts[".svg"]) for (rel, name), exts in sorted(found.items())]


def assign_splits(counts: dict[str, int], val: float, test: float) -> dict[str, str]:
    """Folder → split. Folders in the order of a hash of their path fill test, then val (each until it holds its
    fraction of the stamps); the rest is train. Deterministic and independent of the machine."""
    order = sorted(counts, key=lambda f: hashlib.sha1(f.encode("utf-8")).hexdigest())
    total = sum(counts.values())
    out, n = {}, {"test": 0, "val": 0}
    for f in order:
        if n["test"] < test * total:
            s = "test"
        elif n["val"] < val * total:
            s = "val"
        else:
            s = "train"
        if s in n:
            n[s] += counts[f]
        out[f] = s
    return out


def extract(deb: Path, into: Path, subdir: str = STAMPS_SUBDIR) -> Path:
    """Unpack a Debian package into ``into``; returns ``into/subdir``."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into / subdir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--deb", help="tuxpaint-stamps-default_*.deb (from `apt-get download tuxpaint-stamps-default`)")
    src.add_argument("--stamps_dir", help="an extracted stamps folder (…/usr/share/tuxpaint/stamps)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="64,128", help="comma list of image sizes in pixels")
    ap.add_argument("--lang", choices=("zh", "en"), default="zh", help="caption language (zh_CN line, or English)")
    ap.add_argument("--val", type=float, default=0.1, help="fraction of stamps (by folder) for validation")
    ap.add_argument("--test", type=float, default=0.1, help="fraction of stamps (by folder) for test")
    ap.add_argument("--no_svg", action="store_true", help="skip SVG stamps even when cairosvg is installed")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out = Path(args.out)
    tmp = None
    if args.deb:
        if not Path(args.deb).is_file():
            print(f"error: --deb {args.deb}: no such file (get it with `apt-get download tuxpaint-stamps-default`)",
                  file=sys.stderr)
            return 2
        tmp = tempfile.TemporaryDirectory(prefix="stamps-")
        root = extract(Path(args.deb), Path(tmp.name))
    else:
        root = Path(args.stamps_dir)
    if not root.is_dir():
        print(f"error: {root}: no stamps folder", file=sys.stderr)
        return 2
    try:
        import cairosvg  # noqa: F401
        have_svg = not args.no_svg
    except (ImportError, OSError):
        have_svg = False

    skipped: dict[str, list[str]] = {"mirror": [], "no_caption": [], "svg_without_cairosvg": [], "unreadable": []}
    items = []   # (folder, name, caption, RGBA image)
    for folder, name, path in find_stamps(root):
        key = f"{folder}/{name}"
        if name.endswith("_mirror"):
            skipped["mirror"].append(key)
            continue
        txt = path.with_suffix(".txt")
        cap = read_caption(txt, args.lang) if txt.exists() else None
        if cap is None:
            skipped["no_caption"].append(key)
            continue
        if path.suffix.lower() == ".svg" and not have_svg:
            skipped["svg_without_cairosvg"].append(key)
            continue
        try:
            img = load_stamp(path)
        except Exception as e:  # a broken file in the package: count it, go on
            skipped["unreadable"].append(f"{key}: {e}")
            continue
        items.append((folder, name, cap, img, path.suffix.lower()))

    counts: dict[str, int] = {}
    for it in items:
        counts[it[0]] = counts.get(it[0], 0) + 1
    split_of = assign_splits(counts, args.val, args.test)
    splits = ("train", "val", "test")
    for size in sizes:
        d = out / str(size)
        d.mkdir(parents=True, exist_ok=True)
        files = {s: open(d / f"{s}.tsv", "w", encoding="utf-8") for s in splits}
        prompts = {s: open(d / f"{s}_prompts.tsv", "w", encoding="utf-8") for s in splits}
        for folder, name, cap, img, _ in items:
            s = split_of[folder]
            idx = f"{folder}/{name}".replace("\t", " ")
            files[s].write(f"{idx}\t{cap}\t{png_b64(on_white(img, size))}\n")
            prompts[s].write(f"{idx}\t{cap}\n")
        for f in list(files.values()) + list(prompts.values()):
            f.close()

    n = {s: sum(1 for it in items if split_of[it[0]] == s) for s in splits}
    caps = [it[2] for it in items]
    summary = {
        "source": args.deb or args.stamps_dir, "lang": args.lang, "sizes": sizes,
        "stamps_found": len(find_stamps(root)), "images": len(items),
        "png": sum(it[4] == ".png" for it in items), "svg": sum(it[4] == ".svg" for it in items),
        "split_images": n, "split_folders": {s: sorted(f for f, v in split_of.items() if v == s) for s in splits},
        "distinct_captions": len(set(caps)), "mean_caption_chars": round(sum(map(len, caps)) / max(1, len(caps)), 2),
        "skipped": {k: len(v) for k, v in skipped.items()}, "skipped_items": skipped,
    }
    (out / "stamps.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(items)} images ({summary['png']} PNG, {summary['svg']} SVG) → {out}: train {n['train']}, "
          f"val {n['val']}, test {n['test']} ({len(counts)} folders); {len(set(caps))} distinct captions, "
          f"mean {summary['mean_caption_chars']} characters; skipped "
          + ", ".join(f"{k} {len(v)}" for k, v in skipped.items()))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
