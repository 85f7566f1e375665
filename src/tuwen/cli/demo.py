"""``tuwen demo``: generate images with the shipped demo model, write PNGs/grids/index.html, print accuracy."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the shipped text→image demo (offline, ~1 min on 2 CPU cores)",
                       description="Generates images for a few Chinese prompts (some with colour/shape "
                                   "combinations never seen in training) with the demo model shipped in the "
                                   "package, writes PNGs, grids and index.html, and prints the attribute "
                                   "checker's accuracy.")
    p.add_argument("--out", default="tuwen_demo",
                   help="output folder: PNGs, grids/, prompts.json, index.html (default tuwen_demo)")
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each image derives its own from it)")
    p.add_argument("--model", default=None, help="another text→image model folder (default: the shipped one)")
    p.add_argument("--prompt", action="append", default=None, help="prompt(s) instead of the demo prompts")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--weights_dtype", default="auto", choices=["auto", "fp32", "bf16", "int8", "w8a8"],
                   help="GPT Linear weights for decoding (auto: w8a8 on x86 CPUs, else int8; as loaded on GPU)")
    p.add_argument("--vq_dtype", default=None, choices=["fp32", "bf16", "auto"],
                   help="VQGAN decode dtype (default auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, 2–3× faster "
                        "there and within a few levels, else fp32; fp32 for EasyNLP-exact pixels); recorded in each PNG")
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="speculative Jacobi decoding with K guessed codes per step")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..demo import run_demo

    res = run_demo(a.out, n=a.n, seed=a.seed, prompts=a.prompt, model_path=a.model, device=a.device,
                   weights_dtype=a.weights_dtype, speculative=a.speculative, vq_dtype=a.vq_dtype)
    for w in res.get("warnings", []):
        print(f"warning: {w}")
    for e in res["entries"]:
        marks = "".join("✓" if ok else "✗" for ok in e["ok"])
        note = f"  ({e['note']})" if e["note"] else ""
        print(f"{marks}  {e['prompt']}{note}")
    s = res["score"]
    print(f"attribute accuracy over {res['images']} images: color {s['color']:.1%}  shape {s['shape']:.1%}  "
          f"position {s['position']:.1%}  object {s['object']:.1%}  image {s['image']:.1%}")
    print(f"wrote {res['out']}/index.html in {res['seconds']:.1f} s")
    return 0
