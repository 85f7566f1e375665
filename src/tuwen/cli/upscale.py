"""``tuwen upscale IMG [IMG …] --model SR_DIR --text TEXT``: token super-resolution (2×) with a model trained by
``--app_name=super_resolution`` (``tuwen.models.superres``)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "upscale", help="2× token super-resolution of images with a super_resolution model",
        description="Tokenize each image at the model's low size, sample the codes of the 2× image given the text, "
                    "decode. Example: tuwen upscale small.png --model sr/ --text '左上角有一个红色的圆形' "
                    "--out up/")
    p.add_argument("images", nargs="+", metavar="IMG", help="image file(s) (resized + center-cropped to the low size)")
    p.add_argument("--model", required=True, help="super-resolution model folder (--app_name=super_resolution)")
    p.add_argument("--text", required=True, help="the text describing the image(s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tuwen_upscale", help="output folder: NAME_x2.png per input")
    p.add_argument("--top_k", type=int, default=None,
                   help="sampling top_k (default: the model's; --app_name=super_resolution saves 1, greedy)")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--vq_dtype", default=None, choices=["fp32", "bf16", "auto"],
                   help="VQGAN decode dtype (default fp32; bf16 is 2–3× faster on CPUs with AVX512-BF16, within a "
                        "few levels; auto: bf16 on CUDA and such CPUs, else fp32); recorded in each PNG")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.pngmeta import save_png, tuwen_version
    from ..errors import TuwenError
    from ..models.superres import SuperRes
    from ..runtime import init_distributed

    paths = [Path(p).expanduser() for p in a.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TuwenError(f"image file(s) not found: {', '.join(missing)}")
    if not a.text.strip():
        raise TuwenError("--text is empty; describe the image")
    device = init_distributed(a.device)
    from ..models.vqgan import resolve_vq_dtype
    vq_dtype = resolve_vq_dtype(a.vq_dtype, device, "--vq_dtype")
    model = SuperRes.from_pretrained(a.model, vq_dtype=vq_dtype).to(device)
    kw = {k: getattr(a, k) for k in ("top_k", "top_p", "temperature") if getattr(a, k) is not None}
    from ..models.completion import open_input
    images = [open_input(str(p)) for p in paths]
    out = model.upscale(images, a.text, seed=a.seed, keys=[p.name for p in paths], **kw)
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    for p, im in zip(paths, out):
        save_png(im, dest / f"{p.stem}_x2.png", {"task": "upscale", "input": str(p), "prompt": a.text, "seed": a.seed,
                                                 "model": str(a.model), "tuwen": tuwen_version(), **kw,
                                                 **({"vq_dtype": vq_dtype} if vq_dtype != "fp32" else {})})
    print(f"upscaled {len(out)} image(s) {model.config.low_size} → {model.config.image_size} px into {dest}/")
    return 0
