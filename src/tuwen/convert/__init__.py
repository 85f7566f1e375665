"""Converters from foreign checkpoint layouts (read only; tuwen never writes them).

They return configs, state dicts and base models (``tuwen.models.{vqgan,vit,text_encoder,gpt}``); the composite
models build themselves from these (e.g. ``tuwen.models.clip.load_chinese_clip``).

* ``vqgan_from_taming(path, config)``: taming-transformers ``.ckpt`` / EasyNLP ``vqgan_f16_16384.bin`` → VQGAN
* ``load_openai_vit(path)``: OpenAI CLIP / Chinese-CLIP / HF CLIP weights → the ViT image tower
* ``bert_state_dict(path)`` / ``chinese_clip_state_dict(path, tokenizer)``: HF BERT text towers, whole
  Chinese-CLIP checkpoints → tuwen state dicts + configs (``tuwen.convert.clip``)
* EasyNLP ARTIST / mingpt_i2t checkpoint dirs: ``tuwen.convert.easynlp_t2i`` / ``tuwen.convert.easynlp_i2t``
"""
from __future__ import annotations

import importlib

_LAZY = {
    "vqgan_from_taming": ("tuwen.convert.taming", "vqgan_from_taming"),
    "load_openai_vit": ("tuwen.convert.clip", "load_openai_vit"),
    "bert_state_dict": ("tuwen.convert.clip", "bert_state_dict"),
    "chinese_clip_state_dict": ("tuwen.convert.clip", "chinese_clip_state_dict"),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(name)
