"""Text→image: GPT over ``[text_len text ids + img_vocab_size][img_len image codes]`` + a VQGAN (EasyNLP ARTIST).

* ``TextToImage``: the model (GPT + VQGAN + WordPiece tokenizer). ``from_pretrained`` reads a tuwen folder
  (``config.json`` model_type ``text2image`` + ``model.safetensors`` + ``vocab.txt`` + ``vqgan/``) or an EasyNLP /
  pai-painter folder (``config.json`` model_type ``artist`` + ``pytorch_model.bin`` + ``vocab.txt``) as it is.
* ``T2ITask``: training on the shared trainer, from EasyNLP TSVs (images encoded on the fly by the frozen VQGAN)
  or from pre-tokenized code shards (``tuwen vq tokenize`` output folders).
* ``run_easynlp``: ``tuwen --mode=train|predict|evaluate --app_name=text2image_generation ...``.

Token layout (EasyNLP): text ids are tokenizer ids + ``img_vocab_size`` padded with [PAD] to ``text_len`` (no
[CLS]/[SEP]); image codes are 0..img_vocab_size-1; the head predicts image codes only; logit i predicts code i.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig, Param, parse_user_defined_parameters, typed_kwargs
from ..errors import TuwenError
from ..hub import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, load_state_dict_checked, load_torch_file,
                   load_weights, resolve_model_path, save_weights)
from ..models.gpt import GPT, GPTConfig
from ..models.vqgan import VQGAN
from ..text.tokenizer import TextTokenizer
from ..training.trainer import Task

MODEL_TYPE = "text2image"
EASYNLP_MODEL_TYPES = ("artist",)


# =============================================================================================== config

@dataclasses.dataclass
class TextToImageConfig(BaseConfig):
    """Architecture + generation defaults of a text→image model (the VQGAN's own config lives in ``vqgan/``)."""

    model_type: ClassVar[str] = MODEL_TYPE

    text_len: int = 32               # text positions (EasyNLP text_len)
    img_len: int = 256               # image positions = VQGAN grid h*w (EasyNLP img_len)
    img_vocab_size: int = 16384      # VQGAN codebook size = GPT output classes
    text_vocab_size: int = 21128     # tokenizer vocabulary size
    image_size: int = 256            # pixels (EasyNLP size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    cfg_drop_prob: float = 0.0       # training: text replaced by the unconditional prompt with this probability
    # generation defaults (overridable per call)
    top_k: int | None = 100          # EasyNLP's fixed value
    top_p: float | None = None
    temperature: float = 1.0
    guidance_scale: float | None = None

    @property
    def block_size(self) -> int:
        return self.text_len + self.img_len

    @property
    def vocab_size(self) -> int:
        return self.img_vocab_size + self.text_vocab_size

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_out=self.img_vocab_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, embd_pdrop=self.embd_pdrop,
                         resid_pdrop=self.resid_pdrop, attn_pdrop=self.attn_pdrop)

    def validate(self) -> None:
        for k in ("text_len", "img_len", "img_vocab_size", "text_vocab_size", "image_size"):
            if getattr(self, k) < 1:
                raise TuwenError(f"text2image config: {k} must be ≥ 1")
        if not 0.0 <= self.cfg_drop_prob < 1.0:
            raise TuwenError("text2image config: cfg_drop_prob must be in [0, 1)")


