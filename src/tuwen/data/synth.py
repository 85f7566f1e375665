"""The embedded synthetic data set: coloured shapes on a pale background, with Chinese/English captions.

Nothing is downloaded: every sample is a pure function of ``(seed, index)``, so the same seed writes
byte-identical files whatever the number of worker processes.

Vocabulary (attribute ids are the English words; captions use the Chinese or English words):

* colours (6, hues 45–85° apart in an opponent colour plane): 红色 red, 黄色 yellow, 绿色 green,
  青色 cyan, 蓝色 blue, 紫色 purple
* shapes (4): 圆形 circle, 正方形 square, 三角形 triangle (apex up), 长方形 rectangle (lying, 2:1) — chosen to
  stay apart after blur at 32 px (a diamond, tried first, turns into a circle there)
* positions (3×3 grid): 左上角 top_left, 上方 top, 右上角 top_right, 左侧 left, 中间 center, 右侧 right,
  左下角 bottom_left, 下方 bottom, 右下角 bottom_right
* directions (video): 从左向右 right, 从右向左 left, 从上向下 down, 从下向上 up

An image holds 1 or 2 objects; two objects never share a grid cell and never share a colour (so every object is
identified by its colour, which keeps the attribute checker unambiguous). Each object gets a small random jitter
of position (±0.05 cell) and size (0.6–0.78 cell). Shapes are anti-aliased by exact 4×4 supersampled coverage.

Captions (``paraphrase=True`` mixes a few templates; the attribute words are always the canonical ones)::

    左上角有一个红色的圆形                      a red circle in the top left
    左上角有一个红色的圆形，右下角有一个蓝色的正方形  a red circle in the top left and a blue square in the bottom right
    一个红色的圆形从左向右移动                  a red circle moves from left to right

``parse_caption`` reads every caption the generator can write (and common synonyms) back into ``ObjectSpec``s.

Held-out combinations (``holdout="default"``): the (colour, shape) pairs in ``DEFAULT_HOLDOUT`` —
red triangle, yellow circle, blue square, purple rectangle (each shape once, four different colours) — never
appear in train/val/test; ``holdout.tsv`` holds images that each have at least one of them (ids continue after test).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------- vocabulary

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (238, 198, 20),
    "green": (50, 170, 50),
    "cyan": (20, 178, 200),
    "blue": (40, 70, 225),
    "purple": (150, 50, 200),
}
COLOR_ZH = {"red": "红色", "yellow": "黄色", "green": "绿色", "cyan": "青色", "blue": "蓝色", "purple": "紫色"}

SHAPES = ("circle", "square", "triangle", "rectangle")
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "rectangle": "长方形"}

POSITIONS = ("top_left", "top", "top_right", "left", "center", "right", "bottom_left", "bottom", "bottom_right")
POSITION_ZH = {"top_left": "左上角", "top": "上方", "top_right": "右上角", "left": "左侧", "center": "中间",
               "right": "右侧", "bottom_left": "左下角", "bottom": "下方", "bottom_right": "右下角"}
POSITION_EN = {"top_left": "in the top left", "top": "at the top", "top_right": "in the top right",
               "left": "on the left", "center": "in the center", "right": "on the right",
               "bottom_left": "in the bottom left", "bottom": "at the bottom", "bottom_right": "in the bottom right"}
# grid cell (row, col) of each position
POSITION_CELL = {p: divmod(i, 3) for i, p in enumerate(POSITIONS)}
CELL_POSITION = {v: k for k, v in POSITION_CELL.items()}

DIRECTIONS = ("right", "left", "down", "up")
# (from, to) words of each direction
DIRECTION_ZH = {"right": ("左", "右"), "left": ("右", "左"), "down": ("上", "下"), "up": ("下", "上")}
DIRECTION_EN = {"right": ("left", "right"), "left": ("right", "left"), "down": ("top", "bottom"),
                "up": ("bottom", "top")}
DIRECTION_VEC = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 246),
    "cream": (250, 245, 232),
    "grey": (234, 234, 234),
    "mist": (236, 241, 248),
}

DEFAULT_HOLDOUT = (("red", "triangle"), ("yellow", "circle"), ("blue", "square"), ("purple", "rectangle"))

# shape geometry, in units of the object size s (the width of its bounding box)
SQUARE_SIDE = 0.86
TRIANGLE_HEIGHT = 0.9
RECT_HEIGHT = 0.5
SHAPE_AREA = {"circle": math.pi / 4, "square": SQUARE_SIDE ** 2, "triangle": TRIANGLE_HEIGHT / 2,
              "rectangle": RECT_HEIGHT}
SCALE_RANGE = (0.6, 0.78)   # object size s as a fraction of the cell side
JITTER = 0.05                # max offset of the object centre from its cell centre, fraction of the cell side
DEFAULT_SCALE = 0.7
SUPERSAMPLE = 4


# ----------------------------------------------------------------------------------------------- attributes

@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption describes it: colour, shape and grid position (or, in a video, direction)."""

    color: str
    shape: str
    position: str | None = None
    direction: str | None = None

    def to_dict(self) -> dict:
        d = {"color": self.color, "shape": self.shape}
        if self.position is not None:
            d["position"] = self.position
        if self.direction is not None:
            d["direction"] = self.direction
        return d

    @classmethod
    def from_any(cls, obj: "ObjectSpec | dict") -> "ObjectSpec":
        if isinstance(obj, ObjectSpec):
            return obj
        return cls(obj["color"], obj["shape"], obj.get("position"), obj.get("direction"))


