"""Token super-resolution (CogView's recipe) for tuwen's own models: a low-resolution code grid (+ text) → the code
grid of the image at twice the size.

Sequence (one GPT, the text→image layout with the low-resolution codes as a second prefix)::

    [text ids + img_vocab_size  (text_len)] [low-res ids (low_len = low grid h·w)] [high-res codes (img_len)]

The low side is tokenized by the model's VQGAN (``low_vocab_size`` 0: CogView's recipe, one tokenizer for both
sizes; the low-res ids are image codes) or by a second tokenizer saved in ``low_vqgan/`` (``low_vocab_size`` = its
codebook size; its codes get their own ids after the text's, ``img_vocab_size + text_vocab_size + code``). A
second tokenizer lets each side use one that describes its size well — e.g. a 32 px model's own VQGAN below and
a 64 px VQGAN above, even with a different grid or downsampling factor.

Logit i of the last part predicts high-res code i (it sees the text, every low-res code and high-res codes 0…i-1).
Training pairs are made on the fly from each image: the image at ``image_size`` and its 2× smaller version
(bicubic with antialiasing, ``low_size = image_size / 2``), each tokenized by its frozen tokenizer
(``tuwen.training.tasks.superres``; ``--app_name=super_resolution``, ``low_vqgan_ckpt_path=`` for a second one).
The model folder is a text→image folder with model_type ``superres``, ``low_size`` / ``low_len`` /
``low_vocab_size`` in its config and ``low_vqgan/`` when there is a second tokenizer.

Use: ``SuperRes.from_pretrained(DIR).upscale(images, texts)``, ``tuwen upscale IMG --model DIR --text …``,
``tuwen generate … --super_resolution DIR`` (the generated images are upscaled).

With one tokenizer, it must describe images at ``low_size`` as well as at ``image_size``: a VQGAN trained only on
one scale may tokenize the half-size images poorly (the README's "CogView" section gives the measured figures).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..convert.taming import load_vqgan
from ..errors import TuwenError
from ..runtime import amp_dtype
from ..sampling import SamplingParams, generate as sample_codes
from ..text.tokenizer import TextTokenizer
from .gpt import GPT, GPTConfig
from .text2image import TextToImage, TextToImageConfig, image_seed
from .vqgan import VQGAN

__all__ = ["SuperRes", "SuperResConfig", "downsample", "sr_logits", "MODEL_TYPE"]

MODEL_TYPE = "superres"
#: default top_k of SR models (greedy): on the synthetic proof (README "Token super-resolution") top_k 1 kept more
#: objects than top_k 8, on generations (92.8 against 88.7 %) and on real renders (96.9 against 94.8 %)
SR_TOP_K = 1


def downsample(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] → [B, C, size, size] (bicubic, antialiased; the training pairs' low side)."""
    return F.interpolate(pixels.float(), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1, 1)


@dataclasses.dataclass
class SuperResConfig(TextToImageConfig):
    """A text→image config plus the low-resolution side: ``low_size`` px images → ``low_len`` codes, from the
    model's VQGAN (``low_vocab_size`` 0) or from a second tokenizer with ``low_vocab_size`` codes."""

    model_type: ClassVar[str] = MODEL_TYPE

    low_size: int = 32
    low_len: int = 16
    low_vocab_size: int = 0
    sampling: SamplingParams = dataclasses.field(default_factory=lambda: SamplingParams(top_k=SR_TOP_K))

    @property
    def low_offset(self) -> int:
        """What is added to a low-res code to make its GPT id (0 when both sides share the VQGAN)."""
        return self.img_vocab_size + self.text_vocab_size if self.low_vocab_size else 0

    def sized_gpt(self, **arch) -> GPTConfig:
        return GPTConfig(vocab_size=self.img_vocab_size + self.text_vocab_size + self.low_vocab_size,
                         block_size=self.text_len + self.low_len + self.img_len, n_out=self.img_vocab_size, **arch)

    def validate(self) -> None:
        if self.low_size < 1 or self.low_len < 1 or self.low_vocab_size < 0:
            raise TuwenError("superres config: low_size and low_len must be ≥ 1, low_vocab_size ≥ 0")
        g = self.gpt
        want_vocab = self.img_vocab_size + self.text_vocab_size + self.low_vocab_size
        if g.vocab_size != want_vocab:
            raise TuwenError(f"superres config: gpt.vocab_size={g.vocab_size} but img_vocab_size + text_vocab_size "
                             f"+ low_vocab_size = {want_vocab}")
        want = self.text_len + self.low_len + self.img_len
        if g.block_size != want:
            raise TuwenError(f"superres config: gpt.block_size={g.block_size} but text_len + low_len + img_len = "
                             f"{want}")
        # the text→image checks of everything else, with the sizes as they would be without the low-res prefix
        saved = g.block_size, g.vocab_size
        g.block_size, g.vocab_size = self.text_len + self.img_len, self.img_vocab_size + self.text_vocab_size
        try:
            super().validate()
        finally:
            g.block_size, g.vocab_size = saved


