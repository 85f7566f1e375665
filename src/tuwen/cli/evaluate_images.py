"""``tuwen evaluate-images``: Fréchet distance + KID between generated and reference images, and CLIP score.

Inputs are image folders (captions, for CLIP score, from ``name.txt`` beside ``name.png``) or EasyNLP TSVs (the
last column that holds an image: ``imgbase64`` or a ``gen_imgbase64`` JSON list, so predict's ``scores`` column after
it is passed over; the second of ≥3 columns is the prompt).
The feature space is chosen explicitly (nothing is downloaded):

  --features clip:DIR         tuwen CLIP image tower (L2-normalised embeddings)
  --features vqgan:DIR        tuwen VQGAN encoder (pooled pre-quantisation latents)
  --features inception:FILE   FID Inception-v3 from pytorch-fid's pt_inception-2015-12-05-6726825d.pth
  --features random:SEED      the fixed random CNN of --retrieval (a relative FD: compare against the floor of
                              the references against themselves, not against published FIDs)

--retrieval: does each generated image retrieve its own reference image (same idx, or --match text: same prompt)
among all references? R@1/R@5 in pixel space and in a fixed random-CNN feature space (no network to download);
also for VQGAN reconstructions against their originals.

The report (human-readable on stderr, JSON on stdout or --output) states the feature network, the sample counts
and the resize rule. Numbers from different feature spaces or --size values are not comparable.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate-images", help="FD / KID between two image sets in a chosen feature space, and CLIP score",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", required=True, help="folder of images or EasyNLP TSV (gen_imgbase64 / imgbase64)")
    p.add_argument("--reference", default=None, help="folder or TSV of real images (needed for FD/KID)")
    p.add_argument("--features", default=None, help="clip:DIR | vqgan:DIR | inception:FILE | random:SEED")
    p.add_argument("--clip", default=None, help="a tuwen CLIP folder: also report the CLIP score of --generated")
    p.add_argument("--retrieval", action="store_true",
                   help="self-retrieval R@1/R@5 of generated images among --reference (pixel + random features)")
    p.add_argument("--match", choices=("idx", "text"), default="idx",
                   help="--retrieval: a generated image's own reference has its idx (default) or its prompt text")
    p.add_argument("--retrieval_size", type=int, default=32, help="--retrieval: pixel-space image size (default 32)")
    p.add_argument("--size", type=int, default=None,
                   help="first resize every image (shortest side, bicubic) + center-crop to SIZE×SIZE")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="images per KID subset (clamped to the set size)")
    p.add_argument("--kid_subsets", type=int, default=100, help="number of KID subsets")
    p.add_argument("--max_images", type=int, default=None, help="use at most this many images of each set")
    p.add_argument("--text_column", type=int, default=None, help="TSV: 0-based prompt column (default: 1 of ≥3)")
    p.add_argument("--image_column", type=int, default=None, help="TSV: 0-based image column (default: the last that holds an image)")
    p.add_argument("--skip_first_line", action="store_true", help="TSV: skip a header line")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="KID subset sampling seed")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--max_bad_listed", type=int, default=20)
    p.add_argument("--no_progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import TuwenError
    from ..metrics.image import evaluate_images, format_report, save_json

    for flag in ("size", "kid_subset_size", "kid_subsets", "batch_size", "max_images"):
        v = getattr(args, flag)
        if v is not None and v < (2 if flag == "kid_subset_size" else 1):
            raise TuwenError(f"--{flag} must be ≥ {2 if flag == 'kid_subset_size' else 1}, got {v}")
    set_kw = dict(text_column=args.text_column, image_column=args.image_column, skip_first_line=args.skip_first_line)
    res = {}
    if args.retrieval:
        from ..metrics.image_retrieval import format_retrieval, retrieval_eval
        if not args.reference:
            raise TuwenError("--retrieval needs --reference (the real images, with the idx/prompt of each)")
        if args.retrieval_size < 1:
            raise TuwenError(f"--retrieval_size must be ≥ 1, got {args.retrieval_size}")
        res["retrieval"] = retrieval_eval(args.generated, args.reference, args.match, args.retrieval_size,
                                          args.max_images, args.max_bad_listed, **set_kw)
    if args.features or args.clip or not args.retrieval:
        res.update(evaluate_images(args.generated, args.reference, args.features, args.clip, size=args.size,
                                   kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                                   batch_size=args.batch_size, device=args.device, seed=args.seed,
                                   max_images=args.max_images, progress=args.progress,
                                   max_bad_listed=args.max_bad_listed, **set_kw))
        print(format_report(res), file=sys.stderr)
    if args.retrieval:
        print(format_retrieval(res["retrieval"]), file=sys.stderr)
    print(json.dumps(res, ensure_ascii=False))
    if args.output:
        save_json(res, args.output)
    return 0