def object_specs(attrs: Any) -> list[ObjectSpec]:
    """``ObjectSpec``s of a sample's attrs (a dict with ``objects``, a list of dicts/specs, or one spec)."""
    if isinstance(attrs, (ObjectSpec, )):
        return [attrs]
    if isinstance(attrs, dict):
        if "objects" in attrs:
            attrs = attrs["objects"]
        else:
            return [ObjectSpec.from_any(attrs)]
    return [ObjectSpec.from_any(o) for o in attrs]


def _check_vocab(o: dict) -> None:
    if o["color"] not in COLORS:
        raise ValueError(f"unknown colour {o['color']!r}; use one of {', '.join(COLORS)}")
    if o["shape"] not in SHAPES:
        raise ValueError(f"unknown shape {o['shape']!r}; use one of {', '.join(SHAPES)}")
    if o.get("position") is not None and o["position"] not in POSITIONS:
        raise ValueError(f"unknown position {o['position']!r}; use one of {', '.join(POSITIONS)}")
    if o.get("direction") is not None and o["direction"] not in DIRECTIONS:
        raise ValueError(f"unknown direction {o['direction']!r}; use one of {', '.join(DIRECTIONS)}")


def parse_holdout(spec: str | Iterable | None) -> tuple[tuple[str, str], ...]:
    """``None``/"" → no holdout; ``"default"`` → DEFAULT_HOLDOUT; ``"red:triangle,blue:square"`` → those pairs."""
    if spec is None or spec == "" or spec == () or spec == []:
        return ()
    if isinstance(spec, str):
        if spec.strip().lower() in ("default", "yes", "true", "1"):
            return DEFAULT_HOLDOUT
        if spec.strip().lower() in ("none", "no", "false", "0"):
            return ()
        pairs = []
        for item in [t.strip() for t in spec.split(",") if t.strip()]:
            parts = re.split(r"[:/ ]+", item)
            if len(parts) != 2:
                raise ValueError(f"holdout item {item!r} is not colour:shape (e.g. red:triangle)")
            pairs.append((parts[0].lower(), parts[1].lower()))
    else:
        pairs = [tuple(p) for p in spec]
    for c, s in pairs:
        if c not in COLORS or s not in SHAPES:
            raise ValueError(f"holdout pair {c}:{s} is not colour:shape with colour in {', '.join(COLORS)} "
                             f"and shape in {', '.join(SHAPES)}")
    return tuple(dict.fromkeys(pairs))


def _rng(rng_or_seed) -> random.Random:
    if isinstance(rng_or_seed, random.Random):
        return rng_or_seed
    return random.Random(f"tuwen-synth:{rng_or_seed}")


