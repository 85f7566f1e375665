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
caption is its ids followed by [PAD]s. Training (``tuwen.training.tasks.captioning``): cross-entropy up to and
including the first end token (``loss_on_padding=true``: over all ``text_len`` positions, EasyNLP's definition).

Model folders (``save_pretrained``): ``config.json`` (model_type ``captioner``; ``gpt``, ``vit`` and ``sampling``
nested), ``model.safetensors`` (``vit.*`` + ``gpt.*``), ``vocab.txt`` + ``tokenizer_config.json``, ``vqgan/`` for
the VQ prefix. Format-1 folders (flat ``n_layer`` / ``num_beams`` / ``img_size`` keys) load through
``CaptionerConfig.upgrade``. EasyNLP ``mingpt_i2t`` / ``artist_i2t`` folders (``pytorch_model.bin`` with
``first_stage_model.*`` + ``transformer.*``) load as they are (``tuwen.convert.easynlp_i2t`` reads the pieces).

Decoding (``Captioner.generate``): greedy (``top_k=1``, the default), sampling (top-k / top-p / temperature, one
seed per (input, k) so a caption does not depend on the batch), beam search (``num_beams``, ``length_penalty``,
``no_repeat_ngram_size``); ``num_return_sequences`` captions per input (EasyNLP ``max_generated_num``; with greedy
decoding and more than one caption the N best beams are returned). Rows stop at their own end token; KV cache
throughout. ``Captioner.log_likelihood`` is CogView's caption score ``sum log p(text | image)``.

Video rows with fewer frames than ``frame_num`` are padded by repeating the last frame (with a warning; rejected
under ``--strict``); rows with more keep the **first** ``frame_num`` frames (as EasyNLP).

Commands: ``tuwen --mode=train|predict|evaluate --app_name=image2text_generation|video2text_generation``
(``tuwen.cli.easynlp.captioning``), ``tuwen caption IMAGE… --model DIR``, ``CaptionPipeline`` (``tuwen.pipeline``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .. import sampling
from ..config import BaseConfig
from ..convert import easynlp_i2t
from ..convert.clip import load_openai_vit, load_visual_into
from ..data.images import CLIP_MEAN, CLIP_STD, ImageProcessor, fit_frames, frames_of, is_dir
from ..errors import TuwenError
from ..hub import (CONFIG_NAME, PretrainedModel, load_state_dict_checked, load_weights, read_model_type,
                   resolve_model_path)
from ..runtime import amp_dtype, autocast
from ..sampling import SamplingParams
from ..text.tokenizer import TextTokenizer
from .gpt import GPT, GPTConfig
from .vit import ViTConfig, VisionTransformer

MODEL_TYPE = "captioner"
EASYNLP_MODEL_TYPES = easynlp_i2t.MODEL_TYPES          # ("mingpt_i2t", "artist_i2t")
SAMPLING_KEYS = ("num_beams", "top_k", "top_p", "temperature", "length_penalty", "no_repeat_ngram_size")
GPT_SIZE_KEYS = ("n_layer", "n_head", "n_embd", "embd_pdrop", "resid_pdrop", "attn_pdrop")


# =============================================================================================== config

def _greedy() -> SamplingParams:
    return SamplingParams(top_k=1)   # 1 = greedy; EasyNLP samples with top_k=100, temperature=1


def _gpt_shape(prefix_encoder: str, text_len: int, img_len: int, text_vocab_size: int, img_vocab_size: int,
               n_embd: int, vocab_size: int = 0, feature_dim: int = 0) -> dict:
    """The GPT fields that follow from the captioner's: input rows (``vocab_size`` 0 = text ids for the ViT prefix,
    text + image + 1 for the VQ prefix as EasyNLP), positions, head outputs, prefix projection width."""
    if not vocab_size:
        vocab_size = text_vocab_size + img_vocab_size + 1 if prefix_encoder == "vqgan" else text_vocab_size
    n_prefix = feature_dim if prefix_encoder == "vit" and feature_dim != n_embd else 0
    return dict(vocab_size=vocab_size, block_size=text_len + img_len, n_out=text_vocab_size, n_prefix_embd=n_prefix)


@dataclasses.dataclass
class CaptionerConfig(BaseConfig):
    """Architecture + decoding defaults of a captioner. See the module docstring for the two prefixes.

    ``gpt`` is the whole GPT config; its ``vocab_size`` / ``block_size`` / ``n_out`` / ``n_prefix_embd`` follow
    from the fields here (``build`` fills them in; ``validate`` checks them).
    """

    model_type: ClassVar[str] = MODEL_TYPE

    gpt: GPTConfig
    prefix_encoder: str = "vit"      # "vit" (continuous features) | "vqgan" (image codes as tokens)
    frame_num: int = 0               # 0: still images; N >= 1: video, one vector per frame (ViT prefix)
    text_len: int = 32               # caption positions (EasyNLP text_len)
    img_len: int = 256               # prefix positions reserved: ViT grid², VQGAN codes, video >= frame_num
    image_size: int = 224            # pixels a side
    img_vocab_size: int = 0          # VQGAN codebook size (VQ prefix)
    vit: ViTConfig | None = None     # the image tower (ViT prefix)
    vit_proj: bool = True            # apply the tower's proj (EasyNLP sets it to None when n_embd == width)
    freeze_vit: bool = True          # training: keep the image tower fixed
    image_mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))
    image_resize: str = "center_crop"  # PIL inputs: center_crop (OpenAI/taming) | squash (albumentations Resize)
    sampling: SamplingParams = dataclasses.field(default_factory=_greedy)   # decoding defaults (per call overridable)

    def __post_init__(self):
        self.validate()

    @classmethod
    def build(cls, *, text_vocab_size: int = 21128, vocab_size: int = 0, n_layer: int = 12, n_head: int = 12,
              n_embd: int = 768, embd_pdrop: float = 0.0, resid_pdrop: float = 0.0, attn_pdrop: float = 0.0,
              **fields) -> "CaptionerConfig":
        """A config from the captioner fields and the GPT's sizes; the rest of ``gpt`` follows from them.
        ``vit`` may be a ViTConfig or its dict; ``vocab_size`` 0 = the prefix's rule (see ``_gpt_shape``)."""
        if isinstance(fields.get("vit"), dict):
            fields["vit"] = ViTConfig.from_dict(fields["vit"], source="captioner config: vit")
        f = {k.name: k.default for k in dataclasses.fields(cls) if k.default is not dataclasses.MISSING}
        f.update(fields)
        vit = f["vit"]
        feat = (vit.output_dim if f["vit_proj"] else vit.width) if vit is not None else 0
        gpt = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, embd_pdrop=embd_pdrop,
                        resid_pdrop=resid_pdrop, attn_pdrop=attn_pdrop,
                        **_gpt_shape(f["prefix_encoder"], f["text_len"], f["img_len"], text_vocab_size,
                                     f["img_vocab_size"], n_embd, vocab_size, feat))
        return cls(gpt=gpt, **fields)

    @classmethod
    def upgrade(cls, d: dict, version: int, source: str) -> dict:
        """Format 1 (flat): ``n_layer`` … ``attn_pdrop`` + ``vocab_size`` / ``text_vocab_size`` → ``gpt``; the six
        decoding keys → ``sampling``; ``img_size`` → ``image_size``; ``vit`` stays (a ViTConfig dict)."""
        if version >= 2:
            return d
        d = dict(d)
        sizes = {k: d.pop(k) for k in GPT_SIZE_KEYS if k in d}
        samp = {k: d.pop(k) for k in SAMPLING_KEYS if k in d}
        samp.setdefault("top_k", 1)                       # format 1's default
        text_vocab, vocab = int(d.pop("text_vocab_size", 21128)), int(d.pop("vocab_size", 0) or 0)
        if "img_size" in d:
            d["image_size"] = d.pop("img_size")
        vit = d.get("vit") or None
        feat = int(vit["output_dim"] if d.get("vit_proj", True) else vit["width"]) if vit else 0
        n_embd = int(sizes.get("n_embd", 768))
        d["gpt"] = {**sizes, **_gpt_shape(d.get("prefix_encoder", "vit"), int(d.get("text_len", 32)),
                                          int(d.get("img_len", 256)), text_vocab, int(d.get("img_vocab_size", 0)),
                                          n_embd, vocab, feat)}
        d["sampling"] = samp
        return d

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
    def text_vocab_size(self) -> int:
        """Tokenizer ids = GPT head outputs."""
        return self.gpt.n_out

    @property
    def input_vocab_size(self) -> int:
        return self.gpt.vocab_size

    @property
    def feature_dim(self) -> int:
        """Width of the ViT features handed to the GPT (before its prefix_proj)."""
        return self.vit.output_dim if self.vit_proj else self.vit.width

    def image_processor(self) -> ImageProcessor:
        """uint8 pixels → the prefix encoder's input: CLIP-normalised (ViT) or in [-1, 1] (VQGAN)."""
        return ImageProcessor(self.image_size, self.image_resize, tuple(self.image_mean), tuple(self.image_std),
                              "-1,1" if self.prefix_encoder == "vqgan" else "0,1")

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"captioner config: {msg}")
        if self.prefix_encoder not in ("vit", "vqgan"):
            bad(f"prefix_encoder must be 'vit' or 'vqgan', got {self.prefix_encoder!r}")
        for k in ("text_len", "img_len", "image_size"):
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
            if self.vit is None:
                bad("the ViT prefix needs the image tower's architecture (vit)")
            v = self.vit
            if v.image_size != self.image_size:
                bad(f"image_size ({self.image_size}) differs from the image tower's image_size ({v.image_size})")
            if not self.video and v.num_patches != self.img_len:
                bad(f"img_len ({self.img_len}) must equal the ViT patch count (image_size/patch_size)² = "
                    f"({self.image_size}/{v.patch_size})² = {v.num_patches}")
        g = self.gpt
        if g.block_size != self.block_size:
            bad(f"gpt.block_size ({g.block_size}) must be text_len + img_len = {self.block_size}")
        if g.vocab_size < g.n_out + (self.img_vocab_size if self.prefix_encoder == "vqgan" else 0):
            bad(f"gpt.vocab_size {g.vocab_size} is smaller than the text (+ image) ids it must hold")
        want = self.feature_dim if self.prefix_encoder == "vit" and self.feature_dim != g.n_embd else 0
        if g.n_prefix_embd != want:
            bad(f"gpt.n_prefix_embd is {g.n_prefix_embd}, the image features need {want}")
        if self.image_resize not in ("center_crop", "squash"):
            bad(f"image_resize must be center_crop or squash, got {self.image_resize!r}")


