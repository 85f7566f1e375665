"""Token super-resolution (CogView's recipe) for tuwen's own models: a low-resolution code grid (+ text) → the code
grid of the image at twice the size, with the same image tokenizer.

Sequence (one GPT, the text→image layout with the low-resolution codes as a second prefix)::

    [text ids + img_vocab_size  (text_len)] [low-res codes (low_len = (low_size/f)²)] [high-res codes (img_len)]

Logit i of the last part predicts high-res code i (it sees the text, every low-res code and high-res codes 0…i-1).
Training pairs are made on the fly from each image: the image at ``image_size`` and its 2× smaller version
(bicubic with antialiasing, ``low_size = image_size / 2``), both tokenized by the frozen VQGAN
(``tuwen.training.tasks.superres``; ``--app_name=super_resolution``). The model folder is a text→image folder
with model_type ``superres`` and ``low_size`` / ``low_len`` in its config.

Use: ``SuperRes.from_pretrained(DIR).upscale(images, texts)``, ``tuwen upscale IMG --model DIR --text …``,
``tuwen generate … --super_resolution DIR`` (the generated images are upscaled).

The tokenizer must describe images at ``low_size`` as well as at ``image_size``: a VQGAN trained only on one scale
may tokenize the half-size images poorly (the README's "CogView" section gives the measured figures).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..errors import TuwenError
from ..runtime import amp_dtype
from ..sampling import SamplingParams, generate as sample_codes
from .gpt import GPTConfig
from .text2image import TextToImage, TextToImageConfig, image_seed

__all__ = ["SuperRes", "SuperResConfig", "downsample", "MODEL_TYPE"]

MODEL_TYPE = "superres"


def downsample(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] → [B, C, size, size] (bicubic, antialiased; the training pairs' low side)."""
    return F.interpolate(pixels.float(), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1, 1)


@dataclasses.dataclass
class SuperResConfig(TextToImageConfig):
    """A text→image config plus the low-resolution side: ``low_size`` px images → ``low_len`` codes."""

    model_type: ClassVar[str] = MODEL_TYPE

    low_size: int = 32
    low_len: int = 16
    sampling: SamplingParams = dataclasses.field(default_factory=lambda: SamplingParams(top_k=8))

    def sized_gpt(self, **arch) -> GPTConfig:
        return GPTConfig(vocab_size=self.img_vocab_size + self.text_vocab_size,
                         block_size=self.text_len + self.low_len + self.img_len, n_out=self.img_vocab_size, **arch)

    def validate(self) -> None:
        if self.low_size < 1 or self.low_len < 1:
            raise TuwenError("superres config: low_size and low_len must be ≥ 1")
        g = self.gpt
        want = self.text_len + self.low_len + self.img_len
        if g.block_size != want:
            raise TuwenError(f"superres config: gpt.block_size={g.block_size} but text_len + low_len + img_len = "
                             f"{want}")
        # the text→image checks of everything else, with block_size as it would be without the low-res prefix
        saved = g.block_size
        g.block_size = self.text_len + self.img_len
        try:
            super().validate()
        finally:
            g.block_size = saved


class SuperRes(TextToImage):
    """GPT + VQGAN + tokenizer mapping (text, low-res codes) → high-res codes. Saved/loaded as a text→image folder
    (``from_pretrained``, ``save_pretrained``) with model_type ``superres``."""

    config_class: ClassVar[type] = SuperResConfig

    def _check(self) -> None:
        super()._check()
        h, w = self.low_grid
        if h * w != self.config.low_len:
            raise TuwenError(f"superres: low_len={self.config.low_len} but the VQGAN turns {self.config.low_size}px "
                             f"images into a {h}×{w} grid")

    @property
    def low_grid(self) -> tuple[int, int]:
        return self.vqgan.grid_size(self.config.low_size)

    # ------------------------------------------------------------------ codes
    @torch.inference_mode()
    def encode_low(self, images) -> torch.Tensor:
        """Low-resolution images (PIL / paths / arrays; resized + center-cropped to ``low_size``) → codes
        [B, low_len]."""
        from ..data.images import load_pixels, to_tensor
        px = to_tensor([load_pixels(im, self.config.low_size) for im in images]).to(self.device)
        return self.vqgan.encode(px).reshape(len(images), -1)

    def forward(self, text_ids: torch.Tensor, low_codes: torch.Tensor, high_codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, img_len, img_vocab]: logit i predicts high-res code i."""
        c = self.config
        x = torch.cat([text_ids, low_codes, high_codes[:, :-1]], dim=1)  # [B, text_len + low_len + img_len - 1]
        return self.gpt(x, logits_start=c.text_len + c.low_len - 1)

    @torch.inference_mode()
    def upscale_codes(self, text_ids: torch.Tensor, low_codes: torch.Tensor, seeds, **sampling) -> torch.Tensor:
        """[B, text_len] text ids + [B, low_len] low-res codes → [B, img_len] high-res codes (one seed per row)."""
        p = self.sampling_params(**sampling)
        prefix = torch.cat([text_ids.to(self.device), low_codes.to(self.device)], dim=1)
        uncond = None
        if p.guidance_scale is not None:  # the text dropped, the low-res image kept
            uncond = torch.cat([self.uncond_ids(len(prefix)), low_codes.to(self.device)], dim=1)
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

    def generate(self, *args, **kwargs):
        raise TuwenError("a super-resolution model upscales images: use upscale(images, texts) "
                         "(tuwen upscale IMG --model DIR --text …), not generate")

    def complete(self, *args, **kwargs):
        raise TuwenError("a super-resolution model does not complete images; use a text→image model")