def sample_attrs(rng_or_seed=0, n_objects: int | None = None, holdout: Iterable = (),
                 include: Sequence[tuple[str, str]] | None = None) -> dict:
    """Random attributes of one image: ``{"background": name, "objects": [{color, shape, position, dx, dy,
    scale}, ...]}``; ``dx``/``dy`` are offsets from the cell centre and ``scale`` the size, in cell units.

    ``holdout``: (colour, shape) pairs that must not appear. ``include``: pairs of which the first object must be
    one (used to write the held-out test split).
    """
    rng = _rng(rng_or_seed)
    holdout = set(parse_holdout(holdout) if isinstance(holdout, str) else map(tuple, holdout))
    n = n_objects if n_objects is not None else rng.choice((1, 2))
    if not 1 <= n <= min(len(POSITIONS), len(COLORS)):
        raise ValueError(f"n_objects must be between 1 and {min(len(POSITIONS), len(COLORS))}")
    bg = rng.choice(list(BACKGROUNDS))
    cells = rng.sample(POSITIONS, n)
    objects = []
    used_colors: set[str] = set()
    for k in range(n):
        for _ in range(1000):
            if k == 0 and include:
                color, shape = include[rng.randrange(len(include))]
            else:
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if color not in used_colors and (color, shape) not in holdout:
                break
        else:  # pragma: no cover - only with a holdout that removes everything
            raise ValueError("holdout leaves no (colour, shape) pair to sample")
        used_colors.add(color)
        objects.append({"color": color, "shape": shape, "position": cells[k],
                        "dx": round(rng.uniform(-JITTER, JITTER), 4), "dy": round(rng.uniform(-JITTER, JITTER), 4),
                        "scale": round(rng.uniform(*SCALE_RANGE), 4)})
    return {"background": bg, "objects": objects}


def sample_video_attrs(rng_or_seed=0, frame_num: int = 4, holdout: Iterable = (),
                       include: Sequence[tuple[str, str]] | None = None) -> dict:
    """Random attributes of one clip: one object moving across the image in one of 4 directions.

    The object starts in the first column (row, for vertical motion) and ends in the last one; ``lane`` is its
    fixed coordinate and ``start``/``end`` its moving coordinate, as fractions of the image side.
    """
    rng = _rng(rng_or_seed)
    holdout = set(parse_holdout(holdout) if isinstance(holdout, str) else map(tuple, holdout))
    if frame_num < 2:
        raise ValueError("frame_num must be at least 2 to show a movement")
    bg = rng.choice(list(BACKGROUNDS))
    for _ in range(1000):
        if include:
            color, shape = include[rng.randrange(len(include))]
        else:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in holdout:
            break
    else:  # pragma: no cover - only with a holdout that removes everything
        raise ValueError("holdout leaves no (colour, shape) pair to sample")
    direction = rng.choice(DIRECTIONS)
    lo, hi = 1 / 6 + rng.uniform(-0.03, 0.03), 5 / 6 + rng.uniform(-0.03, 0.03)
    start, end = (lo, hi) if direction in ("right", "down") else (hi, lo)
    obj = {"color": color, "shape": shape, "direction": direction,
           "lane": round(rng.uniform(0.2, 0.8), 4), "start": round(start, 4), "end": round(end, 4),
           "scale": round(rng.uniform(*SCALE_RANGE), 4)}
    return {"background": bg, "frame_num": frame_num, "objects": [obj]}


# ----------------------------------------------------------------------------------------------- rendering

