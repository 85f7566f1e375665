"""Converters from foreign checkpoint layouts (read only; tuwen never writes them).

* ``vqgan_from_taming(path, config)``: taming-transformers ``.ckpt`` / EasyNLP ``vqgan_f16_16384.bin`` → VQGAN
* EasyNLP ARTIST / mingpt_i2t checkpoint dirs and OpenAI/Chinese CLIP weights: see the task modules.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "vqgan_from_taming": ("tuwen.convert.taming", "vqgan_from_taming"),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(name)
