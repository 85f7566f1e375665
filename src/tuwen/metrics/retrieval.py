"""Retrieval metrics from a similarity matrix: R@K, mean and median rank (open_clip's ``get_clip_metrics`` keys).

``sim[i, j]`` is the score of candidate j for query i (higher is better). By default query i's only correct
candidate is j = i (paired image/text rows). With ``query_ids`` / ``candidate_ids`` every candidate whose id equals
the query's id is correct (e.g. identical captions of several images), and the rank is that of the best-scoring
correct candidate.

Ranks are 1-based and **ties count against the query**: rank = 1 + the number of wrong candidates scoring ≥ the best
correct one, so a constant similarity matrix gets R@1 = 0 rather than a lucky sort order.
``median_rank`` follows open_clip: ``floor(median(rank − 1)) + 1``.

CLIP evaluation helpers: ``embed_rows`` (a table's rows → image/text embeddings, bad rows reported),
``read_class_prompts`` + ``zero_shot_classifier`` (zero-shot classification weights from ``label<TAB>prompt…`` lines).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.images import load_pixels
from ..data.tables import BadRowError, BadRowReport, RowDataset, collate_skip_bad
from ..errors import TuwenError, read_text_lines
from ..models.clip import CLIP, trim_padding
from ..runtime import inference_autocast


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


# ----------------------------------------------------------------------------------------------- CLIP evaluation

@torch.inference_mode()
def embed_rows(model: CLIP, source, text_col: str | None, image_col: str | None, batch_size: int = 64,
               num_workers: int = 0, strict: bool = False, report=None, progress: bool | None = None):
    """Embed every good row of ``source``. Returns (indices of good rows, image embeddings [n, D] or None,
    text embeddings [n, D] or None, texts, report). Bad rows (undecodable image, empty text) are reported."""
    report = report or BadRowReport()
    size, ctx, tok = model.config.image_size, model.config.context_length, model.tokenizer
    resize = model.config.image_resize

    def transform(row: dict, i: int) -> dict:
        out: dict[str, Any] = {"index": i}
        if text_col:
            text = str(row[text_col]).strip()
            if not text:
                raise ValueError(f"empty text in column {text_col!r}")
            out["text"] = text
            out["input_ids"] = torch.tensor(tok.encode(text, max_length=ctx, add_special_tokens=True, pad=True))
        if image_col:
            out["pixels"] = load_pixels(row[image_col], size, resize)
        return out

    ds = RowDataset(source, transform)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_bad)
    idx, imgs, txts, texts = [], [], [], []
    dev = model.device
    for batch in tqdm(loader, desc="embedding", unit="batch", disable=(progress is False) or None, file=sys.stderr):
        for b in batch["bad_rows"]:
            if strict:
                raise BadRowError(f"{b} (--strict stops at the first bad row)")
            report.add(b)
        if not batch["size"]:
            continue
        idx += batch["index"].tolist()
        with inference_autocast(dev):
            if image_col:
                imgs.append(model.encode_image(batch["pixels"].to(dev)).cpu())
            if text_col:
                txts.append(model.encode_text(trim_padding(batch["input_ids"], tok.pad_id).to(dev)).cpu())
        texts += batch.get("text", [])
    cat = (lambda xs: torch.cat(xs).float() if xs else torch.zeros(0, model.config.embed_dim))
    return (np.asarray(idx, dtype=np.int64), cat(imgs) if image_col else None, cat(txts) if text_col else None,
            texts, report)


def read_class_prompts(path: str, template: str = "{}") -> list[tuple[str, list[str]]]:
    """``label[<TAB>prompt<TAB>prompt…]`` lines → [(label, prompts)]; a label alone uses ``template``."""
    lines = read_text_lines(path, f"class_prompts={path}")
    classes, seen = [], set()
    for n, line in enumerate(lines, 1):
        parts = [x.strip() for x in line.split("\t")]
        if not parts[0]:
            if any(parts):
                raise TuwenError(f"{path}:{n}: empty class label")
            continue
        if parts[0] in seen:
            raise TuwenError(f"{path}:{n}: class {parts[0]!r} appears twice")
        seen.add(parts[0])
        prompts = [x for x in parts[1:] if x] or [template.replace("{}", parts[0])]
        classes.append((parts[0], prompts))
    if len(classes) < 2:
        raise TuwenError(f"class_prompts={path}: need at least 2 classes, found {len(classes)}")
    return classes


@torch.inference_mode()
def zero_shot_classifier(model: CLIP, classes: list[tuple[str, list[str]]]) -> torch.Tensor:
    """One unit vector per class: mean of its normalised prompt embeddings, re-normalised (open_clip) [C, D]."""
    out = []
    for _, prompts in classes:
        e = model.encode_text(prompts)
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out).float().cpu()