def coverage(shape: str, cx: float, cy: float, s: float, width: int, height: int,
             supersample: int = SUPERSAMPLE, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32, ``height``×``width``) of a shape of size ``s`` centred at
    ``(cx, cy)``; pixel (row i, col j) is the square [j, j+1]×[i, i+1]. Each pixel is sampled on a
    ``supersample``² grid. ``box`` = (y0, y1, x0, x1) limits the work to a window (zeros elsewhere)."""
    out = np.zeros((height, width), np.float32)
    half = s * 0.5 + 1
    y0, y1, x0, x1 = box or (0, height, 0, width)
    y0, y1 = max(y0, int(math.floor(cy - half))), min(y1, int(math.ceil(cy + half)))
    x0, x1 = max(x0, int(math.floor(cx - half))), min(x1, int(math.ceil(cx + half)))
    if y1 <= y0 or x1 <= x0:
        return out
    k = max(1, supersample)
    off = (np.arange(k, dtype=np.float64) + 0.5) / k
    ys = (np.arange(y0, y1, dtype=np.float64)[:, None] + off[None, :]).reshape(-1)[:, None]
    xs = (np.arange(x0, x1, dtype=np.float64)[:, None] + off[None, :]).reshape(-1)[None, :]
    u, v = xs - cx, ys - cy
    if shape == "circle":
        inside = u * u + v * v <= (s * 0.5) ** 2
    elif shape == "square":
        a = SQUARE_SIDE * s * 0.5
        inside = (np.abs(u) <= a) & (np.abs(v) <= a)
    elif shape == "triangle":
        h = TRIANGLE_HEIGHT * s
        depth = v + h * 0.5  # distance below the apex
        inside = (depth >= 0) & (depth <= h) & (np.abs(u) <= depth * (s * 0.5 / h))
    elif shape == "rectangle":
        inside = (np.abs(u) <= s * 0.5) & (np.abs(v) <= RECT_HEIGHT * s * 0.5)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    cov = inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3), dtype=np.float32)
    out[y0:y1, x0:x1] = cov
    return out


def _object_box(o: dict, width: int, height: int) -> tuple[float, float, float]:
    """Centre (x, y) and size s in pixels of a still-image object."""
    row, col = POSITION_CELL[o["position"]]
    cw, ch = width / 3, height / 3
    cell = min(cw, ch)
    cx = (col + 0.5 + o.get("dx", 0.0)) * cw
    cy = (row + 0.5 + o.get("dy", 0.0)) * ch
    return cx, cy, o.get("scale", DEFAULT_SCALE) * cell


def _render_objects(placed: list[tuple[str, float, float, float, tuple]], bg: tuple, size: int,
                    supersample: int = SUPERSAMPLE) -> Image.Image:
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(bg, np.float32)
    for shape, cx, cy, s, color in placed:
        a = coverage(shape, cx, cy, s, size, size, supersample)[..., None]
        img += a * (np.asarray(color, np.float32) - img)
    return Image.fromarray(np.rint(img).astype(np.uint8), "RGB")


def render(attrs: Any, size: int = 64, rng: random.Random | int | None = None,
           supersample: int = SUPERSAMPLE) -> Image.Image:
    """Render a still image of ``attrs``: a sample's attrs dict, or a list of objects (``ObjectSpec`` or dicts with
    color/shape/position). Missing jitter/size/background are drawn from ``rng`` when given (a seed or a
    ``random.Random``), else the object is centred in its cell at the default size on a white background.
    """
    if size < 8:
        raise ValueError(f"size {size} is too small; use at least 8 pixels")
    r = _rng(rng) if rng is not None else None
    if isinstance(attrs, dict) and "objects" in attrs:
        bg_name, objs = attrs.get("background"), attrs["objects"]
    else:
        bg_name, objs = None, attrs if isinstance(attrs, (list, tuple)) else [attrs]
    if bg_name is None:
        bg_name = r.choice(list(BACKGROUNDS)) if r else "white"
    placed = []
    for o in objs:
        o = o.to_dict() if isinstance(o, ObjectSpec) else dict(o)
        _check_vocab(o)
        if o.get("position") is None:
            raise ValueError(f"object {o} has no position; render_video draws moving objects")
        if r is not None:
            o.setdefault("dx", r.uniform(-JITTER, JITTER))
            o.setdefault("dy", r.uniform(-JITTER, JITTER))
            o.setdefault("scale", r.uniform(*SCALE_RANGE))
        cx, cy, s = _object_box(o, size, size)
        placed.append((o["shape"], cx, cy, s, COLORS[o["color"]]))
    return _render_objects(placed, BACKGROUNDS[bg_name], size, supersample)


def video_positions(obj: dict, frame_num: int) -> list[tuple[float, float]]:
    """Object centre (fractions of the image side) in each frame of a clip."""
    dx, dy = DIRECTION_VEC[obj["direction"]]
    out = []
    for t in range(frame_num):
        u = obj["start"] + (obj["end"] - obj["start"]) * (t / max(1, frame_num - 1))
        out.append((u, obj["lane"]) if dx else (obj["lane"], u))
    return out


def render_video(attrs: Any, size: int = 64, frame_num: int | None = None, rng: random.Random | int | None = None,
                 supersample: int = SUPERSAMPLE) -> list[Image.Image]:
    """Frames of a clip. ``attrs``: a video sample's attrs dict, or objects with color/shape/direction (lane,
    start/end and size are drawn from ``rng`` when missing, else centred lane from 1/6 to 5/6)."""
    r = _rng(rng) if rng is not None else None
    if isinstance(attrs, dict) and "objects" in attrs:
        bg_name, objs = attrs.get("background"), attrs["objects"]
        frame_num = frame_num or attrs.get("frame_num")
    else:
        bg_name, objs = None, attrs if isinstance(attrs, (list, tuple)) else [attrs]
    frame_num = frame_num or 4
    if bg_name is None:
        bg_name = r.choice(list(BACKGROUNDS)) if r else "white"
    full = []
    for o in objs:
        o = o.to_dict() if isinstance(o, ObjectSpec) else dict(o)
        _check_vocab(o)
        if o.get("direction") is None:
            raise ValueError(f"object {o} has no direction")
        if "start" not in o:
            fwd = o["direction"] in ("right", "down")
            lo, hi = (1 / 6 + r.uniform(-0.03, 0.03), 5 / 6 + r.uniform(-0.03, 0.03)) if r else (1 / 6, 5 / 6)
            o["start"], o["end"] = (lo, hi) if fwd else (hi, lo)
        o.setdefault("lane", r.uniform(0.2, 0.8) if r else 0.5)
        o.setdefault("scale", r.uniform(*SCALE_RANGE) if r else DEFAULT_SCALE)
        full.append(o)
    frames = []
    for t in range(frame_num):
        placed = []
        for o in full:
            fx, fy = video_positions(o, frame_num)[t]
            placed.append((o["shape"], fx * size, fy * size, o["scale"] * size / 3, COLORS[o["color"]]))
        frames.append(_render_objects(placed, BACKGROUNDS[bg_name], size, supersample))
    return frames


# ----------------------------------------------------------------------------------------------- captions

_ZH_TEMPLATES = ("{pos}有一个{color}的{shape}", "{pos}有一个{color}{shape}", "在{pos}有一个{color}的{shape}",
                 "一个{color}的{shape}位于{pos}")
_EN_TEMPLATES = ("a {color} {shape} {pos}", "there is a {color} {shape} {pos}")
_ZH_VIDEO = ("一个{color}的{shape}从{a}向{b}移动", "一个{color}{shape}从{a}往{b}移动", "{color}的{shape}向{b}移动")
_EN_VIDEO = ("a {color} {shape} moves from {a} to {b}", "a {color} {shape} moving from {a} to {b}",
             "a {color} {shape} moves to the {b}")


def _pick(rng: random.Random | None, templates: Sequence[str]) -> str:
    if rng is None:
        return templates[0]
    # the first (canonical) template half of the time, the others share the rest
    return templates[0] if rng.random() < 0.5 else templates[1 + rng.randrange(len(templates) - 1)]


def caption(attrs: Any, lang: str = "zh", rng: random.Random | None = None) -> str:
    """Caption of a still image's objects (canonical wording unless ``rng`` is given to choose paraphrases)."""
    specs = object_specs(attrs)
    if any(s.direction is not None for s in specs):
        return video_caption(attrs, lang, rng)
    parts = []
    for k, s in enumerate(specs):
        if lang == "zh":
            t = _pick(rng, _ZH_TEMPLATES)
            parts.append(t.format(pos=POSITION_ZH[s.position], color=COLOR_ZH[s.color], shape=SHAPE_ZH[s.shape]))
        elif lang == "en":
            t = _pick(rng, _EN_TEMPLATES) if k == 0 else _EN_TEMPLATES[0]
            parts.append(t.format(pos=POSITION_EN[s.position], color=s.color, shape=s.shape))
        else:
            raise ValueError(f"lang must be zh or en, not {lang!r}")
    return "，".join(parts) if lang == "zh" else " and ".join(parts)


