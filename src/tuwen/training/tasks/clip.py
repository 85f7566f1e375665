"""Contrastive training of ``tuwen.models.clip.CLIP``: the loss, the module the trainer runs, the task.

Loss: symmetric InfoNCE, ``(CE(s·I·Tᵀ, y) + CE(s·T·Iᵀ, y)) / 2``. Under torchrun the features of every rank are
gathered *with gradient* and each rank computes the loss of its own rows against all rows (open_clip's
``--local-loss --gather-with-grad``), weighted so that the mean over ranks equals the single-process loss on the
concatenated batch (also when ranks hold different numbers of rows). Logits are computed in fp32 even under bf16
autocast.

Start points (``model_factory``): random (``vision=``/``text=`` presets; ``vision=RN50`` … a ResNet tower),
``vit_ckpt_path=`` (OpenAI CLIP image tower: ``ViT-B-32.pt`` …, or ``RN50.pt`` … a ResNet), ``bert_ckpt_path=`` + ``vocab=`` (HF BERT text tower), ``cnclip_ckpt_path=`` + ``vocab=`` (a whole
Chinese-CLIP), ``pretrain_model_name_or_path=`` (a tuwen CLIP folder). Without ``vocab=`` a vocabulary is built
from the training texts (``TextTokenizer.train``) and saved with the model. The EasyNLP command line around this
is ``tuwen.cli.easynlp.clip``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ... import runtime as D
from ...convert import clip as conv
from ...data.images import load_pixels
from ...data.rules import APPS as _RULES, check_image_field, check_text_field
from ...data.tables import BadRow, RowDataset, collate_skip_bad
from ...errors import TuwenError
from ...hub import resolve_model_path
from ...models.clip import CLIP, CLIPConfig, chinese_clip_weights, trim_padding, vision_preset
from ...models.resnet import ResNetConfig, is_resnet_preset
from ...models.text_encoder import TextEncoderConfig
from ...models.vit import uint8_to_input
from ...text.tokenizer import TextTokenizer
from ..trainer import Task


def _log(msg: str) -> None:
    if D.is_main():
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- loss

RULES = _RULES["clip"]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of [n, D] rows (equal n on every rank) whose backward sums the gradient of every rank's copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)          # works on gloo and nccl (no reduce_scatter needed)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_features(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Rows of every rank, in rank order, with gradient → (all rows [N, D], offset of this rank's rows, N).

    Ranks may hold different numbers of rows: they are padded to the largest for the collective and cut back.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    xp = F.pad(x, (0, 0, 0, m - x.shape[0])) if x.shape[0] < m else x
    allx = _GatherWithGrad.apply(xp)
    if min(sizes) != m:
        keep = torch.cat([torch.arange(r * m, r * m + s, device=x.device) for r, s in enumerate(sizes)])
        allx = allx.index_select(0, keep)
    return allx, sum(sizes[:rank]), sum(sizes)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of L2-normalised features [n, D] (row i of both is a pair); ``logit_scale`` = exp(param).

    ``gather`` (default: when a process group with >1 rank exists): local rows against the rows of all ranks, the
    loss weighted by n_local·world/N so that its mean over ranks equals the loss on the concatenated batch.
    Returns {"loss", "acc_i2t", "acc_t2i"} (accuracies of the local rows, not differentiable).
    """
    if gather is None:
        gather = D.world_size() > 1
    dev = image_features.device
    with torch.autocast(dev.type, enabled=False):
        img = image_features.float()
        txt = text_features.float()
        scale = logit_scale.float()
        n = img.shape[0]
        if gather and D.world_size() > 1:
            all_img, offset, total = gather_features(img)
            all_txt, _, _ = gather_features(txt)
            weight = n * D.world_size() / total
        else:
            all_img, all_txt, offset, weight = img, txt, 0, 1.0
        labels = torch.arange(offset, offset + n, device=dev)
        logits_i2t = scale * img @ all_txt.T           # [n, N]
        logits_t2i = scale * txt @ all_img.T           # [n, N]
        loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2 * weight
        with torch.no_grad():
            acc_i2t = (logits_i2t.argmax(1) == labels).float().mean()
            acc_t2i = (logits_t2i.argmax(1) == labels).float().mean()
    return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}



# ----------------------------------------------------------------------------------------------- training

