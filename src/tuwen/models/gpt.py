"""One GPT for text→image codes and for captioning: the minGPT of taming-transformers / EasyNLP ARTIST.

Architecture and parameter names are exactly those of the minGPT vendored in taming-transformers and copied
into EasyNLP (``modeling_artist.py``, ``modeling_mingpt_i2t.py``), so the ``transformer.*`` tensors of an
EasyNLP ``pytorch_model.bin`` load directly (after dropping the ``transformer.`` prefix and the legacy
``attn.mask`` buffers, see :meth:`GPT.drop_legacy_buffers`)::

    tok_emb.weight            [vocab_size, C]
    pos_emb                   [1, block_size, C]          (learned, nn.Parameter)
    prefix_proj.{weight,bias} [C, n_prefix_embd]          (only when n_prefix_embd > 0; not in EasyNLP files)
    blocks.{i}.ln1 / ln2      LayerNorm(C)
    blocks.{i}.attn.{key,query,value,proj}.{weight,bias}  Linear(C, C)
    blocks.{i}.mlp.0          Linear(C, 4C)    mlp.1 = exact nn.GELU()
    blocks.{i}.mlp.2          Linear(4C, C)    mlp.3 = Dropout
    ln_f                      LayerNorm(C)
    head.weight               [n_out, C]       (no bias; text→image: n_out = number of image codes)

Blocks are pre-LN: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``; attention is causal over the whole sequence
(continuous prefix embeddings, then tokens), computed with ``F.scaled_dot_product_attention``.

Incremental decoding uses a preallocated :class:`KVCache`. ``forward(..., cache=cache, start_pos=p)``
writes the new keys/values at positions ``p …`` and attends over every cached position:

* ``start_pos`` an ``int`` (CPU, eager): the cache is sliced to the filled length ``[:p+T]`` (dynamic shapes,
  cheapest on CPU);
* ``start_pos`` a LongTensor ``[1]`` on the model's device (static path): fixed shapes, ``index_copy_`` write,
  attention over the whole ``max_len`` with a mask of valid positions, no host sync. This is the step that
  ``tuwen.sampling`` captures in a CUDA graph;
* ``start_pos`` a LongTensor ``[B, T]``: every token's position given explicitly (speculative decoding), same
  masking (a query sees the keys at positions ≤ its own);
* ``start_pos`` a LongTensor ``[B]`` (B > 1): **per-row positions** (continuous batching, ``tuwen.serve``): row
  ``b`` writes at ``start_pos[b] …`` and attends over its own positions ``0 … start_pos[b] + t`` only; same
  fixed shapes and masking as the static path, so rows at different points of their sequences share a step.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import TuwenError
from ..hub import PretrainedModel
from .offload import is_offloaded

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS"]

# name -> (n_layer, n_head, n_embd). base/large are the EasyNLP ARTIST / pai-painter sizes.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 64),
    "small": (4, 4, 128),
    "medium": (6, 6, 384),
    "base": (12, 12, 768),
    "large": (24, 16, 1024),
}


@dataclasses.dataclass
class GPTConfig(BaseConfig):
    """Sizes of the GPT. ``vocab_size`` = rows of the input embedding, ``n_out`` = rows of the output head.

    EasyNLP text→image (ARTIST base): vocab_size 37512 (16384 image codes + 21128 text ids), block_size 288
    (32 text + 256 image positions), n_out 16384 (the head predicts image codes only).
    ``n_prefix_embd > 0`` adds ``prefix_proj`` (Linear n_prefix_embd → n_embd) for continuous prefix features
    (e.g. ViT patch features for captioning). With 0, prefix embeddings of width n_embd are still accepted and
    used as they are (EasyNLP's mingpt_i2t, where CLIP's own projection already gives n_embd).
    """

    model_type: ClassVar[str] = "gpt"

    vocab_size: int
    block_size: int
    n_out: int
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_prefix_embd: int = 0
    # CogView options (all off by default = minGPT/EasyNLP):
    sandwich_ln: bool = False  # Sandwich-LN: x + LN(attn(LN(x))), x + LN(mlp(LN(x))) (ln3, ln4 in each block)
    pb_relax: bool = False     # PB-relax LayerNorm: LN(x / (max|x| / 8)) per position (scale-invariant, fp16-safe)
    gelu: str = "exact"        # "exact" (erf, taming) or "tanh" (OpenAI/Megatron approximation, CogView)
    tie_head: bool = False     # head.weight is tok_emb.weight (needs n_out == vocab_size; CogView)
    n_positions: int = 0       # rows of pos_emb when fewer than block_size (0 = block_size); see position_map()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_out", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TuwenError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise TuwenError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.n_prefix_embd, int) or self.n_prefix_embd < 0:
            raise TuwenError(f"GPTConfig.n_prefix_embd must be an integer >= 0, got {self.n_prefix_embd!r}")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            v = getattr(self, name)
            if not 0.0 <= float(v) < 1.0:
                raise TuwenError(f"GPTConfig.{name} must be in [0, 1), got {v!r}")
        if self.gelu not in ("exact", "tanh"):
            raise TuwenError(f"GPTConfig.gelu must be 'exact' or 'tanh', got {self.gelu!r}")
        if self.tie_head and self.n_out != self.vocab_size:
            raise TuwenError(f"GPTConfig.tie_head needs n_out == vocab_size, got {self.n_out} and {self.vocab_size}")
        if not isinstance(self.n_positions, int) or self.n_positions < 0:
            raise TuwenError(f"GPTConfig.n_positions must be an integer >= 0, got {self.n_positions!r}")

    @property
    def num_positions(self) -> int:
        """Rows of the position embedding."""
        return self.n_positions or self.block_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **fields) -> "GPTConfig":
        """``GPTConfig.preset("base", vocab_size=37512, block_size=288, n_out=16384)``; fields override."""
        if name not in PRESETS:
            raise TuwenError(f"unknown GPT preset {name!r}; known presets: {', '.join(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, **fields})


# --------------------------------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values of every layer: ``k``, ``v`` of shape [n_layer, B, n_head, max_len, head_dim].

    Zero-initialised, so that the masked (never written) slots of the static path hold finite values.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        """A cache sized for ``model`` (dtype/device of its weights unless ``dtype`` is given, e.g. under autocast)."""
        cfg = model.config
        max_len = cfg.block_size if max_len is None else max_len
        if not 0 < max_len <= cfg.block_size:
            raise TuwenError(f"KV cache length {max_len} must be in 1..block_size ({cfg.block_size})")
        w = model.tok_emb.weight
        return cls(cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head,
                   device=w.device, dtype=dtype or w.dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]  # each [B, n_head, max_len, head_dim]

    def reorder_(self, index: torch.Tensor, length: int | None = None) -> None:
        """Beam search: row r of the cache becomes old row ``index[r]`` (only the first ``length`` positions)."""
        n = self.max_len if length is None else length
        self.k[:, :, :, :n] = self.k[:, :, :, :n].index_select(1, index)
        self.v[:, :, :, :n] = self.v[:, :, :, :n].index_select(1, index)

    def narrow(self, batch_size: int, length: int) -> "KVCache":
        """A view of rows ``0 … batch_size-1`` and positions ``0 … length-1`` (writes go to this cache)."""
        new = KVCache.__new__(KVCache)
        new.k = self.k[:, :batch_size, :, :length]
        new.v = self.v[:, :batch_size, :, :length]
        return new

    def repeat_interleave(self, repeats: int) -> "KVCache":
        """A new cache with each row repeated ``repeats`` times (prefill once, then expand to beams/samples)."""
        new = KVCache.__new__(KVCache)
        new.k = self.k.repeat_interleave(repeats, dim=1)
        new.v = self.v.repeat_interleave(repeats, dim=1)
        return new


# --------------------------------------------------------------------------------------------------- modules

def _fused_low_precision(attn: nn.Module) -> nn.Module | None:
    """The one q/k/v layer of an attention's low-precision layers (models/quant.py ``cat``), kept on ``attn``
    between ``GPT.fused_qkv()`` contexts (making it copies the weights, and a w8a8 layer packs them for its
    kernel): it is made again when a weight is replaced or changed in place (its tensor or version differs)."""
    parts = (attn.query, attn.key, attn.value)
    cat = getattr(type(attn.query), "cat", None)
    if cat is None:
        return None
    # an inference tensor (made under inference_mode) has no version counter and cannot be changed in place outside
    # inference_mode; there only its identity is compared
    key = [(m.weight, None if m.weight.is_inference() else m.weight._version) for m in parts]
    kept = attn.__dict__.get("_fused_low_precision")  # not a registered submodule: no state-dict entries
    if kept is None or any(w is not w0 or v != v0 for (w, v), (w0, v0) in zip(key, kept[0])):
        kept = attn.__dict__["_fused_low_precision"] = (key, cat(list(parts)))
    return kept[1]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.key = nn.Linear(C, C)
        self.query = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.attn_pdrop = config.attn_pdrop
        self.resid_drop = nn.Dropout(config.resid_pdrop)
        # (weight [3C, C], bias [3C]) = cat(query, key, value); set only inside GPT.fused_qkv()
        self._fused_qkv: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        B, T, C = x.shape
        nh = self.n_head
        fused = self._fused_qkv  # read once: another thread may leave GPT.fused_qkv() meanwhile
        if fused is not None and not torch.is_grad_enabled():
            qkv = F.linear(x, *fused) if isinstance(fused, tuple) else fused(x)  # tuple, or a quant.py layer
            q, k, v = qkv.split(C, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(B, T, nh, C // nh).transpose(1, 2)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)
        dropout_p = self.attn_pdrop if self.training else 0.0

        if kv is None:  # training / full forward
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif isinstance(start_pos, int):  # dynamic cache: write, then attend over the filled prefix only
            k_cache, v_cache = kv  # [B, nh, max_len, hd]
            end = start_pos + T
            k_cache.narrow(2, start_pos, T).copy_(k)
            v_cache.narrow(2, start_pos, T).copy_(v)
            k, v = k_cache.narrow(2, 0, end), v_cache.narrow(2, 0, end)
            if T == 1:  # one query sees every cached position
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            elif start_pos == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:  # a chunk after cached positions: query t sees keys 0..start_pos+t
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        elif start_pos.numel() > 1:  # per-row positions [B]: row b writes at start_pos[b] … and sees only its own
            k_cache, v_cache = kv
            pos = start_pos if start_pos.dim() == 2 else start_pos.reshape(B, 1) + torch.arange(T, device=x.device)
            where = pos[:, None, :, None].expand(B, nh, T, C // nh)
            k_cache.scatter_(2, where, k.to(k_cache.dtype))
            v_cache.scatter_(2, where, v.to(v_cache.dtype))
            valid = torch.arange(k_cache.shape[2], device=x.device)[None, None, :] <= pos[:, :, None]  # [B, T, L]
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid[:, None], dropout_p=dropout_p)
        else:  # static cache (CUDA graph): fixed shapes, position as a device tensor
            k_cache, v_cache = kv
            pos = start_pos.reshape(-1)[:1] + torch.arange(T, device=x.device)  # [T]
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
            valid = torch.arange(k_cache.shape[2], device=x.device)[None, :] <= pos[:, None]  # [T, max_len]
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid, dropout_p=dropout_p)

        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class PBRelaxLayerNorm(nn.LayerNorm):
    """PB-relax LayerNorm (CogView): ``LayerNorm(x / (max|x| / 8))``, the max taken per position (CogView's code
    takes it over the whole tensor; LayerNorm is scale-invariant, so both equal LayerNorm(x) up to ``eps``). It
    keeps the fp16 variance computation from overflowing on large activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.detach().abs().amax(dim=-1, keepdim=True).div(8).clamp_min(1e-6)
        return super().forward(x / scale)