def video_caption(attrs: Any, lang: str = "zh", rng: random.Random | None = None) -> str:
    s = object_specs(attrs)[0]
    if lang == "zh":
        a, b = DIRECTION_ZH[s.direction]
        return _pick(rng, _ZH_VIDEO).format(color=COLOR_ZH[s.color], shape=SHAPE_ZH[s.shape], a=a, b=b)
    if lang == "en":
        a, b = DIRECTION_EN[s.direction]
        return _pick(rng, _EN_VIDEO).format(color=s.color, shape=s.shape, a=a, b=b)
    raise ValueError(f"lang must be zh or en, not {lang!r}")


def _alt(words: dict[str, str]) -> re.Pattern:
    keys = sorted(words, key=len, reverse=True)
    return re.compile("|".join(re.escape(k) for k in keys))


_ZH_COLOR_WORDS = {**{v: k for k, v in COLOR_ZH.items()}, "红": "red", "黄": "yellow", "绿": "green", "青": "cyan",
                   "蓝": "blue", "紫": "purple"}
_ZH_SHAPE_WORDS = {"圆形": "circle", "圆圈": "circle", "圆": "circle", "正方形": "square", "方形": "square",
                   "方块": "square", "三角形": "triangle", "三角": "triangle", "长方形": "rectangle",
                   "矩形": "rectangle", "长条": "rectangle"}
_ZH_POS_WORDS = {}
for _p, _w in POSITION_ZH.items():
    _ZH_POS_WORDS[_w] = _p