class CLIPTrainModule(nn.Module):
    """What the trainer runs: batch {"pixels": uint8 [B, S, S, 3], "input_ids": [B, T]} → loss dict."""

    def __init__(self, clip: CLIP, freeze_vision: bool = False):
        super().__init__()
        self.clip = clip
        self.freeze_vision = freeze_vision
        if freeze_vision:  # LiT / Chinese-CLIP stage 1: image tower fixed
            for p in clip.visual.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:
            self.clip.visual.eval()
        return self

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        c = self.clip
        x = uint8_to_input(batch["pixels"], c.config.image_mean, c.config.image_std)
        img = F.normalize(c.image_features(x).float(), dim=-1)
        txt = F.normalize(c.text_features(batch["input_ids"]).float(), dim=-1)
        out = clip_loss(img, txt, c.logit_scale.exp(), gather=self.training and D.world_size() > 1)
        out["scale"] = c.logit_scale.detach().float().exp()
        return out



class CLIPTrainTask(Task):
    """Contrastive training on (text, image) rows of a RowSource (TSV tables or image folders)."""

    name = "clip"
    betas = (0.9, 0.98)   # CLIP paper / open_clip for ViT towers
    best_metric = "loss"
    best_mode = "min"

    def __init__(self, make_model: Callable[[], CLIP], tokenizer: TextTokenizer, train_source, val_source=None,
                 text_col: str = "text", image_col: str = "imgbase64", image_size: int = 224,
                 context_length: int = 52, freeze_vision: bool = False, random_crop: bool = False,
                 image_resize: str = "center_crop"):
        self.make_model = make_model
        self.tokenizer = tokenizer
        self.train_source, self.val_source = train_source, val_source
        self.text_col, self.image_col = text_col, image_col
        self.image_size, self.context_length = image_size, context_length
        self.freeze_vision, self.random_crop = freeze_vision, random_crop
        self.image_resize = image_resize

    def build_module(self) -> nn.Module:
        clip = self.make_model()
        if clip.tokenizer is None:
            clip.set_tokenizer(self.tokenizer)
        return CLIPTrainModule(clip, self.freeze_vision)

    def _transform(self, train: bool):
        tok, ctx, size, resize = self.tokenizer, self.context_length, self.image_size, self.image_resize
        text_col, image_col, rc = self.text_col, self.image_col, self.random_crop and train

        def transform(row: dict, i: int) -> dict:
            text = str(row[text_col]).strip()
            check_text_field(text, text_col, RULES)          # the rules `tuwen data validate` applies too
            check_image_field(row[image_col], image_col, RULES)
            pixels = load_pixels(row[image_col], size, resize, random_crop=rc)
            ids = tok.encode(text, max_length=ctx, add_special_tokens=True, pad=True)
            return {"pixels": pixels, "input_ids": torch.tensor(ids, dtype=torch.long)}
        return transform

    def train_dataset(self):
        return RowDataset(self.train_source, self._transform(True))

    def val_dataset(self):
        return RowDataset(self.val_source, self._transform(False)) if self.val_source is not None else None

    def collate(self, samples: list) -> dict:
        batch = collate_skip_bad(samples)
        if torch.is_tensor(batch.get("input_ids")):
            batch["input_ids"] = trim_padding(batch["input_ids"], self.tokenizer.pad_id)
        return batch

    def after_step(self, module: nn.Module, step: int) -> None:
        module.clip.clamp_logit_scale()

    def save_model(self, module: nn.Module, out_dir: Path) -> None:
        module.clip.save_pretrained(out_dir)

    def describe(self) -> dict:
        return {"task": self.name, "text_col": self.text_col, "image_col": self.image_col,
                "image_size": self.image_size, "context_length": self.context_length,
                "freeze_vision": self.freeze_vision}


# ----------------------------------------------------------------------------------------------- start points

