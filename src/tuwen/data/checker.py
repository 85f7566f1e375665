"""Programmatic attribute checker for the synthetic set: is there a <colour> <shape> at <position> in this image?

Used to judge generated images (text→image), generated captions and clips, without any learned model.

How an image is read (``analyze``):

1. Images larger than 128 px are box-downsampled to at most 128 px (area averaging keeps edge mixtures linear).
2. The background colour is the per-channel median (objects cover well under half of every synthetic image).
3. Each pixel's difference from the background ``d = p - bg`` is classified by its hue angle in an opponent
   colour plane (R−G, (R+G)/2−B) to the nearest named colour. An anti-aliased or blurred edge pixel is a mix
   ``bg + a·(c - bg)``, so its hue angle is that of ``c - bg`` whatever the coverage ``a``: blur and JPEG move
   edges, not hues. A pixel is foreground when its coverage ``a`` (projection of ``d`` on ``c - bg``) is ≥ 0.5,
   its chroma is large enough and its hue is within 40° of the named colour.
4. 8-connected components per colour (plain BFS; no scipy), small ones (< 30 % of the smallest object the
   generator draws) dropped, and so are ragged ones (no template fits) smaller than the smallest object.
5. Per component: its own colour (median of its most covered pixels) gives a soft coverage mask ``w``; the
   soft area and centroid of ``w`` fix a template of each shape (same area, same centroid; the generator's exact
   geometry), blurred by a few Gaussian widths; the shape is the template with the smallest L1 distance.
   The position is the 3×3 cell of the fitted shape's centre.

``check(image, objects)`` → per object: colour found, shape right, position right, all three (the best-matching
component of the object's colour is used). ``check_video(frames, objects)`` tracks the object's centroid and
judges the direction. ``score(images, attrs)`` → per-attribute accuracies with chance levels.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any, Sequence

import numpy as np
from PIL import Image

from . import synth
from .synth import COLORS, POSITIONS, SHAPES, ObjectSpec

ANALYSIS_MAX = 128          # images are analysed at most this large
MIN_COVERAGE = 0.5          # foreground: coverage of the named colour at least this
MAX_HUE_DIFF = 40.0         # degrees between a pixel's hue and its colour's hue
MIN_CHROMA_FRAC = 0.35      # pixel chroma at least this fraction of the colour's chroma
MIN_AREA_FRAC = 0.3         # components smaller than this fraction of the smallest object are noise
MAX_AREA_FACTOR = 3.0       # components larger than this many times the largest object are blobs, not shapes
MAX_FIT_ERROR = 0.6         # shape templates further than this (normalised L1) from the mask: shape unknown
CORE_QUANTILE = 0.75        # a component's own colour: median of its pixels above this coverage quantile
MAX_W = 1.5                 # soft mask values are clipped to [0, MAX_W] (the fit absorbs the amplitude)
PALE_CHROMA_FRAC = 0.12     # pixels this close to grey have no reliable hue (faint edges, background)
LUMA_WEIGHT = 1.0           # the soft mask projects on the object colour in YCbCr with these weights: luma
CHROMA_WEIGHT = 0.3         # counts most because JPEG keeps it at full resolution (chroma is subsampled)
BLUR_SIGMAS = (0.0, 0.6, 1.0, 1.5, 2.2)   # Gaussian widths (pixels) tried on each template
MIN_MOVE = 0.12             # a clip's object must move at least this fraction of the image side

_COLOR_NAMES = list(COLORS)
_COLOR_ARR = np.array([COLORS[c] for c in _COLOR_NAMES], np.float32)


def _ycc_metric(luma: float, chroma: float) -> np.ndarray:
    """Quadratic form on RGB differences that weights the YCbCr luma and chroma differences."""
    m = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], np.float32)
    return (m.T @ np.diag([luma, chroma, chroma]).astype(np.float32) @ m).astype(np.float32)


_YCC_W = _ycc_metric(LUMA_WEIGHT, CHROMA_WEIGHT)  # projections weight luma (full resolution in JPEG)


def _chroma(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Opponent chroma coordinates of RGB (differences): (R−G, (R+G)/2 − B)."""
    return x[..., 0] - x[..., 1], (x[..., 0] + x[..., 1]) * 0.5 - x[..., 2]


@dataclasses.dataclass
class Component:
    color: str
    area: float                 # soft area (pixels)
    cx: float                   # fitted shape centre, pixels
    cy: float
    shape: str                  # best template, or "unknown"
    fit_error: float
    errors: dict                # shape → error
    position: str
    pixels: int                 # hard pixel count

    def to_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "position": self.position,
                "area": round(self.area, 1), "cx": round(self.cx, 2), "cy": round(self.cy, 2),
                "fit_error": round(self.fit_error, 3) if math.isfinite(self.fit_error) else None}


