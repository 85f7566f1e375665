"""Image decoding (base64 / bytes / paths, any mode → RGB) and preprocessing (resize, crop, scale to [-1, 1]).

Model inputs: ``open_any_image`` (any image input → RGB PIL), ``frames_of`` / ``fit_frames`` (video inputs),
``load_pixels`` (one input → uint8 [S, S, 3] as a model takes it), ``to_uint8_batch`` (in-memory images → uint8
[B, S, S, 3]) and ``ImageProcessor`` (images → normalised float pixels [B, 3, S, S]).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import TuwenError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is a bad row, not a half-grey picture

#: images with more pixels than this (after JPEG draft scaling) are rejected before their pixels are decoded;
#: ``--max_image_pixels`` changes it (``set_max_image_pixels``)
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
_limit = {"pixels": DEFAULT_MAX_IMAGE_PIXELS}


def set_max_image_pixels(n: int | None) -> None:
    """Set the pixel limit for every image tuwen decodes (DataLoader workers forked later inherit it)."""
    n = DEFAULT_MAX_IMAGE_PIXELS if n is None else int(n)
    if n < 1:
        raise TuwenError(f"--max_image_pixels must be ≥ 1, got {n}")
    _limit["pixels"] = n
    # Pillow's own bomb check runs at open(), before a JPEG can be draft-scaled: keep it far above ours
    Image.MAX_IMAGE_PIXELS = max(n, 1 << 26) * 64


def max_image_pixels() -> int:
    return _limit["pixels"]


set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)

_STD_TABLE = bytes.maketrans(b"-_", b"+/")

# OpenAI CLIP's image normalisation (also Chinese-CLIP's); ``tuwen.models.vit`` re-exports them
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
RESIZE_RULES = ("center_crop", "squash")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # what image folders hold


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


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def looks_like_base64_image(value) -> bool:
    """True when ``value`` is a base64 string (or JSON list of them) whose bytes start like an image file."""
    if not isinstance(value, str):
        return False
    s = value.strip()
    if s.startswith("[") and '"' in s[:4]:
        s = s.split('"', 2)[1] if s.count('"') >= 2 else ""
    if s.startswith("data:") and "," in s[:64]:
        s = s.split(",", 1)[1]
    if len(s) < 16:
        return False
    try:
        head = b64decode_any(s[:64 - len(s[:64]) % 4] if len(s) >= 64 else s)
    except (ValueError, ImageDecodeError):
        return False
    return head.startswith(_IMAGE_MAGIC)


def open_image(data: bytes | str | Path | Image.Image, target_size: int | None = None) -> Image.Image:
    """Decode image bytes (or a path, or a base64 string) into a fully loaded RGB PIL image.

    EXIF orientation is applied. When ``target_size`` is given and the image is a JPEG much larger than it,
    JPEG draft mode decodes at a reduced scale (the DCT does the downscaling for free). An image whose pixel count
    (after that scaling) is above ``max_image_pixels()`` is refused from its header, before its pixels are
    decoded, so a small file that would expand to gigabytes costs nothing.
    Raises ImageDecodeError with a short reason for anything undecodable, truncated or too large.
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
                w, h = img.size
                if w * h > _limit["pixels"]:
                    raise ImageDecodeError(f"image too large: {w}×{h} = {w * h:,} pixels, above the limit of "
                                           f"{_limit['pixels']:,} (raise it with --max_image_pixels)")
                img.load()
        except ImageDecodeError:
            raise
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


# =============================================================================================== model inputs

def _is_file(p: Path) -> bool:
    try:
        return len(str(p)) < 4096 and p.is_file()
    except OSError:  # e.g. a base64 string too long to be a file name
        return False


def is_dir(p: Path) -> bool:
    """``p.is_dir()`` that is False (not an OSError) for strings too long to be a path."""
    try:
        return len(str(p)) < 4096 and p.is_dir()
    except OSError:
        return False


def open_any_image(x, root: str | None = None, target_size: int | None = None) -> Image.Image:
    """A PIL image, path, bytes, uint8 HWC array or base64 string (a path when ``root`` is given or the string
    names an existing file) → RGB PIL image. Raises ``ImageDecodeError`` (a ValueError) with the reason.
    ``target_size``: see ``open_image`` (JPEG draft decoding of much larger files)."""
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
            raise ImageDecodeError(f"numpy images must be uint8 [H, W, 3], got {x.dtype} {x.shape}")
        return Image.fromarray(x, "RGB")
    if isinstance(x, (bytes, bytearray)):
        return open_image(bytes(x), target_size)
    if isinstance(x, os.PathLike):
        return open_image(Path(root, x) if root else Path(x), target_size)
    if isinstance(x, str):
        s = x.strip()
        if root is not None:
            return open_image(Path(root, s), target_size)
        if not s.startswith("data:") and ("/" in s or "." in s[-6:]) and _is_file(Path(s).expanduser()):
            return open_image(Path(s).expanduser(), target_size)
        return open_image(s, target_size)
    raise ImageDecodeError(f"unsupported image input {type(x).__name__} (PIL image, path, bytes, base64 string "
                           f"or uint8 array)")


def frames_of(x, root: str | None = None) -> list:
    """A video input → list of frames: a list/tuple of frames, a JSON list of base64 strings / paths, a
    comma-separated list of paths, or a folder of frame images (sorted by name)."""

    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, (str, os.PathLike)):
        s = str(x).strip()
        if s.startswith("["):
            return decode_frames(s)
        p = Path(root, s) if root else Path(s).expanduser()
        if is_dir(p):
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise ValueError(f"{p}: a folder without frame images")
            return files
        if "," in s and len(s) < 8192:
            return [t.strip() for t in s.split(",") if t.strip()]
        return [s]
    return [x]


