"""Image/video → text: an image prefix + a GPT that writes the caption (EasyNLP image2text / video2text, CogView).

Two prefixes, one GPT (``tuwen.models.gpt``), one sampler (``tuwen.sampling``):

* **ViT prefix** (EasyNLP ``CLIPGPTImageTextGeneration``, the default): an OpenAI-CLIP ``visual`` tower
  (``tuwen.models.vit``). Still image: every patch token, ``ln_post(x[:, 1:]) @ proj`` → [B, grid², D]. Video
  (EasyNLP ``CLIPGPTFrameTextGeneration``): one ``ln_post(x[:, 0]) @ proj`` (CLS) vector per frame, frames in time
  order → [B, frame_num, D]. EasyNLP drops ``proj`` when ``n_embd == width`` (``vit_proj=False`` here). Features
  whose width is not ``n_embd`` go through the GPT's ``prefix_proj``. Sequence: ``[prefix][text]``, no BOS: the
  last prefix position predicts the first word.
* **VQ prefix** (EasyNLP ``VQGANGPTImageTextGeneration``, CogView image2text): the VQGAN's codes offset by the
  text vocabulary, ``[image codes + text_vocab_size][text ids]``, the mirror of text→image; the GPT input
  vocabulary is ``text + image + 1`` (EasyNLP), its head predicts text ids only.

Text: WordPiece ids without [CLS]/[SEP], cut/padded to ``text_len``; the end token is **[PAD]** (EasyNLP), so a
caption is its ids followed by [PAD]s. Training loss = cross-entropy over all ``text_len`` positions (EasyNLP's
definition, reported as ``loss``) plus ``caption_loss`` over the tokens up to and including the first end token.

Model folders (``save_pretrained``): ``config.json`` (model_type ``captioner``), ``model.safetensors`` (``vit.*`` +
``gpt.*``), ``vocab.txt`` + ``tokenizer_config.json``, ``vqgan/`` for the VQ prefix. EasyNLP ``mingpt_i2t`` /
``artist_i2t`` folders (``pytorch_model.bin`` with ``first_stage_model.*`` + ``transformer.*``) load as they are
(``tuwen.convert.easynlp_i2t``).

Decoding (``Captioner.generate``): greedy (``top_k=1``, the default), sampling (top-k / top-p / temperature, one
seed per (input, k) so a caption does not depend on the batch), beam search (``num_beams``, ``length_penalty``,
``no_repeat_ngram_size``); ``num_return_sequences`` captions per input (EasyNLP ``max_generated_num``; with greedy
decoding and more than one caption the N best beams are returned). Rows stop at their own end token; KV cache
throughout. ``Captioner.log_likelihood`` is CogView's caption score ``sum log p(text | image)``.

Video rows with fewer frames than ``frame_num`` are padded by repeating the last frame (with a warning; rejected
under ``--strict``); rows with more keep the **first** ``frame_num`` frames (as EasyNLP).

Commands: ``tuwen --mode=train|predict|evaluate --app_name=image2text_generation|video2text_generation`` (EasyNLP
flags, see ``USER_PARAMS``), ``tuwen caption IMAGE… --model DIR``, ``CaptionPipeline`` (``tuwen.pipeline``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig, Param, parse_user_defined_parameters, typed_kwargs
from ..errors import TuwenError
from ..hub import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, load_state_dict_checked, load_weights,
                   resolve_model_path, save_weights, tuwen_home)
from ..models.gpt import GPT, GPTConfig
from ..models.vit import CLIP_MEAN, CLIP_STD, ViTConfig, VisionTransformer
from ..text.tokenizer import TextTokenizer
from ..training.trainer import Task

MODEL_TYPE = "captioner"
EASYNLP_MODEL_TYPES = ("mingpt_i2t", "artist_i2t")
GENERATION_KEYS = ("num_beams", "top_k", "top_p", "temperature", "length_penalty", "no_repeat_ngram_size")
APPS = ("image2text_generation", "video2text_generation")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =============================================================================================== config

@dataclasses.dataclass
class CaptionerConfig(BaseConfig):
    """Architecture + decoding defaults of a captioner. See the module docstring for the two prefixes."""

    model_type: ClassVar[str] = MODEL_TYPE

    prefix_encoder: str = "vit"      # "vit" (continuous features) | "vqgan" (image codes as tokens)
    frame_num: int = 0               # 0: still images; N >= 1: video, one vector per frame (ViT prefix)
    text_len: int = 32               # caption positions (EasyNLP text_len)
    img_len: int = 256               # prefix positions reserved: ViT grid², VQGAN codes, video >= frame_num
    img_size: int = 224              # pixels a side
    text_vocab_size: int = 21128     # tokenizer ids = GPT head outputs
    img_vocab_size: int = 0          # VQGAN codebook size (VQ prefix)
    vocab_size: int = 0              # GPT input rows; 0 = text_vocab_size (ViT) or text + image + 1 (VQ, EasyNLP)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    vit: dict | None = None          # ViTConfig.to_dict() of the image tower (ViT prefix)
    vit_proj: bool = True            # apply the tower's proj (EasyNLP sets it to None when n_embd == width)
    freeze_vit: bool = True          # training: keep the image tower fixed
    image_mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))
    image_resize: str = "center_crop"  # PIL inputs: center_crop (OpenAI/taming) | squash (albumentations Resize)
    # decoding defaults (per call overridable)
    num_beams: int = 1
    top_k: int | None = 1            # 1 = greedy; EasyNLP samples with top_k=100, temperature=1
    top_p: float | None = None
    temperature: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def video(self) -> bool:
        return self.frame_num > 0

    @property
    def block_size(self) -> int:
        return self.text_len + self.img_len

    @property
    def prefix_len(self) -> int:
        """Positions the prefix occupies: frames (video), grid² patches (ViT image) or codes (VQ)."""
        return self.frame_num if self.video else self.img_len

    @property
    def input_vocab_size(self) -> int:
        if self.vocab_size:
            return self.vocab_size
        if self.prefix_encoder == "vqgan":
            return self.text_vocab_size + self.img_vocab_size + 1
        return self.text_vocab_size

    def vit_config(self) -> ViTConfig:
        return ViTConfig.from_dict(self.vit, source="captioner config: vit")

    @property
    def feature_dim(self) -> int:
        """Width of the ViT features handed to the GPT (before its prefix_proj)."""
        v = self.vit_config()
        return v.output_dim if self.vit_proj else v.width

    def gpt_config(self) -> GPTConfig:
        n_prefix = 0
        if self.prefix_encoder == "vit" and self.feature_dim != self.n_embd:
            n_prefix = self.feature_dim
        return GPTConfig(vocab_size=self.input_vocab_size, block_size=self.block_size, n_out=self.text_vocab_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, embd_pdrop=self.embd_pdrop,
                         resid_pdrop=self.resid_pdrop, attn_pdrop=self.attn_pdrop, n_prefix_embd=n_prefix)

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"captioner config: {msg}")
        if self.prefix_encoder not in ("vit", "vqgan"):
            bad(f"prefix_encoder must be 'vit' or 'vqgan', got {self.prefix_encoder!r}")
        for k in ("text_len", "img_len", "img_size", "text_vocab_size"):
            if getattr(self, k) < 1:
                bad(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.frame_num < 0:
            bad(f"frame_num must be >= 0 (0 = still images), got {self.frame_num}")
        if self.video and self.frame_num > self.img_len:
            bad(f"frame_num ({self.frame_num}) must not exceed img_len ({self.img_len}): the frames take the "
                f"prefix positions")
        if self.prefix_encoder == "vqgan":
            if self.video:
                bad("video needs the ViT prefix (EasyNLP video2text has no VQGAN variant)")
            if self.img_vocab_size < 1:
                bad("the VQ prefix needs img_vocab_size (the VQGAN codebook size)")
        else:
            if not self.vit:
                bad("the ViT prefix needs the image tower's architecture (vit)")
            v = self.vit_config()
            if v.image_size != self.img_size:
                bad(f"img_size ({self.img_size}) differs from the image tower's image_size ({v.image_size})")
            if not self.video and v.num_patches != self.img_len:
                bad(f"img_len ({self.img_len}) must equal the ViT patch count (img_size/patch_size)² = "
                    f"({self.img_size}/{v.patch_size})² = {v.num_patches}")
        if self.vocab_size and self.vocab_size < self.text_vocab_size + (self.img_vocab_size if
                                                                         self.prefix_encoder == "vqgan" else 0):
            bad(f"vocab_size {self.vocab_size} is smaller than the text (+ image) ids it must hold")
        if self.image_resize not in ("center_crop", "squash"):
            bad(f"image_resize must be center_crop or squash, got {self.image_resize!r}")
        if self.num_beams < 1:
            bad("num_beams must be >= 1")
        if self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size must be >= 0")


def caption_seed(seed: int, key: Any, k: int) -> int:
    """The sampling seed of caption ``k`` of input ``key`` (an index or an ``idx`` string): batch independent."""
    h = hashlib.blake2b(f"caption|{int(seed)}|{key}|{int(k)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


# =============================================================================================== images

_pad_warnings = [0]


def fit_frames(frames: list, frame_num: int, where: str = "", strict: bool = False) -> list:
    """Exactly ``frame_num`` frames: the first ``frame_num`` of a longer video (EasyNLP), a shorter one padded by
    repeating its last frame (a warning on stderr for the first few) or, with ``strict``, a ValueError."""
    if not frames:
        raise ValueError("the video has no frames")
    if len(frames) >= frame_num:
        return list(frames[:frame_num])
    msg = f"the video has {len(frames)} frame(s) but frame_num={frame_num}"
    if strict:
        raise ValueError(f"{msg} (--strict rejects short videos; without it they are padded by repeating the "
                         f"last frame)")
    _pad_warnings[0] += 1
    if _pad_warnings[0] <= 3:
        more = "" if _pad_warnings[0] < 3 else " (further padding warnings are not shown)"
        _log(f"warning: {where + ': ' if where else ''}{msg}; padded by repeating the last frame{more}")
    return list(frames) + [frames[-1]] * (frame_num - len(frames))


def _is_file(p: Path) -> bool:
    try:
        return len(str(p)) < 4096 and p.is_file()
    except OSError:  # e.g. a base64 string too long to be a file name
        return False


def _is_dir(p: Path) -> bool:
    try:
        return len(str(p)) < 4096 and p.is_dir()
    except OSError:
        return False


def open_any_image(x, root: str | None = None):
    """A PIL image, path, bytes, uint8 HWC array or base64 string (a path when ``root`` is given or the string
    names an existing file) → RGB PIL image. Raises ``ImageDecodeError`` (a ValueError) with the reason."""
    from PIL import Image

    from ..data.images import ImageDecodeError, open_image, to_rgb

    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
            raise ImageDecodeError(f"numpy images must be uint8 [H, W, 3], got {x.dtype} {x.shape}")
        return Image.fromarray(x, "RGB")
    if isinstance(x, (bytes, bytearray)):
        return open_image(bytes(x))
    if isinstance(x, os.PathLike):
        return open_image(Path(root, x) if root else Path(x))
    if isinstance(x, str):
        s = x.strip()
        if root is not None:
            return open_image(Path(root, s))
        if not s.startswith("data:") and ("/" in s or "." in s[-6:]) and _is_file(Path(s).expanduser()):
            return open_image(Path(s).expanduser())
        return open_image(s)
    raise ImageDecodeError(f"unsupported image input {type(x).__name__} (PIL image, path, bytes, base64 string "
                           f"or uint8 array)")


def frames_of(x, root: str | None = None) -> list:
    """A video input → list of frames: a list/tuple of frames, a JSON list of base64 strings / paths, a
    comma-separated list of paths, or a folder of frame images (sorted by name)."""
    from ..data.tables import IMAGE_EXTS

    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, (str, os.PathLike)):
        s = str(x).strip()
        if s.startswith("["):
            from ..data.images import decode_frames
            return decode_frames(s)
        p = Path(root, s) if root else Path(s).expanduser()
        if _is_dir(p):
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise ValueError(f"{p}: a folder without frame images")
            return files
        if "," in s and len(s) < 8192:
            return [t.strip() for t in s.split(",") if t.strip()]
        return [s]
    return [x]


def load_pixels(image, size: int, resize: str = "center_crop", root: str | None = None) -> np.ndarray:
    """One image input → uint8 [size, size, 3] sized as the model expects."""
    from ..models.vit import to_uint8_batch

    return to_uint8_batch([open_any_image(image, root)], size, resize)[0]


# =============================================================================================== prefix math

def normalize_pixels(pixels: torch.Tensor, config: CaptionerConfig) -> torch.Tensor:
    """uint8 [..., H, W, 3] → float32 [..., 3, H, W]: CLIP-normalised (ViT) or in [-1, 1] (VQGAN)."""
    x = pixels.movedim(-1, -3).float()
    if config.prefix_encoder == "vqgan":
        return x.div_(127.5).sub_(1.0)
    mean = torch.tensor(config.image_mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(config.image_std, device=x.device).view(3, 1, 1)
    return (x.div_(255.0) - mean) / std


def vit_features(vit: VisionTransformer, config: CaptionerConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] → patch features [B, grid², D]; video [B, F, 3, H, W] → one CLS feature per
    frame [B, F, D]. D = proj width (vit_proj) or tower width."""
    if config.video:
        if pixel_values.dim() != 5:
            raise TuwenError(f"video captioner: pixel_values must be [B, frames, 3, H, W], got "
                             f"{tuple(pixel_values.shape)}")
        B, Fn = pixel_values.shape[:2]
        if Fn != config.frame_num:
            raise TuwenError(f"video captioner: {Fn} frames given, the model takes frame_num={config.frame_num}")
        tok = vit.forward_tokens(pixel_values.flatten(0, 1))[:, 0]          # [B*F, width]
        feats = tok @ vit.proj if config.vit_proj else tok
        return feats.view(B, Fn, -1)                                        # [B, F, D]
    if pixel_values.dim() != 4:
        raise TuwenError(f"image captioner: pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
    tok = vit.forward_tokens(pixel_values)[:, 1:]                           # [B, grid², width]
    return tok @ vit.proj if config.vit_proj else tok


def vq_prefix_ids(vqgan, config: CaptionerConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [B, 3, H, W] → GPT input ids [B, img_len] = VQGAN codes + text_vocab_size."""
    codes = vqgan.encode(pixel_values).flatten(1).clone()   # clone: leave inference mode
    if codes.shape[1] != config.img_len:
        raise TuwenError(f"the VQGAN gives {codes.shape[1]} codes for {tuple(pixel_values.shape[-2:])} images; the "
                         f"model has img_len={config.img_len}")
    return codes + config.text_vocab_size


def _amp(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" and weight_dtype == torch.float32 else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# =============================================================================================== model

class Captioner(nn.Module):
    """Image prefix (ViT or VQGAN) + GPT + WordPiece tokenizer. See the module docstring."""

    def __init__(self, config: CaptionerConfig, tokenizer: TextTokenizer, vit: VisionTransformer | None = None,
                 vqgan=None, gpt: GPT | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.gpt = gpt if gpt is not None else GPT(config.gpt_config())
        self.vit = None
        self.vqgan = None
        if config.prefix_encoder == "vit":
            if vit is None:
                vit = VisionTransformer(config.vit_config())
            self.vit = vit
            if vit.config.to_dict() != config.vit_config().to_dict():
                raise TuwenError("captioner: the image tower's architecture differs from config.vit")
            if config.freeze_vit:
                for p in self.vit.parameters():
                    p.requires_grad_(False)
        else:
            if vqgan is None:
                raise TuwenError("captioner: the VQ prefix needs a VQGAN")
            self.vqgan = vqgan.eval()
            for p in self.vqgan.parameters():
                p.requires_grad_(False)
            h, w = vqgan.grid_size(config.img_size)
            if h * w != config.img_len:
                raise TuwenError(f"captioner: img_len={config.img_len} but the VQGAN turns {config.img_size}px images "
                                 f"into {h}×{w}={h * w} codes; set img_len={h * w}")
            if vqgan.config.n_embed != config.img_vocab_size:
                raise TuwenError(f"captioner: img_vocab_size={config.img_vocab_size} but the VQGAN has "
                                 f"{vqgan.config.n_embed} codes")
        if tokenizer.vocab_size > config.text_vocab_size:
            raise TuwenError(f"captioner: the tokenizer has {tokenizer.vocab_size} ids but text_vocab_size is "
                             f"{config.text_vocab_size}; use the vocab.txt the model was trained with")

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_emb.weight.device

    @property
    def end_id(self) -> int:
        """The end token: [PAD] (EasyNLP)."""
        return self.tokenizer.pad_id

    # ------------------------------------------------------------------ images
    def pixel_values(self, images, root: str | None = None, strict: bool = False) -> torch.Tensor:
        """Images → the model's input on its device: ViT float [B, 3, S, S] CLIP-normalised (video
        [B, F, 3, S, S]); VQ float [B, 3, S, S] in [-1, 1].

        ``images``: a list of inputs (PIL images, paths, bytes, base64 strings, uint8 arrays; for a video model each
        input is a list of frames, a JSON list, comma-separated paths or a folder; a flat list of frames is one
        video), a single input, a uint8 tensor [B, (F,) H, W, 3], or a float tensor already preprocessed.
        """
        c, dev = self.config, self.device
        if torch.is_tensor(images):
            if images.dtype == torch.uint8:
                return normalize_pixels(images.to(dev), c)
            return images.to(dev, torch.float32)
        items = self._as_items(images)
        arrs = []
        for i, x in enumerate(items):
            if c.video:
                frames = fit_frames(frames_of(x, root), c.frame_num, where=f"input {i}", strict=strict)
                arrs.append(np.stack([load_pixels(f, c.img_size, c.image_resize, root) for f in frames]))
            else:
                arrs.append(load_pixels(x, c.img_size, c.image_resize, root))
        if not arrs:
            raise TuwenError("captioner: no images given")
        return normalize_pixels(torch.from_numpy(np.stack(arrs)).to(dev), c)

    def _as_items(self, images) -> list:
        from PIL import Image
        single = (Image.Image, bytes, bytearray, os.PathLike, np.ndarray)
        if isinstance(images, single) or isinstance(images, str):
            return [images]
        images = list(images)
        if self.config.video and images and not isinstance(images[0], (list, tuple)):
            # a flat list of frames is one video; a list of folders / JSON lists / "a.png,b.png" strings is many
            first = images[0]
            many = isinstance(first, (str, os.PathLike)) and (str(first).strip().startswith("[") or
                                                              "," in str(first) or _is_dir(Path(str(first))))
            if not many:
                return [images]
        return images

    def prefix_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"prefix_embeds": [B, P, D]}`` (ViT) or ``{"prefix_ids": [B, P]}`` (VQ): what the sampler takes."""
        if self.config.prefix_encoder == "vqgan":
            return {"prefix_ids": vq_prefix_ids(self.vqgan, self.config, pixel_values)}
        return {"prefix_embeds": vit_features(self.vit, self.config, pixel_values)}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The prefix the GPT reads, [B, prefix_len, n_embd] (after ``prefix_proj`` / the token embedding)."""
        pre = self.prefix_inputs(pixel_values.to(self.device))
        if "prefix_ids" in pre:
            return self.gpt.tok_emb(pre["prefix_ids"])
        return self.gpt.embed_prefix(pre["prefix_embeds"])

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Captions → LongTensor [B, text_len]: WordPiece ids (no [CLS]/[SEP]) padded with the end token."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer.encode_batch(list(texts), self.config.text_len, pad=True)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """[N, T] output ids → captions, each cut at its first end token (no spaces between CJK characters)."""
        out = []
        for row in ids.reshape(-1, ids.shape[-1]).tolist():
            if self.end_id in row:
                row = row[:row.index(self.end_id)]
            out.append(self.tokenizer.decode(row))
        return out

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, pixel_values: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, text_vocab] for ``text_ids`` [B, T] (T <= text_len); logit t predicts
        token t from the prefix and tokens < t."""
        pre = self.prefix_inputs(pixel_values.to(self.device))
        text_ids = text_ids.to(self.device)
        P = self.config.prefix_len
        if "prefix_ids" in pre:
            return self.gpt(torch.cat([pre["prefix_ids"], text_ids[:, :-1]], dim=1), logits_start=P - 1)
        return self.gpt(text_ids[:, :-1], pre["prefix_embeds"], logits_start=P - 1)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, images=None, *, pixel_values: torch.Tensor | None = None, num_beams: int | None = None,
                 top_k: int | None | str = "default", top_p: float | None | str = "default",
                 temperature: float | None = None, length_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None, num_return_sequences: int = 1,
                 seed: int = 0, keys: Sequence[Any] | None = None, return_ids: bool = False,
                 batch_size: int | None = None, root: str | None = None):
        """Captions for ``images`` (see ``pixel_values``) or preprocessed ``pixel_values``.

        Returns one list of ``num_return_sequences`` captions per input, or with ``return_ids`` a LongTensor
        [B, R, text_len] of token ids (end-token padded). Strategy: beam search when ``num_beams > 1`` (the R best
        beams; beams are raised to R if fewer); greedy when ``top_k == 1`` or ``temperature == 0`` (with R > 1: the
        R best of an R-beam search); sampling otherwise, caption k of input i seeded by ``caption_seed(seed,
        keys[i], k)``. Unset arguments take the config's defaults.
        """
        c = self.config
        num_beams = c.num_beams if num_beams is None else int(num_beams)
        top_k = c.top_k if top_k == "default" else top_k
        top_p = c.top_p if top_p == "default" else top_p
        temperature = c.temperature if temperature is None else float(temperature)
        length_penalty = c.length_penalty if length_penalty is None else float(length_penalty)
        no_repeat = c.no_repeat_ngram_size if no_repeat_ngram_size is None else int(no_repeat_ngram_size)
        R = int(num_return_sequences)
        if R < 1 or num_beams < 1:
            raise TuwenError(f"num_return_sequences and num_beams must be >= 1 (got {R}, {num_beams})")
        if pixel_values is None:
            if images is None:
                raise TuwenError("generate: give images or pixel_values")
            pixel_values = self.pixel_values(images, root=root)
        pixel_values = pixel_values.to(self.device)
        B = pixel_values.shape[0]
        keys = list(keys) if keys is not None else list(range(B))
        if len(keys) != B:
            raise TuwenError(f"generate: {len(keys)} keys for {B} inputs")
        greedy = top_k == 1 or temperature == 0
        bs = batch_size or (64 if self.device.type == "cuda" else 16)
        chunks = []
        for s in range(0, B, bs):
            chunks.append(self._generate_chunk(pixel_values[s:s + bs], keys[s:s + bs], R, num_beams, greedy, top_k,
                                               top_p, temperature, length_penalty, no_repeat, seed))
        ids = torch.cat(chunks).cpu()  # [B, R, text_len]
        if return_ids:
            return ids
        texts = self.decode(ids)
        return [texts[i * R:(i + 1) * R] for i in range(B)]

    def _generate_chunk(self, pv, keys, R, num_beams, greedy, top_k, top_p, temperature, length_penalty, no_repeat,
                        seed) -> torch.Tensor:
        from .. import sampling

        c, dev = self.config, self.device
        amp = _amp(dev, self.gpt.tok_emb.weight.dtype)
        with _autocast(dev, amp):
            pre = self.prefix_inputs(pv)
        pre = {k: (v.float() if v.is_floating_point() else v) for k, v in pre.items()}
        B, T = pv.shape[0], c.text_len
        if num_beams > 1 or (greedy and R > 1):
            ids, _ = sampling.beam_search(self.gpt, **pre, max_new_tokens=T, num_beams=max(num_beams, R),
                                          eos_id=self.end_id, pad_id=self.end_id, length_penalty=length_penalty,
                                          no_repeat_ngram_size=no_repeat, num_return_sequences=R, amp_dtype=amp,
                                          early_stopping=False)  # HF's default: junk finished beams must not win
            return ids  # [B, R, T]
        if greedy:
            ids = sampling.generate(self.gpt, **pre, num_tokens=T, seeds=0, top_k=1, eos_id=self.end_id,
                                    pad_id=self.end_id, amp_dtype=amp)
            return ids[:, None].expand(B, R, T)
        pre = {k: v.repeat_interleave(R, dim=0) for k, v in pre.items()}
        seeds = torch.tensor([caption_seed(seed, key, k) for key in keys for k in range(R)], dtype=torch.long)
        ids = sampling.generate(self.gpt, **pre, num_tokens=T, seeds=seeds, top_k=top_k, top_p=top_p,
                                temperature=temperature, eos_id=self.end_id, pad_id=self.end_id, amp_dtype=amp)
        return ids.view(B, R, T)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def log_likelihood(self, images, texts: Sequence[str] | str, batch_size: int | None = None,
                       include_end: bool = False) -> torch.Tensor:
        """CogView's caption score: ``sum_t log p(text token t | image, tokens < t)`` per (image, text) pair →
        float32 CPU tensor [N]. ``images``: as ``pixel_values`` takes them (or a preprocessed tensor); ``texts``: N
        captions or one for all. Texts are cut to ``text_len`` tokens; ``include_end`` also counts the end token."""
        pv = images if torch.is_tensor(images) else None
        items = None if pv is not None else self._as_items(images)
        N = pv.shape[0] if pv is not None else len(items)
        texts = [texts] * N if isinstance(texts, str) else list(texts)
        if len(texts) != N:
            raise TuwenError(f"log_likelihood: {N} images but {len(texts)} texts")
        if N == 0:
            return torch.zeros(0)
        from .. import sampling

        bs = batch_size or (64 if self.device.type == "cuda" else 16)
        amp = _amp(self.device, self.gpt.tok_emb.weight.dtype)
        out = []
        for s in range(0, N, bs):
            x = pv[s:s + bs] if pv is not None else self.pixel_values(items[s:s + bs])
            target = self.tokenize(texts[s:s + bs])                                    # [b, T]
            lengths = torch.tensor([len(self.tokenizer.encode(t, self.config.text_len)) for t in texts[s:s + bs]])
            if include_end:
                lengths = (lengths + 1).clamp(max=self.config.text_len)
            mask = torch.arange(target.shape[1])[None, :] < lengths[:, None]
            with _autocast(self.device, amp):
                pre = self.prefix_inputs(x.to(self.device))
            pre = {k: (v.float() if v.is_floating_point() else v) for k, v in pre.items()}
            out.append(sampling.score_sequences(self.gpt, **pre, target_ids=target, target_mask=mask,
                                                amp_dtype=amp).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ I/O
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """tuwen layout: config.json, model.safetensors (vit.* + gpt.*), vocab.txt + tokenizer_config.json,
        vqgan/ (VQ prefix)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {f"gpt.{k}": v for k, v in self.gpt.state_dict().items()}
        if self.vit is not None:
            sd.update({f"vit.{k}": v for k, v in self.vit.state_dict().items()})
        save_weights(sd, path / WEIGHTS_NAME, {"model_type": MODEL_TYPE})
        self.tokenizer.save_pretrained(path)
        if self.vqgan is not None:
            self.vqgan.save_pretrained(path / "vqgan")
        atomic_write_text(path / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        **overrides) -> "Captioner":
        """A tuwen captioner folder, or an EasyNLP ``mingpt_i2t`` / ``artist_i2t`` folder as it is.

        ``overrides``: decoding defaults (``num_beams``, ``top_k``, ``top_p``, ``temperature``,
        ``length_penalty``, ``no_repeat_ngram_size``) and ``freeze_vit``; for EasyNLP folders (whose config does not
        say it) also ``frame_num`` (> 0: a video2text model), ``text_len`` (default 32), ``img_size``,
        ``vqgan_path`` / ``vqgan_config`` (VQ checkpoints without ``first_stage_model.*``) and ``vit_heads``.
        """
        path = resolve_model_path(name_or_path, what="captioner",
                                  expect="config.json + model.safetensors + vocab.txt (tuwen captioner), or "
                                         "config.json (model_type mingpt_i2t) + pytorch_model.bin + vocab.txt (EasyNLP)")
        if path.is_file():
            raise TuwenError(f"{path}: a captioner is a folder (config.json + weights + vocab.txt)")
        raw = _read_json(path / CONFIG_NAME)
        mt = raw.get("model_type")
        if mt in EASYNLP_MODEL_TYPES:
            from ..convert.easynlp_i2t import load_easynlp_captioner
            model = load_easynlp_captioner(path, raw, **overrides)
        elif mt == MODEL_TYPE:
            frame_num = overrides.pop("frame_num", None)
            allowed = set(GENERATION_KEYS) | {"freeze_vit"}
            extra = sorted(set(overrides) - allowed)
            if extra:
                raise TuwenError(f"{path}: cannot change {', '.join(extra)} of a trained tuwen captioner (fixed by its "
                                 f"weights); settable: {', '.join(sorted(allowed))}")
            config = CaptionerConfig.from_dict(raw, source=str(path / CONFIG_NAME), **overrides)
            if frame_num is not None and frame_num != config.frame_num:
                what = f"a video model with frame_num={config.frame_num}" if config.video else "a still-image model"
                raise TuwenError(f"{path}: frame_num={frame_num} was asked but this is {what}")
            tok = TextTokenizer.from_pretrained(path)
            vqgan = None
            if config.prefix_encoder == "vqgan":
                from ..convert.taming import load_vqgan
                vqgan = load_vqgan(path / "vqgan")
            model = cls(config, tok, vqgan=vqgan)
            sd = load_weights(path / WEIGHTS_NAME)
            load_state_dict_checked(model.gpt, {k[4:]: v for k, v in sd.items() if k.startswith("gpt.")},
                                    f"{path / WEIGHTS_NAME} (gpt.*)")
            if model.vit is not None:
                load_state_dict_checked(model.vit, {k[4:]: v for k, v in sd.items() if k.startswith("vit.")},
                                        f"{path / WEIGHTS_NAME} (vit.*)")
            stray = [k for k in sd if not k.startswith(("gpt.", "vit." if model.vit is not None else "gpt."))]
            if stray:
                raise TuwenError(f"{path / WEIGHTS_NAME}: unexpected tensors {', '.join(stray[:5])}")
        else:
            raise TuwenError(f"{path / CONFIG_NAME}: model_type {mt!r} is not a captioner (expected {MODEL_TYPE!r} "
                             f"or EasyNLP's {' / '.join(EASYNLP_MODEL_TYPES)})")
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TuwenError(f"{path.parent}: not a model folder (no {path.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuwenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TuwenError(f"{path}: expected a JSON object")
    return d


# =============================================================================================== resolving names

def resolve_vit_path(spec: str) -> Path:
    """``vit_ckpt_path``: a local file/folder, or an OpenAI model name (``ViT-L/14`` → ``ViT-L-14.pt``) under
    ``$TUWEN_HOME/models``. Nothing is downloaded; a missing file is a TuwenError saying where to put it."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if spec.startswith(("oss://", "http://", "https://")):
        raise TuwenError(f"vit_ckpt_path={spec!r}: tuwen downloads nothing; copy the file to a local path")
    if spec.startswith(("/", "./", "../", "~")):
        raise TuwenError(f"vit_ckpt_path={spec!r}: no such file or folder")
    fname = spec.replace("/", "-")
    if not fname.endswith((".pt", ".bin", ".pth", ".safetensors")):
        fname += ".pt"
    home = tuwen_home()
    for c in (home / "models" / fname, home / fname, home / "models" / spec.replace("/", "-")):
        if c.exists():
            return c
    raise TuwenError(
        f"vit_ckpt_path={spec!r} not found: it is not a local path and {home / 'models' / fname} does not exist. "
        f"tuwen downloads nothing: put OpenAI's {fname} (the file openai/CLIP publishes for {spec}) at "
        f"{home / 'models' / fname} (set TUWEN_HOME to change the root), or pass vit_ckpt_path=/path/to/{fname} or "
        f"a tuwen CLIP model folder")


def resolve_pretrained(spec: str) -> tuple[str, Path]:
    """``pretrain_model_name_or_path`` → ("model", folder) for a captioner to finetune, or ("tokenizer", path of a
    vocab.txt or a folder holding one) for training from scratch (EasyNLP: ``bert-base-chinese``)."""
    p = Path(spec).expanduser()
    if not p.exists():
        home = tuwen_home()
        cands = [home / "models" / spec, home / spec]
        p = next((c for c in cands if c.exists()), None)
        if p is None:
            if spec.startswith(("/", "./", "../", "~")):
                raise TuwenError(f"pretrain_model_name_or_path={spec!r}: no such file or folder")
            raise TuwenError(
                f"pretrain_model_name_or_path={spec!r} not found: it is not a local path and not under TUWEN_HOME "
                f"(looked in {cands[0]} and {cands[1]}). tuwen downloads nothing: to train from scratch with the "
                f"{spec} tokenizer put its vocab.txt at {cands[0] / 'vocab.txt'}; to finetune, put the captioner "
                f"folder (config.json + weights + vocab.txt) at {cands[0]} (set TUWEN_HOME to change the root)")
    if p.is_file():
        return "tokenizer", p
    cfg = p / CONFIG_NAME
    mt = _read_json(cfg).get("model_type") if cfg.exists() else None
    if mt in (MODEL_TYPE,) + EASYNLP_MODEL_TYPES:
        return "model", p
    if (p / "vocab.txt").exists():
        return "tokenizer", p
    raise TuwenError(f"pretrain_model_name_or_path={spec!r} ({p}): neither a captioner folder (config.json with "
                     f"model_type captioner / mingpt_i2t) nor a tokenizer (vocab.txt)")


def load_image_tower(spec: str, img_size: int | None = None) -> tuple[VisionTransformer, str, list, list]:
    """``vit_ckpt_path`` → (tower, description for the log, image mean, image std). Reads OpenAI CLIP ``.pt``
    (TorchScript or state dict), Chinese-CLIP / HF CLIP weights, a bare ``visual`` state dict, or a tuwen CLIP
    folder (its ``visual.*``)."""
    from ..convert.clip import load_openai_vit, load_visual_into

    path = resolve_vit_path(spec)
    mt = _read_json(path / CONFIG_NAME).get("model_type") if path.is_dir() and (path / CONFIG_NAME).exists() else None
    if mt == "clip":
        from .clip import CLIPConfig
        ccfg = CLIPConfig.load(path / CONFIG_NAME)
        vcfg = ccfg.vision.replace(image_size=img_size) if img_size else ccfg.vision
        vit = VisionTransformer(vcfg)
        sd = load_weights(path)
        load_visual_into(vit, {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")},
                         f"{path} (visual.*)")
        return vit, f"the image tower of the tuwen CLIP model {path}", list(ccfg.image_mean), list(ccfg.image_std)
    if path.is_dir() and mt is not None:
        raise TuwenError(f"vit_ckpt_path={spec!r}: {path} holds a {mt!r} model, not a CLIP")
    vit = load_openai_vit(path, image_size=img_size)
    return vit, f"CLIP image-tower weights from {path}", list(CLIP_MEAN), list(CLIP_STD)


# =============================================================================================== user_defined_parameters

USER_PARAMS: dict[str, Param] = {
    "frame_num": Param(int, None, "video: frames per clip (EasyNLP default 3); shorter clips are padded by repeating "
                                  "the last frame (warning; --strict rejects them), longer ones keep the first frames"),
    "vit_ckpt_path": Param(str, None, "image tower weights: OpenAI CLIP .pt (ViT-L/14 → $TUWEN_HOME/models/"
                                      "ViT-L-14.pt), a tuwen CLIP folder, or a visual state dict"),
    "vit_preset": Param(str, None, "ViT size when the image tower is trained from scratch (tiny, small, base-64, "
                                   "ViT-B-32, ...; default small)"),
    "freeze_vit": Param(bool, None, "keep the image tower fixed (default: frozen when loaded from weights, trained "
                                    "when from scratch)"),
    "img_size": Param(int, None, "image side in pixels (EasyNLP: 224 ViT, 256 VQGAN)"),
    "img_len": Param(int, None, "prefix positions: ViT (img_size/patch)², VQGAN codes; video: reserved, >= frame_num"),
    "text_len": Param(int, None, "caption tokens (default 32)"),
    "pretrain_model_name_or_path": Param(str, None, "captioner to finetune, or (from scratch) the tokenizer: a "
                                                    "vocab.txt, a folder with one, or a name under $TUWEN_HOME/models"),
    "vocab_size": Param(int, 8000, "size of the vocabulary built from the training texts when no tokenizer is given"),
    "block_size": Param(int, None, "EasyNLP compatibility: must equal text_len + img_len"),
    "n_layer": Param(int, None, "GPT layers (default 12)"),
    "n_head": Param(int, None, "GPT heads (default 12)"),
    "n_embd": Param(int, None, "GPT width (default 768)"),
    "gpt_preset": Param(str, None, "GPT size preset: tiny, small, medium, base, large"),
    "dropout": Param(float, None, "GPT dropout when training from scratch"),
    "text_vocab_size": Param(int, None, "text vocabulary size (default: the tokenizer's)"),
    "img_vocab_size": Param(int, None, "VQ prefix: VQGAN codebook size (checked against the VQGAN)"),
    "enable_vit": Param(bool, None, "EasyNLP: the ViT prefix (the default)"),
    "enable_vqgan": Param(bool, None, "EasyNLP: the VQGAN-code prefix (also --app_name=image2text_generation_vqgan)"),
    "vqgan_ckpt_path": Param(str, None, "VQ prefix from scratch: tuwen VQGAN folder, taming .ckpt or EasyNLP .bin"),
    "vqgan_config": Param(str, None, "taming yaml/json for vqgan_ckpt_path (default: inferred from the shapes)"),
    "enable_img_path": Param(bool, False, "image columns hold file paths (relative to img_root_dir), not base64"),
    "img_root_dir": Param(str, None, "folder that image paths are relative to (with enable_img_path)"),
    "max_generated_num": Param(int, 1, "captions per input; gen_text is then a JSON list"),
    "num_beams": Param(int, None, "beam width (1 = no beam search)"),
    "length_penalty": Param(float, None, "beam search: score = sum log p / length ** length_penalty"),
    "no_repeat_ngram_size": Param(int, None, "beam search: never repeat an n-gram of this size"),
    "top_k": Param(int, None, "sampling: keep the k most likely tokens (1 = greedy, the default)"),
    "top_p": Param(float, None, "sampling: nucleus probability mass"),
    "temperature": Param(float, None, "sampling temperature"),
    "seed": Param(int, None, "sampling seed (default: --random_seed)"),
    "pkeep": Param(float, 1.0, "training: probability of keeping each input text token (EasyNLP pkeep)"),
    "do_eval": Param(bool, True, "evaluate on the validation table while training"),
    "eval_num": Param(int, None, "evaluate: caption at most this many images for BLEU/CIDEr/ROUGE (default all)"),
    "device": Param(str, None, "EasyNLP compatibility (cuda/cpu); same as --device"),
}


def parse_udp(args) -> dict:
    return parse_user_defined_parameters(args.user_defined_parameters, USER_PARAMS, args.app_name)


def _decode_kwargs(udp: dict) -> dict:
    return {k: udp[k] for k in GENERATION_KEYS if udp.get(k) is not None}


# =============================================================================================== training

class CaptionTrainModule(nn.Module):
    """What the trainer trains: the GPT and (unless frozen) the ViT. A VQGAN is frozen and not in the state dict."""

    def __init__(self, config: CaptionerConfig, gpt: GPT, vit: VisionTransformer | None = None, vqgan=None,
                 end_id: int = 0, pkeep: float = 1.0):
        super().__init__()
        self.config, self.gpt, self.end_id, self.pkeep = config, gpt, end_id, pkeep
        self.vit = vit
        self._vqgan = [vqgan]  # not registered: excluded from state_dict / optimizer
        self.train_vit = vit is not None and not config.freeze_vit
        if vit is not None:
            for p in vit.parameters():
                p.requires_grad_(self.train_vit)

    @property
    def vqgan(self):
        return self._vqgan[0]

    def _apply(self, fn, *a, **kw):
        if self.vqgan is not None:
            self.vqgan._apply(fn, *a, **kw)
        return super()._apply(fn, *a, **kw)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vit is not None and not self.train_vit:
            self.vit.eval()
        return self

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        c = self.config
        pv = normalize_pixels(batch["pixels"], c)
        text = batch["text_ids"]                                   # [B, T] ids + end padding
        inp = text[:, :-1]
        if self.training and self.pkeep < 1.0:
            keep = torch.rand(inp.shape, device=inp.device) < self.pkeep
            inp = torch.where(keep, inp, torch.randint_like(inp, c.text_vocab_size))
        P = c.prefix_len
        if c.prefix_encoder == "vqgan":
            with torch.no_grad():
                ids = vq_prefix_ids(self.vqgan, c, pv)
            logits = self.gpt(torch.cat([ids, inp], dim=1), logits_start=P - 1)
        else:
            with contextlib.nullcontext() if self.train_vit else torch.no_grad():
                feats = vit_features(self.vit, c, pv)
            logits = self.gpt(inp, feats, logits_start=P - 1)      # [B, T, text_vocab]
        nll = F.cross_entropy(logits.float().transpose(1, 2), text, reduction="none")  # [B, T]
        # tokens up to and including the first end token (the caption proper)
        is_end = (text == self.end_id).int()
        in_caption = (is_end.cumsum(1) - is_end) == 0
        caption_loss = (nll * in_caption).sum() / in_caption.sum().clamp(min=1)
        acc = ((logits.argmax(-1) == text) & in_caption).sum().float() / in_caption.sum().clamp(min=1)
        return {"loss": nll.mean(), "caption_loss": caption_loss.detach(), "token_acc": acc.detach()}


def _tables(args) -> list[str]:
    return [t for t in (args.tables or "").split(",") if t.strip()]


def _columns(args) -> tuple[str, str]:
    """(image column, text column): EasyNLP's I2T/V2T first_sequence = image(s), second_sequence = text."""
    return args.first_sequence or "imgbase64", args.second_sequence or "text"


def make_transform(config: CaptionerConfig, tokenizer: TextTokenizer | None, source, image_col: str,
                   text_col: str | None, udp: dict, strict: bool = False, seed: int = 0):
    """Row → {"pixels": uint8 [(F,) S, S, 3], "text_ids": [text_len]} (text omitted when ``text_col`` is None).

    Several references in one text field (JSON list or ``a || b``) → one of them, chosen by (seed, epoch, row)."""
    from ..metrics.captions import split_references

    root = udp.get("img_root_dir") if udp.get("enable_img_path") else None
    if udp.get("enable_img_path") and not root:
        raise TuwenError("enable_img_path=true needs img_root_dir=/folder/with/the/images")

    def transform(row: dict, index: int, epoch: int = 0) -> dict:
        field = row[image_col]
        if config.video:
            frames = frames_of(field, root)
            where = "{}:{}".format(*source.location(index))
            frames = fit_frames(frames, config.frame_num, where=where, strict=strict)
            pixels = np.stack([load_pixels(f, config.img_size, config.image_resize, root) for f in frames])
        else:
            pixels = load_pixels(field, config.img_size, config.image_resize, root)
        out = {"pixels": torch.from_numpy(pixels)}
        if text_col is not None:
            refs = split_references(row.get(text_col, ""))
            if not refs:
                raise ValueError(f"empty caption in column {text_col!r}")
            text = refs[0] if len(refs) == 1 else random.Random(f"{seed}-{epoch}-{index}").choice(refs)
            ids = tokenizer.encode(text, config.text_len, pad=True)
            if all(i == tokenizer.pad_id for i in ids):
                raise ValueError(f"caption {text[:40]!r} has no tokens")
            out["text_ids"] = torch.tensor(ids, dtype=torch.long)
        return out

    return transform


class CaptionTask(Task):
    """Training of a captioner on EasyNLP TSV tables (see ``run_easynlp``)."""

    name = "captioning"
    betas = (0.9, 0.95)  # minGPT

    def __init__(self, args, udp: dict, video: bool, vq: bool, log=_log):
        self.args, self.udp, self.log = args, udp, log
        tables = _tables(args)
        if not tables:
            raise TuwenError("--tables is required for training (train table, then the validation table)")
        self.train_tables, self.val_tables = (tables[:-1], tables[-1:]) if len(tables) > 1 else (tables, [])
        self.image_col, self.text_col = _columns(args)
        pre = udp["pretrain_model_name_or_path"]
        kind, path = resolve_pretrained(pre) if pre else (None, None)
        self.vit = self.vqgan = self.base = None
        if kind == "model":
            self._init_finetune(path, video, vq)
        else:
            self._init_scratch(path, video, vq)
        c = self.config
        if udp["block_size"] and udp["block_size"] != c.block_size:
            raise TuwenError(f"block_size={udp['block_size']} but text_len ({c.text_len}) + img_len ({c.img_len}) = "
                             f"{c.block_size}")
        seq = getattr(args, "sequence_length", None)
        if seq and seq != c.block_size:
            raise TuwenError(f"--sequence_length={seq} does not fit the model: text_len ({c.text_len}) + img_len "
                             f"({c.img_len}) = {c.block_size}. Pass --sequence_length={c.block_size} or change "
                             f"text_len/img_len in --user_defined_parameters")

    # -------------------------------------------------------------- model setup
    def _init_finetune(self, path: Path, video: bool, vq: bool) -> None:
        udp = self.udp
        over = {}
        if udp["freeze_vit"] is not None:
            over["freeze_vit"] = udp["freeze_vit"]
        mt = _read_json(path / CONFIG_NAME).get("model_type")
        if mt in EASYNLP_MODEL_TYPES:
            over.update({k: udp[k] for k in ("text_len", "img_size") if udp[k] is not None})
            if video:
                over["frame_num"] = udp["frame_num"] or 3
            if udp["vqgan_ckpt_path"]:
                over["vqgan_path"] = udp["vqgan_ckpt_path"]
            if udp["vqgan_config"]:
                over["vqgan_config"] = udp["vqgan_config"]
        self.base = Captioner.from_pretrained(path, **over)
        c = self.base.config
        check_udp_against_config(udp, c, video, vq, what=f"the pretrained model {path}")
        self.config, self.tokenizer = c, self.base.tokenizer
        self.vit, self.vqgan = self.base.vit, self.base.vqgan
        self.log(f"finetuning the captioner {path} ({c.prefix_encoder} prefix, "
                 f"{'video, %d frames' % c.frame_num if c.video else 'images'}; image tower "
                 f"{'frozen' if c.freeze_vit or c.prefix_encoder == 'vqgan' else 'trained'})")

    def _init_scratch(self, tok_path: Path | None, video: bool, vq: bool) -> None:
        udp = self.udp
        if tok_path is not None:
            self.tokenizer = TextTokenizer.from_pretrained(tok_path)
            self.log(f"tokenizer: {tok_path} ({self.tokenizer.vocab_size} ids)")
        else:
            self.tokenizer = TextTokenizer.train(self._texts(self.train_tables), vocab_size=udp["vocab_size"])
            self.log(f"tokenizer: built a {self.tokenizer.vocab_size}-entry WordPiece vocabulary from the training "
                     f"texts (saved with the model as vocab.txt)")
        text_vocab = udp["text_vocab_size"] or self.tokenizer.vocab_size
        if text_vocab < self.tokenizer.vocab_size:
            raise TuwenError(f"text_vocab_size={text_vocab} is smaller than the vocabulary "
                             f"({self.tokenizer.vocab_size})")
        if udp["gpt_preset"]:
            from ..models.gpt import PRESETS
            if udp["gpt_preset"] not in PRESETS:
                raise TuwenError(f"gpt_preset={udp['gpt_preset']!r}: choose one of {', '.join(PRESETS)}")
            nl, nh, ne = PRESETS[udp["gpt_preset"]]
        else:
            nl, nh, ne = 12, 12, 768
        nl, nh, ne = udp["n_layer"] or nl, udp["n_head"] or nh, udp["n_embd"] or ne
        drop = udp["dropout"] or 0.0
        text_len = udp["text_len"] or 32
        frame_num = (udp["frame_num"] or 3) if video else 0
        common = dict(text_len=text_len, text_vocab_size=text_vocab, n_layer=nl, n_head=nh, n_embd=ne,
                      embd_pdrop=drop, resid_pdrop=drop, attn_pdrop=drop)
        if vq:
            if not udp["vqgan_ckpt_path"]:
                raise TuwenError("the VQ prefix from scratch needs vqgan_ckpt_path=... (a tuwen VQGAN folder, a taming "
                                 ".ckpt or EasyNLP's vqgan_f16_16384.bin) in --user_defined_parameters")
            from ..convert.taming import load_vqgan
            self.vqgan = load_vqgan(udp["vqgan_ckpt_path"], config=udp["vqgan_config"])
            size = udp["img_size"] or self.vqgan.config.resolution
            h, w = self.vqgan.grid_size(size)
            if udp["img_len"] and udp["img_len"] != h * w:
                raise TuwenError(f"img_len={udp['img_len']} but the VQGAN gives {h}×{w}={h * w} codes for "
                                 f"img_size={size}")
            if udp["img_vocab_size"] and udp["img_vocab_size"] != self.vqgan.config.n_embed:
                raise TuwenError(f"img_vocab_size={udp['img_vocab_size']} but the VQGAN has "
                                 f"{self.vqgan.config.n_embed} codes")
            self.config = CaptionerConfig(prefix_encoder="vqgan", img_len=h * w, img_size=size,
                                          img_vocab_size=self.vqgan.config.n_embed, vit=None, **common)
            self.log(f"image encoder: the frozen VQGAN {udp['vqgan_ckpt_path']} ({h}×{w} codes of "
                     f"{self.vqgan.config.n_embed})")
            return
        if udp["vit_ckpt_path"]:
            self.vit, desc, mean, std = load_image_tower(udp["vit_ckpt_path"], udp["img_size"])
            freeze = True if udp["freeze_vit"] is None else udp["freeze_vit"]
            self.log(f"image encoder: {desc} ({'frozen' if freeze else 'trained'})")
        else:
            preset = udp["vit_preset"] or "small"
            self.vit = VisionTransformer(ViTConfig.preset(preset, image_size=udp["img_size"]))
            mean, std = list(CLIP_MEAN), list(CLIP_STD)
            freeze = False if udp["freeze_vit"] is None else udp["freeze_vit"]
            self.log(f"image encoder: ViT preset {preset!r} from scratch (random init, "
                     f"{'frozen: its features stay random!' if freeze else 'trained'}); pass vit_ckpt_path= for "
                     f"OpenAI CLIP weights or a tuwen CLIP folder")
        v = self.vit.config
        img_len = udp["img_len"] or (frame_num if video else v.num_patches)
        if not video and img_len != v.num_patches:
            raise TuwenError(f"img_len={img_len} but the image tower cuts {v.image_size}px images into "
                             f"({v.image_size}/{v.patch_size})² = {v.num_patches} patches; set img_len={v.num_patches}")
        if udp["img_size"] and udp["img_size"] != v.image_size:
            raise TuwenError(f"img_size={udp['img_size']} but the image tower takes {v.image_size}px images")
        self.config = CaptionerConfig(prefix_encoder="vit", frame_num=frame_num, img_len=img_len,
                                      img_size=v.image_size, vit=v.to_dict(), vit_proj=ne != v.width,
                                      freeze_vit=freeze, image_mean=mean, image_std=std, **common)

    def _texts(self, tables: list[str]):
        from ..data.tables import BadRow, open_source
        from ..metrics.captions import split_references
        src = open_source(tables, self.args.input_schema, self.args.skip_first_line, text_col=self.text_col,
                          image_col=self.image_col)
        if self.text_col not in src.columns:
            raise TuwenError(f"--second_sequence={self.text_col!r} is not a column of --input_schema "
                             f"({', '.join(src.columns)})")
        for i in range(len(src)):
            r = src.row(i)
            if not isinstance(r, BadRow) and r.get(self.text_col):
                yield from split_references(r[self.text_col])

    # -------------------------------------------------------------- data
    def _dataset(self, tables: list[str]):
        from ..data.tables import RowDataset, open_source
        src = open_source(tables, self.args.input_schema, self.args.skip_first_line, text_col=self.text_col,
                          image_col=self.image_col)
        for col, flag in ((self.image_col, "--first_sequence"), (self.text_col, "--second_sequence")):
            if col not in src.columns:
                raise TuwenError(f"{flag}={col!r} is not a column of --input_schema ({', '.join(src.columns)})")
        return RowDataset(src, make_transform(self.config, self.tokenizer, src, self.image_col, self.text_col,
                                              self.udp, self.args.strict, self.args.random_seed))

    def train_dataset(self):
        return self._dataset(self.train_tables)

    def val_dataset(self):
        return self._dataset(self.val_tables) if self.val_tables else None

    def build_module(self) -> nn.Module:
        c = self.config
        gpt = GPT(c.gpt_config())
        if self.base is not None:
            gpt.load_state_dict(self.base.gpt.state_dict())
        return CaptionTrainModule(c, gpt, self.vit, self.vqgan, self.tokenizer.pad_id, self.udp["pkeep"])

    def param_groups(self, module, weight_decay):
        groups = module.gpt.configure_param_groups(weight_decay)
        if module.vit is not None and module.train_vit:
            vit_groups = Task.param_groups(self, module.vit, weight_decay)
            groups = groups + vit_groups
        return groups

    def save_model(self, module, out_dir):
        Captioner(self.config, self.tokenizer, vit=module.vit, vqgan=module.vqgan, gpt=module.gpt) \
            .save_pretrained(out_dir)

    def describe(self):
        return {"task": self.name, "config": self.config.to_dict(), "tables": self.args.tables,
                "finetune_from": self.udp["pretrain_model_name_or_path"]}


def check_udp_against_config(udp: dict, c: CaptionerConfig, video: bool, vq: bool, what: str = "the model") -> None:
    """EasyNLP passes the size keys again at predict time: they must describe the model."""
    checks = (("text_len", c.text_len), ("img_len", c.img_len), ("img_size", c.img_size),
              ("block_size", c.block_size))
    for k, v in checks:
        if udp.get(k) is not None and udp[k] != v:
            raise TuwenError(f"--user_defined_parameters {k}={udp[k]} does not match {what} ({k}={v})")
    if udp.get("frame_num") is not None and c.video and udp["frame_num"] != c.frame_num:
        raise TuwenError(f"--user_defined_parameters frame_num={udp['frame_num']} does not match {what}, which was "
                         f"trained on {c.frame_num} frames")
    if video and not c.video:
        raise TuwenError(f"--app_name=video2text_generation but {what} is a still-image captioner; use "
                         f"--app_name=image2text_generation")
    if not video and c.video:
        raise TuwenError(f"--app_name=image2text_generation but {what} is a video captioner (frame_num="
                         f"{c.frame_num}); use --app_name=video2text_generation")
    if vq and c.prefix_encoder != "vqgan":
        raise TuwenError(f"enable_vqgan / image2text_generation_vqgan but {what} has a ViT prefix")


# =============================================================================================== commands

def _device_flag(device: str | None, udp: dict) -> str:
    """--device, or EasyNLP's ``device=`` key when --device is auto."""
    device = device or "auto"
    if device == "auto" and udp.get("device"):
        device = udp["device"]
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TuwenError(f"--user_defined_parameters device={device}: no CUDA device here; drop it or use cpu")
    return device


def load_for_inference(path: str, udp: dict, video: bool | None = None, device: str = "auto",
                       vq: bool = False) -> Captioner:
    """Load a captioner for predict/evaluate/pipelines: EasyNLP folders get their sizes from ``udp``; tuwen folders
    are checked against them."""
    from ..runtime import init_distributed
    dev = init_distributed(_device_flag(device, udp))
    p = resolve_model_path(path, what="captioner")
    raw = _read_json(p / CONFIG_NAME) if p.is_dir() else {}
    over = _decode_kwargs(udp)
    if raw.get("model_type") in EASYNLP_MODEL_TYPES:
        over.update({k: udp[k] for k in ("text_len", "img_size") if udp.get(k) is not None})
        if video:
            over["frame_num"] = udp.get("frame_num") or 3
        if udp.get("vqgan_ckpt_path"):
            over["vqgan_path"] = udp["vqgan_ckpt_path"]
        if udp.get("vqgan_config"):
            over["vqgan_config"] = udp["vqgan_config"]
    model = Captioner.from_pretrained(p, **over)
    if video is not None:
        check_udp_against_config(udp, model.config, video, vq)
    return model.to(dev).eval()


def _row_pixels(model: Captioner, rows: list[dict], image_col: str, udp: dict, source, indices, strict: bool):
    """Decode the image field of each row → (uint8 tensor [n, (F,) S, S, 3], list of row positions that worked,
    {position: exception})."""
    transform = make_transform(model.config, None, source, image_col, None, udp, strict)
    arrs, ok, errors = [], [], {}
    for j, (r, i) in enumerate(zip(rows, indices)):
        try:
            arrs.append(transform(r, i)["pixels"])
            ok.append(j)
        except (ValueError, KeyError, OSError) as e:
            errors[j] = ValueError(str(e) if not isinstance(e, KeyError) else f"missing column {e}")
    return (torch.stack(arrs) if arrs else None), ok, errors


def run_predict(args, udp: dict, video: bool, vq: bool) -> int:
    from ..data.tables import open_source
    from ..cli.predict import parse_columns, run_predict as _run

    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=predict (the captioner folder)")
    if not args.tables:
        raise TuwenError("--tables is required for --mode=predict (the input TSV)")
    model = load_for_inference(args.checkpoint_dir, udp, video, args.device, vq)
    n = udp["max_generated_num"]
    if n < 1:
        raise TuwenError("max_generated_num must be >= 1")
    image_col = args.first_sequence or "imgbase64"
    schema = args.input_schema or "idx:str:1,imgbase64:str:1"
    src = open_source(_tables(args)[0], schema, args.skip_first_line, image_col=image_col)
    if image_col not in src.columns:
        raise TuwenError(f"--first_sequence={image_col!r} is not a column of --input_schema ({', '.join(src.columns)})")
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed

    def predict_batch(rows: list[dict], indices: list[int]) -> list:
        pixels, ok, errors = _row_pixels(model, rows, image_col, udp, src, indices, args.strict)
        results: list[Any] = [errors.get(j) for j in range(len(rows))]
        if pixels is not None:
            keys = [rows[j].get("idx", indices[j]) for j in ok]
            caps = model.generate(pixel_values=normalize_pixels(pixels.to(model.device), model.config),
                                  num_return_sequences=n, seed=seed, keys=keys)
            for j, key, group in zip(ok, keys, caps):
                results[j] = {"idx": key, "gen_text": group if n > 1 else group[0]}
        return results

    _run(src, predict_batch, args.outputs, parse_columns(args.output_schema, "--output_schema"),
         parse_columns(args.append_cols, "--append_cols"), batch_size=max(1, args.micro_batch_size),
         strict=args.strict, max_listed=args.max_bad_listed, desc=args.app)
    return 0


def evaluate_captions(model: Captioner, source, image_col: str, text_col: str, udp: dict, *, batch_size: int = 16,
                      seed: int = 0, strict: bool = False, limit: int | None = None, report=None,
                      progress: bool | None = None) -> dict:
    """Caption each image of ``source`` once and score against all its references.

    Rows that share an ``idx`` value are one image with several references (the first row's image is captioned);
    a text field may also hold several (JSON list or ``a || b``). Returns BLEU-1…4, CIDEr-D, ROUGE-L (+ METEOR where
    Java and pycocoevalcap are present), the synthetic-set attribute accuracy when every reference is a synthetic
    caption, and a few examples."""
    from tqdm import tqdm

    from ..data.tables import BadRow, BadRowError
    from ..metrics.captions import caption_metrics, split_references

    groups: dict[str, dict] = {}
    order: list[str] = []
    for i in range(len(source)):
        r = source.row(i)
        if isinstance(r, BadRow):
            if strict:
                raise BadRowError(f"{r} (--strict stops at the first bad row)")
            if report is not None:
                report.add(r)
            continue
        key = str(r.get("idx", i))
        if key not in groups:
            if limit is not None and len(order) >= limit:
                continue
            groups[key] = {"index": i, "refs": []}  # the row (with its image) is read again when captioned
            order.append(key)
        groups[key]["refs"] += split_references(r.get(text_col, ""))
    order = [k for k in order if groups[k]["refs"]]
    if not order:
        raise TuwenError(f"no rows with a reference caption in column {text_col!r}")
    preds, refs, keys = [], [], []
    bar = tqdm(total=len(order), desc="captioning", unit="img", disable=(progress is False) or None, file=sys.stderr)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        idx = [groups[k]["index"] for k in chunk]
        rows = [source.row(i) for i in idx]
        pixels, ok, errors = _row_pixels(model, rows, image_col, udp, source, idx, strict)
        for j, e in errors.items():
            bad = source.bad(idx[j], str(e))
            if strict:
                raise BadRowError(f"{bad} (--strict stops at the first bad row)")
            if report is not None:
                report.add(bad)
        if pixels is not None:
            caps = model.generate(pixel_values=normalize_pixels(pixels.to(model.device), model.config), seed=seed,
                                  keys=[chunk[j] for j in ok])
            for j, group in zip(ok, caps):
                preds.append(group[0])
                refs.append(groups[chunk[j]]["refs"])
                keys.append(chunk[j])
        bar.update(len(chunk))
    bar.close()
    if not preds:
        raise TuwenError("no image could be captioned (every row was bad)")
    out = caption_metrics(preds, refs)
    from ..data.synth import parse_caption
    if all(parse_caption(r[0]) is not None for r in refs):
        from ..data.checker import score_captions
        out["attributes"] = score_captions(preds, [r[0] for r in refs])
    out["examples"] = [{"idx": k, "gen_text": p, "references": r} for k, p, r in list(zip(keys, preds, refs))[:5]]
    return out


def run_evaluate(args, udp: dict, video: bool, vq: bool) -> int:
    from ..data.tables import BadRowReport, RowDataset, open_source
    from ..training.trainer import Trainer, TrainArgs

    if not args.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for --mode=evaluate (the captioner folder)")
    tables = _tables(args)
    if not tables:
        raise TuwenError("--tables is required for --mode=evaluate (a table with images and reference captions)")
    model = load_for_inference(args.checkpoint_dir, udp, video, args.device, vq)
    image_col, text_col = _columns(args)
    src = open_source(tables[-1], args.input_schema, args.skip_first_line, text_col=text_col, image_col=image_col)
    for col, flag in ((image_col, "--first_sequence"), (text_col, "--second_sequence")):
        if col not in src.columns:
            raise TuwenError(f"{flag}={col!r} is not a column of --input_schema ({', '.join(src.columns)})")
    # teacher-forced loss, as EasyNLP's evaluator
    ds = RowDataset(src, make_transform(model.config, model.tokenizer, src, image_col, text_col, udp, args.strict,
                                        args.random_seed))
    trainer = Trainer(TrainArgs(checkpoint_dir=args.checkpoint_dir, micro_batch_size=args.micro_batch_size,
                                device=args.device, num_workers=args.num_workers, strict=args.strict,
                                tensorboard=False), _EvalTask())
    module = CaptionTrainModule(model.config, model.gpt, model.vit, model.vqgan, model.end_id).to(trainer.device)
    trainer._tb = None
    loss = trainer.evaluate(module, ds)
    report = BadRowReport(args.max_bad_listed)
    seed = udp["seed"] if udp["seed"] is not None else args.random_seed
    metrics = evaluate_captions(model, src, image_col, text_col, udp, batch_size=max(1, args.micro_batch_size),
                                seed=seed, strict=args.strict, limit=udp["eval_num"], report=report)
    result = {"eval_loss": loss.get("loss"), "caption_loss": loss.get("caption_loss"),
              "token_acc": loss.get("token_acc"), **metrics}
    bad = max(trainer.report.count, report.count)
    if bad:
        print((trainer.report if trainer.report.count >= report.count else report).summary(total=len(src)),
              file=sys.stderr)
        result["bad_rows"] = bad
    if args.metric and args.metric != "attributes":
        raise TuwenError(f"--metric {args.metric!r}: captioning reports loss, BLEU, CIDEr-D, ROUGE-L and (synthetic "
                         f"set) attributes; --metric attributes requires the latter")
    if args.metric == "attributes" and "attributes" not in result:
        raise TuwenError("--metric attributes: the references are not synthetic-set captions")
    text = json.dumps(result, ensure_ascii=False, indent=2)
    print(text)
    if args.outputs:
        atomic_write_text(args.outputs, text + "\n")
    return 0


class _EvalTask(Task):
    name = "captioning-eval"


def run_easynlp(args) -> int:
    udp = parse_udp(args)
    app = args.app_name
    video = args.app == "video2text_generation"
    vq = "vqgan" in app[len(args.app):] or bool(udp["enable_vqgan"])
    if vq and udp["enable_vit"]:
        raise TuwenError("enable_vit and enable_vqgan are both set; choose one image prefix")
    if vq and video:
        raise TuwenError("video2text_generation has no VQGAN prefix (EasyNLP neither); drop enable_vqgan")
    if not video and udp["frame_num"] is not None:
        raise TuwenError("frame_num is a video2text_generation setting; for still images drop it")
    if args.mode == "train":
        from ..cli.common import train_args_from
        from ..training.trainer import Trainer
        args.device = _device_flag(args.device, udp)
        targs = train_args_from(args, default_lr=4e-5, default_wd=0.01)
        if not udp["do_eval"]:
            targs.do_eval = False
        task = CaptionTask(args, udp, video, vq)
        result = Trainer(targs, task).train()
        _log(f"captioner saved to {targs.checkpoint_dir} (step {result['step']}, best val loss {result['best']})")
        return 0
    if args.mode == "predict":
        return run_predict(args, udp, video, vq)
    return run_evaluate(args, udp, video, vq)


# =============================================================================================== pipeline

class CaptionPipeline:
    """``tuwen.pipeline("image2text_generation" | "video2text_generation", model_path=..., **udp)``.

    Callable on one input or a list (base64 strings, PIL images, paths, bytes; for video each input is a list of
    frames — a flat list of frames is one video) → one ``{"gen_text": [captions…]}`` per input. Keyword arguments
    are ``USER_PARAMS`` (``max_generated_num``, ``num_beams``, ``top_k``, ``seed``, ...; typed, unknown keys are an
    error); calls may override them.
    """

    def __init__(self, task: str, model_path: str, device: str = "auto", **udp: Any):
        if task not in APPS:
            raise TuwenError(f"CaptionPipeline: task must be one of {', '.join(APPS)}, got {task!r}")
        self.task = task
        self.udp = typed_kwargs(udp, USER_PARAMS, task)
        self.model = load_for_inference(str(model_path), self.udp, task == "video2text_generation", device)

    def __call__(self, inputs, **overrides: Any) -> list[dict]:
        udp = dict(self.udp)
        if overrides:
            typed = typed_kwargs(overrides, USER_PARAMS, self.task)
            udp.update({k: typed[k] for k in overrides})
        root = udp["img_root_dir"] if udp["enable_img_path"] else None
        items = self.model._as_items(inputs)
        if not items:
            return []
        seed = udp["seed"] if udp["seed"] is not None else 0
        caps = self.model.generate(items, num_return_sequences=udp["max_generated_num"], seed=seed, root=root,
                                   **_decode_kwargs(udp))
        return [{"gen_text": g} for g in caps]