@dataclasses.dataclass
class Analysis:
    width: int
    height: int
    background: tuple
    components: list[Component]

    def of_color(self, color: str) -> list[Component]:
        return [c for c in self.components if c.color == color]


@dataclasses.dataclass
class ObjectResult:
    target: ObjectSpec
    color: bool
    shape: bool
    position: bool              # for clips: direction
    found: dict | None          # the component judged (shape, position/direction, ...)

    @property
    def ok(self) -> bool:
        return self.color and self.shape and self.position

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(), "color": self.color, "shape": self.shape,
                "position": self.position, "ok": self.ok, "found": self.found}


# ----------------------------------------------------------------------------------------------- image analysis

def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        img = image if image.mode == "RGB" else image.convert("RGB")
        w, h = img.size
        if max(w, h) > ANALYSIS_MAX:
            f = ANALYSIS_MAX / max(w, h)
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX)
        return np.asarray(img, np.float32)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image (H×W×3), got an array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        scale = 1.0 if arr.max() > 1.5 else 255.0  # floats in [0, 1] or [0, 255]
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    return _as_array(Image.fromarray(np.ascontiguousarray(arr), "RGB"))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of flat indices (BFS; small images only)."""
    h, w = mask.shape
    flat = mask.reshape(-1).copy()
    comps = []
    for start in np.flatnonzero(flat):
        if not flat[start]:
            continue
        flat[start] = False
        q = deque([int(start)])
        members = []
        while q:
            p = q.popleft()
            members.append(p)
            y, x = divmod(p, w)
            for yy in (y - 1, y, y + 1):
                if yy < 0 or yy >= h:
                    continue
                base = yy * w
                for xx in (x - 1, x, x + 1):
                    if 0 <= xx < w:
                        n = base + xx
                        if flat[n]:
                            flat[n] = False
                            q.append(n)
        comps.append(np.asarray(members, np.int64))
    return comps


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    idx = np.arange(n)
    g = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return (g / (sigma * math.sqrt(2 * math.pi))).astype(np.float32)


SCALE_FACTORS = (0.84, 0.92, 1.0, 1.09)


def _fit_shape(w: np.ndarray, oy: int, ox: int, area: float, mx: float, my: float
               ) -> tuple[str, float, dict, float, float]:
    """Best shape template for the soft mask ``w`` (a window whose top-left pixel is (oy, ox)).

    The model is ``w ≈ a · blur_σ(template(shape, size s, centre))`` with the centre from the centroid and
    ``a·area(s) = Σw``; (σ, s) are searched on a small grid (blur and faded colours trade amplitude for size).
    Returns (shape, error, errors, centre x, centre y) in image pixel coordinates.
    """
    hh, ww = w.shape
    templates, owners, centres = [], [], {}
    for shape in SHAPES:
        s0 = math.sqrt(area / synth.SHAPE_AREA[shape])
        for f in SCALE_FACTORS:
            s = s0 * f
            cx, cy = mx, my
            if shape == "triangle":
                cy = my - synth.TRIANGLE_HEIGHT * s / 6  # centroid is h/6 below the bounding-box centre
            t = synth.coverage(shape, cx - ox, cy - oy, s, ww, hh, supersample=4)
            templates.append(t * (area / max(float(t.sum()), 1e-6)))
            owners.append(shape)
            if f == 1.0:
                centres[shape] = (cx, cy)
    stack = np.stack(templates)                                   # (shapes × scales, hh, ww)
    best = np.abs(stack - w).sum(axis=(1, 2))
    for sigma in BLUR_SIGMAS:
        if sigma > 0:
            blurred = _blur_matrix(hh, sigma) @ stack @ _blur_matrix(ww, sigma).T
            best = np.minimum(best, np.abs(blurred - w).sum(axis=(1, 2)))
    errors = {}
    for shape, e in zip(owners, best.tolist()):
        errors[shape] = min(errors.get(shape, float("inf")), e / max(area, 1e-6))
    shape = min(errors, key=errors.get)
    return shape, errors[shape], errors, centres[shape][0], centres[shape][1]


def _cell_position(x: float, y: float, width: int, height: int) -> str:
    col = min(2, max(0, int(3 * x / width)))
    row = min(2, max(0, int(3 * y / height)))
    return synth.CELL_POSITION[(row, col)]


def analyze(image: Any) -> Analysis:
    """Find the coloured objects of an image (PIL image or uint8/float array, any size)."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    bg = np.median(arr.reshape(-1, 3), axis=0).astype(np.float32)
    d = arr - bg
    dc1, dc2 = _chroma(d)
    ref = _COLOR_ARR - bg                                       # (K, 3)
    rc1, rc2 = _chroma(ref)
    ref_angle = np.degrees(np.arctan2(rc2, rc1))                # (K,)
    ref_chroma = np.hypot(rc1, rc2)
    pix_angle = np.degrees(np.arctan2(dc2, dc1))
    pix_chroma = np.hypot(dc1, dc2)
    diff = np.abs((pix_angle[..., None] - ref_angle + 180.0) % 360.0 - 180.0)   # (H, W, K)
    label = np.argmin(diff, axis=-1)
    hue_diff = np.take_along_axis(diff, label[..., None], -1)[..., 0]
    r = ref[label]                                               # (H, W, 3)
    cover = (d * r).sum(-1) / np.maximum((r * r).sum(-1), 1e-6)
    fg = ((cover >= MIN_COVERAGE) & (hue_diff <= MAX_HUE_DIFF)
          & (pix_chroma >= MIN_CHROMA_FRAC * ref_chroma[label]))
    cell = min(w, h) / 3
    min_area = MIN_AREA_FRAC * synth.SHAPE_AREA["triangle"] * (synth.SCALE_RANGE[0] * cell) ** 2
    max_area = MAX_AREA_FACTOR * synth.SHAPE_AREA["circle"] * (synth.SCALE_RANGE[1] * cell) ** 2
    raw = []
    comp_id = np.full(h * w, -1, np.int64)
    for k, name in enumerate(_COLOR_NAMES):
        mk = fg & (label == k)
        if mk.sum() < max(1.0, min_area * 0.5):
            continue
        for members in _components(mk):
            if len(members) < max(1.0, min_area * 0.5):
                continue
            comp_id[members] = len(raw)
            raw.append((k, name, members))
    comp_id = comp_id.reshape(h, w)
    comps: list[Component] = []
    any_fg = comp_id >= 0
    for j, (k, name, members) in enumerate(raw):
        ys, xs = np.divmod(members, w)
        # the component's own colour: median of its most covered pixels
        cov = cover.reshape(-1)[members]
        core = members[cov >= np.quantile(cov, CORE_QUANTILE)] if len(members) >= 4 else members
        own = np.median(arr.reshape(-1, 3)[core], axis=0) - bg
        if np.dot(own, own) < 1e-6:
            own = ref[k]
        size = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        m = int(math.ceil(3 + 0.25 * size))
        y0, y1 = max(0, ys.min() - m), min(h, ys.max() + m + 1)
        x0, x1 = max(0, xs.min() - m), min(w, xs.max() + m + 1)
        dw = d[y0:y1, x0:x1]
        wo = own @ _YCC_W
        wm = np.clip((dw @ wo) / float(np.dot(own, wo)), 0.0, MAX_W)
        # keep pixels of this hue (or too pale to have one); drop other objects and faint noise
        same_hue = (label[y0:y1, x0:x1] == k) & (hue_diff[y0:y1, x0:x1] <= 60.0)
        pale = pix_chroma[y0:y1, x0:x1] < PALE_CHROMA_FRAC * ref_chroma[k]
        other = any_fg[y0:y1, x0:x1] & (comp_id[y0:y1, x0:x1] != j)
        wm = np.where((same_hue | pale) & ~other & (wm >= 0.08), wm, 0.0).astype(np.float32)
        area = float(wm.sum())
        if area < min_area:
            continue
        gy, gx = np.mgrid[y0:y1, x0:x1]
        mx = float((wm * (gx + 0.5)).sum() / area)
        my = float((wm * (gy + 0.5)).sum() / area)
        if area > max_area:
            shape, err, errs, cx, cy = "unknown", float("inf"), {}, mx, my
        else:
            shape, err, errs, cx, cy = _fit_shape(wm, y0, x0, area, mx, my)
            if err > MAX_FIT_ERROR:
                if area < min_area / MIN_AREA_FRAC:  # small and ragged: speckle, not an object
                    continue
                shape = "unknown"
        comps.append(Component(name, area, cx, cy, shape, err, errs, _cell_position(cx, cy, w, h), len(members)))
    return Analysis(w, h, tuple(float(v) for v in bg), comps)