def _layer_norm(config: GPTConfig, C: int) -> nn.LayerNorm:
    return PBRelaxLayerNorm(C) if config.pb_relax else nn.LayerNorm(C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.ln1 = _layer_norm(config, C)
        self.ln2 = _layer_norm(config, C)
        if config.sandwich_ln:  # CogView's third_layernorm / fourth_layernorm
            self.ln3 = _layer_norm(config, C)
            self.ln4 = _layer_norm(config, C)
        self.attn = CausalSelfAttention(config)
        self.mlp = nn.Sequential(
            nn.Linear(C, 4 * C),
            nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none"),  # exact (erf) as taming/EasyNLP
            nn.Linear(4 * C, C),
            nn.Dropout(config.resid_pdrop),
        )
        self.sandwich = config.sandwich_ln

    def forward(self, x: torch.Tensor, kv=None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        if self.sandwich:
            x = x + self.ln3(self.attn(self.ln1(x), kv, start_pos))
            return x + self.ln4(self.mlp(self.ln2(x)))
        x = x + self.attn(self.ln1(x), kv, start_pos)
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(PretrainedModel):
    """minGPT with learned positions, an optional continuous prefix, and a separate output head (``n_out``)."""

    config_class: ClassVar[type[BaseConfig]] = GPTConfig
    #: key suffixes present in EasyNLP/taming files but not in this model (the causal-mask buffers)
    LEGACY_BUFFER_SUFFIXES: ClassVar[tuple[str, ...]] = ("attn.mask",)

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.num_positions, C))
        if config.n_prefix_embd > 0:
            self.prefix_proj = nn.Linear(config.n_prefix_embd, C)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = _layer_norm(config, C)
        self.head = nn.Linear(C, config.n_out, bias=False)
        self._fuse_depth = 0
        self._pos_map: torch.Tensor | None = None  # sequence position -> position id, see position_map()
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)
        if config.tie_head:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------- weights

    @classmethod
    def drop_legacy_buffers(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of ``state_dict`` without the ``attn.mask`` buffers of EasyNLP/taming files."""
        return {k: v for k, v in state_dict.items() if not k.endswith(cls.LEGACY_BUFFER_SUFFIXES)}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self.pos_emb.numel()
        return n

    def configure_param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups à la minGPT: decay the weights of Linear layers only (not biases, LayerNorm,
        embeddings, pos_emb)."""
        decay, no_decay = [], []
        for mn, m in self.named_modules():
            for pn, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                (decay if isinstance(m, nn.Linear) and pn == "weight" else no_decay).append(p)
        return [{"params": decay, "weight_decay": float(weight_decay)},
                {"params": no_decay, "weight_decay": 0.0}]

    @contextlib.contextmanager
    def fused_qkv(self, dtype: torch.dtype | None = None):
        """Inference only: inside this context each attention layer computes q, k, v with one matmul over a
        concatenated copy of its query/key/value weights (made on entry, dropped on exit; the parameters and
        state-dict names are unchanged). ``dtype``: make the copy in this dtype (e.g. the autocast dtype).
        Do not change the weights inside the context; gradient-enabled forwards ignore the copy."""
        if self._fuse_depth == 0:
            with torch.no_grad():
                for blk in self.blocks:
                    a = blk.attn
                    if is_offloaded(blk):  # its weights visit the device only while it runs (models/offload.py)
                        a._fused_qkv = None
                        continue
                    if not isinstance(a.query, nn.Linear):  # low-precision layers (models/quant.py) fuse themselves
                        a._fused_qkv = _fused_low_precision(a)
                        continue
                    w = torch.cat([a.query.weight, a.key.weight, a.value.weight])
                    b = torch.cat([a.query.bias, a.key.bias, a.value.bias])
                    a._fused_qkv = (w.to(dtype or w.dtype), b.to(dtype or b.dtype))
        self._fuse_depth += 1
        try:
            yield self
        finally:
            self._fuse_depth -= 1
            if self._fuse_depth == 0:
                for blk in self.blocks:
                    blk.attn._fused_qkv = None

    @contextlib.contextmanager
    def position_map(self, pos_ids: torch.Tensor | None):
        """Inside this context the token at sequence position ``t`` gets the position embedding ``pos_ids[t]``
        (LongTensor [L], the same for every row) instead of ``t``: CogView's rule that position ids restart
        after ``[ROI2]``. Works with the KV cache, the static/CUDA-graph path and per-row positions."""
        if pos_ids is not None:
            pos_ids = pos_ids.to(self.pos_emb.device, torch.long).reshape(-1)
            if pos_ids.numel() and (int(pos_ids.min()) < 0 or int(pos_ids.max()) >= self.pos_emb.shape[1]):
                raise TuwenError(f"position ids must be in 0..{self.pos_emb.shape[1] - 1}")
        old, self._pos_map = self._pos_map, pos_ids
        try:
            yield self
        finally:
            self._pos_map = old

    # ------------------------------------------------------------------------------------------- forward

    def embed_prefix(self, prefix_embeds: torch.Tensor) -> torch.Tensor:
        """[B, P, n_prefix_embd] (or [B, P, n_embd] when the config has no prefix_proj) → [B, P, n_embd]."""
        cfg = self.config
        d = prefix_embeds.shape[-1]
        if prefix_embeds.dim() != 3:
            raise TuwenError(f"prefix_embeds must be [batch, length, features], got shape {tuple(prefix_embeds.shape)}")
        if cfg.n_prefix_embd > 0:
            if d != cfg.n_prefix_embd:
                raise TuwenError(f"prefix_embeds have {d} features, the model expects n_prefix_embd={cfg.n_prefix_embd}")
            return self.prefix_proj(prefix_embeds.to(self.prefix_proj.weight.dtype))
        if d != cfg.n_embd:
            raise TuwenError(f"prefix_embeds have {d} features; this model has no prefix_proj (n_prefix_embd=0), "
                             f"so they must have n_embd={cfg.n_embd} features")
        return prefix_embeds.to(self.tok_emb.weight.dtype)

    def forward(self, idx: torch.Tensor | None = None, prefix_embeds: torch.Tensor | None = None, *,
                cache: KVCache | None = None, start_pos: int | torch.Tensor = 0, logits_start: int | None = 0,
                return_hidden: bool = False):
        """Logits ``[B, T_total - logits_start, n_out]`` for the sequence ``[prefix_embeds][idx]``.

        idx: LongTensor [B, T] (input ids, < vocab_size). prefix_embeds: [B, P, n_prefix_embd] placed before
        the tokens. T_total = P + T. With ``cache`` the sequence occupies positions ``start_pos …`` and attends
        over all cached positions before it. ``logits_start`` (python-style, -1 = last position only; None = no
        head) limits where the head is computed. ``return_hidden=True`` returns ``(logits, hidden)`` with the
        final (post-ln_f) hidden states of all T_total positions, [B, T_total, n_embd].
        """
        if prefix_embeds is not None and idx is not None:
            x = torch.cat([self.embed_prefix(prefix_embeds), self.tok_emb(idx)], dim=1)
        elif prefix_embeds is not None:
            x = self.embed_prefix(prefix_embeds)
        elif idx is not None:
            x = self.tok_emb(idx)
        else:
            raise TuwenError("GPT.forward needs idx and/or prefix_embeds")
        T = x.shape[1]  # x: [B, T_total, C]

        if isinstance(start_pos, int):
            if start_pos + T > self.config.block_size:
                raise TuwenError(f"sequence of {start_pos + T} positions is longer than block_size "
                                 f"({self.config.block_size})")
            if self._pos_map is None:
                pos = self.pos_emb[:, start_pos:start_pos + T]  # [1, T, C]
            else:
                pos = self.pos_emb[0, self._pos_map[start_pos:start_pos + T]]  # [T, C]
        elif start_pos.numel() > 1:  # per-row positions [B] (checked by the caller)
            # [B, T]; a 2-D start_pos gives every position explicitly (speculative decoding's scratch slots)
            t = start_pos if start_pos.dim() == 2 else start_pos.reshape(-1, 1) + torch.arange(T, device=x.device)
            pos = self.pos_emb[0, self._pos_map[t] if self._pos_map is not None else t]  # [B, T, C]
        else:  # static path: no host sync, positions checked by the caller
            t = start_pos.reshape(-1)[:1] + torch.arange(T, device=x.device)  # [T]
            pos = self.pos_emb[0, self._pos_map[t] if self._pos_map is not None else t]  # [T, C]
        x = self.drop(x + pos)

        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i) if cache is not None else None, start_pos)

        if return_hidden:
            x = self.ln_f(x)
            logits = None if logits_start is None else self.head(x[:, logits_start:])
            return logits, x
        if logits_start is None:
            return None
        return self.head(self.ln_f(x[:, logits_start:]))