def sr_logits(gpt: GPT, config: SuperResConfig, text_ids: torch.Tensor, low_codes: torch.Tensor,
              high_codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [B, img_len, img_vocab] of ``[text][low ids][high[:-1]]`` (logit i predicts high code
    i; ``low_codes`` are the low tokenizer's codes, offset here); ``SuperRes.forward`` and the training loss share
    it."""
    c = config
    x = torch.cat([text_ids, low_codes + c.low_offset, high_codes[:, :-1]], dim=1)  # [B, T + L + img_len - 1]
    return gpt(x, logits_start=c.text_len + c.low_len - 1)


class SuperRes(TextToImage):
    """GPT + VQGAN (+ a low-res VQGAN) + tokenizer mapping (text, low-res codes) → high-res codes. Saved/loaded as a
    text→image folder (``from_pretrained``, ``save_pretrained``) with model_type ``superres``."""

    config_class: ClassVar[type] = SuperResConfig

    def __init__(self, config: SuperResConfig, vqgan: VQGAN, tokenizer: TextTokenizer, gpt: GPT | None = None,
                 low_vqgan: VQGAN | None = None):
        super().__init__(config, vqgan, tokenizer, gpt=gpt)
        if bool(config.low_vocab_size) != (low_vqgan is not None):
            raise TuwenError(f"superres: low_vocab_size={config.low_vocab_size} "
                             f"{'needs a low-res VQGAN' if config.low_vocab_size else 'but a low-res VQGAN was given'}")
        self.low_vqgan = low_vqgan.eval() if low_vqgan is not None else None
        if low_vqgan is not None:
            for p in low_vqgan.parameters():
                p.requires_grad_(False)
            if low_vqgan.config.n_embed != config.low_vocab_size:
                raise TuwenError(f"superres: low_vocab_size={config.low_vocab_size} but the low-res VQGAN has "
                                 f"{low_vqgan.config.n_embed} codes")
        h, w = self.low_grid
        if h * w != config.low_len:
            raise TuwenError(f"superres: low_len={config.low_len} but the {'low-res ' if low_vqgan else ''}VQGAN "
                             f"turns {config.low_size}px images into a {h}×{w} grid")

    @property
    def low_tokenizer(self) -> VQGAN:
        """The VQGAN of the low-res side: ``low_vqgan`` when the model has one, else the model's own."""
        return self.low_vqgan if self.config.low_vocab_size else self.vqgan

    @property
    def low_grid(self) -> tuple[int, int]:
        return self.low_tokenizer.grid_size(self.config.low_size)

    # ------------------------------------------------------------------ codes
    @torch.inference_mode()
    def encode_low(self, images) -> torch.Tensor:
        """Low-resolution images (PIL / paths / arrays; resized + center-cropped to ``low_size``) → the low
        tokenizer's codes [B, low_len]."""
        from ..data.images import load_pixels, to_tensor
        px = to_tensor([load_pixels(im, self.config.low_size) for im in images]).to(self.device)
        return self.low_tokenizer.encode(px).reshape(len(images), -1)

    def forward(self, text_ids: torch.Tensor, low_codes: torch.Tensor, high_codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, img_len, img_vocab]: logit i predicts high-res code i (``low_codes``: the low
        tokenizer's codes, as ``encode_low`` gives them)."""
        return sr_logits(self.gpt, self.config, text_ids, low_codes, high_codes)

    @torch.inference_mode()
    def upscale_codes(self, text_ids: torch.Tensor, low_codes: torch.Tensor, seeds, **sampling) -> torch.Tensor:
        """[B, text_len] text ids + [B, low_len] low-res codes → [B, img_len] high-res codes (one seed per row)."""
        p = self.sampling_params(**sampling)
        low = low_codes.to(self.device) + self.config.low_offset
        prefix = torch.cat([text_ids.to(self.device), low], dim=1)
        uncond = None
        if p.guidance_scale is not None:  # the text dropped, the low-res image kept
            uncond = torch.cat([self.uncond_ids(len(prefix)), low], dim=1)
        return sample_codes(self.gpt, prefix_ids=prefix, num_tokens=self.config.img_len,
                            seeds=torch.as_tensor(list(seeds)), top_k=p.top_k, top_p=p.top_p,
                            temperature=p.temperature, guidance_scale=p.guidance_scale, uncond_prefix_ids=uncond,
                            amp_dtype=amp_dtype(self.device, self.gpt.tok_emb.weight.dtype))

    @torch.inference_mode()
    def upscale(self, images: Sequence, texts: Sequence[str] | str, *, seed: int = 0, keys: Sequence | None = None,
                batch_size: int = 16, **sampling) -> list:
        """Images (any size: resized + center-cropped to ``low_size``) and their texts → PIL images of
        ``image_size``. Image i uses the seed ``image_seed(seed, keys[i] if keys else i, 0)``."""
        images = list(images)
        texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
        if len(texts) != len(images):
            raise TuwenError(f"upscale: {len(images)} images but {len(texts)} texts")
        keys = list(keys) if keys is not None else list(range(len(images)))
        out = []
        for s in range(0, len(images), batch_size):
            low = self.encode_low(images[s:s + batch_size])
            ids = self.tokenize(texts[s:s + batch_size])
            seeds = [image_seed(seed, k, 0) for k in keys[s:s + batch_size]]
            out += self.decode_codes(self.upscale_codes(ids, low, seeds, **sampling))
        return out

    # ------------------------------------------------------------------ I/O
    def _save_extra(self, path) -> None:
        super()._save_extra(path)
        if self.config.low_vocab_size:
            self.low_vqgan.save_pretrained(path / "low_vqgan")

    @classmethod
    def _extra_parts(cls, path, config: SuperResConfig) -> dict:
        if not config.low_vocab_size:
            return {}
        if not (path / "low_vqgan").is_dir():
            raise TuwenError(f"{path}: config.json says low_vocab_size={config.low_vocab_size} (a second, low-res "
                             f"tokenizer) but the folder has no low_vqgan/; copy the whole model folder")
        return {"low_vqgan": load_vqgan(path / "low_vqgan")}

    def generate(self, *args, **kwargs):
        raise TuwenError("a super-resolution model upscales images: use upscale(images, texts) "
                         "(tuwen upscale IMG --model DIR --text …), not generate")

    def complete(self, *args, **kwargs):
        raise TuwenError("a super-resolution model does not complete images; use a text→image model")