# ----------------------------------------------------------------------------------------------- checking

def _targets(objects: Any) -> list[ObjectSpec] | None:
    if isinstance(objects, str):
        return synth.parse_caption(objects)
    if objects is None:
        return None
    return synth.object_specs(objects)


def check(image: Any, objects: Any) -> list[ObjectResult]:
    """Judge each wanted object (``ObjectSpec``s / dicts / a sample's attrs / a caption) in one image.

    For each object, the components of its colour are compared and the best match (most attributes right, then
    largest) is reported: colour found, shape right, position right (``ok`` = all three).
    """
    an = image if isinstance(image, Analysis) else analyze(image)
    targets = _targets(objects)
    if targets is None:
        raise ValueError(f"cannot parse the caption {objects!r}")
    out = []
    for t in targets:
        best, best_key = None, None
        for c in an.of_color(t.color):
            key = (int(c.shape == t.shape) + int(c.position == t.position), c.shape == t.shape, c.area)
            if best_key is None or key > best_key:
                best, best_key = c, key
        if best is None:
            out.append(ObjectResult(t, False, False, False, None))
        else:
            out.append(ObjectResult(t, True, best.shape == t.shape, best.position == t.position, best.to_dict()))
    return out


def extra_objects(an: Analysis, objects: Sequence[ObjectSpec]) -> int:
    """Components whose colour no wanted object has (things drawn that the prompt did not ask for)."""
    wanted = {o.color for o in objects}
    return sum(1 for c in an.components if c.color not in wanted)


