"""Image decoding (base64 / bytes / paths, any mode → RGB) and preprocessing (resize, crop, scale to [-1, 1])."""
from __future__ import annotations

import base64
import binascii
import io
import json
import random
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is a bad row, not a half-grey picture
Image.MAX_IMAGE_PIXELS = 20000 * 20000

_STD_TABLE = bytes.maketrans(b"-_", b"+/")


class ImageDecodeError(ValueError):
    """Raised for a field that is not a decodable image; the message is the bad-row reason."""


def b64decode_any(s: str | bytes) -> bytes:
    """Decode standard or URL-safe base64, tolerating missing padding and surrounding whitespace/quotes."""
    if isinstance(s, str):
        s = s.strip().strip('"').encode("ascii", errors="strict") if s.isascii() else None
        if s is None:
            raise ImageDecodeError("image field is not base64 (non-ASCII characters)")
    else:
        s = s.strip()
    if s.startswith(b"data:") and b"," in s[:100]:  # data URI
        s = s.split(b",", 1)[1]
    s = s.translate(_STD_TABLE, b" \r\n")
    if not s:
        raise ImageDecodeError("image field is empty")
    s += b"=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageDecodeError(f"bad base64 ({e})") from None


def encode_png_b64(img: Image.Image) -> str:
    """PNG bytes as standard base64 (no newlines), as EasyNLP writes ``gen_imgbase64``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_image_b64(img: Image.Image, fmt: str = "PNG", **save_kw) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode → RGB. Transparency is composited over ``background`` (white), not dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and img.palette and img.palette.mode == "RGBA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, background + (255,))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = ((arr - arr.min()) / max(np.ptp(arr), 1e-12) * 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def open_image(data: bytes | str | Path | Image.Image, target_size: int | None = None) -> Image.Image:
    """Decode image bytes (or a path, or a base64 string) into a fully loaded RGB PIL image.

    EXIF orientation is applied. When ``target_size`` is given and the image is a JPEG much larger than it,
    JPEG draft mode decodes at a reduced scale (the DCT does the downscaling for free).
    Raises ImageDecodeError with a short reason for anything undecodable or truncated.
    """
    if isinstance(data, Image.Image):
        img = data
        img.load()
    else:
        if isinstance(data, Path):
            try:
                data = data.read_bytes()
            except OSError as e:
                raise ImageDecodeError(f"cannot read image file {data}: {e.strerror}") from None
        elif isinstance(data, str):
            data = b64decode_any(data)
        if not data:
            raise ImageDecodeError("image is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if target_size and img.format == "JPEG" and min(img.size) >= 2 * target_size:
                    img.draft("RGB", (target_size, target_size))
                img.load()
        except Image.DecompressionBombWarning as e:
            raise ImageDecodeError(f"image too large ({e})") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", " data", str(e)) or type(e).__name__
            if "truncated" in reason.lower():
                raise ImageDecodeError(f"truncated image ({reason})") from None
            raise ImageDecodeError(f"undecodable image ({reason})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not lose the picture
        pass
    return to_rgb(img)


def decode_frames(field: str, frame_num: int | None = None) -> list[str]:
    """A video column: JSON list of base64 frames (a single base64 string counts as one frame)."""
    s = field.strip()
    if s.startswith("["):
        try:
            frames = json.loads(s)
        except json.JSONDecodeError:
            try:
                import ast
                frames = ast.literal_eval(s)
            except Exception as e:
                raise ImageDecodeError(f"frame list is not valid JSON ({e})") from None
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise ImageDecodeError("frame list must be a JSON list of base64 strings")
        return frames
    return [s]


def resize_crop(img: Image.Image, size: int, random_crop: bool = False,
                rng: random.Random | None = None) -> Image.Image:
    """Shortest side to ``size`` (bicubic, antialiased), then a center (or random) ``size``×``size`` crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    if random_crop:
        rng = rng or random
        left, top = rng.randint(0, nw - size), rng.randint(0, nh - size)
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL → uint8 HWC array."""
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def to_tensor(arrays: np.ndarray | Sequence[np.ndarray]):
    """uint8 HWC (or a list / NHWC array) → float32 NCHW / CHW tensor in [-1, 1]."""
    import torch

    if isinstance(arrays, np.ndarray) and arrays.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(arrays)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    arr = np.stack(list(arrays)) if not isinstance(arrays, np.ndarray) else arrays
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_pil(x) -> list[Image.Image]:
    """Float NCHW (or CHW) tensor in [-1, 1] → list of RGB PIL images (clamped)."""
    import torch

    if x.dim() == 3:
        x = x.unsqueeze(0)
    # (x + 1) * 127.5 truncated to uint8: the conversion EasyNLP's and taming's save_image use
    arr = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def load_image(data, size: int, random_crop: bool = False, rng: random.Random | None = None) -> np.ndarray:
    """Decode + preprocess in one call: returns a uint8 HWC ``size``×``size`` RGB array."""
    return to_array(resize_crop(open_image(data, target_size=size), size, random_crop, rng))


def make_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2,
              bg=(255, 255, 255)) -> Image.Image:
    """Tile equally sized images into one grid picture."""
    n = len(images)
    if n == 0:
        raise ValueError("make_grid: no images")
    cols = cols or min(n, int(np.ceil(np.sqrt(n))))
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), bg)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB").resize((w, h)) if im.size != (w, h) else im.convert("RGB"),
                   (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
