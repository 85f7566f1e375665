"""Does reranking help? For each prompt, generate N candidates with a text→image model (fixed seeds), judge every
candidate with the synthetic-set attribute checker, and compare the accuracy of the image kept by each scorer with
a random pick (its expectation = the mean over the N candidates, exact, no sampling noise).

    python scripts/rerank_proof.py --prompts runs/demo/data/holdout_prompts.tsv,runs/demo/data/test_prompts.tsv \
        --n 16 --max_prompts 64 --scorer clip:runs/clip --scorer caption:runs/cap_img [--model DIR]

Prints, per prompt file and scorer, the fraction of kept images with every object right ("image") and per-object
accuracy, next to the random-pick and best-possible (oracle: any candidate right) figures.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="comma list of idx<TAB>text files (tuwen data synth *_prompts.tsv)")
    ap.add_argument("--model", default=None, help="text→image model (default: the shipped demo model)")
    ap.add_argument("--scorer", action="append", required=True, help="clip:DIR or caption:DIR (repeatable)")
    ap.add_argument("--n", type=int, default=16, help="candidates per prompt")
    ap.add_argument("--max_prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--output", default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    from tuwen.data import checker
    from tuwen.demo import demo_model_path
    from tuwen.rerank import load_scorer, order_by_score
    from tuwen.models.text2image import TextToImage

    torch.manual_seed(0)
    model = TextToImage.from_pretrained(args.model or demo_model_path())
    scorers = [(s, load_scorer(s, device="cpu")) for s in args.scorer]
    gen = {"top_k": args.top_k} if args.top_k else {}
    report = {}
    for path in args.prompts.split(","):
        rows = [line.split("\t") for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]
        rows = rows[: args.max_prompts]
        t0 = time.time()
        groups = model.generate([r[1] for r in rows], num_images_per_prompt=args.n, seed=args.seed,
                                keys=[r[0] for r in rows], **gen)
        t_gen = time.time() - t0
        ok = []      # [prompt][candidate] -> (image ok, objects ok, n objects)
        for (_, text), group in zip(rows, groups):
            res = [checker.check(im, text) for im in group]
            ok.append([(all(o.ok for o in r), sum(o.ok for o in r), len(r)) for r in res])
        n_obj = sum(c[0][2] for c in ok)
        fig = {"prompts": len(rows), "candidates": args.n, "generate_seconds": round(t_gen, 1),
               "random": {"image": sum(sum(x[0] for x in c) / len(c) for c in ok) / len(ok),
                          "object": sum(sum(x[1] for x in c) / len(c) for c in ok) / n_obj},
               "oracle": {"image": sum(any(x[0] for x in c) for c in ok) / len(ok)}}
        for name, scorer in scorers:
            t0 = time.time()
            picks = []
            for (_, text), group in zip(rows, groups):
                picks.append(order_by_score(scorer.score([text] * len(group), group))[0])
            fig[name] = {"image": sum(c[p][0] for c, p in zip(ok, picks)) / len(ok),
                         "object": sum(c[p][1] for c, p in zip(ok, picks)) / n_obj,
                         "score_seconds": round(time.time() - t0, 1)}
        report[path] = fig
        print(f"{path}: {len(rows)} prompts × {args.n} candidates (generated in {t_gen:.1f} s)")
        print(f"  {'pick':<40} {'image ok':>9} {'object ok':>10}")
        print(f"  {'random (expected)':<40} {fig['random']['image']:>9.1%} {fig['random']['object']:>10.1%}")
        for name, _ in scorers:
            print(f"  {'best by ' + name:<40} {fig[name]['image']:>9.1%} {fig[name]['object']:>10.1%}")
        print(f"  {'oracle (any candidate right)':<40} {fig['oracle']['image']:>9.1%}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