def check_video(frames: Sequence[Any], objects: Any) -> list[ObjectResult]:
    """Judge a clip: per object, colour found (in at least half the frames), shape (majority over frames) and
    direction (displacement of the centroid from the first to the last frame where it is found)."""
    targets = _targets(objects)
    if targets is None:
        raise ValueError(f"cannot parse the caption {objects!r}")
    if not frames:
        raise ValueError("a clip needs at least one frame")
    ans = [f if isinstance(f, Analysis) else analyze(f) for f in frames]
    out = []
    for t in targets:
        track, shapes = [], []
        for an in ans:
            cands = an.of_color(t.color)
            if not cands:
                continue
            c = max(cands, key=lambda c: (c.shape == t.shape, c.area))
            track.append((c.cx / an.width, c.cy / an.height))
            shapes.append(c.shape)
        found = len(track) * 2 >= len(ans) and len(track) > 0
        if not found:
            out.append(ObjectResult(t, False, False, False, None))
            continue
        shape = max(SHAPES + ("unknown",), key=lambda s: (shapes.count(s), s == t.shape))
        direction = None
        if len(track) >= 2:
            dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
            if max(abs(dx), abs(dy)) >= MIN_MOVE:
                if abs(dx) >= abs(dy):
                    direction = "right" if dx > 0 else "left"
                else:
                    direction = "down" if dy > 0 else "up"
        ok_dir = direction == t.direction if t.direction is not None else True
        out.append(ObjectResult(t, True, shape == t.shape, ok_dir,
                                {"shape": shape, "direction": direction, "frames_found": len(track),
                                 "track": [(round(x, 3), round(y, 3)) for x, y in track]}))
    return out


# ----------------------------------------------------------------------------------------------- scoring

def chance_levels(attr_lists: Sequence[Sequence[ObjectSpec]] | None = None, video: bool = False) -> dict:
    """Accuracy of guessing each attribute uniformly at random."""
    third = 1 / len(synth.DIRECTIONS) if video else 1 / len(POSITIONS)
    obj = 1 / len(COLORS) / len(SHAPES) * third
    levels = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), ("direction" if video else "position"): third,
              "object": obj}
    if attr_lists:
        levels["image"] = float(np.mean([obj ** max(1, len(a)) for a in attr_lists]))
    else:
        levels["image"] = obj
    return levels


def _accumulate(results: list[list[ObjectResult]], video: bool) -> dict:
    n_obj = sum(len(r) for r in results)
    third = "direction" if video else "position"
    if not n_obj:
        return {"n_images": len(results), "n_objects": 0}
    flat = [o for r in results for o in r]
    return {"n_images": len(results), "n_objects": n_obj,
            "color": sum(o.color for o in flat) / n_obj,
            "shape": sum(o.shape for o in flat) / n_obj,
            third: sum(o.position for o in flat) / n_obj,
            "object": sum(o.ok for o in flat) / n_obj,
            "image": sum(bool(r) and all(o.ok for o in r) for r in results) / len(results)}