def image_seed(seed: int, key: int | str, k: int) -> int:
    """The seed of image ``k`` of prompt ``key`` (an index or an ``idx`` string): independent of batching."""
    h = hashlib.blake2b(f"{int(seed)}|{key}|{int(k)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


# =============================================================================================== model

class TextToImage(nn.Module):
    """GPT + VQGAN + tokenizer. See the module docstring for the token layout."""

    def __init__(self, config: TextToImageConfig, vqgan: VQGAN, tokenizer: TextTokenizer, gpt: GPT | None = None):
        super().__init__()
        self.config = config
        self.gpt = gpt if gpt is not None else GPT(config.gpt_config())
        self.vqgan = vqgan.eval()
        for p in self.vqgan.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self._check()

    def _check(self) -> None:
        c = self.config
        h, w = self.grid
        if h * w != c.img_len:
            raise TuwenError(f"text2image: img_len={c.img_len} but the VQGAN turns {c.image_size}px images into a "
                             f"{h}×{w}={h * w} grid; set img_len={h * w} (or size to match the VQGAN)")
        if self.vqgan.config.n_embed != c.img_vocab_size:
            raise TuwenError(f"text2image: img_vocab_size={c.img_vocab_size} but the VQGAN codebook has "
                             f"{self.vqgan.config.n_embed} codes")
        if self.tokenizer.vocab_size > c.text_vocab_size:
            raise TuwenError(f"text2image: the tokenizer has {self.tokenizer.vocab_size} entries but text_vocab_size "
                             f"is {c.text_vocab_size}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.vqgan.grid_size(self.config.image_size)

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_emb.weight.device

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Prompts → LongTensor [B, text_len] of offset ids as fed to the GPT (EasyNLP layout)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer.encode_batch(list(texts), self.config.text_len, pad=True)
        return torch.tensor(ids, dtype=torch.long, device=self.device) + self.config.img_vocab_size

    def uncond_ids(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional prompt (all [PAD]) used for classifier-free guidance, [B, text_len]."""
        pad = self.tokenizer.pad_id + self.config.img_vocab_size
        return torch.full((batch_size, self.config.text_len), pad, dtype=torch.long, device=self.device)

    def decode_text(self, text_ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode((row - self.config.img_vocab_size).clamp_min(0).tolist())
                for row in text_ids.cpu()]

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, n, img_vocab] for ``image_codes`` [B, n] (n ≤ img_len); logit i predicts code i."""
        n = image_codes.shape[1]
        if n > self.config.img_len:
            raise TuwenError(f"image_codes has {n} positions; the model has img_len={self.config.img_len}")
        x = torch.cat([text_ids, image_codes[:, :-1]], dim=1) if n > 1 else text_ids
        return self.gpt(x, logits_start=self.config.text_len - 1)

    def loss(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        logits = self(text_ids, image_codes)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), image_codes.reshape(-1))

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_codes(self, text_ids: torch.Tensor, seeds: Sequence[int] | torch.Tensor, *, top_k: int | None = None,
                       top_p: float | None = None, temperature: float = 1.0, guidance_scale: float | None = None,
                       use_cuda_graph: bool | str = "auto") -> torch.Tensor:
        """One image's codes per row of ``text_ids`` [B, text_len] with its own seed → LongTensor [B, img_len]."""
        from .. import sampling

        amp = torch.bfloat16 if self.device.type == "cuda" and self.gpt.tok_emb.weight.dtype == torch.float32 else None
        uncond = self.uncond_ids(1) if guidance_scale is not None else None
        return sampling.generate(self.gpt, prefix_ids=text_ids.to(self.device), num_tokens=self.config.img_len,
                                 seeds=torch.as_tensor(list(seeds) if not torch.is_tensor(seeds) else seeds),
                                 top_k=top_k, top_p=top_p, temperature=temperature,
                                 guidance_scale=guidance_scale, uncond_prefix_ids=uncond,
                                 use_cuda_graph=use_cuda_graph, amp_dtype=amp)

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor) -> list:
        """Codes [B, img_len] → PIL images (one batched VQGAN decode)."""
        from ..data.images import to_pil

        h, w = self.grid
        return to_pil(self.vqgan.decode(codes.reshape(-1, h, w).to(self.device)))

    @torch.inference_mode()
    def generate(self, prompts: str | Sequence[str] | None = None, *, text_ids: torch.Tensor | None = None,
                 top_k: int | None | str = "default", top_p: float | None | str = "default",
                 temperature: float | None = None, guidance_scale: float | None | str = "default",
                 num_images_per_prompt: int = 1, seed: int | Sequence[int] = 0, keys: Sequence[Any] | None = None,
                 return_codes: bool = False, batch_size: int | None = None, progress: bool = False,
                 use_cuda_graph: bool | str = "auto"):
        """Sample images for prompts (or pre-tokenized ``text_ids``).

        Image k of prompt i uses the seed ``image_seed(seed, keys[i] if keys else i, k)`` (or ``seed[i]`` when a
        list is given, one per prompt), so an image does not depend on the batch size or its position in a batch.
        ``top_k=1`` is greedy. Returns a list (one per prompt) of lists of PIL images, or with ``return_codes``
        a LongTensor [num_prompts, num_images_per_prompt, img_len] of codes (no decoding).
        """
        c = self.config
        top_k = c.top_k if top_k == "default" else top_k
        top_p = c.top_p if top_p == "default" else top_p
        temperature = c.temperature if temperature is None else temperature
        guidance_scale = c.guidance_scale if guidance_scale == "default" else guidance_scale
        if text_ids is None:
            if prompts is None:
                raise TuwenError("generate: give prompts or text_ids")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            text_ids = self.tokenize(prompts)
        text_ids = text_ids.to(self.device)
        P, n = text_ids.shape[0], int(num_images_per_prompt)
        if n < 1:
            raise TuwenError(f"num_images_per_prompt must be ≥ 1, got {n}")
        if isinstance(seed, (list, tuple)) or torch.is_tensor(seed):
            seed = list(seed)
            if len(seed) != P:
                raise TuwenError(f"seed: {len(seed)} seeds given for {P} prompts")
            seeds = [image_seed(s, 0, k) for s in seed for k in range(n)]
        else:
            keys = list(keys) if keys is not None else list(range(P))
            seeds = [image_seed(seed, keys[i], k) for i in range(P) for k in range(n)]
        rows = text_ids.repeat_interleave(n, dim=0)  # [P*n, text_len]
        bs = batch_size or (64 if self.device.type == "cuda" else 16)
        codes, images = [], []
        from tqdm import tqdm
        for s in tqdm(range(0, rows.shape[0], bs), desc="generating", unit="batch",
                      disable=not progress, file=sys.stderr):
            cb = self.generate_codes(rows[s:s + bs], seeds[s:s + bs], top_k=top_k, top_p=top_p,
                                     temperature=temperature, guidance_scale=guidance_scale,
                                     use_cuda_graph=use_cuda_graph)
            if return_codes:
                codes.append(cb)
            else:
                images += self.decode_codes(cb)
        if return_codes:
            return torch.cat(codes).reshape(P, n, c.img_len)
        return [images[i * n:(i + 1) * n] for i in range(P)]

    # ------------------------------------------------------------------ I/O
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """tuwen layout: config.json, model.safetensors (GPT), vocab.txt + tokenizer_config.json, vqgan/."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_weights(self.gpt.state_dict(), path / WEIGHTS_NAME, {"model_type": MODEL_TYPE})
        self.tokenizer.save_pretrained(path)
        self.vqgan.save_pretrained(path / "vqgan")
        atomic_write_text(path / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        vqgan_config: Any = None, vqgan_path: str | None = None, img_len: int | None = None,
                        **overrides) -> "TextToImage":
        """Load a tuwen text→image folder or an EasyNLP ARTIST / pai-painter folder.

        EasyNLP folders do not describe their VQGAN: it is read from the ``first_stage_model.*`` weights with the
        architecture from ``vqgan_config`` (taming yaml/json) or inferred from the tensor shapes; ``vqgan_path``
        gives a separate VQGAN when the checkpoint has none. ``overrides``: config fields (e.g. generation
        defaults ``top_k=32``, or ``text_len``/``img_len``/``size`` for EasyNLP folders).
        """
        path = resolve_model_path(name_or_path, what="text2image model",
                                  expect="config.json + model.safetensors + vocab.txt + vqgan/ (tuwen), or "
                                         "config.json (model_type artist) + pytorch_model.bin + vocab.txt (EasyNLP)")
        if path.is_file():
            raise TuwenError(f"{path}: a text2image model is a folder (config.json + weights + vocab.txt)")
        try:
            raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TuwenError(f"{path}: not a model folder (no {CONFIG_NAME})") from None
        except json.JSONDecodeError as e:
            raise TuwenError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from None
        mt = raw.get("model_type")
        if "size" in overrides:
            overrides["image_size"] = overrides.pop("size")
        if mt in EASYNLP_MODEL_TYPES:
            model = _from_easynlp(path, raw, vqgan_config=vqgan_config, vqgan_path=vqgan_path, img_len=img_len,
                                  overrides=overrides)
        elif mt == MODEL_TYPE:
            if img_len is not None:
                overrides["img_len"] = img_len
            config = TextToImageConfig.from_dict(raw, source=str(path / CONFIG_NAME), **overrides)
            from ..convert.taming import load_vqgan
            vq = load_vqgan(vqgan_path or path / "vqgan", config=vqgan_config)
            tok = TextTokenizer.from_pretrained(path)
            model = cls(config, vq, tok)
            load_state_dict_checked(model.gpt, load_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
        else:
            raise TuwenError(f"{path / CONFIG_NAME}: model_type {mt!r} is not a text→image model "
                             f"(expected {MODEL_TYPE!r} or EasyNLP's 'artist')")
        model.eval()
        if device is not None:
            model.to(device)
        return model


def _from_easynlp(path: Path, raw: dict, vqgan_config, vqgan_path, img_len, overrides) -> TextToImage:
    """EasyNLP/pai-painter: config.json (model_type artist) + pytorch_model.bin + vocab.txt."""
    from ..convert.taming import extract_vqgan_state_dict, infer_vqgan_config, load_config, load_vqgan

    weights = path / "pytorch_model.bin"
    if not weights.exists():
        alt = sorted(path.glob("pytorch_model*.bin"))
        if not alt:
            raise TuwenError(f"{path}: EasyNLP folder without pytorch_model.bin")
        weights = alt[0]
    sd = load_torch_file(weights)
    if not isinstance(sd, dict):
        raise TuwenError(f"{weights}: expected a state dict")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    gpt_sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    if not gpt_sd:
        raise TuwenError(f"{weights}: no transformer.* weights; is this an EasyNLP text2image checkpoint?")
    gpt_sd = GPT.drop_legacy_buffers(gpt_sd)
    n_embd = gpt_sd["tok_emb.weight"].shape[1]
    vocab_rows = gpt_sd["tok_emb.weight"].shape[0]
    block = gpt_sd["pos_emb"].shape[1]
    n_layer = len({k.split(".")[1] for k in gpt_sd if k.startswith("blocks.")})
    img_vocab = gpt_sd["head.weight"].shape[0]
    n_head = int(overrides.pop("n_head", raw.get("n_head", 12)))
    # the VQGAN: first_stage_model.* inside the checkpoint, or a separate file
    vq_sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    image_size = int(overrides.get("image_size", 256))
    if vqgan_path:
        vq = load_vqgan(vqgan_path, config=vqgan_config)
    elif vq_sd:
        vq_sd = extract_vqgan_state_dict(vq_sd, str(weights))
        cfg = load_config(vqgan_config) if vqgan_config is not None else infer_vqgan_config(vq_sd, image_size, str(weights))
        vq = VQGAN(cfg)
        load_state_dict_checked(vq, {k: v.float() for k, v in vq_sd.items()}, f"{weights} (first_stage_model.*)")
    else:
        raise TuwenError(f"{weights}: no first_stage_model.* (VQGAN) weights; pass vqgan_path=... "
                         f"(e.g. vqgan_f16_16384.bin) and, if not f16_16384, vqgan_config=")
    h, w = vq.grid_size(image_size)
    il = int(img_len or overrides.pop("img_len", 0) or h * w)
    text_len = int(overrides.pop("text_len", block - il))
    if text_len + il != block:
        raise TuwenError(f"{path}: text_len ({text_len}) + img_len ({il}) = {text_len + il} but the checkpoint has "
                         f"{block} positions (block_size)")
    tok = TextTokenizer.from_pretrained(path)
    text_vocab = vocab_rows - img_vocab
    for k in ("text_vocab_size", "img_vocab_size"):
        if k in raw and int(raw[k]) != (text_vocab if k == "text_vocab_size" else img_vocab):
            raise TuwenError(f"{path / CONFIG_NAME}: {k}={raw[k]} does not match the weights "
                             f"(tok_emb has {vocab_rows} rows, head {img_vocab})")
    gen = {k: overrides.pop(k) for k in ("top_k", "top_p", "temperature", "guidance_scale") if k in overrides}
    config = TextToImageConfig(text_len=text_len, img_len=il, img_vocab_size=img_vocab, text_vocab_size=text_vocab,
                               image_size=image_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, **gen)
    overrides.pop("image_size", None)
    if overrides:
        raise TuwenError(f"unknown setting(s) for an EasyNLP text2image model: {', '.join(overrides)}")
    model = TextToImage(config, vq, tok)
    load_state_dict_checked(model.gpt, gpt_sd, f"{weights} (transformer.*)")
    return model


# =============================================================================================== user_defined_parameters

USER_PARAMS: dict[str, Param] = {
    "size": Param(int, None, "image size in pixels (EasyNLP default 256)"),
    "text_len": Param(int, None, "text positions (EasyNLP default 32)"),
    "img_len": Param(int, None, "image positions = VQGAN grid h*w (EasyNLP default 256)"),
    "img_vocab_size": Param(int, None, "VQGAN codebook size (EasyNLP default 16384)"),
    "text_vocab_size": Param(int, None, "tokenizer vocabulary size (taken from the vocabulary when known)"),
    "pretrain_model_name_or_path": Param(str, None, "model to finetune (folder or model-zoo name under TUWEN_HOME)"),
    "vqgan_ckpt_path": Param(str, None, "VQGAN for training from scratch: tuwen folder, taming .ckpt or .bin"),
    "vqgan_config": Param(str, None, "taming yaml/json describing vqgan_ckpt_path (default: inferred from shapes)"),
    "vocab_path": Param(str, None, "vocab.txt to use when training from scratch (default: built from the texts)"),
    "vocab_size": Param(int, 8000, "size of the vocabulary built from training texts when none is given"),
    "random_crop": Param(bool, False, "random instead of center crops"),
    "n_layer": Param(int, None, "GPT layers for training from scratch (default 12)"),
    "n_head": Param(int, None, "GPT heads (default 12)"),
    "n_embd": Param(int, None, "GPT width (default 768)"),
    "gpt_preset": Param(str, None, "GPT size preset: tiny, small, base, large"),
    "block_size": Param(int, None, "accepted for EasyNLP compatibility; must equal text_len + img_len"),
    "dropout": Param(float, None, "embedding/attention/residual dropout for training from scratch"),
    "cfg_drop_prob": Param(float, None, "classifier-free guidance training: probability of dropping the text"),
    "null_cond_prob": Param(float, None, "alias of cfg_drop_prob (DALLE-pytorch name)"),
    "pkeep": Param(float, 1.0, "probability of keeping each input image code (taming's corruption trick)"),
    "max_generated_num": Param(int, 1, "images per prompt (predict)"),
    "top_k": Param(int, None, "sampling: keep the k most likely codes (1 = greedy; default from the model)"),
    "top_p": Param(float, None, "sampling: nucleus probability mass"),
    "temperature": Param(float, None, "sampling temperature"),
    "guidance_scale": Param(float, None, "classifier-free guidance scale (model trained with cfg_drop_prob)"),
    "do_eval": Param(bool, True, "evaluate on the validation table while training"),
    "eval_num": Param(int, 64, "evaluate --metric attributes: prompts to generate for"),
    "seed": Param(int, None, "sampling seed (default: --random_seed)"),
}


def parse_udp(args) -> dict:
    return parse_user_defined_parameters(args.user_defined_parameters, USER_PARAMS, "text2image_generation")


# =============================================================================================== training

class T2ITrainModule(nn.Module):
    """What the trainer trains: the GPT (and, when the data are images, the frozen VQGAN that encodes them).

    The VQGAN is not part of this module's state dict (it is frozen and saved with the model folder)."""

    def __init__(self, gpt: GPT, vqgan: VQGAN | None, text_len: int, img_vocab_size: int, uncond_id: int,
                 cfg_drop_prob: float = 0.0, pkeep: float = 1.0):
        super().__init__()
        self.gpt = gpt
        self._vqgan = [vqgan]  # not registered: excluded from state_dict / optimizer
        self.text_len, self.img_vocab_size, self.uncond_id = text_len, img_vocab_size, uncond_id
        self.cfg_drop_prob, self.pkeep = cfg_drop_prob, pkeep

    @property
    def vqgan(self) -> VQGAN | None:
        return self._vqgan[0]

    def _apply(self, fn, *a, **kw):
        if self.vqgan is not None:
            self.vqgan._apply(fn, *a, **kw)
        return super()._apply(fn, *a, **kw)

    def codes(self, batch: dict) -> torch.Tensor:
        if "codes" in batch:
            return batch["codes"]
        with torch.no_grad():
            return self.vqgan.encode(batch["image"]).flatten(1).clone()  # [B, img_len] (clone: not an inference tensor)

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        text, z = batch["text_ids"], self.codes(batch)
        if self.training and self.cfg_drop_prob > 0:
            drop = torch.rand(text.shape[0], device=text.device) < self.cfg_drop_prob
            text = torch.where(drop[:, None], torch.full_like(text, self.uncond_id), text)
        inp = z
        if self.training and self.pkeep < 1.0:
            keep = torch.bernoulli(torch.full(z.shape, self.pkeep, device=z.device)).bool()
            inp = torch.where(keep, z, torch.randint_like(z, self.img_vocab_size))
        x = torch.cat([text, inp[:, :-1]], dim=1)
        logits = self.gpt(x, logits_start=self.text_len - 1)  # [B, img_len, img_vocab]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), z.reshape(-1))
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2)}


