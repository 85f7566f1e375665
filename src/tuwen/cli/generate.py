"""``tuwen generate "一只红色的猫" -n 4 --model DIR --seed 0 --out DIR``: one-off text→image."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images for one or more prompts",
        description="Generate images from prompts with a text→image model (tuwen or EasyNLP/pai-painter folder). "
                    "Example: tuwen generate '左上角有一个红色的圆形' -n 4 --model DIR --seed 0 --out out/")
    p.add_argument("prompts", nargs="+", help="prompt(s); use --file for a file with one prompt per line")
    p.add_argument("--model", default=None, help="model folder or model-zoo name (default: the shipped demo model)")
    p.add_argument("-n", "--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tuwen_out", help="output folder: PNGs, one grid per prompt, index.html")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely codes (1 = greedy)")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--rerank", default=None, help="clip:DIR or caption:DIR: score the candidates, keep the best")
    p.add_argument("--keep", type=int, default=None, help="with --rerank: how many to keep per prompt")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import TuwenError
    from ..models.text2image import TextToImage
    from ..runtime import init_distributed
    from .common import write_images

    if a.num_images < 1:
        raise TuwenError("-n/--num_images must be ≥ 1")
    model_path = a.model
    if model_path is None:
        from ..pipelines import demo_model_path
        model_path = demo_model_path()
    model = TextToImage.from_pretrained(model_path).to(init_distributed(a.device))
    kw = {k: getattr(a, k) for k in ("top_k", "top_p", "temperature", "guidance_scale") if getattr(a, k) is not None}
    images = model.generate(a.prompts, num_images_per_prompt=a.num_images, seed=a.seed, batch_size=a.batch_size,
                            progress=True, **kw)
    scorer = None
    if a.rerank:
        from ..rerank import load_scorer, rerank
        scorer = load_scorer(a.rerank)
    keep = a.keep or a.num_images
    if keep > a.num_images:
        raise TuwenError(f"--keep {keep} is more than -n {a.num_images}")
    out = Path(a.out)
    index = []
    for i, (prompt, group) in enumerate(zip(a.prompts, images)):
        scores = None
        if scorer is not None:
            order, sc = rerank(scorer, prompt, group, keep)
            group, scores = [group[j] for j in order], [float(sc[j]) for j in order]
        names = write_images(out, f"prompt{i:03d}", group, scores)
        index.append({"prompt": prompt, "images": names, "grid": f"prompt{i:03d}_grid.png",
                      **({"scores": scores} if scores else {})})
    from ..demo import write_index_html
    write_index_html(out, index, title="tuwen generate")
    (out / "prompts.json").write_text(json.dumps(index, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"wrote {sum(len(e['images']) for e in index)} image(s) for {len(index)} prompt(s) to {out}/ "
          f"(open {out / 'index.html'})")
    return 0
