"""Token super-resolution training (``--app_name=super_resolution``) on the shared trainer: CogView's recipe.

Each training image gives a pair: its codes at ``size`` (the target) and the codes of its 2× downsampled version
(bicubic, antialiased) at ``size / 2`` (the condition), both from the same frozen VQGAN, or the low side from a
second one (``low_vqgan_ckpt_path=``); the GPT learns p(high codes | text, low codes) (``tuwen.models.superres``).
The data are text→image rows (EasyNLP TSV, CSV, JSONL, …: a text and an image column); everything else (flags,
udp keys, finetuning, checkpoints) is text→image's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...convert.taming import load_vqgan
from ...errors import TuwenError
from ...models.gpt import GPT, PRESETS
from ...models.superres import SR_TOP_K, SuperRes, SuperResConfig, downsample, sr_logits
from ...models.text2image import GPT_STABILITY_FIELDS
from .common import WithFrozen
from .text2image import T2ITask, _image_sizes, _make_tokenizer, _scratch_vqgan, check_no_txt_loss, default_sampling, \
    is_code_dir, split_tables


class SRTrainModule(WithFrozen):
    """The GPT, with the frozen VQGAN(s) that tokenize the two sides of each pair."""

    def __init__(self, gpt: GPT, vqgan, config: SuperResConfig, low_vqgan=None):
        super().__init__()
        self.gpt = gpt
        self.set_frozen("vqgan", vqgan)
        self.set_frozen("low_vqgan", low_vqgan)  # None: the low side uses ``vqgan``
        self.config = config

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        img = batch["image"]  # [B, 3, size, size] in [-1, 1]
        with torch.no_grad():
            high = self.frozen("vqgan").encode(img).flatten(1).clone()  # [B, img_len]
            low_vq = self.frozen("low_vqgan") or self.frozen("vqgan")
            low = low_vq.encode(downsample(img, self.config.low_size)).flatten(1).clone()  # [B, low_len]
        logits = sr_logits(self.gpt, self.config, batch["text_ids"], low, high)  # [B, img_len, img_vocab]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), high.reshape(-1))
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2)}


class SRTask(T2ITask):
    name = "super_resolution"

    def __init__(self, args, udp: dict, *, low_vqgan=None, **kw):
        super().__init__(args, udp, **kw)
        self.low_vqgan = low_vqgan  # None: the low side uses the model's VQGAN

    @classmethod
    def from_udp(cls, args, udp: dict, log=print) -> "SRTask":
        check_no_txt_loss(udp)
        train_tables, _ = split_tables(args.tables)
        if any(is_code_dir(t) for t in train_tables):
            raise TuwenError("super_resolution trains on images (it tokenizes each image at two sizes); give TSV/CSV/"
                             "JSONL tables with an image column, not `tuwen vq tokenize` folders")
        pre = udp["pretrain_model_name_or_path"]
        if pre:
            if udp.get("low_vqgan_ckpt_path"):
                raise TuwenError(f"low_vqgan_ckpt_path= with pretrain_model_name_or_path={pre}: a finetuned model "
                                 f"keeps its tokenizers; drop low_vqgan_ckpt_path")
            base = SuperRes.from_pretrained(pre)
            return cls(args, udp, config=base.config, tokenizer=base.tokenizer, vqgan=base.vqgan,
                       low_vqgan=base.low_vqgan, base=base)
        vqgan = _scratch_vqgan(udp)
        size, img_len = _image_sizes(udp, vqgan)
        if size % 2:
            raise TuwenError(f"size={size}: super-resolution doubles the size; give an even size")
        low_vqgan = load_vqgan(udp["low_vqgan_ckpt_path"]) if udp.get("low_vqgan_ckpt_path") else None
        lh, lw = (vqgan if low_vqgan is None else low_vqgan).grid_size(size // 2)
        tokenizer = _make_tokenizer(udp, args, train_tables, log)
        preset = udp["gpt_preset"]
        if preset and preset not in PRESETS:
            raise TuwenError(f"gpt_preset={preset!r}: choose one of {', '.join(PRESETS)}")
        nl, nh, ne = PRESETS[preset] if preset else (12, 12, 768)
        drop = udp["dropout"] or 0.0
        config = SuperResConfig.build(
            text_len=udp["text_len"] or 32, img_len=img_len, img_vocab_size=vqgan.config.n_embed,
            text_vocab_size=udp["text_vocab_size"] or tokenizer.vocab_size, image_size=size, low_size=size // 2,
            low_len=lh * lw, low_vocab_size=low_vqgan.config.n_embed if low_vqgan is not None else 0,
            n_layer=udp["n_layer"] or nl, n_head=udp["n_head"] or nh, n_embd=udp["n_embd"] or ne,
            embd_pdrop=drop, resid_pdrop=drop, attn_pdrop=drop, sampling=default_sampling(udp, 0.0).replace(
                top_k=udp["top_k"] or SR_TOP_K), **{k: bool(udp.get(k)) for k in GPT_STABILITY_FIELDS})
        return cls(args, udp, config=config, tokenizer=tokenizer, vqgan=vqgan, low_vqgan=low_vqgan)

    def build_module(self, gpt: GPT | None = None) -> SRTrainModule:
        return SRTrainModule(self.new_gpt() if gpt is None else gpt, self.vqgan, self.config,
                             low_vqgan=self.low_vqgan)

    def _model(self, module: SRTrainModule) -> SuperRes:
        return SuperRes(self.config, module.frozen("vqgan"), self.tokenizer, gpt=module.gpt,
                        low_vqgan=module.frozen("low_vqgan"))

    def sample_images(self, module, batch):
        model = self._model(module)
        px = downsample(batch["image"][:4].to(model.device), self.config.low_size)
        low = model.low_tokenizer.encode(px).flatten(1)
        codes = model.upscale_codes(batch["text_ids"][:4], low, list(range(len(low))))
        return model.decode_codes(codes)
