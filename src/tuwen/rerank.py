"""Reranking / post-selection of generated images: score (prompt, image) pairs and keep the best.

Stable API (used by ``tuwen generate --rerank SPEC --keep K`` and text→image predict)::

    scorer = load_scorer("clip:runs/clip")             # or "caption:runs/captioner"
    scores = scorer.score(["一只猫"] * 8, images)       # list[float], one per image, batched inside
    kept, scores = rerank(scorer, "一只猫", images, keep=2)   # kept: indices best-first; scores: all, input order

Scorers (higher = better):

* ``clip:DIR`` — a tuwen CLIP folder: cosine similarity of the L2-normalised image and text embeddings
  (``ClipScorer(logit_scaled=True)`` multiplies by the model's ``logit_scale.exp()`` instead). This is the
  DALLE-pytorch / BriVL-style reranking.
* ``caption:DIR`` — a tuwen captioner folder, CogView's post-selection ("caption score"): the **sum of
  log p(text tokens | image)** under the captioner, computed by ``tuwen.models.captioner.Captioner.log_likelihood``
  (``(images, texts) -> Tensor [N]``). Higher (closer to 0) is better.

A bare folder (no ``clip:``/``caption:``) is recognised from its ``config.json`` ``model_type``. Images are PIL
images (any size/mode; each scorer resizes as its model expects). Scores are deterministic for a given model and
device, and do not depend on the batch size beyond float rounding.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

import torch
from tqdm import tqdm

from .data.images import ImageDecodeError, open_image
from .data.tables import BadRow, BadRowReport
from .errors import TuwenError, read_text_lines
from .hub import read_model_type, resolve_model_path
from .models.clip import CLIP
from .runtime import inference_autocast, resolve_device


class Scorer(Protocol):
    """Anything with ``score(texts, images) -> list[float]`` (``len(texts)`` is 1 or ``len(images)``)."""

    name: str

    def score(self, texts: list[str], images: list) -> list[float]: ...


def _pair_texts(texts: Sequence[str] | str, n: int) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if len(texts) == 1 and n != 1:
        texts = texts * n
    if len(texts) != n:
        raise TuwenError(f"score: {len(texts)} texts for {n} images (give one text, or one per image)")
    return texts


class _BatchScorer:
    """``score(texts, images)``: one text for all images, or one per image; empty input → []. Subclasses score
    the paired lists in ``_score``."""

    @torch.inference_mode()
    def score(self, texts: Sequence[str] | str, images: Sequence) -> list[float]:
        images = list(images)
        if not images:
            return []
        return self._score(_pair_texts(texts, len(images)), images)

    def _score(self, texts: list[str], images: list) -> list[float]:
        raise NotImplementedError


class ClipScorer(_BatchScorer):
    """Cosine similarity (or logit-scaled) of image and text under a tuwen CLIP; texts are encoded once each."""

    def __init__(self, model, batch_size: int = 32, logit_scaled: bool = False, name: str = "clip"):
        self.model = model.eval()
        self.batch_size = batch_size
        self.logit_scaled = logit_scaled
        self.name = name

    def _score(self, texts: list[str], images: list) -> list[float]:
        uniq = list(dict.fromkeys(texts))
        dev = self.model.device
        with inference_autocast(dev):
            te = self.model.encode_text(uniq, batch_size=self.batch_size).float()
            ie = torch.cat([self.model.encode_image(images[i:i + self.batch_size]).float()
                            for i in range(0, len(images), self.batch_size)])
        pos = torch.tensor([uniq.index(t) for t in texts], device=te.device) if len(uniq) > 1 else \
            torch.zeros(len(texts), dtype=torch.long, device=te.device)
        cos = (ie * te[pos]).sum(-1)
        if self.logit_scaled:
            cos = cos * self.model.logit_scale.float().exp()
        return [float(x) for x in cos.cpu()]


class CaptionScorer(_BatchScorer):
    """CogView's caption score: sum of log p(text tokens | image) from ``Captioner.log_likelihood``."""

    def __init__(self, captioner, batch_size: int = 16, name: str = "caption"):
        self.captioner = captioner
        self.batch_size = batch_size
        self.name = name

    def _score(self, texts: list[str], images: list) -> list[float]:
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            ll = self.captioner.log_likelihood(images[i:i + self.batch_size], texts[i:i + self.batch_size])
            ll = torch.as_tensor(ll).detach().float().reshape(-1).cpu()
            if ll.numel() != len(images[i:i + self.batch_size]):
                raise RuntimeError(f"Captioner.log_likelihood returned {ll.numel()} values for "
                                   f"{len(images[i:i + self.batch_size])} images")
            out += [float(x) for x in ll]
        return out


