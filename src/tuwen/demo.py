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

from .cli.common import ImageWriter
from .data import checker
from .data.synth import parse_caption
from .models.quant import resolve_weights_dtype
from .models.text2image import TextToImage
from .models.vqgan import resolve_vq_dtype
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


def write_index_html(out: Path, entries: list[dict], title: str = "tuwen", settings: str | None = None,
                     summary: str | None = None, notes: dict[str, str] | None = None) -> Path:
    """A static page showing every prompt with its images (and scores/accuracy if present): the model and
    sampling ``settings``, an accuracy ``summary``, a legend for ✓/✗ and what each entry ``note`` means
    (``notes``: note → explanation)."""
    esc = html.escape
    rows = []
    for e in entries:
        imgs = "".join(
            f'<figure><a href="{esc(n)}"><img src="{esc(n)}" width="192" height="192" '
            f'style="image-rendering:pixelated" alt="{esc(e["prompt"])}"></a>'
            + (f"<figcaption>score {e['scores'][k]:.3f}</figcaption>" if e.get("scores") else "")
            + ('<figcaption class="{0}">{1}</figcaption>'.format(*(("ok", "✓") if e["ok"][k] else ("bad", "✗")))
               if e.get("ok") else "")
            + "</figure>" for k, n in enumerate(e["images"]))
        note = f" <small>({esc(e['note'])})</small>" if e.get("note") else ""
        rows.append(f"<section><h3>{esc(e['prompt'])}{note}</h3><div class=row>{imgs}</div></section>")
    head = []
    if settings:
        head.append(f"<p class=meta>{esc(settings)}</p>")
    if summary:
        head.append(f"<p class=summary>{esc(summary)}</p>")
    legend = []
    if any(e.get("ok") for e in entries):
        legend.append("<li><b class=ok>✓</b> the attribute checker finds every object of the prompt with its "
                      "colour, shape and position; <b class=bad>✗</b> at least one is wrong or missing</li>")
    if any(e.get("scores") for e in entries):
        legend.append("<li>score: the reranker's score (higher is better); images are shown best first</li>")
    for note, text in (notes or {}).items():
        if any(e.get("note") == note for e in entries):
            legend.append(f"<li><small>({esc(note)})</small>: {esc(text)}</li>")
    legend.append("<li>each PNG carries its prompt, seed, sampling settings and model in PNG text chunks: "
                  "<code>tuwen generate --from-png IMG</code> re-creates it; click an image for full size</li>")
    page = (f"<!doctype html><meta charset=utf-8><title>{esc(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}.row{display:flex;gap:10px;flex-wrap:wrap}"
            "figure{margin:0;text-align:center}.ok{color:#080}.bad{color:#b00}.meta{color:#555}"
            ".summary{font-weight:bold}</style>"
            f"<h1>{esc(title)}</h1>" + "".join(head) + "<ul class=legend>" + "".join(legend) + "</ul>"
            + "".join(rows))
    path = Path(out) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


UNSEEN_NOTE = "unseen combination"
UNSEEN_TEXT = ("this colour/shape pair (e.g. a blue square) never appears in the demo model's training images; "
               "the model has only seen the colour and the shape separately, so these prompts test whether it "
               "composes them")


def run_demo(out: str | Path = "tuwen_demo", n: int = 4, seed: int = 0, prompts: list[str] | None = None,
             model_path: str | Path | None = None, device: str = "auto", weights_dtype: str | None = "auto",
             speculative: int | None = None, vq_dtype: str | None = None) -> dict:
    """Generate ``n`` images per demo prompt, write them with grids + index.html, score them with the checker."""
    t0 = time.time()
    prompts = prompts or DEMO_PROMPTS
    dev = init_distributed(device)
    model = TextToImage.from_pretrained(model_path or demo_model_path(),
                                        weights_dtype=resolve_weights_dtype(weights_dtype, dev),
                                        vq_dtype=resolve_vq_dtype(vq_dtype or "auto", dev, "--vq_dtype")).to(dev)
    warnings = [w for p in prompts for w in model.prompt_warnings(p)]
    heldout = set()
    meta = Path(model_path or demo_model_path()) / "demo.json"
    if meta.exists():
        heldout = {tuple(x) for x in json.loads(meta.read_text(encoding="utf-8")).get("holdout", [])}
    images = model.generate(prompts, num_images_per_prompt=n, seed=seed, speculative=speculative)
    out = Path(out)
    writer = ImageWriter(out)
    writer.warn_if_not_empty("--out")
    entries, flat_imgs, flat_prompts = [], [], []
    for i, (prompt, group) in enumerate(zip(prompts, images)):
        records = model.records(prompt, seed, i, n)
        names = writer.write(f"prompt{i:02d}", group, records=records)
        results = [checker.check(im, prompt) for im in group]
        ok = [all(r.ok for r in res) for res in results]
        objs = parse_caption(prompt) or []
        unseen = any((o.color, o.shape) in heldout for o in objs)
        entries.append({"prompt": prompt, "images": names, "grid": writer.last_grid, "ok": ok,
                        "note": UNSEEN_NOTE if unseen else "", "records": records})
        flat_imgs += group
        flat_prompts += [prompt] * len(group)
    score = checker.score(flat_imgs, flat_prompts)
    p = model.sampling_params()
    settings = (f"model: {'the shipped demo model' if model_path is None else model_path} · seed {seed} · "
                f"{n} image(s) per prompt · top_k {p.top_k} · top_p {p.top_p} · temperature {p.temperature} · "
                f"guidance_scale {p.guidance_scale} · {model.config.image_size} px")
    summary = (f"attribute checker over {len(flat_imgs)} images: colour {score['color']:.1%} · shape "
               f"{score['shape']:.1%} · position {score['position']:.1%} · object {score['object']:.1%} · "
               f"whole image {score['image']:.1%}")
    write_index_html(out, entries, title="tuwen demo: text→image on the synthetic shapes set", settings=settings,
                     summary=summary, notes={UNSEEN_NOTE: UNSEEN_TEXT})
    (out / "prompts.json").write_text(json.dumps(
        entries,
        ensure_ascii=False, indent=2), encoding="utf-8")
    elapsed = time.time() - t0
    return {"out": str(out), "images": len(flat_imgs), "score": score, "seconds": elapsed, "entries": entries,
            "warnings": warnings}