def _is_code_dir(p: str) -> bool:
    return Path(p).is_dir() and (Path(p) / "meta.json").exists()


class T2ITask(Task):
    name = "text2image"
    betas = (0.9, 0.95)  # minGPT

    def __init__(self, args, udp: dict, log=print):
        self.args, self.udp = args, udp
        tables = [t for t in (args.tables or "").split(",") if t.strip()]
        if not tables:
            raise TuwenError("--tables is required for training (train table, then the validation table)")
        self.train_tables, self.val_tables = (tables[:-1], tables[-1:]) if len(tables) > 1 else (tables, [])
        self.text_col = args.first_sequence or "text"
        self.image_col = args.second_sequence or "imgbase64"
        pre = udp["pretrain_model_name_or_path"]
        if pre:  # finetune: everything comes from the pretrained model
            self.base = TextToImage.from_pretrained(pre)
            cfg = self.base.config
            for k, ck in (("text_len", "text_len"), ("img_len", "img_len"), ("size", "image_size"),
                          ("img_vocab_size", "img_vocab_size")):
                if udp[k] is not None and udp[k] != getattr(cfg, ck):
                    raise TuwenError(f"--user_defined_parameters {k}={udp[k]} does not match the pretrained model "
                                     f"{pre} ({ck}={getattr(cfg, ck)})")
            changes = {}
            if udp["cfg_drop_prob"] is not None or udp["null_cond_prob"] is not None:
                changes["cfg_drop_prob"] = udp["cfg_drop_prob"] if udp["cfg_drop_prob"] is not None else udp["null_cond_prob"]
            self.config = cfg.replace(**changes) if changes else cfg
            self.vqgan, self.tokenizer = self.base.vqgan, self.base.tokenizer
        else:
            self.base = None
            if not udp["vqgan_ckpt_path"]:
                raise TuwenError("training from scratch needs an image tokenizer: add vqgan_ckpt_path=... to "
                                 "--user_defined_parameters (a tuwen VQGAN folder from `tuwen vq train`/`tuwen vq "
                                 "import`, a taming .ckpt, or EasyNLP's vqgan_f16_16384.bin); or finetune with "
                                 "pretrain_model_name_or_path=...")
            from ..convert.taming import load_vqgan
            self.vqgan = load_vqgan(udp["vqgan_ckpt_path"], config=udp["vqgan_config"])
            size = udp["size"] or self.vqgan.config.resolution
            h, w = self.vqgan.grid_size(size)
            img_len = udp["img_len"] or h * w
            if img_len != h * w:
                raise TuwenError(f"--user_defined_parameters img_len={img_len} but the VQGAN gives a {h}×{w} grid "
                                 f"for size={size} ({h * w} codes)")
            if udp["img_vocab_size"] and udp["img_vocab_size"] != self.vqgan.config.n_embed:
                raise TuwenError(f"img_vocab_size={udp['img_vocab_size']} but the VQGAN has "
                                 f"{self.vqgan.config.n_embed} codes")
            self.tokenizer = self._make_tokenizer(log)
            text_vocab = udp["text_vocab_size"] or self.tokenizer.vocab_size
            if text_vocab < self.tokenizer.vocab_size:
                raise TuwenError(f"text_vocab_size={text_vocab} is smaller than the vocabulary "
                                 f"({self.tokenizer.vocab_size})")
            preset = udp["gpt_preset"]
            if preset:
                from ..models.gpt import PRESETS
                if preset not in PRESETS:
                    raise TuwenError(f"gpt_preset={preset!r}: choose one of {', '.join(PRESETS)}")
                nl, nh, ne = PRESETS[preset]
            else:
                nl, nh, ne = 12, 12, 768
            drop = udp["dropout"] or 0.0
            cfg_drop = udp["cfg_drop_prob"] if udp["cfg_drop_prob"] is not None else (udp["null_cond_prob"] or 0.0)
            self.config = TextToImageConfig(
                text_len=udp["text_len"] or 32, img_len=img_len, img_vocab_size=self.vqgan.config.n_embed,
                text_vocab_size=text_vocab, image_size=size, n_layer=udp["n_layer"] or nl,
                n_head=udp["n_head"] or nh, n_embd=udp["n_embd"] or ne, embd_pdrop=drop, resid_pdrop=drop,
                attn_pdrop=drop, cfg_drop_prob=cfg_drop)
            self.config.validate()
        if udp["block_size"] and udp["block_size"] != self.config.block_size:
            raise TuwenError(f"block_size={udp['block_size']} but text_len + img_len = {self.config.block_size}")
        seq = getattr(args, "sequence_length", None)
        if seq and seq != self.config.block_size:
            raise TuwenError(f"--sequence_length={seq} but text_len ({self.config.text_len}) + img_len "
                             f"({self.config.img_len}) = {self.config.block_size}; fix one of them")

    # -------------------------------------------------------------- data
    def _texts(self, tables: list[str]):
        from ..data.tables import BadRow, open_source
        for t in tables:
            if _is_code_dir(t):
                from ..data.codes import CodeShards
                shards = CodeShards(t)
                for i in range(len(shards)):
                    yield shards[i]["text"]
                continue
            src = open_source([t], self.args.input_schema, self.args.skip_first_line, text_col=self.text_col,
                              image_col=self.image_col)
            for i in range(len(src)):
                r = src.row(i)
                if not isinstance(r, BadRow) and r.get(self.text_col):
                    yield r[self.text_col]

    def _make_tokenizer(self, log) -> TextTokenizer:
        if self.udp["vocab_path"]:
            return TextTokenizer.from_pretrained(self.udp["vocab_path"])
        tok = TextTokenizer.train(self._texts(self.train_tables), vocab_size=self.udp["vocab_size"])
        log(f"built a {tok.vocab_size}-entry WordPiece vocabulary from the training texts "
            f"(saved with the model as vocab.txt)")
        return tok

    def _dataset(self, tables: list[str], random_crop: bool):
        from ..data.images import load_image, to_tensor
        from ..data.tables import ConcatSource, RowDataset, open_source

        c, tok = self.config, self.tokenizer
        offset = c.img_vocab_size
        text_col, image_col = self.text_col, self.image_col
        seed = self.args.random_seed

        if all(_is_code_dir(t) for t in tables):
            from ..data.codes import CodeShards
            shards = [CodeShards(t) for t in tables]
            for t, s in zip(tables, shards):
                if s.seq_len != c.img_len or s.n_embed != c.img_vocab_size:
                    raise TuwenError(f"{t}: code shards hold {s.seq_len} codes per image from a {s.n_embed}-code "
                                     f"codebook; this model has img_len={c.img_len}, img_vocab_size={c.img_vocab_size}")
            return _CodesDataset(shards, tok, c.text_len, offset)
        if any(_is_code_dir(t) for t in tables):
            raise TuwenError("--tables: do not mix code-shard folders and TSV tables in one split")
        src = open_source(tables, self.args.input_schema, self.args.skip_first_line, text_col=text_col,
                          image_col=image_col)
        for col, flag in ((text_col, "--first_sequence"), (image_col, "--second_sequence")):
            if col not in src.columns:
                raise TuwenError(f"{flag}={col!r} is not a column of --input_schema ({', '.join(src.columns)})")

        def transform(row: dict, index: int, epoch: int) -> dict:
            text = row[text_col]
            if not text or not text.strip():
                raise ValueError(f"empty text in column {text_col!r}")
            ids = tok.encode(text, c.text_len, pad=True)
            rng = random.Random(f"{seed}-{epoch}-{index}") if random_crop else None
            img = load_image(row[image_col], c.image_size, random_crop=random_crop, rng=rng)
            return {"text_ids": torch.tensor(ids, dtype=torch.long) + offset, "image": to_tensor(img)}

        return RowDataset(src, transform)

    def train_dataset(self):
        return self._dataset(self.train_tables, self.udp["random_crop"])

    def val_dataset(self):
        return self._dataset(self.val_tables, False) if self.val_tables else None

    def build_module(self):
        c = self.config
        gpt = GPT(c.gpt_config())
        if self.base is not None:
            gpt.load_state_dict(self.base.gpt.state_dict())
        uncond = self.tokenizer.pad_id + c.img_vocab_size
        return T2ITrainModule(gpt, self.vqgan, c.text_len, c.img_vocab_size, uncond, c.cfg_drop_prob,
                              self.udp["pkeep"])

    def param_groups(self, module, weight_decay):
        return module.gpt.configure_param_groups(weight_decay)

    def save_model(self, module, out_dir):
        TextToImage(self.config, module.vqgan, self.tokenizer, gpt=module.gpt).save_pretrained(out_dir)

    def sample_images(self, module, batch):
        m = TextToImage(self.config, module.vqgan, self.tokenizer, gpt=module.gpt)
        imgs = m.generate(text_ids=batch["text_ids"][:4], num_images_per_prompt=2, seed=0)
        return [im for row in imgs for im in row]

    def describe(self):
        return {"task": self.name, "config": self.config.to_dict(), "tables": self.args.tables,
                "finetune_from": self.udp["pretrain_model_name_or_path"]}


