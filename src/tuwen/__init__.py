"""tuwen (图文): text→image generation (VQGAN + GPT) and image/video→text captioning, EasyNLP-compatible.

Public API (imported lazily so that ``import tuwen`` stays cheap)::

    from tuwen import VQGAN, TextToImage, Captioner, CLIP, pipeline
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "VQGAN": ("tuwen.models.vqgan", "VQGAN"),
    "TextToImage": ("tuwen.models.text2image", "TextToImage"),
    "Captioner": ("tuwen.models.captioner", "Captioner"),
    "CLIP": ("tuwen.models.clip", "CLIP"),
    "pipeline": ("tuwen.pipelines", "pipeline"),
    "TuwenError": ("tuwen.errors", "TuwenError"),
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tuwen' has no attribute {name!r}")
