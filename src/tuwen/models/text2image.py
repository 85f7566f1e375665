"""Text→image: a GPT over ``[text_len text ids + img_vocab_size][img_len image codes]`` + a VQGAN (EasyNLP ARTIST).

``TextToImage.from_pretrained`` reads a tuwen folder (``config.json`` model_type ``text2image`` + ``model.safetensors``
(the GPT) + ``vocab.txt`` + ``vqgan/``) or an EasyNLP / pai-painter folder (``config.json`` model_type ``artist`` +
``pytorch_model.bin`` + ``vocab.txt``, read by ``tuwen.convert.easynlp_t2i``) as it is.

Token layout (EasyNLP): text ids are tokenizer ids + ``img_vocab_size`` padded with [PAD] to ``text_len`` (no
[CLS]/[SEP]); image codes are 0..img_vocab_size-1; the head predicts image codes only; logit i predicts code i.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from ..config import BaseConfig
from ..convert import cogview as cogview_ckpt, easynlp_t2i
from ..convert.taming import load_vqgan
from ..data.images import to_pil
from ..errors import TuwenError
from ..hub import CONFIG_NAME, WEIGHTS_NAME, PretrainedModel, load_state_dict_checked, load_weights, \
    read_model_type, resolve_model_path, verify_model_folder
from ..runtime import amp_dtype, progress_disable
from ..sampling import SamplingParams, generate as sample_codes
from ..text.tokenizer import TextTokenizer
from .gpt import GPT, GPTConfig
from .quant import check_weights_dtype, quantize_weights
from .vqgan import VQGAN, check_vq_dtype, resolve_vq_dtype, vq_torch_dtype

MODEL_TYPE = "text2image"
EASYNLP_MODEL_TYPES = easynlp_t2i.MODEL_TYPES

# the GPT's own sizes; its vocab_size, block_size and n_out follow from the text→image fields
GPT_ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "embd_pdrop", "resid_pdrop", "attn_pdrop")
# CogView's options for stable low-precision training of deep GPTs (GPTConfig fields; off by default)
GPT_STABILITY_FIELDS = ("sandwich_ln", "pb_relax")
# the sampling settings text→image uses (the others are captioning's)
SAMPLING_FIELDS = ("top_k", "top_p", "temperature", "guidance_scale")


# =============================================================================================== config

@dataclasses.dataclass
class TextToImageConfig(BaseConfig):
    """Architecture + generation defaults of a text→image model (the VQGAN's own config lives in ``vqgan/``).

    ``gpt`` must agree with the other fields: vocab_size = img_vocab_size + text_vocab_size, block_size =
    text_len + img_len, n_out = img_vocab_size. Left out (None) it gets those sizes and GPTConfig's default
    width/depth; ``TextToImageConfig.build(n_layer=…, n_head=…, n_embd=…, **fields)`` sets the width/depth.
    """

    model_type: ClassVar[str] = MODEL_TYPE

    text_len: int = 32               # text positions (EasyNLP text_len)
    img_len: int = 256               # image positions = VQGAN grid h*w (EasyNLP img_len)
    img_vocab_size: int = 16384      # VQGAN codebook size = GPT output classes
    text_vocab_size: int = 21128     # tokenizer vocabulary size
    image_size: int = 256            # pixels (EasyNLP size)
    gpt: GPTConfig | None = None
    cfg_drop_prob: float = 0.0       # training: text replaced by the unconditional prompt with this probability
    sampling: SamplingParams = dataclasses.field(default_factory=lambda: SamplingParams(top_k=100))  # EasyNLP's k

    def __post_init__(self):
        if self.gpt is None:
            self.gpt = self.sized_gpt()

    def sized_gpt(self, **arch) -> GPTConfig:
        """A GPTConfig with this model's vocabulary/positions/head sizes and ``arch`` (n_layer, n_head, …)."""
        return GPTConfig(vocab_size=self.img_vocab_size + self.text_vocab_size,
                         block_size=self.text_len + self.img_len, n_out=self.img_vocab_size, **arch)

    @classmethod
    def build(cls, **kwargs) -> "TextToImageConfig":
        """Config fields plus the GPT's width/depth (``GPT_ARCH_FIELDS``) and CogView's Sandwich-LN / PB-relax
        (``GPT_STABILITY_FIELDS``) as flat keyword arguments."""
        arch = {k: kwargs.pop(k) for k in GPT_ARCH_FIELDS + GPT_STABILITY_FIELDS if k in kwargs}
        config = cls(**kwargs)
        config.gpt = config.sized_gpt(**arch)
        config.validate()
        return config

    def validate(self) -> None:
        for k in ("text_len", "img_len", "img_vocab_size", "text_vocab_size", "image_size"):
            if getattr(self, k) < 1:
                raise TuwenError(f"text2image config: {k} must be ≥ 1")
        if not 0.0 <= self.cfg_drop_prob < 1.0:
            raise TuwenError("text2image config: cfg_drop_prob must be in [0, 1)")
        g = self.gpt
        for name, have, want, why in (
                ("vocab_size", g.vocab_size, self.img_vocab_size + self.text_vocab_size, "img_vocab_size + text_vocab_size"),
                ("block_size", g.block_size, self.text_len + self.img_len, "text_len + img_len"),
                ("n_out", g.n_out, self.img_vocab_size, "img_vocab_size")):
            if have != want:
                raise TuwenError(f"text2image config: gpt.{name}={have} but {why} = {want}")
        if g.n_prefix_embd:
            raise TuwenError("text2image config: gpt.n_prefix_embd must be 0 (the prefix is text ids)")

    @classmethod
    def upgrade(cls, d: dict, version: int, source: str) -> dict:
        """Format 1: GPT sizes and sampling settings were flat fields of this config."""
        d = dict(d)
        if version < 2:
            arch = {k: d.pop(k) for k in GPT_ARCH_FIELDS if k in d}
            sampling = {k: d.pop(k) for k in SAMPLING_FIELDS if k in d}
            sizes = {k: int(d.get(k, getattr(cls, k))) for k in ("text_len", "img_len", "img_vocab_size",
                                                                 "text_vocab_size")}
            d["gpt"] = {"vocab_size": sizes["img_vocab_size"] + sizes["text_vocab_size"],
                        "block_size": sizes["text_len"] + sizes["img_len"], "n_out": sizes["img_vocab_size"], **arch}
            d["sampling"] = {"top_k": 100, **sampling}
        return d


def image_seed(seed: int, key: int | str, k: int) -> int:
    """The seed of image ``k`` of prompt ``key`` (an index or an ``idx`` string): independent of batching."""
    h = hashlib.blake2b(f"{int(seed)}|{key}|{int(k)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def image_logits(gpt: GPT, text_ids: torch.Tensor, image_codes: torch.Tensor, text_len: int) -> torch.Tensor:
    """Teacher forcing: text_ids [B, text_len], image_codes [B, n] → logits [B, n, img_vocab]; logit i predicts
    code i (it sees the text and codes 0..i-1)."""
    n = image_codes.shape[1]
    x = torch.cat([text_ids, image_codes[:, :-1]], dim=1) if n > 1 else text_ids  # [B, text_len + n - 1]
    return gpt(x, logits_start=text_len - 1)


# =============================================================================================== model

class TextToImage(PretrainedModel):
    """GPT + VQGAN + tokenizer. See the module docstring for the token layout.

    The folder's ``model.safetensors`` holds the GPT only; the VQGAN is saved in ``vqgan/`` and the tokenizer
    beside the config. The VQGAN is frozen.
    """

    config_class: ClassVar[type[BaseConfig]] = TextToImageConfig

    def __init__(self, config: TextToImageConfig, vqgan: VQGAN, tokenizer: TextTokenizer, gpt: GPT | None = None):
        super().__init__(config)
        self.gpt = gpt if gpt is not None else GPT(config.gpt)
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

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Prompts → LongTensor [B, text_len] of offset ids as fed to the GPT (EasyNLP layout)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer.encode_batch(list(texts), self.config.text_len, pad=True)
        return torch.tensor(ids, dtype=torch.long, device=self.device) + self.config.img_vocab_size

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What the model will not see of ``prompt``: words outside its vocabulary (they become [UNK]) and tokens
        past ``text_len`` (cut off). Empty when the prompt is read whole. (CLI, pipelines and the server show
        these; the pipeline returns them as ``warnings`` and ``unknown_tokens``.)"""
        out = []
        unknown = self.tokenizer.unknown_words(prompt)
        if unknown:
            out.append(f"prompt {prompt!r}: {len(unknown)} word(s) unknown to the model's vocabulary, drawn as if "
                       f"absent: {' '.join(unknown)}")
        n = len(self.tokenizer.encode(prompt))
        if n > self.config.text_len:
            out.append(f"prompt {prompt!r}: {n} tokens, the model reads the first {self.config.text_len} "
                       f"(text_len); the rest is cut off")
        return out

    def uncond_ids(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional prompt (all [PAD]) used for classifier-free guidance, [B, text_len]."""
        pad = self.tokenizer.pad_id + self.config.img_vocab_size
        return torch.full((batch_size, self.config.text_len), pad, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, n, img_vocab] for ``image_codes`` [B, n] (n ≤ img_len); logit i predicts code i."""
        n = image_codes.shape[1]
        if n > self.config.img_len:
            raise TuwenError(f"image_codes has {n} positions; the model has img_len={self.config.img_len}")
        return image_logits(self.gpt, text_ids, image_codes, self.config.text_len)

    # ------------------------------------------------------------------ generation
    def sampling_params(self, **overrides) -> SamplingParams:
        """The model's sampling defaults with ``overrides`` (top_k, top_p, temperature, guidance_scale) applied;
        a setting passed as None is switched off."""
        other = sorted(set(overrides) - set(SAMPLING_FIELDS))
        if other:
            raise TuwenError(f"text→image sampling takes {', '.join(SAMPLING_FIELDS)}; not {', '.join(other)}")
        return self.config.sampling.replace(**overrides)

    @torch.inference_mode()
    def generate_codes(self, text_ids: torch.Tensor, seeds: Sequence[int] | torch.Tensor, *,
                       use_cuda_graph: bool | str = "auto", speculative: int | None = None,
                       **sampling_overrides) -> torch.Tensor:
        """One image's codes per row of ``text_ids`` [B, text_len] with its own seed → LongTensor [B, img_len]."""
        return self._sample(text_ids, seeds, self.sampling_params(**sampling_overrides), use_cuda_graph,
                            speculative=speculative)

    def _sample(self, text_ids: torch.Tensor, seeds, params: SamplingParams, use_cuda_graph,
                speculative: int | None = None) -> torch.Tensor:
        uncond = self.uncond_ids(1) if params.guidance_scale is not None else None
        return sample_codes(self.gpt, prefix_ids=text_ids.to(self.device), num_tokens=self.config.img_len,
                            seeds=torch.as_tensor(list(seeds) if not torch.is_tensor(seeds) else seeds),
                            top_k=params.top_k, top_p=params.top_p, temperature=params.temperature,
                            guidance_scale=params.guidance_scale, uncond_prefix_ids=uncond,
                            use_cuda_graph=use_cuda_graph, speculative=speculative,
                            amp_dtype=amp_dtype(self.device, self.gpt.tok_emb.weight.dtype))

    def decode_dtype(self, vq_dtype: str | None = None) -> str:
        """The VQGAN decode dtype ("fp32" or "bf16") ``decode_codes`` uses: ``vq_dtype`` or the model's
        ``vq_dtype`` (``from_pretrained(vq_dtype=…)``; default fp32), "auto" resolved for the model's device."""
        return resolve_vq_dtype(vq_dtype or getattr(self, "vq_dtype", None), self.device)

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor, vq_dtype: str | None = None) -> list:
        """Codes [B, img_len] → PIL images (one batched VQGAN decode, in ``decode_dtype(vq_dtype)``)."""
        h, w = self.grid
        images = to_pil(self.vqgan.decode(codes.reshape(-1, h, w).to(self.device),
                                          dtype=vq_torch_dtype(self.decode_dtype(vq_dtype))))
        for j, im in enumerate(images):  # where it was decoded: ``regenerate`` decodes the same way (PNG record)
            im.info["tuwen_decode"] = (j, len(images))
        return images

    @torch.inference_mode()
    def generate(self, prompts: str | Sequence[str] | None = None, *, text_ids: torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, seed: int | Sequence[int] = 0, keys: Sequence[Any] | None = None,
                 return_codes: bool = False, batch_size: int | None = None, progress: bool | None = False,
                 use_cuda_graph: bool | str = "auto", speculative: int | None = None, vq_dtype: str | None = None,
                 **sampling_overrides):
        """Sample images for prompts (or pre-tokenized ``text_ids``).

        Image k of prompt i uses the seed ``image_seed(seed, keys[i] if keys else i, k)`` (or ``seed[i]`` when a
        list is given, one per prompt), so an image does not depend on the batch size or its position in a batch.
        ``sampling_overrides``: top_k, top_p, temperature, guidance_scale, replacing the model's defaults
        (``config.sampling``; None switches one off); ``top_k=1`` is greedy. Returns a list (one per prompt) of
        lists of PIL images, or with ``return_codes`` a LongTensor [num_prompts, num_images_per_prompt, img_len]
        of codes (no decoding). ``speculative=k``: speculative Jacobi decoding with k guessed codes per step
        (same distribution, different images for a seed; see ``tuwen.sampling.generate``). ``vq_dtype``: the
        VQGAN decode dtype for this call (fp32 / bf16 / auto; default the model's, see ``decode_dtype``) — pass the
        same to ``records`` so the PNG record says how to re-create the images.
        """
        params = self.sampling_params(**sampling_overrides)
        vq_dtype = check_vq_dtype(vq_dtype)
        if text_ids is None:
            if prompts is None:
                raise TuwenError("generate: give prompts or text_ids")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            text_ids = self.tokenize(prompts)
        text_ids = text_ids.to(self.device)
        P, n = text_ids.shape[0], int(num_images_per_prompt)
        if n < 1:
            raise TuwenError(f"num_images_per_prompt must be ≥ 1, got {n}")
        seeds = self._image_seeds(seed, keys, P, n)
        rows = text_ids.repeat_interleave(n, dim=0)  # [P*n, text_len]
        bs = batch_size or (64 if self.device.type == "cuda" else 16)
        codes, images = [], []
        from tqdm import tqdm
        for s in tqdm(range(0, rows.shape[0], bs), desc="generating", unit="batch",
                      disable=progress_disable(progress), file=sys.stderr):
            cb = self._sample(rows[s:s + bs], seeds[s:s + bs], params, use_cuda_graph,
                              speculative=speculative)  # [b, img_len]
            if return_codes:
                codes.append(cb)
            else:
                images += self.decode_codes(cb, vq_dtype=vq_dtype)
        if return_codes:
            return torch.cat(codes).reshape(P, n, self.config.img_len)
        return [images[i * n:(i + 1) * n] for i in range(P)]

    @torch.inference_mode()
    def complete(self, prompt: str, image, mask, *, num_images: int = 1, seed: int = 0, key: Any = 0,
                 sweeps: int = 1, window: int | str | None = "row", return_codes: bool = False,
                 vq_dtype: str | None = None, **sampling_overrides):
        """Image completion ("text and part of image"): keep the codes of the known region of ``image``, sample
        the others given ``prompt`` and every known code (``tuwen.models.completion`` states the method: raster
        fill with the known codes forced, then ``sweeps`` Gibbs sweeps when the unknown region is not a suffix
        in raster order; its limits), decode, paste the known pixels back.

        ``image``: path / PIL / base64, resized + center-cropped to ``image_size``; ``mask``: bool array
        [image_size, image_size] (True = generate) or a mask image of the input image's size (white = generate).
        ``window``: codes after an unknown code that its Gibbs candidates are scored on ("row": one grid row + 1;
        None: all). Image k uses the seed ``image_seed(seed, key, k)``. Returns ``num_images`` PIL images, or with
        ``return_codes`` (codes LongTensor [num_images, img_len], code mask bool [img_len]). ``vq_dtype``: as in
        ``generate``."""
        import numpy as np

        from ..data.images import resize_crop
        from .completion import code_mask, complete_codes, load_mask, open_input, paste_known

        size = self.config.image_size
        img = open_input(image)
        pixel_mask = mask if isinstance(mask, np.ndarray) else load_mask(mask, img.size, size)
        if pixel_mask.shape != (size, size):
            raise TuwenError(f"complete: the mask is {pixel_mask.shape[1]}×{pixel_mask.shape[0]}, the model draws "
                             f"{size}×{size} images")
        img = resize_crop(img, size)
        unknown = code_mask(pixel_mask, self.grid)
        known = self.vqgan.encode([img], size=size).reshape(1, -1)  # [1, img_len]
        n = int(num_images)
        if n < 1:
            raise TuwenError(f"num_images must be ≥ 1, got {n}")
        p = self.sampling_params(**sampling_overrides)
        codes = complete_codes(self.gpt, self.tokenize([prompt]).expand(n, -1), known.expand(n, -1), unknown,
                               [image_seed(seed, key, k) for k in range(n)], text_len=self.config.text_len,
                               top_k=p.top_k, top_p=p.top_p, temperature=p.temperature,
                               guidance_scale=p.guidance_scale,
                               uncond_ids=self.uncond_ids(1) if p.guidance_scale is not None else None,
                               sweeps=sweeps, window=self.grid[1] + 1 if window == "row" else window,
                               amp_dtype=amp_dtype(self.device, self.gpt.tok_emb.weight.dtype))
        if return_codes:
            return codes, unknown
        return [paste_known(g, img, pixel_mask) for g in self.decode_codes(codes, vq_dtype=check_vq_dtype(vq_dtype))]

    def records(self, prompt: str, seed: int, key: Any, n: int, *, vq_dtype: str | None = None,
                **sampling_overrides) -> list[dict]:
        """The generation record of each of the ``n`` images ``generate`` makes for ``prompt`` (key ``key``):
        what ``tuwen.data.pngmeta`` writes into the PNG and ``regenerate`` reads back (``vq_dtype``: as given
        to ``generate``; the decode dtype is written only when it is not fp32)."""
        from ..data.pngmeta import tuwen_version
        params = self.sampling_params(**sampling_overrides)
        sampling = {k: getattr(params, k) for k in SAMPLING_FIELDS}
        c = self.config
        return [{"prompt": prompt, "seed": int(seed), "key": key, "k": k, "sampling": sampling,
                 "model": str(getattr(self, "name_or_path", None) or "?"), "image_size": c.image_size,
                 "text_len": c.text_len, "img_len": c.img_len, "tuwen": tuwen_version(),
                 **({"weights_dtype": wd} if (wd := getattr(self, "weights_dtype", None)) else {}),
                 **({"vq_dtype": vd} if (vd := self.decode_dtype(vq_dtype)) != "fp32" else {})} for k in range(n)]

    @torch.inference_mode()
    def regenerate(self, record: dict):
        """The image a record (``records``, or a PNG's via ``pngmeta.read_png_record``) describes."""
        if record.get("task", "generate") != "generate":
            raise TuwenError(f"the image was made by `tuwen {record['task']}` (from {record.get('input', 'an image')}"
                             f"), not from its prompt alone; run that command again to re-create it")
        for k in ("text_len", "img_len", "image_size"):
            if record.get(k) is not None and record[k] != getattr(self.config, k):
                raise TuwenError(f"the image was made by a model with {k}={record[k]}; this one has "
                                 f"{getattr(self.config, k)} (load {record.get('model')})")
        seed = image_seed(record["seed"], record.get("key", 0), int(record.get("k", 0)))
        s = {k: v for k, v in (record.get("sampling") or {}).items() if k in SAMPLING_FIELDS}
        codes = self._sample(self.tokenize([record["prompt"]]), [seed], self.sampling_params(**s), "auto",
                             speculative=record.get("speculative"))
        # the VQGAN's convolutions may round differently for another batch shape: decode as the original was
        j, b = (int(v) for v in (record.get("decode") or (0, 1)))
        # and in the dtype it was decoded in (a record without "vq_dtype" was decoded in fp32)
        vd = check_vq_dtype(record.get("vq_dtype") or "fp32", "the record's vq_dtype", allow_auto=False)
        return self.decode_codes(codes.repeat(max(b, j + 1), 1), vq_dtype=vd)[j]

    @staticmethod
    def _image_seeds(seed, keys, P: int, n: int) -> list[int]:
        """P*n seeds, prompt-major (see ``generate``)."""
        if isinstance(seed, (list, tuple)) or torch.is_tensor(seed):
            seed = list(seed)
            if len(seed) != P:
                raise TuwenError(f"seed: {len(seed)} seeds given for {P} prompts")
            return [image_seed(s, 0, k) for s in seed for k in range(n)]
        keys = list(keys) if keys is not None else list(range(P))
        return [image_seed(seed, keys[i], k) for i in range(P) for k in range(n)]

    # ------------------------------------------------------------------ I/O
    def _weights_for_save(self) -> dict[str, torch.Tensor]:
        return self.gpt.state_dict()

    def _save_extra(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.vqgan.save_pretrained(path / "vqgan")

    @classmethod
    def _extra_parts(cls, path: Path, config: TextToImageConfig) -> dict:
        """More constructor arguments a subclass reads from its folder (a second tokenizer); none here."""
        return {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None, *,
                        vqgan_config: Any = None, vqgan_path: str | None = None, weights_dtype: str | None = None,
                        vq_dtype: str | None = None, **overrides) -> "TextToImage":
        """Load a tuwen text→image folder or an EasyNLP ARTIST / pai-painter folder.

        EasyNLP folders do not describe their VQGAN: it is read from the ``first_stage_model.*`` weights with the
        architecture from ``vqgan_config`` (taming yaml/json) or inferred from the tensor shapes; ``vqgan_path``
        gives a separate VQGAN when the checkpoint has none. ``overrides``: sampling defaults (top_k, top_p,
        temperature, guidance_scale); config fields of a tuwen folder, or for an EasyNLP folder the sizes
        ``size``/``image_size``, ``text_len``, ``img_len`` and ``n_head``. None values are ignored.
        ``weights_dtype``: "fp32" (None: as loaded), "bf16", "int8" (weight-only) or "w8a8" (int8 weights and
        activations) Linear layers in the GPT, for faster decoding (``tuwen.models.quant``; inference only, do
        not train the result).
        ``vq_dtype``: the VQGAN decode dtype of ``generate``/``complete`` — "fp32" (None: the default), "bf16",
        or "auto" (bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32); recorded with the images.
        """
        weights_dtype = check_weights_dtype(weights_dtype)
        vq_dtype = check_vq_dtype(vq_dtype)
        path = resolve_model_path(name_or_path, what="text2image model",
                                  expect="config.json + model.safetensors + vocab.txt + vqgan/ (tuwen), or "
                                         "config.json (model_type artist) + pytorch_model.bin + vocab.txt (EasyNLP)")
        if path.is_file():
            raise TuwenError(f"{path}: a text2image model is a folder (config.json + weights + vocab.txt)")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "size" in overrides:
            overrides["image_size"] = overrides.pop("size")
        sampling = {k: overrides.pop(k) for k in SAMPLING_FIELDS if k in overrides}
        mt = read_model_type(path)
        own = cls.config_class.model_type  # text2image, or a subclass's (superres)
        if mt in EASYNLP_MODEL_TYPES and own == MODEL_TYPE:
            model = cls._from_easynlp(path, sampling, vqgan_config=vqgan_config, vqgan_path=vqgan_path, **overrides)
        elif mt == own:
            verify_model_folder(path)
            sizes = {k: overrides.pop(k) for k in ("image_size", "text_len", "img_len") if k in overrides}
            config = cls._read_config(path, **overrides)
            for k, v in sizes.items():  # a tuwen folder records its sizes: a different one is a mistake
                if v != getattr(config, k):
                    raise TuwenError(f"{'size' if k == 'image_size' else k}={v} does not match the model {path} "
                                     f"({k}={getattr(config, k)})")
            config.sampling = config.sampling.replace(**sampling)
            tok = TextTokenizer.from_pretrained(path)
            model = cls(config, load_vqgan(vqgan_path or path / "vqgan", config=vqgan_config), tok,
                        **cls._extra_parts(path, config))
            load_state_dict_checked(model.gpt, load_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
        else:
            if mt == "cogview" or (mt is None and cogview_ckpt.is_checkpoint_folder(path)):
                raise TuwenError(f"{path}: a CogView (Megatron) checkpoint folder or a converted CogView folder, "
                                 f"not a tuwen/EasyNLP text→image model: generate with `tuwen generate --model "
                                 f"{path}`, finetune with pretrain_model_name_or_path={path}"
                                 f"{'' if mt else f', or `tuwen convert {path} OUT`'}")
            if mt is None:
                cls._read_config(path)  # no config.json / not JSON: its own message
            expected = f"{own!r} or EasyNLP's 'artist'" if own == MODEL_TYPE else repr(own)
            raise TuwenError(f"{path / CONFIG_NAME}: model_type {mt!r} is not a "
                             f"{'text→image' if own == MODEL_TYPE else own} model (expected {expected})")
        model.name_or_path = str(name_or_path)
        model.weights_dtype = weights_dtype  # recorded with generated images (the same weights re-create them)
        model.vq_dtype = vq_dtype  # resolved for the device at decode time; recorded when not fp32
        model.eval()
        if weights_dtype is not None:
            quantize_weights(model.gpt, weights_dtype)
        if device is not None:
            model.to(device)
        return model

    @classmethod
    def _from_easynlp(cls, path: Path, sampling: dict, *, vqgan_config, vqgan_path, **overrides) -> "TextToImage":
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        sizes = {k: overrides.pop(k) for k in ("image_size", "text_len", "img_len", "n_head") if k in overrides}
        if overrides:
            raise TuwenError(f"unknown setting(s) for an EasyNLP text2image model: {', '.join(overrides)}")
        ckpt = easynlp_t2i.read_artist(path, raw, vqgan_config=vqgan_config, vqgan_path=vqgan_path, **sizes)
        config = TextToImageConfig(**ckpt.fields)
        config.sampling = config.sampling.replace(**sampling)
        config.validate()
        model = cls(config, ckpt.vqgan, ckpt.tokenizer)
        load_state_dict_checked(model.gpt, ckpt.gpt_state_dict, ckpt.source)
        return model