def caption_seed(seed: int, key: Any, k: int) -> int:
    """The sampling seed of caption ``k`` of input ``key`` (an index or an ``idx`` string): batch independent."""
    h = hashlib.blake2b(f"caption|{int(seed)}|{key}|{int(k)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


# =============================================================================================== prefix math

def normalize_pixels(pixels: torch.Tensor, config: CaptionerConfig) -> torch.Tensor:
    """uint8 [..., H, W, 3] → float32 [..., 3, H, W]: CLIP-normalised (ViT) or in [-1, 1] (VQGAN)."""
    return config.image_processor().normalize(pixels)


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


# =============================================================================================== model

class Captioner(PretrainedModel):
    """Image prefix (ViT or VQGAN) + GPT + WordPiece tokenizer. See the module docstring."""

    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig, tokenizer: TextTokenizer | None = None,
                 vit: VisionTransformer | None = None, vqgan=None, gpt: GPT | None = None):
        super().__init__(config)
        self.gpt = gpt if gpt is not None else GPT(config.gpt)
        self.vit = None
        self.vqgan = None
        self.tokenizer = None
        if config.prefix_encoder == "vit":
            if vit is None:
                vit = VisionTransformer(config.vit)
            self.vit = vit
            if vit.config != config.vit:
                raise TuwenError("captioner: the image tower's architecture differs from config.vit")
            if config.freeze_vit:
                for p in self.vit.parameters():
                    p.requires_grad_(False)
        elif vqgan is not None:
            self.set_vqgan(vqgan)
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_vqgan(self, vqgan) -> None:
        """Attach the (frozen) VQGAN of a VQ-prefix captioner; its weights live in ``vqgan/``, not the state dict
        that ``save_pretrained`` writes."""
        c = self.config
        h, w = vqgan.grid_size(c.image_size)
        if h * w != c.img_len:
            raise TuwenError(f"captioner: img_len={c.img_len} but the VQGAN turns {c.image_size}px images "
                             f"into {h}×{w}={h * w} codes; set img_len={h * w}")
        if vqgan.config.n_embed != c.img_vocab_size:
            raise TuwenError(f"captioner: img_vocab_size={c.img_vocab_size} but the VQGAN has "
                             f"{vqgan.config.n_embed} codes")
        self.vqgan = vqgan.eval()
        for p in self.vqgan.parameters():
            p.requires_grad_(False)

    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        if tokenizer.vocab_size > self.config.text_vocab_size:
            raise TuwenError(f"captioner: the tokenizer has {tokenizer.vocab_size} ids but text_vocab_size is "
                             f"{self.config.text_vocab_size}; use the vocab.txt the model was trained with")
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_emb.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

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
        proc = c.image_processor()
        if torch.is_tensor(images):
            if images.dtype == torch.uint8:
                return proc.normalize(images.to(dev))
            return images.to(dev, torch.float32)
        items = self._as_items(images)
        arrs = []
        for i, x in enumerate(items):
            if c.video:
                frames = fit_frames(frames_of(x, root), c.frame_num, where=f"input {i}", strict=strict)
                arrs.append(np.stack([proc.load(f, root) for f in frames]))
            else:
                arrs.append(proc.load(x, root))
        if not arrs:
            raise TuwenError("captioner: no images given")
        return proc.normalize(torch.from_numpy(np.stack(arrs)).to(dev))

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
                                                              "," in str(first) or is_dir(Path(str(first))))
            if not many:
                return [images]
        return images

    def prefix_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"prefix_embeds": [B, P, D]}`` (ViT) or ``{"prefix_ids": [B, P]}`` (VQ): what the sampler takes."""
        if self.config.prefix_encoder == "vqgan":
            if self.vqgan is None:
                raise TuwenError("captioner: the VQ prefix needs a VQGAN (Captioner(..., vqgan=...))")
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

    def _prefix_for_sampling(self, pixel_values: torch.Tensor, amp) -> dict[str, torch.Tensor]:
        with autocast(self.device, amp):
            pre = self.prefix_inputs(pixel_values.to(self.device))
        return {k: (v.float() if v.is_floating_point() else v) for k, v in pre.items()}

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, images=None, *, pixel_values: torch.Tensor | None = None, num_return_sequences: int = 1,
                 seed: int = 0, keys: Sequence[Any] | None = None, return_ids: bool = False,
                 batch_size: int | None = None, root: str | None = None, **sampling_overrides):
        """Captions for ``images`` (see ``pixel_values``) or preprocessed ``pixel_values``.

        Returns one list of ``num_return_sequences`` captions per input, or with ``return_ids`` a LongTensor
        [B, R, text_len] of token ids (end-token padded). ``sampling_overrides``: fields of ``config.sampling``
        (``num_beams``, ``top_k``, ``top_p``, ``temperature``, ``length_penalty``, ``no_repeat_ngram_size``); one
        not passed keeps the config's value, ``top_k=None`` / ``top_p=None`` switch that filter off. Strategy: beam
        search when ``num_beams > 1`` (the R best beams; beams are raised to R if fewer); greedy when
        ``top_k == 1`` or ``temperature == 0`` (with R > 1: the R best of an R-beam search); sampling otherwise,
        caption k of input i seeded by ``caption_seed(seed, keys[i], k)``.
        """
        sp = self.config.sampling.replace(**sampling_overrides)
        R = int(num_return_sequences)
        if R < 1:
            raise TuwenError(f"num_return_sequences must be >= 1 (got {R})")
        if pixel_values is None:
            if images is None:
                raise TuwenError("generate: give images or pixel_values")
            pixel_values = self.pixel_values(images, root=root)
        pixel_values = pixel_values.to(self.device)
        B = pixel_values.shape[0]
        keys = list(keys) if keys is not None else list(range(B))
        if len(keys) != B:
            raise TuwenError(f"generate: {len(keys)} keys for {B} inputs")
        bs = batch_size or (64 if self.device.type == "cuda" else 16)
        chunks = [self._generate_chunk(pixel_values[s:s + bs], keys[s:s + bs], R, sp, seed) for s in range(0, B, bs)]
        ids = torch.cat(chunks).cpu()  # [B, R, text_len]
        if return_ids:
            return ids
        texts = self.decode(ids)
        return [texts[i * R:(i + 1) * R] for i in range(B)]

    def _generate_chunk(self, pv, keys, R: int, sp: SamplingParams, seed: int) -> torch.Tensor:
        amp = amp_dtype(self.device, self.gpt.tok_emb.weight.dtype)
        pre = self._prefix_for_sampling(pv, amp)
        B, T, end = pv.shape[0], self.config.text_len, self.end_id
        greedy = sp.top_k == 1 or sp.temperature == 0
        if sp.num_beams > 1 or (greedy and R > 1):
            ids, _ = sampling.beam_search(self.gpt, **pre, max_new_tokens=T, num_beams=max(sp.num_beams, R),
                                          eos_id=end, pad_id=end, length_penalty=sp.length_penalty,
                                          no_repeat_ngram_size=sp.no_repeat_ngram_size, num_return_sequences=R,
                                          amp_dtype=amp, early_stopping=False)  # HF's default: junk finished beams
            return ids  # [B, R, T]                                                # must not win
        if greedy:
            ids = sampling.generate(self.gpt, **pre, num_tokens=T, seeds=0, top_k=1, eos_id=end, pad_id=end,
                                    amp_dtype=amp)
            return ids[:, None].expand(B, R, T)
        pre = {k: v.repeat_interleave(R, dim=0) for k, v in pre.items()}
        seeds = torch.tensor([caption_seed(seed, key, k) for key in keys for k in range(R)], dtype=torch.long)
        ids = sampling.generate(self.gpt, **pre, num_tokens=T, seeds=seeds, top_k=sp.top_k, top_p=sp.top_p,
                                temperature=sp.temperature, eos_id=end, pad_id=end, amp_dtype=amp)
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
        bs = batch_size or (64 if self.device.type == "cuda" else 16)
        amp = amp_dtype(self.device, self.gpt.tok_emb.weight.dtype)
        out = []
        for s in range(0, N, bs):
            x = pv[s:s + bs] if pv is not None else self.pixel_values(items[s:s + bs])
            target = self.tokenize(texts[s:s + bs])                                    # [b, T]
            lengths = torch.tensor([len(self.tokenizer.encode(t, self.config.text_len)) for t in texts[s:s + bs]])
            if include_end:
                lengths = (lengths + 1).clamp(max=self.config.text_len)
            mask = torch.arange(target.shape[1])[None, :] < lengths[:, None]
            pre = self._prefix_for_sampling(x, amp)
            out.append(sampling.score_sequences(self.gpt, **pre, target_ids=target, target_mask=mask,
                                                amp_dtype=amp).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ I/O (hub.PretrainedModel hooks)
    def _weights_for_save(self) -> dict[str, torch.Tensor]:
        """``gpt.*`` + ``vit.*``; a VQGAN is saved in its own folder (``vqgan/``)."""
        sd = {f"gpt.{k}": v for k, v in self.gpt.state_dict().items()}
        if self.vit is not None:
            sd.update({f"vit.{k}": v for k, v in self.vit.state_dict().items()})
        return sd

    def _save_extra(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)
        if self.vqgan is not None:
            self.vqgan.save_pretrained(path / "vqgan")

    def _load_extra(self, path: Path) -> None:
        self.set_tokenizer(TextTokenizer.from_pretrained(path))
        if self.config.prefix_encoder == "vqgan":
            from ..convert.taming import load_vqgan
            self.set_vqgan(load_vqgan(path / "vqgan"))

    @classmethod
    def _read_config(cls, path: Path, **overrides) -> CaptionerConfig:
        """config.json (format 1 or 2) with the settable ``overrides`` applied: decoding defaults (``SAMPLING_KEYS``)
        and ``freeze_vit``; ``frame_num`` is checked, not changed."""
        frame_num = overrides.pop("frame_num", None)
        extra = sorted(set(overrides) - set(SAMPLING_KEYS) - {"freeze_vit"})
        if extra:
            raise TuwenError(f"{path}: cannot change {', '.join(extra)} of a trained tuwen captioner (fixed by its "
                             f"weights); settable: {', '.join(sorted(SAMPLING_KEYS + ('freeze_vit',)))}")
        config = super()._read_config(path)
        if "freeze_vit" in overrides:
            config = config.replace(freeze_vit=bool(overrides.pop("freeze_vit")))
        if overrides:
            config = config.replace(sampling=config.sampling.replace(**overrides))
        if frame_num is not None and frame_num != config.frame_num:
            what = f"a video model with frame_num={config.frame_num}" if config.video else "a still-image model"
            raise TuwenError(f"{path}: frame_num={frame_num} was asked but this is {what}")
        return config

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
        if not (path / CONFIG_NAME).is_file():
            raise TuwenError(f"{path}: not a model folder (no {CONFIG_NAME})")
        mt = read_model_type(path)
        if mt == MODEL_TYPE:
            return super().from_pretrained(path, device, **overrides)
        if mt not in EASYNLP_MODEL_TYPES:
            raise TuwenError(f"{path / CONFIG_NAME}: model_type {mt!r} is not a captioner (expected {MODEL_TYPE!r} "
                             f"or EasyNLP's {' / '.join(EASYNLP_MODEL_TYPES)})")
        model = cls._from_easynlp(path, **overrides).eval()
        if device is not None:
            model.to(device)
        return model

    @classmethod
    def _from_easynlp(cls, path: Path, frame_num: int = 0, text_len: int | None = None,
                      img_size: int | None = None, vqgan_path=None, vqgan_config=None, vit_heads: int | None = None,
                      freeze_vit: bool | None = None, **gen) -> "Captioner":
        unknown = sorted(set(gen) - set(SAMPLING_KEYS))
        if unknown:
            raise TuwenError(f"unknown setting(s) for an EasyNLP captioner: {', '.join(unknown)}")
        ck = easynlp_i2t.read_easynlp_i2t(path, frame_num=frame_num, text_len=text_len, image_size=img_size,
                                          vqgan_path=vqgan_path, vqgan_config=vqgan_config, vit_heads=vit_heads)
        fields = dict(ck.fields)
        if fields["prefix_encoder"] == "vit":
            fields["freeze_vit"] = True if freeze_vit is None else bool(freeze_vit)
        config = CaptionerConfig.build(**fields, sampling=_greedy().replace(**gen))
        model = cls(config, ck.tokenizer, vit=ck.vit, vqgan=ck.vqgan)
        load_state_dict_checked(model.gpt, ck.gpt_state_dict, f"{ck.weights} (transformer.*)")
        return model


# =============================================================================================== image towers

def load_image_tower(spec: str, image_size: int | None = None) -> tuple[VisionTransformer, str, list, list]:
    """``vit_ckpt_path`` → (tower, description for the log, image mean, image std). Reads OpenAI CLIP ``.pt``
    (TorchScript or state dict), Chinese-CLIP / HF CLIP weights, a bare ``visual`` state dict, or a tuwen CLIP
    folder (its ``visual.*``)."""
    path = easynlp_i2t.resolve_vit_path(spec)
    mt = read_model_type(path) if path.is_dir() else None
    if mt == "clip":
        from .clip import CLIPConfig
        ccfg = CLIPConfig.load(path / CONFIG_NAME)
        if not isinstance(ccfg.vision, ViTConfig):
            raise TuwenError(f"vit_ckpt_path={spec!r}: the CLIP model {path} has a ResNet image tower; the "
                             f"captioner's image prefix needs a ViT (patch tokens)")
        vcfg = ccfg.vision.replace(image_size=image_size) if image_size else ccfg.vision
        vit = VisionTransformer(vcfg)
        sd = load_weights(path)
        load_visual_into(vit, {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")},
                         f"{path} (visual.*)")
        return vit, f"the image tower of the tuwen CLIP model {path}", list(ccfg.image_mean), list(ccfg.image_std)
    if path.is_dir() and mt is not None:
        raise TuwenError(f"vit_ckpt_path={spec!r}: {path} holds a {mt!r} model, not a CLIP")
    vit = load_openai_vit(path, image_size=image_size)
    return vit, f"CLIP image-tower weights from {path}", list(CLIP_MEAN), list(CLIP_STD)
