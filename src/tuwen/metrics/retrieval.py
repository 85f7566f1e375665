"""Retrieval metrics from a similarity matrix: R@K, mean and median rank (open_clip's ``get_clip_metrics`` keys).

``sim[i, j]`` is the score of candidate j for query i (higher is better). By default query i's only correct
candidate is j = i (paired image/text rows). With ``query_ids`` / ``candidate_ids`` every candidate whose id equals
the query's id is correct (e.g. identical captions of several images), and the rank is that of the best-scoring
correct candidate.

Ranks are 1-based and **ties count against the query**: rank = 1 + the number of wrong candidates scoring ≥ the best
correct one, so a constant similarity matrix gets R@1 = 0 rather than a lucky sort order.
``median_rank`` follows open_clip: ``floor(median(rank − 1)) + 1``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if torch.is_tensor(x):
        return x
    return torch.as_tensor(np.asarray(x))


def retrieval_ranks(sim, query_ids: Sequence | np.ndarray | None = None,
                    candidate_ids: Sequence | np.ndarray | None = None, chunk: int = 2048) -> np.ndarray:
    """1-based rank of the best correct candidate for every query (row of ``sim`` [Nq, Nc]).

    Without ids the matrix must be square and the correct candidate of query i is i. A query with no correct
    candidate gets rank ``Nc + 1`` (never retrieved).
    """
    s = _as_tensor(sim).float()
    if s.dim() != 2:
        raise ValueError(f"similarity must be a 2-D matrix, got shape {tuple(s.shape)}")
    nq, nc = s.shape
    if query_ids is None and candidate_ids is None:
        if nq != nc:
            raise ValueError(f"a {nq}×{nc} similarity matrix needs query_ids/candidate_ids (it is not square)")
        qid = torch.arange(nq)
        cid = torch.arange(nc)
    else:
        if query_ids is None or candidate_ids is None:
            raise ValueError("give both query_ids and candidate_ids, or neither")
        qi, ci = _ids_to_int(query_ids, candidate_ids)
        qid, cid = torch.from_numpy(qi), torch.from_numpy(ci)
        if len(qid) != nq or len(cid) != nc:
            raise ValueError(f"ids do not match the matrix: {len(qid)} query ids, {len(cid)} candidate ids, "
                             f"matrix {nq}×{nc}")
    ranks = torch.empty(nq, dtype=torch.long)
    for a in range(0, nq, chunk):
        blk = s[a:a + chunk]                                       # [q, Nc]
        pos = qid[a:a + chunk, None] == cid[None, :]               # [q, Nc] correct candidates
        has = pos.any(1)
        best = torch.where(pos, blk, torch.full_like(blk, -float("inf"))).amax(1)   # best correct score
        wrong_ge = ((blk >= best[:, None]) & ~pos).sum(1)
        r = 1 + wrong_ge
        ranks[a:a + chunk] = torch.where(has, r, torch.full_like(r, nc + 1))
    return ranks.numpy()


def _ids_to_int(q, c) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary hashable ids (strings, ints) of both sides onto one integer space."""
    table: dict = {}
    qi = np.array([table.setdefault(x, len(table)) for x in q], dtype=np.int64)
    ci = np.array([table.setdefault(x, len(table)) for x in c], dtype=np.int64)
    return qi, ci


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10), prefix: str = "") -> dict[str, float]:
    """{prefix}R@k (fraction of queries with rank ≤ k), {prefix}mean_rank, {prefix}median_rank."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no queries")
    out = {f"{prefix}R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}mean_rank"] = float(ranks.mean())
    out[f"{prefix}median_rank"] = float(np.floor(np.median(ranks - 1)) + 1)
    return out


def retrieval_metrics(sim, query_ids=None, candidate_ids=None, ks: Sequence[int] = (1, 5, 10),
                      prefix: str = "") -> dict[str, float]:
    """R@K / mean / median rank of the queries (rows) of ``sim``."""
    return rank_metrics(retrieval_ranks(sim, query_ids, candidate_ids), ks, prefix)


def image_text_retrieval(image_features, text_features, image_ids=None, text_ids=None,
                         ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Both directions from (L2-normalised) features [N, D] and [M, D]; keys as open_clip:
    ``image_to_text_R@1`` … ``text_to_image_median_rank``.

    ``image_ids[i]`` / ``text_ids[j]``: image i and text j match iff the ids are equal (default: i == j).
    """
    img = _as_tensor(image_features).float()
    txt = _as_tensor(text_features).float()
    sim = img @ txt.T                                              # [N, M]
    out = retrieval_metrics(sim, image_ids, text_ids, ks, "image_to_text_")
    out.update(retrieval_metrics(sim.T, text_ids, image_ids, ks, "text_to_image_"))
    return out