class _CodesDataset:
    """Pre-tokenized codes (``tuwen vq tokenize`` folders) → {"text_ids", "codes"}."""

    def __init__(self, shards, tok: TextTokenizer, text_len: int, offset: int):
        import numpy as np
        self.shards, self.tok, self.text_len, self.offset = shards, tok, text_len, offset
        self._cum = np.cumsum([0] + [len(s) for s in shards])
        self.epoch = 0

    def __len__(self):
        return int(self._cum[-1])

    def __getitem__(self, i):
        import numpy as np
        k = int(np.searchsorted(self._cum, i, side="right") - 1)
        item = self.shards[k][i - int(self._cum[k])]
        ids = self.tok.encode(item["text"], self.text_len, pad=True)
        return {"text_ids": torch.tensor(ids, dtype=torch.long) + self.offset, "codes": item["codes"].long()}


# =============================================================================================== commands

def _generation_kwargs(model: TextToImage, udp: dict) -> dict:
    kw = {}
    for k in ("top_k", "top_p", "temperature", "guidance_scale"):
        if udp.get(k) is not None:
            kw[k] = udp[k]
    if kw.get("guidance_scale") is not None and model.config.cfg_drop_prob == 0:
        print("warning: guidance_scale is set but the model was trained without cfg_drop_prob; the unconditional "
              "prompt may be meaningless", file=sys.stderr)
    return kw