def _read_texts(source, text_col: str, limit: int = 200_000) -> list[str]:
    texts = []
    n = len(source)
    step = max(1, n // limit)
    for i in range(0, n, step):
        r = source.row(i)
        if not isinstance(r, BadRow) and str(r.get(text_col, "")).strip():
            texts.append(str(r[text_col]))
    return texts


def training_tokenizer(p: dict, train_source, text_col: str) -> TextTokenizer:
    """The vocabulary of a training run: the start model's, ``vocab=``, or one built from the training texts."""
    if p["pretrain_model_name_or_path"]:
        return TextTokenizer.from_pretrained(resolve_model_path(p["pretrain_model_name_or_path"], "CLIP"))
    if (p["cnclip_ckpt_path"] or p["bert_ckpt_path"]) and not p["vocab"]:
        raise TuwenError("cnclip_ckpt_path / bert_ckpt_path need vocab=/path/to/vocab.txt (the vocabulary the "
                         "text tower was trained with, e.g. Chinese-CLIP's 21128-line vocab.txt)")
    if p["vocab"]:
        return TextTokenizer.from_pretrained(p["vocab"])
    texts = _read_texts(train_source, text_col)
    if not texts:
        raise TuwenError(f"no training texts in column {text_col!r} to build a vocabulary from; pass vocab=")
    tok = TextTokenizer.train(texts, vocab_size=p["vocab_size"])
    _log(f"built a vocabulary of {tok.vocab_size} tokens from {len(texts)} training texts (saved with the model)")
    return tok


def model_factory(p: dict, tokenizer: TextTokenizer) -> tuple[CLIPConfig, Callable[[], CLIP]]:
    """The ``--user_defined_parameters`` of a training run → (the architecture, a function that builds the initial
    CLIP). Foreign checkpoints are read once, here; the function only builds and loads."""
    if p["pretrain_model_name_or_path"]:
        path = resolve_model_path(p["pretrain_model_name_or_path"], "CLIP")
        return CLIP._read_config(path), lambda: CLIP.from_pretrained(path).train()
    if p["cnclip_ckpt_path"]:
        sd, cfg = chinese_clip_weights(p["cnclip_ckpt_path"], tokenizer, image_size=p["image_size"],
                                       context_length=p["context_length"])

        def make_cn() -> CLIP:
            model = CLIP(cfg, tokenizer)
            model.load_converted(sd, p["cnclip_ckpt_path"])
            _log(f"CLIP initialised from the Chinese-CLIP checkpoint {p['cnclip_ckpt_path']}")
            return model.train()
        return cfg, make_cn

    sd_vit = None
    if p["vit_ckpt_path"]:
        sd_vit = conv.openai_visual_state_dict(p["vit_ckpt_path"], allow_resnet=True)   # ViT-B-32.pt, RN50.pt …
        v = conv.visual_config_from_state_dict(sd_vit, image_size=p["image_size"])
        if p["embed_dim"] and p["embed_dim"] != v.output_dim:
            raise TuwenError(f"embed_dim={p['embed_dim']} differs from the image tower's output size {v.output_dim} "
                             f"in vit_ckpt_path; drop embed_dim")
    elif is_resnet_preset(p["vision"]):
        vit_only = [k for k in ("patch_size", "vision_layers") if p[k] is not None]
        if vit_only:
            raise TuwenError(f"{', '.join(vit_only)}= set a ViT image tower; vision={p['vision']} is a ResNet "
                             f"(its depth is the preset's; vision_width= and vision_heads= apply)")
        v = ResNetConfig.preset(p["vision"], image_size=p["image_size"], width=p["vision_width"],
                                heads=p["vision_heads"])
        if p["embed_dim"]:
            v = v.replace(output_dim=p["embed_dim"])
    else:
        v = vision_preset(p["vision"], image_size=p["image_size"], patch_size=p["patch_size"],
                          width=p["vision_width"], layers=p["vision_layers"], heads=p["vision_heads"])
        if p["embed_dim"]:
            v = v.replace(output_dim=p["embed_dim"])
    sd_bert = None
    if p["bert_ckpt_path"]:
        sd_bert, t = conv.bert_state_dict(p["bert_ckpt_path"])
        if tokenizer.vocab_size > t.vocab_size:
            raise TuwenError(f"bert_ckpt_path: {t.vocab_size} word embeddings but the vocabulary has "
                             f"{tokenizer.vocab_size} ids; pass the vocab.txt of that model with vocab=")
        if p["context_length"] > t.max_position_embeddings:
            raise TuwenError(f"context_length={p['context_length']} exceeds the {t.max_position_embeddings} "
                             f"positions of bert_ckpt_path")
        t = t.replace(pad_token_id=tokenizer.pad_id)
    else:
        t = TextEncoderConfig.preset(p["text"], hidden_size=p["text_width"], num_hidden_layers=p["text_layers"],
                                     num_attention_heads=p["text_heads"])
        t = t.replace(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                      max_position_embeddings=max(t.max_position_embeddings, p["context_length"]))
    cfg = CLIPConfig(embed_dim=v.output_dim, vision=v, text=t, context_length=p["context_length"])

    def make() -> CLIP:
        model = CLIP(cfg, tokenizer)
        if sd_vit is not None:
            conv.load_visual_into(model.visual, sd_vit, p["vit_ckpt_path"])
            _log(f"image tower initialised from {p['vit_ckpt_path']}")
        if sd_bert is not None:
            conv.load_bert_into(model.bert, sd_bert, p["bert_ckpt_path"])
            _log(f"text tower initialised from {p['bert_ckpt_path']}")
        return model.train()
    return cfg, make

