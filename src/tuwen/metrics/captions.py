"""Caption metrics as the COCO caption evaluation (``coco-caption`` / ``pycocoevalcap``) computes them.

* :func:`bleu` — corpus BLEU-1…4 of coco-caption's ``BleuScorer`` (option ``"closest"``): clipped n-gram counts
  against the maximum count over an image's references, summed over the corpus; brevity penalty with, per
  hypothesis, the reference length closest to its length (ties → the shorter); the same ``1e-15``/``1e-9``
  guards, so a corpus without any 4-gram match scores ≈0 instead of raising.
* :func:`cider_d` — CIDEr-D (Vedantam et al. 2015) as coco-caption's ``CiderScorer``: TF-IDF n-gram vectors
  (n = 1…4) with document frequencies over the *references of the evaluated set*, ``idf = log(N_images) −
  log(max(1, df))``, clipped cosine ``Σ min(h, r)·r / (‖h‖‖r‖)``, Gaussian length penalty
  ``exp(−Δlen²/(2·6²))``, mean over n, mean over references, ×10; corpus score = mean over images.
* :func:`rouge_l` — coco-caption's ROUGE-L: LCS-based F-measure with β = 1.2 using the best precision and the
  best recall over the references; corpus score = mean over images.
* :func:`meteor` — METEOR 1.5 through ``pycocoevalcap`` when it is installed and ``java`` is on the PATH
  (``None`` otherwise; no other metric needs Java).

These are re-implementations of the published formulas (no code copied); ``tests/test_caption_metrics.py`` checks
them against values computed with ``pycocoevalcap`` 1.2 (and BLEU against ``sacrebleu`` when installed).

Tokenisation (:func:`tokenize`): Chinese/Japanese/Korean characters are one token each, Latin text is lower-cased and
split into words (letters, digits, apostrophes), punctuation is dropped (as coco-caption's PTB tokenizer drops
``. , ! ? : ; - …``). Scores are fractions as coco-caption prints them (BLEU-4 0.31, CIDEr-D 0.95); papers
usually multiply by 100.

References: every image has one or more reference captions. :func:`split_references` reads a field that holds
several (a JSON list ``["…", "…"]`` or ``a || b``); :func:`caption_metrics` takes, per image, one prediction and
its list of references.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from typing import Sequence

# CJK ideographs (incl. extension A and compatibility), kana, hangul: one token per character
_CJK_CHARS = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK_CHARS}]|[a-z0-9]+(?:'[a-z0-9]+)*")

Ngrams = Counter  # Counter[tuple[str, ...]]


def tokenize(text: str) -> list[str]:
    """'左上角有一个红色的圆形，A red Circle.' → ['左', '上', '角', …, '形', 'a', 'red', 'circle'].

    Full-width letters/digits are folded to ASCII (NFKC) first; everything that is neither a CJK character nor a
    Latin/digit word (punctuation, symbols, spaces) is dropped.
    """
    import unicodedata

    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def split_references(field) -> list[str]:
    """One reference field → list of references: a JSON list (``["a", "b"]``), ``a || b``, or a single caption."""
    if isinstance(field, (list, tuple)):
        return [str(x).strip() for x in field if str(x).strip()]
    s = str(field).strip()
    if s.startswith("["):
        try:
            v = json.loads(s)
        except json.JSONDecodeError:
            v = None
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return [x.strip() for x in v if x.strip()]
    if "||" in s:
        return [x.strip() for x in s.split("||") if x.strip()]
    return [s] if s else []


def _ngrams(tokens: Sequence[str], n: int) -> Ngrams:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            c[tuple(tokens[i:i + k])] += 1
    return c


def _check(predictions: Sequence, references: Sequence[Sequence]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    for i, r in enumerate(references):
        if not r:
            raise ValueError(f"item {i} has no reference caption")


def _tok(x, pre_tokenized: bool) -> list[str]:
    if pre_tokenized:
        return list(x) if not isinstance(x, str) else x.split()
    return tokenize(x)


# ----------------------------------------------------------------------------------------------- BLEU

def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
         pre_tokenized: bool = False) -> dict[str, float]:
    """Corpus BLEU-1…n (coco-caption, ``closest`` reference length) → ``{"bleu_1": …, …, "bleu_n": …}``.

    ``pre_tokenized=True``: captions are token lists or space-separated token strings (no :func:`tokenize`).
    """
    _check(predictions, references)
    small, tiny = 1e-9, 1e-15
    guess, correct = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        h = _tok(pred, pre_tokenized)
        rs = [_tok(r, pre_tokenized) for r in refs]
        max_counts: Counter = Counter()
        for r in rs:
            for g, c in _ngrams(r, n).items():
                if c > max_counts[g]:
                    max_counts[g] = c
        for g, c in _ngrams(h, n).items():
            correct[len(g) - 1] += min(c, max_counts.get(g, 0))
        for k in range(n):
            guess[k] += max(0, len(h) - k)
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]  # closest; ties → shorter
    out, prod = {}, 1.0
    ratio = (hyp_len + tiny) / (ref_len + small)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        out[f"bleu_{k + 1}"] = prod ** (1.0 / (k + 1)) * bp
    return out


# ----------------------------------------------------------------------------------------------- CIDEr-D

def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0,
            pre_tokenized: bool = False, return_per_item: bool = False):
    """CIDEr-D of the corpus (coco-caption's ``Cider``); with ``return_per_item`` also the per-image scores."""
    _check(predictions, references)
    hyps = [_ngrams(_tok(p, pre_tokenized), n) for p in predictions]
    refs = [[_ngrams(_tok(r, pre_tokenized), n) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        for g in {g for r in rs for g in r}:
            df[g] += 1
    log_n = math.log(float(len(refs)))

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df[g])))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:  # coco-caption counts the length as the number of bigrams (its "n == 1")
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for h, rs in zip(hyps, refs):
        vh, nh, lh = vec(h)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(rs) * 10.0)
    mean = sum(scores) / len(scores)
    return (mean, scores) if return_per_item else mean