def score(images: Sequence[Any], attr_lists: Sequence[Any], shuffled: bool | Sequence[Any] = False,
          details: bool = False) -> dict:
    """Per-attribute accuracies of ``images`` against ``attr_lists`` (attrs dicts, object lists or captions).

    Returns ``{"n_images", "n_objects", "color", "shape", "position", "object", "image", "unparsed",
    "extra_objects", "chance": {...}}``; ``image`` = every object of the image right. Captions that do not parse
    count as wrong on every attribute (``unparsed`` counts them). Clips (a list of frames per item, with objects
    that have a direction) are scored with ``check_video`` and report ``direction`` instead of ``position``.
    ``shuffled=True`` also scores every image against the next image's attributes (``"shuffled": {...}``),
    an empirical chance level; a sequence gives those mismatched attribute lists explicitly (e.g. when several
    images share a prompt). ``details=True`` adds per-image results.
    """
    if len(images) != len(attr_lists):
        raise ValueError(f"{len(images)} images but {len(attr_lists)} attribute lists")
    targets = [_targets(a) for a in attr_lists]
    video = any(t and any(o.direction is not None for o in t) for t in targets)
    analyses = []
    for img in images:
        if video:
            frames = img if isinstance(img, (list, tuple)) else [img]
            analyses.append([analyze(f) for f in frames])
        else:
            analyses.append(analyze(img))

    def run(tl):
        res, extra = [], 0
        for an, t in zip(analyses, tl):
            if t is None:
                res.append(None)
                continue
            if video:
                res.append(check_video(an, t))
            else:
                res.append(check(an, t))
                extra += extra_objects(an, t)
        return res, extra

    res, extra = run(targets)
    unparsed = sum(r is None for r in res)
    filled = [r if r is not None else [] for r in res]
    out = _accumulate(filled, video)
    if unparsed:  # an unparseable caption: one object, all wrong
        n_obj = out["n_objects"] + unparsed
        for k in ("color", "shape", "direction" if video else "position", "object"):
            out[k] = out.get(k, 0.0) * out["n_objects"] / n_obj
        out["image"] = sum(bool(r) and all(o.ok for o in r) for r in filled) / len(filled)
        out["n_objects"] = n_obj
    out["unparsed"] = unparsed
    if not video:
        out["extra_objects"] = extra / max(1, len(images))
    out["chance"] = chance_levels([t for t in targets if t], video)
    if not isinstance(shuffled, bool):
        if len(shuffled) != len(images):
            raise ValueError(f"{len(images)} images but {len(shuffled)} shuffled attribute lists")
        sres, _ = run([_targets(a) for a in shuffled])
        out["shuffled"] = _accumulate([r if r is not None else [] for r in sres], video)
    elif shuffled and len(images) > 1:
        rolled = targets[1:] + targets[:1]
        sres, _ = run(rolled)
        out["shuffled"] = _accumulate([r if r is not None else [] for r in sres], video)
    if details:
        out["details"] = [[o.to_dict() for o in r] if r is not None else None for r in res]
    return out


def score_captions(predictions: Sequence[str], references: Sequence[Any]) -> dict:
    """Score generated captions against reference attributes (attrs dicts, object lists or reference captions).

    Each reference object is matched to the predicted object with most attributes in common; reports the
    fraction of captions that parse, per-attribute accuracies over reference objects, ``object`` (all right)
    and ``caption`` (the predicted set of objects equals the reference set).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n_obj = parsed = exact = 0
    hits = {"color": 0, "shape": 0, "place": 0, "object": 0}
    refs = [_targets(r) or [] for r in references]
    video = any(o.direction is not None for r in refs for o in r)

    def key(o: ObjectSpec) -> tuple:
        return (o.color, o.shape, o.position or "", o.direction or "")

    def place_ok(q: ObjectSpec, o: ObjectSpec) -> bool:
        return q.direction == o.direction if o.direction is not None else q.position == o.position

    for pred, r in zip(predictions, refs):
        p = synth.parse_caption(pred) if isinstance(pred, str) else None
        n_obj += len(r)
        if p is None:
            continue
        parsed += 1
        if sorted(map(key, p)) == sorted(map(key, r)):
            exact += 1
        for o in r:
            best = max(p, key=lambda q: (q.color == o.color) + (q.shape == o.shape) + place_ok(q, o))
            hits["color"] += best.color == o.color
            hits["shape"] += best.shape == o.shape
            hits["place"] += place_ok(best, o)
            hits["object"] += best.color == o.color and best.shape == o.shape and place_ok(best, o)
    n = len(predictions)
    out = {"n_captions": n, "n_objects": n_obj, "parsed": parsed / max(1, n), "caption": exact / max(1, n)}
    for k, v in hits.items():
        out[("direction" if video else "position") if k == "place" else k] = v / max(1, n_obj)
    return out