for _p, _ws in {"top_left": ("左上方", "左上"), "top_right": ("右上方", "右上"), "bottom_left": ("左下方", "左下"),
                "bottom_right": ("右下方", "右下"), "top": ("上面", "上边", "顶部", "正上方", "上部"),
                "bottom": ("下面", "下边", "底部", "正下方", "下部"), "left": ("左边", "左面", "左方"),
                "right": ("右边", "右面", "右方"), "center": ("中央", "正中", "中心", "中部")}.items():
    for _w in _ws:
        _ZH_POS_WORDS[_w] = _p
_ZH_COLOR_RE, _ZH_SHAPE_RE, _ZH_POS_RE = _alt(_ZH_COLOR_WORDS), _alt(_ZH_SHAPE_WORDS), _alt(_ZH_POS_WORDS)
_ZH_SIDE = {"左": "left", "右": "right", "上": "top", "下": "bottom"}
_ZH_DIR_FROM_TO = re.compile(r"[从自由]\s*([左右上下])[边侧方面]?\s*(?:向|往|到|至|朝)\s*([左右上下])")
_ZH_DIR_TO = re.compile(r"(?:向|往|朝)\s*([左右上下])[边侧方面]?\s*(?:移动|运动|滑动|平移|移|走|动)")

_EN_COLOR_WORDS = {**{k: k for k in COLORS}, "violet": "purple", "teal": "cyan"}
_EN_SHAPE_WORDS = {"circle": "circle", "disc": "circle", "disk": "circle", "square": "square",
                   "triangle": "triangle", "rectangle": "rectangle", "oblong": "rectangle"}
_EN_POS_WORDS = {"top left": "top_left", "upper left": "top_left", "top-left": "top_left",
                 "top right": "top_right", "upper right": "top_right", "top-right": "top_right",
                 "bottom left": "bottom_left", "lower left": "bottom_left", "bottom-left": "bottom_left",
                 "bottom right": "bottom_right", "lower right": "bottom_right", "bottom-right": "bottom_right",
                 "top": "top", "bottom": "bottom", "left": "left", "right": "right",
                 "center": "center", "centre": "center", "middle": "center"}


def _wre(words: dict[str, str]) -> re.Pattern:
    keys = sorted(words, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(k).replace(r"\ ", r"\s+") for k in keys) + r")s?\b")


_EN_COLOR_RE, _EN_SHAPE_RE, _EN_POS_RE = _wre(_EN_COLOR_WORDS), _wre(_EN_SHAPE_WORDS), _wre(_EN_POS_WORDS)
_EN_SIDE = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "up": "top", "down": "bottom"}
_EN_DIR_FROM_TO = re.compile(r"\bfrom\s+(?:the\s+)?(left|right|top|bottom)\s+to\s+(?:the\s+)?(left|right|top|bottom)\b")
_EN_DIR_TO = re.compile(r"\b(?:mov(?:es|ing|e)|go(?:es|ing)?|slid(?:es|ing|e))\s+(?:to\s+the\s+)?"
                        r"(left|right|up|down|top|bottom)(?:wards?)?\b")
_SIDES_TO_DIR = {("left", "right"): "right", ("right", "left"): "left", ("top", "bottom"): "down",
                 ("bottom", "top"): "up"}
_TO_DIR = {"right": "right", "left": "left", "bottom": "down", "top": "up"}


def _norm_en(m: str, words: dict[str, str]) -> str:
    m = re.sub(r"\s+", " ", m.lower())
    if m not in words and m.endswith("s"):
        m = m[:-1]
    return words[m]