def sanitize_name(s: Any, maxlen: int = 80) -> str:
    """A safe file-name part from user text (idx values): no path separators, no dot-files, bounded length."""
    s = re.sub(r"[^\w\-.]+", "_", str(s), flags=re.UNICODE).strip("._") or "row"
    return s[:maxlen]


def check_seed_udp_against_config(udp: dict, cfg: TextToImageConfig) -> None:
    for k, ck in (("text_len", "text_len"), ("img_len", "img_len"), ("size", "image_size"),
                  ("img_vocab_size", "img_vocab_size")):
        if udp.get(k) is not None and udp[k] != getattr(cfg, ck):
            raise TuwenError(f"--user_defined_parameters {k}={udp[k]} does not match the model ({ck}="
                             f"{getattr(cfg, ck)})")


def load_for_inference(path: str, udp: dict, device: str = "auto") -> TextToImage:
    from ..runtime import init_distributed
    dev = init_distributed(device)
    kw = {}
    if udp.get("vqgan_config"):
        kw["vqgan_config"] = udp["vqgan_config"]
    if udp.get("vqgan_ckpt_path") and not Path(path, "vqgan").exists():
        kw["vqgan_path"] = udp["vqgan_ckpt_path"]
    over = {k: udp[k] for k in ("text_len", "img_len", "size") if udp.get(k) is not None}
    try:
        model = TextToImage.from_pretrained(path, **kw, **({} if not over else _easynlp_only(path, over)))
    except TypeError as e:
        raise TuwenError(str(e)) from None
    check_seed_udp_against_config(udp, model.config)
    return model.to(dev).eval()


