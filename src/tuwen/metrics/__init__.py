"""Offline metrics: retrieval (R@K, ranks), images (Fréchet distance, KID, CLIP score), captions (elsewhere).

    from tuwen.metrics import retrieval_metrics, image_text_retrieval      # tuwen.metrics.retrieval
    from tuwen.metrics import frechet_distance, kid, evaluate_images       # tuwen.metrics.image

Submodules are imported lazily (``import tuwen.metrics`` does not import torch).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "retrieval_ranks": "retrieval", "rank_metrics": "retrieval", "retrieval_metrics": "retrieval",
    "image_text_retrieval": "retrieval", "embed_rows": "retrieval", "read_class_prompts": "retrieval",
    "zero_shot_classifier": "retrieval",
    "feature_statistics": "image", "frechet_distance": "image", "fd_from_features": "image", "kid": "image",
    "clip_score": "image", "load_feature_extractor": "image", "evaluate_images": "image",
    "iter_image_set": "image",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"tuwen.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tuwen.metrics' has no attribute {name!r}")


__all__ = sorted(_LAZY)
