"""Image completion on the shipped demo model: the attribute checker's accuracy on the generated object.

    python bench/bench_completion.py [--n 24] [--model DIR] [--seed 0] [--threads 1]

Synthetic-set images with two objects (seen colour/shape pairs), rendered at the model's size. Object A lies in the
region to generate, object B in the known part; the prompt is the image's caption (both objects). Scenarios:

* ``extend down``  — the bottom 3 code rows are generated (A in the bottom row of the 3×3 layout): a suffix mask,
  so the raster fill is an exact sample;
* ``extend right`` — the right 3 code columns are generated (A in the right column): not a suffix;
* ``inpaint box``  — the code cells covering A's 3×3 cell are generated (a box anywhere): not a suffix.

Reported per scenario (fraction of images; ``checker.check`` per object): A right (colour + shape + position),
B right (kept), both; and for A the baselines: plain text→image from the same prompt and seeds (nothing known),
the VQ round trip of the real image (the tokenizer's ceiling), and for the non-suffix masks the raster fill
without the Gibbs sweep (``sweeps=0``). Prints one JSON line per scenario and a table.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def pick_samples(kind: str, n: int, size: int, start: int = 500_000):
    from tuwen.data import synth
    out, s = [], start
    while len(out) < n:
        s += 1
        attrs = synth.sample_attrs(s, n_objects=2, holdout=synth.DEFAULT_HOLDOUT)
        a, b = attrs["objects"]
        ra, ca = synth.POSITION_CELL[a["position"]]
        rb, cb = synth.POSITION_CELL[b["position"]]
        if kind == "down" and not (ra == 2 and rb < 2):
            continue
        if kind == "right" and not (ca == 2 and cb < 2):
            continue
        out.append((attrs, synth.render(attrs, size), synth.caption(attrs)))
    return out


def mask_for(kind: str, attrs, size: int, f: int) -> np.ndarray:
    from tuwen.data import synth
    m = np.zeros((size, size), bool)
    strip = 3 * f
    if kind == "down":
        m[size - strip:] = True
    elif kind == "right":
        m[:, size - strip:] = True
    else:
        r, c = synth.POSITION_CELL[attrs["objects"][0]["position"]]
        cell = size / 3
        y0, y1 = int(r * cell) // f * f, -(-int(np.ceil((r + 1) * cell)) // f) * f
        x0, x1 = int(c * cell) // f * f, -(-int(np.ceil((c + 1) * cell)) // f) * f
        m[y0:y1, x0:x1] = True
    return m


def ok(img, obj) -> bool:
    from tuwen.data import checker
    return bool(checker.check(img, [obj])[0].ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=24, help="images per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweeps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP contention on a busy machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from tuwen.models.completion import code_mask, complete_codes, paste_known
    from tuwen.models.text2image import TextToImage, image_seed
    from tuwen.pipelines import demo_model_path

    model = TextToImage.from_pretrained(a.model or demo_model_path()).eval()
    size, (gh, gw) = model.config.image_size, model.grid
    f = size // gh
    p = model.config.sampling
    table = []
    for kind in ("down", "right", "box"):
        t0 = time.time()
        samples = pick_samples(kind, a.n, size)
        res = {k: [] for k in ("A", "B", "both", "A_t2i", "A_roundtrip", "A_no_sweep")}
        # group the samples by mask (one batched completion per mask)
        groups: dict[bytes, list[int]] = {}
        masks = [mask_for(kind, s[0], size, f) for s in samples]
        for i, m in enumerate(masks):
            groups.setdefault(m.tobytes(), []).append(i)
        imgs = [s[1] for s in samples]
        known = model.vqgan.encode(imgs, size=size).reshape(len(imgs), -1)
        text = model.tokenize([s[2] for s in samples])
        seeds = [image_seed(a.seed, i, 0) for i in range(len(samples))]
        done: dict[int, dict] = {}
        sweeps_list = [a.sweeps] + ([0] if kind != "down" else [])
        for idx in groups.values():
            unknown = code_mask(masks[idx[0]], (gh, gw))
            for sw in sweeps_list:
                codes = complete_codes(model.gpt, text[idx], known[idx], unknown, [seeds[i] for i in idx],
                                       text_len=model.config.text_len, top_k=p.top_k, top_p=p.top_p,
                                       temperature=p.temperature, guidance_scale=p.guidance_scale,
                                       uncond_ids=model.uncond_ids(1), sweeps=sw, window=gw + 1)
                for i, g in zip(idx, model.decode_codes(codes)):
                    done.setdefault(i, {})[sw] = paste_known(g, imgs[i], masks[i])
        t2i = model.generate_codes(text, seeds)
        t2i_imgs = model.decode_codes(t2i)
        rt_imgs = model.decode_codes(known)
        for i, (attrs, img, cap) in enumerate(samples):
            A, B = attrs["objects"]
            out = done[i][a.sweeps]
            res["A"].append(ok(out, A))
            res["B"].append(ok(out, B))
            res["both"].append(res["A"][-1] and res["B"][-1])
            res["A_t2i"].append(ok(t2i_imgs[i], A))
            res["A_roundtrip"].append(ok(rt_imgs[i], A))
            if 0 in done[i] and a.sweeps != 0:
                res["A_no_sweep"].append(ok(done[i][0], A))
        row = {"scenario": {"down": "extend down", "right": "extend right", "box": "inpaint box"}[kind],
               "n": len(samples), "seconds": round(time.time() - t0, 1),
               **{k: round(float(np.mean(v)), 3) for k, v in res.items() if v}}
        print(json.dumps(row, ensure_ascii=False), flush=True)
        table.append(row)
    print("\nscenario        n   A(generated)  B(kept)  both   A: t2i  A: no sweep  A: VQ round trip")
    for r in table:
        print(f"{r['scenario']:<14} {r['n']:>3}   {r['A']:>8.3f}    {r['B']:>7.3f}  {r['both']:>5.3f}   "
              f"{r['A_t2i']:>6.3f}  {r.get('A_no_sweep', float('nan')):>9.3f}    {r['A_roundtrip']:>6.3f}")


if __name__ == "__main__":
    main()