def _easynlp_only(path: str, over: dict) -> dict:
    """Size keys only shape an EasyNLP folder (tuwen folders record them and are checked instead)."""
    try:
        mt = json.loads(Path(resolve_model_path(path), CONFIG_NAME).read_text(encoding="utf-8")).get("model_type")
    except Exception:
        return {}
    return over if mt in EASYNLP_MODEL_TYPES else {}


def write_images(out_dir: Path, key: Any, images: list, scores: list[float] | None = None) -> list[str]:
    """``{idx}_{k}.png`` (+ score in the name when reranked) and ``{idx}_grid.png``; returns the file names."""
    from ..data.images import make_grid
    out_dir.mkdir(parents=True, exist_ok=True)
    base = sanitize_name(key)
    names = []
    for k, im in enumerate(images):
        name = f"{base}_{k}.png" if scores is None else f"{base}_{k}_score{scores[k]:.3f}.png"
        im.save(out_dir / name)
        names.append(name)
    if images:
        make_grid(images).save(out_dir / f"{base}_grid.png")
    return names


def run_predict(args, udp: dict) -> int:
    from ..data.images import encode_png_b64
    from ..data.tables import open_source
    from ..cli.predict import parse_columns, run_predict as _run

    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=predict (the model folder)")
    if not args.tables:
        raise TuwenError("--tables is required for --mode=predict (the input TSV)")
    model = load_for_inference(args.checkpoint_dir, udp, args.device)
    n = udp["max_generated_num"]
    if n < 1:
        raise TuwenError("max_generated_num must be ≥ 1")
    gen = _generation_kwargs(model, udp)
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed
    text_col = args.first_sequence or "text"
    schema = args.input_schema or "idx:str:1,text:str:1"
    src = open_source(args.tables.split(",")[0] if "," in args.tables else args.tables, schema,
                      args.skip_first_line, text_col=text_col)
    if text_col not in src.columns:
        raise TuwenError(f"--first_sequence={text_col!r} is not a column of --input_schema ({', '.join(src.columns)})")
    scorer = None
    keep = args.keep or n
    if args.rerank:
        from .rerank import load_scorer
        scorer = load_scorer(args.rerank)
    if keep > n:
        raise TuwenError(f"--keep {keep} is more than max_generated_num={n}")
    out_dir = Path(args.output_dir) if args.output_dir else None

    def predict_batch(rows: list[dict], indices: list[int]) -> list:
        prompts, keys, results = [], [], [None] * len(rows)
        for j, r in enumerate(rows):
            t = r.get(text_col, "")
            if not t or not t.strip():
                results[j] = ValueError(f"empty text in column {text_col!r}")
            else:
                prompts.append(t)
                keys.append((j, r.get("idx", indices[j])))
        if prompts:
            imgs = model.generate(prompts, num_images_per_prompt=n, seed=seed, keys=[k for _, k in keys],
                                  batch_size=max(1, args.micro_batch_size) * n, **gen)
            for (j, key), prompt, group in zip(keys, prompts, imgs):
                scores = None
                if scorer is not None:
                    from .rerank import rerank
                    order, sc = rerank(scorer, prompt, group, keep)
                    group, scores = [group[i] for i in order], [sc[i] for i in order]
                pred = {"idx": rows[j].get("idx", key), "text": prompt,
                        "gen_imgbase64": [encode_png_b64(im) for im in group]}
                if scores is not None:
                    pred["scores"] = [round(float(s), 6) for s in scores]
                if out_dir is not None:
                    write_images(out_dir, key, group, scores)
                results[j] = pred
        return results

    _run(src, predict_batch, args.outputs, parse_columns(args.output_schema, "--output_schema"),
         parse_columns(args.append_cols, "--append_cols"), batch_size=max(1, args.micro_batch_size),
         strict=args.strict, max_listed=args.max_bad_listed, desc="text2image")
    return 0


