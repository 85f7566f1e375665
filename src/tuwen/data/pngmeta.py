"""The record of how a generated image was made, in its own PNG file (text chunks, as other image generators do).

Every PNG tuwen generates carries:

* ``prompt`` (iTXt, UTF-8): the prompt as given;
* ``tuwen`` (iTXt): a JSON record — prompt, seed, key (the prompt's index or the row's ``idx``), k (the image's
  number among the prompt's candidates), sampling settings (top_k, top_p, temperature, guidance_scale), model (the
  folder or name it was loaded from), image_size / text_len / img_len, tuwen's version; when they are not the
  defaults, ``weights_dtype`` (the GPT's Linear weights) and ``vq_dtype`` (the VQGAN decode dtype, "bf16"; absent =
  fp32), and ``decode`` ([position, batch size] of the VQGAN decode), so the same pixels can be made again;
* ``parameters`` (tEXt): the same in one human-readable line.

``read_png_record(path)`` gives the record back; ``tuwen generate --from-png IMG`` re-creates the image from it.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..errors import TuwenError

RECORD_KEY = "tuwen"


def png_info(record: dict[str, Any] | None) -> PngImagePlugin.PngInfo | None:
    """The PNG text chunks for ``record`` (None: none)."""
    if not record:
        return None
    info = PngImagePlugin.PngInfo()
    if record.get("prompt") is not None:
        info.add_itxt("prompt", str(record["prompt"]))
    info.add_itxt(RECORD_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True))
    s = record.get("sampling") or {}
    line = ", ".join([f"seed: {record.get('seed')}", f"k: {record.get('k')}"]
                     + [f"{k}: {v}" for k, v in s.items()] + [f"model: {record.get('model')}"])
    info.add_text("parameters", line.encode("ascii", "backslashreplace").decode("ascii"))
    return info


def save_png(img: Image.Image, dest, record: dict[str, Any] | None = None) -> None:
    """Save ``img`` as PNG to a path or a binary file object, with ``record`` in its text chunks (``record`` gets
    ``decode`` = [position, batch size] of the VQGAN decode that made ``img``, when ``TextToImage.generate`` noted
    it: what ``regenerate`` needs for the same pixels)."""
    if record is not None and "tuwen_decode" in img.info:
        record["decode"] = list(img.info["tuwen_decode"])
    img.save(dest, format="PNG", pnginfo=png_info(record))


def png_bytes(img: Image.Image, record: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    save_png(img, buf, record)
    return buf.getvalue()


def read_png_record(path: str | Path) -> dict[str, Any]:
    """The ``tuwen`` record of a PNG written by tuwen, or a TuwenError saying why there is none."""
    p = Path(path)
    if not p.is_file():
        raise TuwenError(f"{p}: no such file")
    try:
        with Image.open(p) as im:
            im.load()  # text chunks after the image data are read with it
            text = dict(getattr(im, "text", {}) or {})
            fmt = im.format
    except (OSError, SyntaxError, ValueError) as e:
        raise TuwenError(f"{p}: not a readable image ({e})") from None
    if fmt != "PNG" or RECORD_KEY not in text:
        raise TuwenError(f"{p}: no tuwen record in this image (only PNGs written by tuwen generate / demo / "
                         f"predict --output_dir carry one)")
    try:
        rec = json.loads(text[RECORD_KEY])
    except json.JSONDecodeError as e:
        raise TuwenError(f"{p}: its tuwen record is not valid JSON ({e})") from None
    if not isinstance(rec, dict) or "prompt" not in rec or "seed" not in rec:
        raise TuwenError(f"{p}: its tuwen record lacks the prompt or the seed")
    return rec


# ----------------------------------------------------------------------------------------------- output folders

GRID_DIR = "grids"


def image_files(root: str | Path, exts) -> list[Path]:
    """The images of a folder (recursively, sorted) that are single generated or given images: grids (the
    ``grids/`` sub-folder, older ``*_grid.png``) and ``preview.png`` are left out."""
    root = Path(root)
    out = []
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in exts:
            continue
        rel = f.relative_to(root)
        if GRID_DIR in rel.parts[:-1] or f.stem.endswith("_grid") or f.name == "preview.png":
            continue
        out.append(f)
    return out


def folder_prompts(root: str | Path) -> dict[str, str]:
    """``prompts.json`` of a tuwen output folder (generate, demo) as {image file name: prompt}; {} when absent.
    A file that is there but unreadable is an error naming it."""
    p = Path(root) / "prompts.json"
    if not p.is_file():
        return {}
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
        return {str(n): str(e["prompt"]) for e in entries for n in e.get("images", [])}
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:
        raise TuwenError(f"{p}: not a prompts.json written by tuwen ({e}); remove it or fix it") from None


def png_prompt(path: str | Path) -> str | None:
    """The ``prompt`` text chunk of a PNG written by tuwen (None when there is none)."""
    try:
        with Image.open(path) as im:
            return (getattr(im, "text", None) or {}).get("prompt")
    except (OSError, SyntaxError, ValueError):
        return None


def tuwen_version() -> str:
    """The installed tuwen's version (recorded with every generated image)."""
    try:
        from importlib.metadata import version
        return version("tuwen")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source tree on sys.path)
        return "unknown"
