"""``tuwen complete IMG --mask MASK.png --prompt TEXT``: image completion ("text and part of image").

Inpainting (``--mask`` white = generate, or ``--box x0,y0,x1,y1``) and outpainting (``--extend right:PX``,
``down:PX``: the view moves by PX pixels of the model's image and the strip that comes into view is generated)
with a tuwen / EasyNLP text→image model. The method and its limits: ``tuwen.models.completion``.
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "complete", help="complete an image: regenerate a masked region (inpainting) or extend it (outpainting)",
        description="Keep the known part of IMG and generate the rest for a prompt with a text→image model. "
                    "Examples: tuwen complete photo.png --mask mask.png --prompt '右上角有一个红色的圆形'; "
                    "tuwen complete photo.png --box 40,0,64,24 --prompt ...; "
                    "tuwen complete photo.png --extend right:16 --prompt ...")
    p.add_argument("image", metavar="IMG", help="the image to complete (resized + center-cropped to the model's size)")
    p.add_argument("--prompt", required=True, help="text describing the whole completed image")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--mask", default=None, metavar="MASK.png",
                   help="mask of IMG's size: white (≥128) = generate, black = keep (transparent pixels of an "
                        "RGBA mask also mean generate)")
    g.add_argument("--box", default=None, metavar="x0,y0,x1,y1", help="generate this box (pixels of IMG)")
    g.add_argument("--extend", default=None, metavar="right:PX[,down:PX]",
                   help="outpainting: move the view right and/or down by PX pixels of the model's image and "
                        "generate the strip that comes into view")
    p.add_argument("--model", default=None, help="text→image model folder (default: the shipped demo model)")
    p.add_argument("-n", "--num_images", type=int, default=4, help="completions to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tuwen_complete",
                   help="output folder: complete_K.png (known pixels pasted back), grids/, input.png, mask.png")
    p.add_argument("--sweeps", type=int, default=1,
                   help="Gibbs sweeps over the unknown codes when the mask is not a suffix in raster order "
                        "(0 = raster fill only; see the README)")
    p.add_argument("--window", default="row",
                   help="codes after an unknown code that its candidates are scored on: row (one grid row + 1), "
                        "all, or a number")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--vq_dtype", default=None, choices=["fp32", "bf16", "auto"],
                   help="VQGAN decode dtype (default fp32; bf16 is 2–3× faster on CPUs with AVX512-BF16, within a "
                        "few levels; auto: bf16 on CUDA and such CPUs, else fp32); recorded in each PNG")
    p.set_defaults(func=run)


def _parse_box(s: str) -> tuple[float, ...]:
    from ..errors import TuwenError
    try:
        box = tuple(float(v) for v in s.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise TuwenError(f"--box {s!r}: give four numbers x0,y0,x1,y1 (pixels of the input image)")
    return box


def _parse_extend(s: str) -> dict[str, int]:
    from ..errors import TuwenError
    out = {}
    for item in (t.strip() for t in s.split(",") if t.strip()):
        side, _, px = item.partition(":")
        if side not in ("right", "down") or not px.strip().isdigit() or side in out:
            raise TuwenError(f"--extend {s!r}: give right:PX and/or down:PX (e.g. right:16 or right:16,down:8)")
        out[side] = int(px)
    if not out:
        raise TuwenError(f"--extend {s!r}: give right:PX and/or down:PX")
    return out


def _parse_window(s: str):
    from ..errors import TuwenError
    if s in ("row", "all"):
        return None if s == "all" else "row"
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise TuwenError(f"--window {s!r}: row, all or a positive number of codes")


def run(a: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ..data.images import resize_crop
    from ..data.pngmeta import save_png, tuwen_version
    from ..errors import TuwenError
    from ..models.completion import box_mask, extend_canvas, load_mask, open_input
    from ..models.text2image import SAMPLING_FIELDS, TextToImage
    from ..runtime import init_distributed
    from .common import ImageWriter

    if not Path(a.image).expanduser().is_file():
        raise TuwenError(f"{a.image}: image file not found")
    if a.mask is not None and not Path(a.mask).expanduser().is_file():
        raise TuwenError(f"--mask {a.mask}: file not found")
    if a.num_images < 1:
        raise TuwenError("-n/--num_images must be ≥ 1")
    if a.sweeps < 0:
        raise TuwenError("--sweeps must be ≥ 0")
    if not a.prompt.strip():
        raise TuwenError("--prompt is empty; describe the whole completed image")
    window = _parse_window(a.window)
    box = _parse_box(a.box) if a.box else None
    extend = _parse_extend(a.extend) if a.extend else None
    image = open_input(str(Path(a.image).expanduser()))
    device = init_distributed(a.device)
    model_path = a.model
    if model_path is None:
        from ..pipelines import demo_model_path
        model_path = demo_model_path()
    from ..models.vqgan import resolve_vq_dtype
    model = TextToImage.from_pretrained(model_path, vq_dtype=resolve_vq_dtype(a.vq_dtype, device, "--vq_dtype")
                                        ).to(device)
    size = model.config.image_size
    if extend:
        canvas, mask = extend_canvas(image, size, right=extend.get("right", 0), down=extend.get("down", 0))
    else:
        canvas = resize_crop(image, size)
        mask = box_mask(box, image.size, size) if box else load_mask(a.mask, image.size, size)
    for w in model.prompt_warnings(a.prompt):
        print(f"warning: {w}", file=sys.stderr)
    kw = {k: getattr(a, k) for k in SAMPLING_FIELDS if getattr(a, k) is not None}
    images = model.complete(a.prompt, canvas, mask, num_images=a.num_images, seed=a.seed, key="complete",
                            sweeps=a.sweeps, window=window, **kw)
    out = Path(a.out)
    writer = ImageWriter(out)
    writer.warn_if_not_empty("--out")
    how = {"mask": a.mask, "box": a.box, "extend": a.extend}
    records = [{**r, "task": "complete", "input": str(a.image), "completion": {
        **{k: v for k, v in how.items() if v is not None}, "sweeps": a.sweeps, "window": a.window,
        "unknown_pixels": int(mask.sum())}} for r in model.records(a.prompt, a.seed, "complete", a.num_images, **kw)]
    names = writer.write("complete", images, None, records)
    shown = np.asarray(canvas).copy()
    shown[mask] = (shown[mask] * 0.3 + np.array([255, 0, 255]) * 0.7).astype(np.uint8)  # the region to generate
    save_png(Image.fromarray(shown), out / "input.png", {"prompt": a.prompt, "tuwen": tuwen_version()})
    Image.fromarray((mask * 255).astype(np.uint8), "L").save(out / "mask.png")
    (out / "prompts.json").write_text(json.dumps([{"prompt": a.prompt, "images": names, "grid": writer.last_grid,
                                                   "records": records}], ensure_ascii=False, indent=2),
                                      encoding="utf-8")
    print(f"wrote {len(names)} completion(s) of {a.image} to {out}/ (input.png shows the generated region in "
          f"magenta; {int(mask.sum())} of {size * size} pixels generated)")
    return 0