# ----------------------------------------------------------------------------------------------- ROUGE-L

def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2,
            pre_tokenized: bool = False, return_per_item: bool = False):
    """ROUGE-L (coco-caption's ``Rouge``): mean over images of F_β(max precision, max recall), β = 1.2."""
    _check(predictions, references)
    scores = []
    for pred, refs in zip(predictions, references):
        h = _tok(pred, pre_tokenized)
        prec, rec = [], []
        for r in refs:
            t = _tok(r, pre_tokenized)
            lcs = _lcs(t, h)
            prec.append(lcs / len(h) if h else 0.0)
            rec.append(lcs / len(t) if t else 0.0)
        p, r = max(prec), max(rec)
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    mean = sum(scores) / len(scores)
    return (mean, scores) if return_per_item else mean


# ----------------------------------------------------------------------------------------------- METEOR

def meteor_available() -> bool:
    """METEOR needs ``pycocoevalcap`` (its ``meteor-1.5.jar``) and a ``java`` executable."""
    if shutil.which("java") is None:
        return False
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except Exception:
        return False
    return True


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """METEOR 1.5 via pycocoevalcap + Java on the tokenised captions; ``None`` where that is not available."""
    _check(predictions, references)
    if not meteor_available():
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {i: [" ".join(tokenize(r)) or "_" for r in rs] for i, rs in enumerate(references)}
    res = {i: [" ".join(tokenize(p)) or "_"] for i, p in enumerate(predictions)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        close = getattr(scorer, "close", None)
        if close:
            close()
    return float(score)


# ----------------------------------------------------------------------------------------------- all

def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]], writable=None) -> float:
    """The share of predictions equal to one of their references, whitespace ignored (CJK decodes may be spaced).

    ``writable``: a function giving a reference as the model's tokenizer would write it (e.g. lower-cased by an
    uncased WordPiece vocabulary, unknown characters as ``[UNK]``): the references are compared in that form, so a
    caption the model cannot spell (capital letters under bert-base-chinese's vocabulary) does not count as a miss.
    """
    _check(predictions, references)
    squash = lambda t: "".join(str(t).split())  # noqa: E731
    norm = (lambda r: squash(writable(r))) if writable is not None else squash
    hits = sum(squash(p) in {norm(r) for r in rs} for p, rs in zip(predictions, references))
    return hits / len(predictions)


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str] | str],
                    with_meteor: bool | str = "auto") -> dict:
    """BLEU-1…4, CIDEr-D, ROUGE-L (and METEOR where possible) of one prediction per image against all its
    references. ``references[i]``: a list of captions or a field for :func:`split_references`.

    ``with_meteor``: "auto" (when Java + pycocoevalcap are present), True (error if not), False.
    """
    refs = [split_references(r) if isinstance(r, str) else [str(x) for x in r] for r in references]
    preds = [p if isinstance(p, str) else "" for p in predictions]
    out = dict(bleu(preds, refs))
    out["cider_d"] = cider_d(preds, refs)
    out["rouge_l"] = rouge_l(preds, refs)
    if with_meteor:
        m = meteor(preds, refs) if (with_meteor is True or meteor_available()) else None
        if m is None and with_meteor is True:
            raise RuntimeError("METEOR needs Java and pycocoevalcap (pip install pycocoevalcap)")
        if m is not None:
            out["meteor"] = m
    out["n_images"] = len(preds)
    out["n_references"] = sum(len(r) for r in refs)
    return out
