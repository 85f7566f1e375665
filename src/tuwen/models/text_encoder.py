"""BERT-style text tower (post-LN transformer encoder over the WordPiece vocab, Chinese per character).

The parameter names are those of HF/Chinese-CLIP ``BertModel`` (without the pooler), so Chinese-CLIP's text tower
(``bert.*`` in its checkpoints) and HF BERT/RoBERTa-wwm-ext checkpoints (``chinese-roberta-wwm-ext``'s
``pytorch_model.bin``) load key for key when this module is the ``bert`` attribute of the model::

    embeddings.word_embeddings.weight          [vocab_size, hidden]
    embeddings.position_embeddings.weight      [max_position_embeddings, hidden]
    embeddings.token_type_embeddings.weight    [type_vocab_size, hidden]
    embeddings.LayerNorm.{weight,bias}
    encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}
    encoder.layer.{i}.attention.output.dense.{weight,bias}
    encoder.layer.{i}.attention.output.LayerNorm.{weight,bias}
    encoder.layer.{i}.intermediate.dense.{weight,bias}
    encoder.layer.{i}.output.dense.{weight,bias}
    encoder.layer.{i}.output.LayerNorm.{weight,bias}

Forward as in Chinese-CLIP's ``modeling_bert.py``: embeddings (word + position + token type 0) → LayerNorm →
dropout; per layer ``h = LN(h + Attn(h))``, ``h = LN(h + W2·gelu(W1·h))`` (post-LN, exact erf GELU, LayerNorm eps
1e-12). Padding (``pad_token_id``, 0 in BERT vocabs) is masked out of attention. ``pooled`` returns the [CLS]
(position 0) hidden state, which CLIP projects with ``text_projection`` (there is no tanh pooler, like cn_clip).

    enc = TextEncoder(TextEncoderConfig.preset("tiny", vocab_size=len(tokenizer)))
    h = enc(ids)          # [B, T, hidden]
    cls = enc.pooled(ids) # [B, hidden]
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import TuwenError

PRESETS: dict[str, dict[str, Any]] = {
    # Chinese-CLIP text towers (hfl Chinese RoBERTa-wwm-ext; vocab 21128 = Google Chinese BERT)
    "RoBERTa-wwm-ext-base-chinese": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072, max_position_embeddings=512, vocab_size=21128),
    "RoBERTa-wwm-ext-large-chinese": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                          intermediate_size=4096, max_position_embeddings=512, vocab_size=21128),
    "RBT3-chinese": dict(hidden_size=768, num_hidden_layers=3, num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=512, vocab_size=21128),
    # small towers for tests / the synthetic data set (dropout off: tiny data, few steps)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "base-64": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                    max_position_embeddings=128, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
}


@dataclasses.dataclass
class TextEncoderConfig(BaseConfig):
    """BERT hyper-parameters (names as in HF ``BertConfig`` / Chinese-CLIP's text model configs)."""

    model_type: ClassVar[str] = "bert_text"

    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"                  # gelu (erf) | gelu_new (tanh) | relu
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> "TextEncoderConfig":
        if name not in PRESETS:
            raise TuwenError(f"unknown text tower preset {name!r}; choose one of {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"text tower config: {msg}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            bad(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTS:
            bad(f"hidden_act {self.hidden_act!r}: use one of {', '.join(_ACTS)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            bad(f"pad_token_id {self.pad_token_id} outside the vocabulary (size {self.vocab_size})")


_ACTS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ----------------------------------------------------------------------------------------------- modules

class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))                      # [B, h, T, d]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for blk in self.layer:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x


class TextEncoder(nn.Module):
    """``BertModel`` without the pooler: token ids [B, T] → hidden states [B, T, hidden]."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:  # BERT's init
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``: 1/True for real tokens (default: ``input_ids != pad_token_id``)."""
        if input_ids.dim() != 2:
            raise TuwenError(f"TextEncoder: expected token ids [B, T], got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise TuwenError(f"TextEncoder: {T} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}; lower context_length")
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        keep = attention_mask.bool()
        mask = None if bool(keep.all()) else keep[:, None, None, :]     # [B, 1, 1, T] True = attend
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, mask)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The [CLS] (first position) hidden state [B, hidden]."""
        return self(input_ids, attention_mask)[:, 0]