def run_evaluate(args, udp: dict) -> int:
    from ..data.tables import open_source
    from ..training.trainer import Trainer, TrainArgs

    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=evaluate (the model folder)")
    if not args.tables:
        raise TuwenError("--tables is required for --mode=evaluate (the validation TSV)")
    model = load_for_inference(args.checkpoint_dir, udp, args.device)
    tables = [t for t in args.tables.split(",") if t.strip()]
    ev_args = argparse_like(args, tables=tables[-1])
    task = T2ITask.__new__(T2ITask)  # reuse the data code with the loaded model
    task.args, task.udp, task.config, task.tokenizer, task.vqgan, task.base = ev_args, udp, model.config, \
        model.tokenizer, model.vqgan, model
    task.text_col, task.image_col = args.first_sequence or "text", args.second_sequence or "imgbase64"
    ds = task._dataset([tables[-1]], False)
    trainer = Trainer(TrainArgs(checkpoint_dir=args.checkpoint_dir, micro_batch_size=args.micro_batch_size,
                                device=args.device, num_workers=args.num_workers, strict=args.strict,
                                tensorboard=False), task)
    module = T2ITrainModule(model.gpt, model.vqgan, model.config.text_len, model.config.img_vocab_size,
                            model.tokenizer.pad_id + model.config.img_vocab_size).to(trainer.device)
    trainer._tb = None
    metrics = trainer.evaluate(module, ds)
    result = {"eval_loss": metrics.get("loss"), "bits_per_image_token": metrics.get("bits_per_token"),
              "rows": len(ds)}
    if trainer.report.count:
        print(trainer.report.summary(total=len(ds)), file=sys.stderr)
        result["bad_rows"] = trainer.report.count
    if args.metric:
        if args.metric != "attributes":
            raise TuwenError(f"--metric {args.metric!r}: tuwen evaluates 'attributes' (synthetic shapes set)")
        result.update(attribute_accuracy(model, tables[-1], args, udp))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def argparse_like(args, **changes):
    import copy
    a = copy.copy(args)
    for k, v in changes.items():
        setattr(a, k, v)
    return a


