"""The shipped demo: a small VQGAN + GPT trained by tuwen's own commands on the synthetic shapes set.

``tuwen demo`` generates images for a handful of prompts (including colour/shape combinations that were held out
of training), writes PNGs, grids and an ``index.html``, and prints the attribute checker's accuracy — offline, in
under a minute on 2 CPU cores. ``scripts/train_demo.sh`` reproduces the model.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

from .cli.common import write_images
from .data import checker
from .data.synth import parse_caption
from .models.text2image import TextToImage
from .pipelines import DEMO_DIR, demo_model_path  # noqa: F401  (DEMO_DIR: part of this module's interface)
from .runtime import init_distributed

# prompts: seen combinations and (color, shape) pairs held out of training (listed in assets/demo_t2i/demo.json)
DEMO_PROMPTS = [
    "左上角有一个红色的圆形",
    "中间有一个蓝色的正方形",          # held out of training
    "右下角有一个绿色的三角形",
    "左侧有一个黄色的长方形，右上角有一个紫色的圆形",
    "下方有一个青色的正方形",
    "右侧有一个红色的三角形",          # held out of training
    "左下角有一个黄色的圆形",          # held out of training
]


def write_index_html(out: Path, entries: list[dict], title: str = "tuwen") -> Path:
    """A static page showing every prompt with its images (and scores/accuracy if present)."""
    rows = []
    for e in entries:
        imgs = "".join(
            f'<figure><img src="{html.escape(n)}" width="128" height="128" style="image-rendering:pixelated">'
            + (f"<figcaption>{e['scores'][k]:.3f}</figcaption>" if e.get("scores") else "")
            + ("<figcaption>{}</figcaption>".format("✓" if e["ok"][k] else "✗") if e.get("ok") else "")
            + "</figure>" for k, n in enumerate(e["images"]))
        note = f" <small>({html.escape(e['note'])})</small>" if e.get("note") else ""
        rows.append(f"<section><h3>{html.escape(e['prompt'])}{note}</h3><div class=row>{imgs}</div></section>")
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}.row{display:flex;gap:8px;flex-wrap:wrap}"
            "figure{margin:0;text-align:center}</style>"
            f"<h1>{html.escape(title)}</h1>" + "".join(rows))
    path = Path(out) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def run_demo(out: str | Path = "tuwen_demo", n: int = 4, seed: int = 0, prompts: list[str] | None = None,
             model_path: str | Path | None = None, device: str = "auto") -> dict:
    """Generate ``n`` images per demo prompt, write them with grids + index.html, score them with the checker."""
    t0 = time.time()
    prompts = prompts or DEMO_PROMPTS
    model = TextToImage.from_pretrained(model_path or demo_model_path()).to(init_distributed(device))
    heldout = set()
    meta = Path(model_path or demo_model_path()) / "demo.json"
    if meta.exists():
        heldout = {tuple(x) for x in json.loads(meta.read_text(encoding="utf-8")).get("holdout", [])}
    images = model.generate(prompts, num_images_per_prompt=n, seed=seed)
    out = Path(out)
    entries, flat_imgs, flat_prompts = [], [], []
    for i, (prompt, group) in enumerate(zip(prompts, images)):
        names = write_images(out, f"prompt{i:02d}", group)
        results = [checker.check(im, prompt) for im in group]
        ok = [all(r.ok for r in res) for res in results]
        objs = parse_caption(prompt) or []
        unseen = any((o.color, o.shape) in heldout for o in objs)
        entries.append({"prompt": prompt, "images": names, "ok": ok, "note": "unseen combination" if unseen else ""})
        flat_imgs += group
        flat_prompts += [prompt] * len(group)
    write_index_html(out, entries, title="tuwen demo: text→image on the synthetic shapes set")
    score = checker.score(flat_imgs, flat_prompts)
    elapsed = time.time() - t0
    return {"out": str(out), "images": len(flat_imgs), "score": score, "seconds": elapsed, "entries": entries}