def parse_caption(text: str) -> list[ObjectSpec] | None:
    """Objects described by a caption the generator writes (zh or en, still or video), or None if unparseable.

    Still images: every colour word, shape word and position word is found in order; the k-th of each make the
    k-th object (so "左上角有一个红色的圆形" and "一个红色的圆形位于左上角" both parse). The counts must agree.
    Video: one colour, one shape and a direction ("从左向右", "向右移动", "from left to right", "moves right").
    """
    if not isinstance(text, str) or not text.strip():
        return None
    t = text.strip()
    zh = re.search(r"[\u4e00-\u9fff]", t) is not None
    if zh:
        colors = [_ZH_COLOR_WORDS[m.group()] for m in _ZH_COLOR_RE.finditer(t)]
        shapes = [_ZH_SHAPE_WORDS[m.group()] for m in _ZH_SHAPE_RE.finditer(t)]
        direction = None
        m = _ZH_DIR_FROM_TO.search(t)
        if m:
            direction = _SIDES_TO_DIR.get((_ZH_SIDE[m.group(1)], _ZH_SIDE[m.group(2)]))
            if direction is None:
                return None
        else:
            m = _ZH_DIR_TO.search(t)
            if m:
                direction = _TO_DIR[_ZH_SIDE[m.group(1)]]
        positions = [] if direction else [_ZH_POS_WORDS[m.group()] for m in _ZH_POS_RE.finditer(t)]
    else:
        low = t.lower()
        colors = [_norm_en(m.group(), _EN_COLOR_WORDS) for m in _EN_COLOR_RE.finditer(low)]
        shapes = [_norm_en(m.group(), _EN_SHAPE_WORDS) for m in _EN_SHAPE_RE.finditer(low)]
        direction = None
        m = _EN_DIR_FROM_TO.search(low)
        if m:
            direction = _SIDES_TO_DIR.get((m.group(1), m.group(2)))
            if direction is None:
                return None
        else:
            m = _EN_DIR_TO.search(low)
            if m:
                direction = _TO_DIR[_EN_SIDE[m.group(1)]]
        positions = [] if direction else [_norm_en(m.group(), _EN_POS_WORDS) for m in _EN_POS_RE.finditer(low)]
    if direction:
        if len(colors) != 1 or len(shapes) != 1:
            return None
        return [ObjectSpec(colors[0], shapes[0], None, direction)]
    if not colors or not (len(colors) == len(shapes) == len(positions)):
        return None
    return [ObjectSpec(c, s, p) for c, s, p in zip(colors, shapes, positions)]


# ----------------------------------------------------------------------------------------------- samples

def make_sample(rng_or_seed=0, size: int = 64, lang: str = "zh", n_objects: int | None = None,
                holdout: Iterable = (), paraphrase: bool = True,
                include: Sequence[tuple[str, str]] | None = None) -> tuple[Image.Image, str, dict]:
    """One still sample: (RGB image ``size``×``size``, caption, attrs)."""
    rng = _rng(rng_or_seed)
    attrs = sample_attrs(rng, n_objects, holdout, include)
    text = caption(attrs, lang, rng if paraphrase else None)
    return render(attrs, size), text, attrs


def make_video_sample(rng_or_seed=0, size: int = 64, lang: str = "zh", frame_num: int = 4,
                      holdout: Iterable = (), paraphrase: bool = True,
                      include: Sequence[tuple[str, str]] | None = None) -> tuple[list[Image.Image], str, dict]:
    """One clip: (``frame_num`` RGB frames, caption, attrs)."""
    rng = _rng(rng_or_seed)
    attrs = sample_video_attrs(rng, frame_num, holdout, include)
    text = video_caption(attrs, lang, rng if paraphrase else None)
    return render_video(attrs, size), text, attrs


# ----------------------------------------------------------------------------------------------- writing

_SPLITS = ("train", "val", "test")


def _encode(img: Image.Image, image_format: str, quality: int) -> str:
    from .images import encode_image_b64
    if image_format == "jpeg":
        return encode_image_b64(img, "JPEG", quality=quality, subsampling=0)
    return encode_image_b64(img, "PNG", compress_level=6)


def _make_rows(job: tuple) -> list[tuple[str, str, str, str]]:
    """Worker: rows (idx, text, image field, attrs json) for the sample indices of one chunk."""
    seed, split, lo, hi, size, lang, video, frame_num, holdout, paraphrase, image_format, quality = job
    include = holdout if split == "holdout" else None
    avoid = () if split == "holdout" else holdout
    rows = []
    for i in range(lo, hi):
        rng = random.Random(f"tuwen-synth:{seed}:{split if split == 'holdout' else 'main'}:{i}")
        if video:
            frames, text, attrs = make_video_sample(rng, size, lang, frame_num, avoid, paraphrase, include)
            field = json.dumps([_encode(f, image_format, quality) for f in frames], separators=(",", ":"))
        else:
            img, text, attrs = make_sample(rng, size, lang, None, avoid, paraphrase, include)
            field = _encode(img, image_format, quality)
        att = json.dumps({"idx": str(i), "text": text, **attrs}, ensure_ascii=False, separators=(",", ":"))
        rows.append((str(i), text, field, att))
    return rows