def load_scorer(spec: str, device: str | torch.device | None = None, batch_size: int = 32,
                flag: str = "--rerank") -> Scorer:
    """``clip:DIR`` | ``caption:DIR`` (| a bare model folder) → a scorer on ``device`` (default: CUDA if present)."""
    if not spec or not str(spec).strip():
        raise TuwenError(f"{flag}: empty scorer; use clip:DIR or caption:DIR")
    spec = str(spec).strip()
    kind, _, path = spec.partition(":")
    if kind.lower() not in ("clip", "caption") or not path:   # a bare folder: look at its model_type
        if path and not Path(spec).expanduser().exists():
            import difflib
            near = difflib.get_close_matches(kind.lower(), ["clip", "caption"], n=1)
            raise TuwenError(f"{flag} {spec}: unknown scorer {kind!r}"
                             + (f" (did you mean {near[0]}:{path}?)" if near else "")
                             + "; use clip:DIR (a CLIP model) or caption:DIR (a captioning model)")
        kind, path = "", spec
    p = resolve_model_path(path, what=f"{flag} model")
    if not kind:
        mt = read_model_type(p)
        if mt is None:
            raise TuwenError(f"{flag} {spec}: say which scorer: clip:{spec} or caption:{spec}")
        kind = "clip" if mt == "clip" else "caption"
    dev = resolve_device(device)
    if kind.lower() == "clip":
        mt = read_model_type(p)
        if mt not in (None, "clip"):
            raise TuwenError(f"{flag} clip:{path}: that folder holds a {mt!r} model, not a CLIP (model_type 'clip')")
        model = CLIP.from_pretrained(p, device=dev)
        if model.tokenizer is None:
            raise TuwenError(f"{flag} clip:{path}: the CLIP folder has no vocab.txt")
        return ClipScorer(model, batch_size, name=f"clip:{path}")
    try:
        from .models.captioner import Captioner
    except ImportError as e:
        raise TuwenError(f"{flag} caption:{path}: the captioner is not available in this build ({e})") from None
    cap = Captioner.from_pretrained(p, device=dev)
    if hasattr(cap, "eval"):
        cap.eval()
    return CaptionScorer(cap, batch_size=max(1, batch_size // 2), name=f"caption:{path}")


class RerankResult(NamedTuple):
    """``indices``: the kept candidates, best first; ``scores``: every candidate's score, in input order."""

    indices: list[int]
    scores: list[float]


def order_by_score(scores: Sequence[float]) -> list[int]:
    """Indices best-first: descending score, ties by lower index, NaN last (deterministic)."""
    def key(i: int):
        s = scores[i]
        bad = s is None or (isinstance(s, float) and math.isnan(s))
        return (1 if bad else 0, 0.0 if bad else -float(s), i)
    return sorted(range(len(scores)), key=key)


def rerank(scorer: Scorer, prompt: str, images: Sequence, keep: int | None = None) -> RerankResult:
    """Score every image against ``prompt`` (one batched ``scorer.score`` call) and keep the ``keep`` best
    (all when None). Returns ``(kept indices best-first, scores of all images in input order)``."""
    images = list(images)
    if keep is not None and keep < 1:
        raise TuwenError(f"--keep must be ≥ 1, got {keep}")
    if not images:
        return RerankResult([], [])
    scores = [float(s) for s in scorer.score([prompt] * len(images), images)]
    if len(scores) != len(images):
        raise RuntimeError(f"scorer {getattr(scorer, 'name', scorer)!r} returned {len(scores)} scores for "
                           f"{len(images)} images")
    order = order_by_score(scores)
    return RerankResult(order[: keep or len(order)], scores)


# ----------------------------------------------------------------------------------------------- files

def parse_rerank_line(line: str) -> tuple[str, list[str]]:
    """CogView post-selection line ``text \\t img1 \\t img2 …`` → (text, paths). Raises ValueError."""
    parts = line.rstrip("\n").rstrip("\r").split("\t")
    text = parts[0].strip()
    paths = [p.strip() for p in parts[1:] if p.strip()]
    if not text:
        raise ValueError("empty text (expected: text<TAB>image1<TAB>image2 …)")
    if not paths:
        raise ValueError("no image paths after the text (expected: text<TAB>image1<TAB>image2 …)")
    return text, paths


def rerank_file(scorer: Scorer, input_path: str | Path, output=None, batch_size: int = 32, report=None,
                precision: int = 6, progress: bool | None = None) -> dict[str, Any]:
    """Score a CogView post-selection file; write ``text \\t s1 \\t s2 …`` per good input line (scores in the
    line's image order, ``nan`` for an image that cannot be read). Lines without text/images are skipped.
    Problems go to ``report`` as ``file:line: reason``. Returns counts."""
    report = report if report is not None else BadRowReport()
    inp = Path(input_path).expanduser()
    raw_lines = read_text_lines(inp, f"--input {inp}")
    base = inp.parent
    jobs: list[tuple[int, str, list[Path]]] = []
    for n, line in enumerate(raw_lines, 1):
        if not line.strip():
            continue
        try:
            text, paths = parse_rerank_line(line)
        except ValueError as e:
            report.add(BadRow(str(inp), n, str(e)))
            continue
        jobs.append((n, text, [(Path(p).expanduser() if Path(p).expanduser().is_absolute() else base / p)
                               for p in paths]))
    if not jobs:
        raise TuwenError(f"--input {inp}: no usable lines (expected: text<TAB>image1<TAB>image2 …)"
                         + (f"; {report.summary()}" if report.count else ""))
    missing = [(n, p) for n, _, paths in jobs for p in paths if not p.is_file()]
    if missing:  # checked before any scoring: a wrong path is the user's to fix, not a nan to find later
        shown = "; ".join(f"{inp}:{n}: {p}" for n, p in missing[:5])
        raise TuwenError(f"--input {inp}: {len(missing)} image path(s) do not exist ({shown}"
                         f"{' …' if len(missing) > 5 else ''}); relative paths are resolved against {base}")
    fmt = f"{{:.{precision}g}}"
    written = images_scored = 0
    bar = tqdm(total=sum(len(j[2]) for j in jobs), desc="rerank", unit="img", disable=(progress is False) or None,
               file=sys.stderr)
    # group lines so that each scorer call sees about batch_size·4 images (bounded memory, batched scoring)
    group: list[tuple[int, str, list[Path]]] = []
    budget = max(batch_size * 4, 1)

    def flush(group):
        nonlocal written, images_scored
        texts, images, slots = [], [], []
        results = {n: [math.nan] * len(paths) for n, _, paths in group}
        for n, text, paths in group:
            for k, p in enumerate(paths):
                try:
                    images.append(open_image(p))
                except ImageDecodeError as e:
                    report.add(BadRow(str(inp), n, f"image {k + 1} ({p}): {e}"))
                    continue
                texts.append(text)
                slots.append((n, k))
        if images:
            scores = scorer.score(texts, images)
            for (n, k), s in zip(slots, scores):
                results[n][k] = float(s)
            images_scored += len(images)
        for n, text, paths in group:
            output.write("\t".join([text.replace("\t", " ")] + [fmt.format(s) for s in results[n]]) + "\n")
            written += 1
        bar.update(sum(len(p) for _, _, p in group))

    for job in jobs:
        group.append(job)
        if sum(len(j[2]) for j in group) >= budget:
            flush(group)
            group = []
    if group:
        flush(group)
    bar.close()
    return {"lines": written, "images": images_scored, "bad": report.count}
