"""Self-retrieval of images: does a generated image (or a VQGAN reconstruction) find its own reference image
among all the references? (``tuwen evaluate-images --generated G --reference R --retrieval``.)

Every generated image is a query; every reference image a candidate. A query's correct candidates are the
references with the same key: the ``idx`` (first TSV column; a folder image's file stem, ``{idx}_{k}`` also
matching ``{idx}``) with ``match="idx"``, or the same prompt text with ``match="text"`` (then every reference of a
repeated prompt counts). Reported per space: R@1, R@5, mean rank, and chance@1 (the R@1 a random ranking has in
expectation: the mean over queries of correct candidates / candidates).

Two feature spaces that need no trained network (so anyone can rebuild the numbers offline):

* ``pixel``: the image resized (bilinear, antialiased) to ``size``×``size`` RGB in [0, 1]; similarity = minus
  the squared L2 distance.
* ``random_features``: a fixed random 3-layer CNN (seed 0, Kaiming-normal weights, 4×4 stride-2 convolutions
  3→32→64→128 with ReLU on a 64×64 input in [-1, 1], average-pooled to 4×4 → 2048-d), centred by the mean of the
  reference features and L2-normalised; similarity = cosine. Random conv features keep local colour/edge layout
  and forgive small shifts better than raw pixels.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tables import BadRowReport
from ..errors import TuwenError
from ..fileio import sanitize_name
from .features import RANDOM_NET_INPUT, pixel_features, random_feature_net, random_features  # noqa: F401
from .image import iter_image_set
from .retrieval import retrieval_ranks

def _neg_sq_dist(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return -(q.pow(2).sum(1, keepdim=True) - 2 * q @ c.T + c.pow(2).sum(1)[None])


def _cosine_centred(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    mu = c.mean(0, keepdim=True)
    return F.normalize(q - mu, dim=1) @ F.normalize(c - mu, dim=1).T


def _read(path, match: str, report: BadRowReport, max_images: int | None, **set_kw):
    keys, images = [], []
    for it in iter_image_set(path, None, report, limit=max_images, **set_kw):
        if match == "text":
            key = (it.text or "").strip() or None
        else:
            key = it.key
        if key is None:
            raise TuwenError(f"--retrieval: {it.where} has no {'prompt text' if match == 'text' else 'idx'} to "
                             f"match on ({'a TSV text column or name.txt' if match == 'text' else 'TSV idx column'}"
                             f"{'' if match == 'text' else ' or file name'}); try --match "
                             f"{'idx' if match == 'text' else 'text'}")
        keys.append(key)
        images.append(np.asarray(it.image.convert("RGB")))
    return keys, images


def _reference_key(k: str, known: set, by_name: dict) -> str:
    """The reference idx a generated image's key stands for: itself, its file-name form, or either without the
    ``_{k}`` suffix of predict's numbered outputs."""
    for cand in (k, re.sub(r"_\d+$", "", k)):
        if cand in known:
            return cand
        if cand in by_name:
            return by_name[cand]
    return k


def rank_summary(ranks: np.ndarray, n_correct: np.ndarray, n_candidates: int) -> dict:
    return {"R@1": float(np.mean(ranks <= 1)), "R@5": float(np.mean(ranks <= 5)),
            "mean_rank": float(ranks.mean()), "chance@1": float(np.mean(n_correct / n_candidates))}


def retrieval_eval(generated, reference, match: str = "idx", size: int = 32, max_images: int | None = None,
                   max_bad_listed: int = 20, **set_kw) -> dict:
    """Self-retrieval of ``generated`` images among ``reference`` images (folders or TSVs): see the module doc."""
    if match not in ("idx", "text"):
        raise TuwenError(f"--match {match!r}: use idx or text")
    rep_g, rep_r = BadRowReport(max_bad_listed), BadRowReport(max_bad_listed)
    rkeys, rimgs = _read(reference, match, rep_r, None, **set_kw)
    gkeys, gimgs = _read(generated, match, rep_g, max_images, **set_kw)
    known = set(rkeys)
    # predict --output_dir names images {sanitize_name(idx)}_{k}.png: such a stem also matches the reference idx
    # (an idx such as animals/birds/crow is written animals_birds_crow_<hash>)
    if match == "idx":
        by_name = {sanitize_name(k): k for k in known}
        gkeys = [_reference_key(k, known, by_name) for k in gkeys]
    matched = [i for i, k in enumerate(gkeys) if k in known]
    if not rimgs or not matched:
        bad = "".join(f"; {what}: {r.count} bad row(s), the first {r.listed[0]}"
                      for what, r in (("--generated", rep_g), ("--reference", rep_r)) if r.listed)
        raise TuwenError(f"--retrieval: no generated image has a reference with the same {match} "
                         f"({len(gimgs)} generated, {len(rimgs)} references){bad}; check --match and the files")
    qkeys = [gkeys[i] for i in matched]
    qimgs = [gimgs[i] for i in matched]
    counts: dict[str, int] = {}
    for k in rkeys:
        counts[k] = counts.get(k, 0) + 1
    n_correct = np.array([counts[k] for k in qkeys], dtype=np.float64)
    out = {"match": match, "n_queries": len(qkeys), "n_candidates": len(rkeys),
           "unmatched": len(gkeys) - len(matched), "bad_generated": rep_g.count, "bad_reference": rep_r.count,
           "generated": str(generated), "reference": str(reference)}
    ranks = retrieval_ranks(_neg_sq_dist(pixel_features(qimgs, size), pixel_features(rimgs, size)), qkeys, rkeys)
    out["pixel"] = {**rank_summary(ranks, n_correct, len(rkeys)), "space": f"RGB {size}×{size}, -L2²"}
    net = random_feature_net()
    ranks = retrieval_ranks(_cosine_centred(random_features(qimgs, net), random_features(rimgs, net)), qkeys, rkeys)
    out["random_features"] = {**rank_summary(ranks, n_correct, len(rkeys)),
                              "space": "fixed random CNN (seed 0), 2048-d, centred cosine"}
    return out


def format_retrieval(res: dict) -> str:
    lines = [f"self-retrieval ({res['match']}): {res['n_queries']} generated images among {res['n_candidates']} "
             f"references" + (f" ({res['unmatched']} without a reference left out)" if res["unmatched"] else "")]
    for space in ("pixel", "random_features"):
        r = res[space]
        lines.append(f"  {space:<15} R@1 {100 * r['R@1']:.1f} %  R@5 {100 * r['R@5']:.1f} %  mean rank "
                     f"{r['mean_rank']:.1f}  (chance@1 {100 * r['chance@1']:.2f} %; {r['space']})")
    return "\n".join(lines)