def split_sizes(n: int, splits: Sequence[float]) -> dict[str, int]:
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {tuple(splits)}")
    tot = sum(splits)
    n_val = int(round(n * splits[1] / tot))
    n_test = int(round(n * splits[2] / tot))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def write_dataset(out_dir: str | os.PathLike, n: int = 20000, size: int = 64, lang: str = "zh", seed: int = 0,
                  video: bool = False, frame_num: int = 4, splits: Sequence[float] = (0.9, 0.05, 0.05),
                  image_format: str = "png", holdout: str | Iterable | None = None, paraphrase: bool = True,
                  workers: int | None = None, jpeg_quality: int = 90, progress: bool = False) -> dict:
    """Write the synthetic set as EasyNLP TSVs; returns a summary (files, counts, schema) also saved as meta.json.

    Files: ``train.tsv``/``val.tsv``/``test.tsv`` (``idx \\t text \\t imgbase64``; video:
    ``idx \\t imgbase64 \\t text`` with a JSON list of base64 frames), ``test_prompts.tsv`` (``idx \\t text``),
    ``{split}.attributes.jsonl`` (one JSON object per row: idx, text, background, objects...). With ``holdout``,
    train/val/test never contain the held-out (colour, shape) pairs and ``holdout.tsv`` (same layout, as many rows
    as test, at least one held-out pair in every row), ``holdout_prompts.tsv``, ``holdout.attributes.jsonl`` are
    written too. Sample ``i`` depends only on (seed, i), so the output does not depend on ``workers``.
    """
    if lang not in ("zh", "en"):
        raise ValueError(f"lang must be zh or en, not {lang!r}")
    image_format = {"jpg": "jpeg"}.get(image_format.lower(), image_format.lower())
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image format must be png or jpeg, not {image_format!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 8:
        raise ValueError(f"size {size} is too small; use at least 8 pixels")
    if video and frame_num < 2:
        raise ValueError("frame_num must be at least 2 to show a movement")
    hold = parse_holdout(holdout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = split_sizes(n, splits)
    ranges, lo = {}, 0
    for s in _SPLITS:
        ranges[s] = (lo, lo + counts[s])
        lo += counts[s]
    if hold:  # idx continues after the main splits so that ids stay unique
        counts["holdout"] = max(1, counts["test"])
        ranges["holdout"] = (n, n + counts["holdout"])
    chunk = 256
    jobs = []
    for split, (a, b) in ranges.items():
        for c in range(a, b, chunk):
            jobs.append((seed, split, c, min(b, c + chunk), size, lang, video, frame_num, hold, paraphrase,
                         image_format, jpeg_quality))
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n * size * size >= 2000 * 64 * 64 else 1
    files: dict[str, list[str]] = {}
    handles: dict[str, dict[str, Any]] = {}
    for split in ranges:
        tsv, att = out / f"{split}.tsv", out / f"{split}.attributes.jsonl"
        h = {"tsv": open(tsv, "w", encoding="utf-8", newline="\n"),
             "att": open(att, "w", encoding="utf-8", newline="\n")}
        files[split] = [tsv.name, att.name]
        if split in ("test", "holdout"):
            p = out / f"{split}_prompts.tsv"
            h["prompts"] = open(p, "w", encoding="utf-8", newline="\n")
            files[split].append(p.name)
        handles[split] = h
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(counts.values()), desc="synth", unit="img", disable=None)
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(workers)
            results = pool.imap(_make_rows, jobs)
        else:
            pool, results = None, map(_make_rows, jobs)
        try:
            for job, rows in zip(jobs, results):
                h = handles[job[1]]
                for idx, text, field, att in rows:
                    h["tsv"].write(f"{idx}\t{field}\t{text}\n" if video else f"{idx}\t{text}\t{field}\n")
                    h["att"].write(att + "\n")
                    if "prompts" in h:
                        h["prompts"].write(f"{idx}\t{text}\n")
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        for h in handles.values():
            for f in h.values():
                f.close()
        if bar is not None:
            bar.close()
    schema = "idx:str:1,imgbase64:str:1,text:str:1" if video else "idx:str:1,text:str:1,imgbase64:str:1"
    meta = {"n": n, "size": size, "lang": lang, "seed": seed, "video": video,
            "frame_num": frame_num if video else None, "image_format": image_format, "paraphrase": paraphrase,
            "counts": counts, "input_schema": schema,
            "first_sequence": "imgbase64" if video else "text", "second_sequence": "text" if video else "imgbase64",
            "holdout": [list(p) for p in hold],
            "vocab": {"colors": list(COLORS), "shapes": list(SHAPES), "positions": list(POSITIONS),
                      "directions": list(DIRECTIONS)},
            "files": files}
    (out / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return meta


def read_attributes(path: str | os.PathLike) -> dict[str, dict]:
    """``{split}.attributes.jsonl`` → {idx: attrs}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out[str(d["idx"])] = d
    return out
