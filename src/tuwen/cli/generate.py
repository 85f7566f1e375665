"""``tuwen generate "一只红色的猫" -n 4 --model DIR --seed 0 --out DIR``: one-off text→image."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images for one or more prompts",
        description="Generate images from prompts with a text→image model (tuwen or EasyNLP/pai-painter folder). "
                    "Example: tuwen generate '左上角有一个红色的圆形' -n 4 --model DIR --seed 0 --out out/")
    p.add_argument("prompts", nargs="*", help="prompt(s)")
    p.add_argument("--model", default=None, help="model folder or model-zoo name (default: the shipped demo model)")
    p.add_argument("-n", "--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tuwen_out",
                   help="output folder: PNGs (each with its prompt, seed, settings and model in PNG text chunks), "
                        "grids/ (one grid per prompt), prompts.json, index.html")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely codes (1 = greedy)")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--weights_dtype", default="auto", choices=["auto", "fp32", "bf16", "int8", "w8a8"],
                   help="GPT Linear weights for decoding (auto: w8a8 on x86 CPUs, else int8; as loaded on GPU)")
    p.add_argument("--vq_dtype", default=None, choices=["fp32", "bf16", "auto"],
                   help="VQGAN decode dtype (default auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, 2–3× faster "
                        "there and within a few levels, else fp32; fp32 for EasyNLP-exact pixels); recorded in each PNG, so "
                        "--from-png decodes the same way (with --from-png: default the record's)")
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="speculative Jacobi decoding: K guessed codes verified per step (same distribution, "
                        "different images for a seed)")
    p.add_argument("--size", type=int, default=None,
                   help="EasyNLP folders: image size in pixels (their config.json does not say; default: inferred)")
    p.add_argument("--text_len", type=int, default=None, help="EasyNLP folders: text positions (default 32)")
    p.add_argument("--img_len", type=int, default=None, help="EasyNLP folders: image positions (VQGAN grid h*w)")
    p.add_argument("--from-png", "--from_png", dest="from_png", default=None, metavar="IMG",
                   help="re-create the image IMG (a PNG written by tuwen) from the record in it: prompt, seed, "
                        "settings and model (--model overrides the model)")
    p.add_argument("--rerank", default=None, help="clip:DIR or caption:DIR: score the candidates, keep the best")
    p.add_argument("--keep", type=int, default=None, help="with --rerank: how many to keep per prompt")
    p.add_argument("--super_resolution", "--super-resolution", dest="super_resolution", default=None, metavar="SR_DIR",
                   help="upscale the images (kept ones, after --rerank) 2× with a token super-resolution model "
                        "(--app_name=super_resolution)")
    from .cogview import add_flags
    add_flags(p)  # CogView's --input-source/--with-id/--debug/--batch-size/--max-inference-batch-size/…
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from ..errors import TuwenError
    from ..models.text2image import TextToImage
    from ..runtime import init_distributed
    from .common import ImageWriter

    if a.from_png:
        return _from_png(a)
    from . import cogview
    if cogview.wants_cogview_path(a):  # CogView models, --input-source/--with-id/--debug
        if a.vq_dtype == "bf16":
            raise TuwenError("--vq_dtype bf16: CogView models decode with their own VQ-VAE in fp32; drop the flag")
        return cogview.run(a)
    if not a.prompts:
        raise TuwenError("tuwen generate: give at least one prompt (or --from-png IMG)")
    if a.num_images < 1:
        raise TuwenError("-n/--num_images must be ≥ 1")
    keep = a.keep or a.num_images
    if keep > a.num_images:
        raise TuwenError(f"--keep {keep} is more than -n {a.num_images}")
    device = init_distributed(a.device)  # a device this machine lacks is an error before any work
    from ..models.vqgan import resolve_vq_dtype
    vq_dtype = resolve_vq_dtype(a.vq_dtype or "auto", device, "--vq_dtype")   # fresh images: auto
    scorer = None
    if a.rerank:  # a bad --rerank is found before any image is generated
        from ..rerank import load_scorer, rerank
        scorer = load_scorer(a.rerank)
    sr = None
    if a.super_resolution:  # a bad SR folder is found before any image is generated
        from ..models.superres import SuperRes
        sr = SuperRes.from_pretrained(a.super_resolution, vq_dtype=vq_dtype).to(device)
    model_path = a.model
    if model_path is None:
        from ..pipelines import demo_model_path
        model_path = demo_model_path()
    from ..models.quant import resolve_weights_dtype
    model = TextToImage.from_pretrained(model_path, size=a.size, text_len=a.text_len, img_len=a.img_len,
                                        weights_dtype=resolve_weights_dtype(a.weights_dtype, device,
                                                                            "--weights_dtype"),
                                        vq_dtype=vq_dtype).to(device)
    if sr is not None and sr.config.low_size != model.config.image_size:
        raise TuwenError(f"--super_resolution {a.super_resolution} upscales {sr.config.low_size} px images to "
                         f"{sr.config.image_size} px, but {model_path} draws {model.config.image_size} px images; "
                         f"use an SR model trained with size={2 * model.config.image_size}")
    for p in a.prompts:
        for w in model.prompt_warnings(p):
            print(f"warning: {w}", file=sys.stderr)
    kw = {k: getattr(a, k) for k in ("top_k", "top_p", "temperature", "guidance_scale") if getattr(a, k) is not None}
    out = Path(a.out)
    writer = ImageWriter(out)
    writer.warn_if_not_empty("--out")
    images = model.generate(a.prompts, num_images_per_prompt=a.num_images, seed=a.seed, batch_size=a.batch_size,
                            progress=True, speculative=a.speculative, **kw)
    index = []
    for i, (prompt, group) in enumerate(zip(a.prompts, images)):
        records = model.records(prompt, a.seed, i, a.num_images, **kw)
        if a.speculative:
            records = [{**r, "speculative": a.speculative} for r in records]
        scores = None
        if scorer is not None:
            order, sc = rerank(scorer, prompt, group, keep)
            group, scores = [group[j] for j in order], [float(sc[j]) for j in order]
            records = [records[j] for j in order]
        if sr is not None:
            group = sr.upscale(group, prompt, seed=a.seed, keys=[f"{i}-{k}" for k in range(len(group))])
            records = [{**r, "super_resolution": {"model": str(a.super_resolution), "size": sr.config.image_size}}
                       for r in records]
        names = writer.write(f"prompt{i:03d}", group, scores, records)
        index.append({"prompt": prompt, "images": names, "grid": writer.last_grid, "records": records,
                      **({"scores": scores} if scores else {})})
    from ..demo import write_index_html
    write_index_html(out, index, title="tuwen generate", settings=_settings_line(model, a, kw))
    (out / "prompts.json").write_text(json.dumps(index, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"wrote {sum(len(e['images']) for e in index)} image(s) for {len(index)} prompt(s) to {out}/ "
          f"(open {out / 'index.html'})")
    return 0


def _settings_line(model, a, kw) -> str:
    p = model.sampling_params(**kw)
    return (f"model {model.name_or_path} · seed {a.seed} · top_k {p.top_k} · top_p {p.top_p} · temperature "
            f"{p.temperature} · guidance_scale {p.guidance_scale} · {model.config.image_size} px")


def _from_png(a) -> int:
    """``--from-png IMG``: the image again, from the record in its PNG text chunks."""
    from pathlib import Path

    from ..data.pngmeta import read_png_record, save_png
    from ..errors import TuwenError
    from ..models.text2image import TextToImage
    from ..runtime import init_distributed

    if a.prompts:
        raise TuwenError("--from-png takes its prompt from the image; give no prompt with it")
    rec = read_png_record(a.from_png)
    model_path = a.model or rec.get("model")
    if not model_path or model_path == "?":
        raise TuwenError(f"{a.from_png}: the record does not name the model; pass --model DIR")
    device = init_distributed(a.device)
    from ..models.quant import resolve_weights_dtype
    wd = rec.get("weights_dtype") if a.weights_dtype == "auto" else resolve_weights_dtype(a.weights_dtype, device)
    if a.vq_dtype is not None:  # decode in another dtype than the record's (the new PNG's record says which)
        from ..models.vqgan import resolve_vq_dtype
        rec = {k: v for k, v in rec.items() if k != "vq_dtype"}
        if (vd := resolve_vq_dtype(a.vq_dtype, device, "--vq_dtype")) != "fp32":
            rec["vq_dtype"] = vd
    model = TextToImage.from_pretrained(model_path, size=a.size, text_len=a.text_len, img_len=a.img_len,
                                        weights_dtype=wd).to(device)
    img = model.regenerate(rec)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{Path(a.from_png).stem}_again.png"
    save_png(img, dest, {**rec, "model": str(model_path)})
    print(f"re-created {a.from_png} (prompt {rec['prompt']!r}, seed {rec['seed']}, image {rec.get('k', 0)}) as "
          f"{dest}")
    return 0