_pad_warnings = [0]


def fit_frames(frames: list, frame_num: int, where: str = "", strict: bool = False) -> list:
    """Exactly ``frame_num`` frames: the first ``frame_num`` of a longer video (EasyNLP), a shorter one padded by
    repeating its last frame (a warning on stderr for the first few) or, with ``strict``, a ValueError."""
    if not frames:
        raise ValueError("the video has no frames")
    if len(frames) >= frame_num:
        return list(frames[:frame_num])
    msg = f"the video has {len(frames)} frame(s) but frame_num={frame_num}"
    if strict:
        raise ValueError(f"{msg} (--strict rejects short videos; without it they are padded by repeating the "
                         f"last frame)")
    _pad_warnings[0] += 1
    if _pad_warnings[0] <= 3:
        more = "" if _pad_warnings[0] < 3 else " (further padding warnings are not shown)"
        print(f"warning: {where + ': ' if where else ''}{msg}; padded by repeating the last frame{more}",
              file=sys.stderr, flush=True)
    return list(frames) + [frames[-1]] * (frame_num - len(frames))


def _check_resize(resize: str) -> None:
    if resize not in RESIZE_RULES:
        raise TuwenError(f"resize must be 'center_crop' or 'squash', got {resize!r}")


def fit_image(img: Image.Image, size: int, resize: str = "center_crop", random_crop: bool = False) -> np.ndarray:
    """RGB PIL → uint8 [size, size, 3]. ``resize="center_crop"``: OpenAI's / taming's transform (shortest side to
    ``size`` bicubic, then a center crop, or a random one with ``random_crop``); ``"squash"``: Chinese-CLIP's /
    albumentations' ``Resize((size, size))`` (bicubic, aspect ratio not kept; ``random_crop`` does not apply)."""
    _check_resize(resize)
    if resize == "squash":
        img = img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)
    else:
        img = resize_crop(img, size, random_crop)
    return to_array(img)


def load_pixels(image, size: int, resize: str = "center_crop", random_crop: bool = False,
                root: str | None = None) -> np.ndarray:
    """One image input (anything ``open_any_image`` takes) → uint8 [size, size, 3] sized as the model expects."""
    _check_resize(resize)
    return fit_image(open_any_image(image, root, target_size=size), size, resize, random_crop)


def to_uint8_batch(images, size: int, resize: str = "center_crop") -> np.ndarray:
    """PIL images / uint8 HWC arrays → uint8 [B, size, size, 3] (see ``fit_image`` for ``resize``); arrays that
    already are ``size``×``size`` pass as they are."""
    _check_resize(resize)
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise TuwenError(f"preprocess: numpy images must be uint8 [H, W, 3], got {im.dtype} {im.shape}")
            if im.shape[:2] == (size, size):
                out.append(im)
                continue
            im = Image.fromarray(im, "RGB")
        elif not isinstance(im, Image.Image):
            raise TuwenError(f"preprocess: unsupported image type {type(im).__name__} (PIL image or uint8 array)")
        out.append(fit_image(to_rgb(im), size, resize))
    if not out:
        raise TuwenError("preprocess: no images given")
    return np.stack(out)


@dataclasses.dataclass
class ImageProcessor:
    """Image inputs → the float pixels a model takes, [B, 3, size, size].

    ``value_range="0,1"``: ``(x / 255 - mean) / std`` (CLIP / ViT towers); ``"-1,1"``: ``x / 127.5 - 1`` (VQGAN
    encoders; mean/std unused). ``resize``: see ``fit_image``.
    """

    size: int = 224
    resize: str = "center_crop"
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    value_range: str = "0,1"

    def __post_init__(self):
        _check_resize(self.resize)
        if self.value_range not in ("0,1", "-1,1"):
            raise TuwenError(f"value_range must be '0,1' or '-1,1', got {self.value_range!r}")

    def load(self, image, root: str | None = None, random_crop: bool = False) -> np.ndarray:
        """One input (path, bytes, base64, PIL, uint8 array) → uint8 [size, size, 3]."""
        return load_pixels(image, self.size, self.resize, random_crop, root)

    def normalize(self, pixels):
        """uint8 tensor [..., H, W, 3] (any device) → float32 [..., 3, H, W] on the same device."""
        import torch

        x = pixels.movedim(-1, -3).float()
        if self.value_range == "-1,1":
            return x.div_(127.5).sub_(1.0)
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x.div_(255.0) - mean) / std

    def __call__(self, images, root: str | None = None, device=None):
        """Images → float32 [B, 3, size, size] on ``device``. ``images``: one input or a list (PIL images, uint8
        arrays, paths, bytes, base64 strings), or a uint8 tensor [B, H, W, 3] (normalised as it is)."""
        import torch

        if torch.is_tensor(images):
            if images.dtype != torch.uint8:
                raise TuwenError(f"ImageProcessor: tensors must be uint8 [B, H, W, 3], got {images.dtype}")
            return self.normalize(images.to(device) if device is not None else images)
        if isinstance(images, (Image.Image, np.ndarray, str, bytes, bytearray, os.PathLike)):
            if not (isinstance(images, np.ndarray) and images.ndim == 4):
                images = [images]
        arrs = [self.load(x, root) for x in images]
        if not arrs:
            raise TuwenError("ImageProcessor: no images given")
        x = torch.from_numpy(np.stack(arrs))
        return self.normalize(x.to(device) if device is not None else x)