def attribute_accuracy(model: TextToImage, table: str, args, udp: dict) -> dict:
    """Generate one image per prompt of ``table`` (synthetic captions) and score it with the attribute checker."""
    from ..data import checker
    from ..data.synth import parse_caption
    from ..data.tables import BadRow, open_source

    from PIL import Image

    from ..data.images import load_image

    text_col, image_col = args.first_sequence or "text", args.second_sequence or "imgbase64"
    src = open_source(table, args.input_schema or "idx:str:1,text:str:1,imgbase64:str:1", args.skip_first_line,
                      text_col=text_col)
    prompts, keys, real = [], [], []
    for i in range(len(src)):
        r = src.row(i)
        if isinstance(r, BadRow) or parse_caption(r.get(text_col, "")) is None:
            continue
        prompts.append(r[text_col])
        keys.append(r.get("idx", i))
        if real is not None and r.get(image_col):
            try:
                real.append(Image.fromarray(load_image(r[image_col], model.config.image_size)))
            except Exception:  # noqa: BLE001 - a bad image only removes the real-image reference figure
                real = None
        else:
            real = None
        if len(prompts) >= udp["eval_num"]:
            break
    if not prompts:
        raise TuwenError(f"--metric attributes: no prompt of {table} is a synthetic-set caption")
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed
    imgs = model.generate(prompts, seed=seed, keys=keys, **_generation_kwargs(model, udp))
    keep = ("color", "shape", "position", "object", "image")
    res = checker.score([g[0] for g in imgs], prompts)
    out = {"attributes": {k: res[k] for k in keep if k in res}, "attributes_prompts": len(prompts)}
    if real:
        # references: the table's own images (the ceiling), and the same images paired with other prompts
        # (what an image that ignores its prompt scores: the chance level of this prompt distribution)
        ref = checker.score(real, prompts, shuffled=True)
        out["attributes_real_images"] = {k: ref[k] for k in keep if k in ref}
        out["attributes_random_images"] = {k: ref["shuffled"][k] for k in keep if k in ref["shuffled"]}
    return out


def run_easynlp(args) -> int:
    udp = parse_udp(args)
    if args.mode == "train":
        from ..cli.common import train_args_from
        from ..training.trainer import Trainer
        targs = train_args_from(args, default_lr=4e-5, default_wd=0.01)
        if not udp["do_eval"]:
            targs.do_eval = False
        task = T2ITask(args, udp, log=lambda m: print(m, file=sys.stderr))
        Trainer(targs, task).train()
        return 0
    if args.mode == "predict":
        return run_predict(args, udp)
    return run_evaluate(args, udp)
