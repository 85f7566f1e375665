"""CLIP: a contrastive image–text model (ViT image tower + BERT text tower), its training task and EasyNLP commands.

Model (``CLIP``, model_type ``clip``) — the layout of Chinese-CLIP (``cn_clip``), so its checkpoints load::

    visual.*            VisionTransformer (OpenAI CLIP names), output = ln_post(CLS) @ visual.proj  [B, embed_dim]
    bert.*              TextEncoder (HF BERT names), output = hidden[CLS] @ text_projection          [B, embed_dim]
    text_projection     [text hidden, embed_dim]
    logit_scale         scalar, init ln(1/0.07), clamped to [0, ln 100] after every optimizer step (open_clip)

Both embeddings are L2-normalised; ``similarity`` is their cosine, ``logit_scale.exp()·cos`` the logits. The folder
written by ``save_pretrained`` holds ``config.json``, ``model.safetensors`` and the tokenizer (``vocab.txt`` +
``tokenizer_config.json``). Texts are tokenised as ``[CLS] text [SEP]`` padded with [PAD] to ``context_length``
(52, like Chinese-CLIP).

    clip = CLIP.from_pretrained("runs/clip")
    sim = clip.similarity(pil_images, ["左上角有一个红色的圆形", "一只狗"])     # [n_images, n_texts] cosines

Training loss: symmetric InfoNCE, ``(CE(s·I·Tᵀ, y) + CE(s·T·Iᵀ, y)) / 2``. Under torchrun the features of every
rank are gathered *with gradient* and each rank computes the loss of its own rows against all rows (open_clip's
``--local-loss --gather-with-grad``), weighted so that the mean over ranks equals the single-process loss on the
concatenated batch (also when ranks hold different numbers of rows). Logits are computed in fp32 even under bf16
autocast.

EasyNLP-style commands (``tuwen --mode=... --app_name=clip``)::

    tuwen --mode=train --app_name=clip --tables=train.tsv,val.tsv \\
        --input_schema=idx:str:1,text:str:1,imgbase64:str:1 --first_sequence=text --second_sequence=imgbase64 \\
        --checkpoint_dir=runs/clip --micro_batch_size=64 --epoch_num=10 --learning_rate=5e-4 \\
        --user_defined_parameters='vision=small text=small image_size=64'
    tuwen --mode=evaluate --app_name=clip --tables=test.tsv --input_schema=... --checkpoint_dir=runs/clip \\
        [--user_defined_parameters='class_prompts=classes.txt'] [--outputs=metrics.json]
    tuwen --mode=predict --app_name=clip --tables=in.tsv --input_schema=... --checkpoint_dir=runs/clip \\
        --outputs=out.tsv --output_schema=idx,score,text_embedding,image_embedding

Evaluate reports image→text and text→image R@1/5/10, mean and median rank (identical texts count as the same
text), ``mean_recall`` (mean of the six R@K, Chinese-CLIP's figure) and, with ``class_prompts=FILE``
(``label[<TAB>prompt…]`` lines), zero-shot top-1/top-5 accuracy; JSON on stdout (and ``--outputs``). Predict
columns: ``score`` (cosine of the row's text and image), ``logit`` (× logit_scale.exp()), ``text_embedding`` /
``image_embedding`` (L2-normalised, JSON lists; EasyNLP's ``text_feat`` / ``image_feat`` are accepted as aliases),
plus any input column.

``--user_defined_parameters`` keys: see ``CLIP_PARAMS`` (typed; an unknown key is an error that lists the known
ones). Without ``vocab=`` a vocabulary is built from the training texts (``TextTokenizer.train``) and saved with the
model. Start points: random (``vision=``/``text=`` presets), ``vit_ckpt_path=`` (OpenAI CLIP image tower),
``bert_ckpt_path=`` + ``vocab=`` (HF BERT text tower), ``cnclip_ckpt_path=`` + ``vocab=`` (a whole Chinese-CLIP),
``pretrain_model_name_or_path=`` (a tuwen CLIP folder); ``freeze_vision=true`` trains LiT-style.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig, Param, parse_user_defined_parameters
from ..errors import TuwenError, read_text_lines
from ..hub import PretrainedModel
from ..models.text_encoder import TextEncoder, TextEncoderConfig
from ..models.vit import CLIP_MEAN, CLIP_STD, ViTConfig, VisionTransformer, to_uint8_batch, uint8_to_input
from ..text.tokenizer import TextTokenizer
from .. import runtime as D
from ..training.trainer import Task

LOGIT_SCALE_INIT = math.log(1 / 0.07)   # 2.6593
LOGIT_SCALE_MAX = math.log(100.0)       # 4.6052


# ----------------------------------------------------------------------------------------------- config

@dataclasses.dataclass
class CLIPConfig(BaseConfig):
    """A CLIP model: image tower, text tower, shared embedding size (``vision.output_dim == embed_dim``)."""

    model_type: ClassVar[str] = "clip"

    embed_dim: int = 64
    vision: ViTConfig = dataclasses.field(default_factory=lambda: ViTConfig.preset("tiny"))
    text: TextEncoderConfig = dataclasses.field(default_factory=lambda: TextEncoderConfig.preset("tiny"))
    context_length: int = 52
    logit_scale_init: float = LOGIT_SCALE_INIT
    logit_scale_max: float = LOGIT_SCALE_MAX
    image_mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))
    image_resize: str = "center_crop"    # how PIL inputs are sized: center_crop (OpenAI) | squash (Chinese-CLIP)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise TuwenError(f"CLIP config: {msg}")
        if self.vision.output_dim != self.embed_dim:
            bad(f"vision.output_dim {self.vision.output_dim} must equal embed_dim {self.embed_dim}")
        if not 3 <= self.context_length <= self.text.max_position_embeddings:
            bad(f"context_length {self.context_length} must be in [3, text.max_position_embeddings="
                f"{self.text.max_position_embeddings}]")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            bad("image_mean / image_std must be 3 numbers (std > 0)")
        if self.image_resize not in ("center_crop", "squash"):
            bad(f"image_resize must be center_crop or squash, got {self.image_resize!r}")

    @property
    def image_size(self) -> int:
        return self.vision.image_size


# ----------------------------------------------------------------------------------------------- model

class CLIP(PretrainedModel):
    """Contrastive image–text model; see the module docstring for the layout."""

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig, tokenizer: TextTokenizer | None = None):
        super().__init__(config)
        self.visual = VisionTransformer(config.vision)
        self.bert = TextEncoder(config.text)
        self.text_projection = nn.Parameter(torch.empty(config.text.hidden_size, config.embed_dim))
        nn.init.normal_(self.text_projection, std=config.text.hidden_size ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    @classmethod
    def build(cls, tokenizer: TextTokenizer, vision: str | ViTConfig = "tiny", text: str | TextEncoderConfig = "tiny",
              embed_dim: int | None = None, context_length: int = 52, image_size: int | None = None,
              **text_overrides) -> "CLIP":
        """A randomly initialised CLIP from presets (``ViTConfig.preset`` / ``TextEncoderConfig.preset`` names)."""
        v = ViTConfig.preset(vision, image_size=image_size) if isinstance(vision, str) else vision
        if embed_dim is not None:
            v = v.replace(output_dim=embed_dim)
        if isinstance(text, str):
            t = TextEncoderConfig.preset(text, **text_overrides).replace(vocab_size=tokenizer.vocab_size)
        else:
            t = text.replace(vocab_size=max(text.vocab_size, tokenizer.vocab_size))
        t = t.replace(pad_token_id=tokenizer.pad_id, max_position_embeddings=max(t.max_position_embeddings,
                                                                                 context_length))
        cfg = CLIPConfig(embed_dim=v.output_dim, vision=v, text=t, context_length=context_length)
        return cls(cfg, tokenizer)

    # ---------------------------------------------------------------- tokenizer
    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        if tokenizer.vocab_size > self.config.text.vocab_size:
            raise TuwenError(f"CLIP: the tokenizer has {tokenizer.vocab_size} ids but the text tower only "
                             f"{self.config.text.vocab_size} embeddings; use the vocab.txt the model was trained with")
        if tokenizer.pad_id != self.config.text.pad_token_id:
            raise TuwenError(f"CLIP: the tokenizer's [PAD] id is {tokenizer.pad_id}, the model's "
                             f"{self.config.text.pad_token_id}")
        if tokenizer.cls_id is None or tokenizer.sep_id is None:
            raise TuwenError("CLIP: the vocabulary needs [CLS] and [SEP]")
        self.tokenizer = tokenizer

    def _save_extra(self, path: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    def _load_extra(self, path: Path) -> None:
        if (path / "vocab.txt").exists():
            self.set_tokenizer(TextTokenizer.from_pretrained(path))

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts → LongTensor [B, context_length]: ``[CLS] tokens [SEP] [PAD]…`` (long texts truncated)."""
        if self.tokenizer is None:
            raise TuwenError("CLIP: no tokenizer (the model folder has no vocab.txt); pass token ids instead")
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer.encode_batch(list(texts), max_length=self.config.context_length,
                                          add_special_tokens=True, pad=True)
        return torch.tensor(ids, dtype=torch.long)

    # ---------------------------------------------------------------- encoders
    def pixel_values(self, images) -> torch.Tensor:
        """PIL images / uint8 arrays [H, W, 3] / uint8 tensor [B, H, W, 3] / CLIP-normalised float [B, 3, H, W]
        → CLIP-normalised float32 [B, 3, S, S] on the model's device (S = config.image_size for PIL/arrays)."""
        dev = self.device
        if torch.is_tensor(images):
            if images.dtype == torch.uint8:
                x = images if images.dim() == 4 else images[None]
                return uint8_to_input(x.to(dev), self.config.image_mean, self.config.image_std)
            return (images if images.dim() == 4 else images[None]).to(dev, torch.float32)
        arr = torch.from_numpy(to_uint8_batch(images, self.config.image_size, self.config.image_resize)).to(dev)
        return uint8_to_input(arr, self.config.image_mean, self.config.image_std)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images → projected (not normalised) embeddings [B, embed_dim]."""
        return self.visual(pixel_values)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] → projected (not normalised) embeddings [B, embed_dim]."""
        return self.bert.pooled(input_ids) @ self.text_projection

    def encode_image(self, images, normalize: bool = True, batch_size: int | None = None) -> torch.Tensor:
        """Images (see ``pixel_values``) → float32 embeddings [B, embed_dim], L2-normalised by default."""
        if isinstance(images, (list, tuple)) and batch_size and len(images) > batch_size:
            return torch.cat([self.encode_image(images[i:i + batch_size], normalize)
                              for i in range(0, len(images), batch_size)])
        f = self.image_features(self.pixel_values(images)).float()
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, texts, normalize: bool = True, batch_size: int | None = None) -> torch.Tensor:
        """Texts (str / list of str) or token ids [B, T] → float32 embeddings [B, embed_dim], L2-normalised."""
        if torch.is_tensor(texts):
            ids = texts if texts.dim() == 2 else texts[None]
        else:
            if isinstance(texts, str):
                texts = [texts]
            if batch_size and len(texts) > batch_size:
                return torch.cat([self.encode_text(texts[i:i + batch_size], normalize)
                                  for i in range(0, len(texts), batch_size)])
            ids = self.tokenize(texts)
        f = self.text_features(ids.to(self.device)).float()
        return F.normalize(f, dim=-1) if normalize else f

    @torch.no_grad()
    def similarity(self, images, texts) -> torch.Tensor:
        """Cosine similarity [n_images, n_texts] (float32, in [-1, 1])."""
        return self.encode_image(images) @ self.encode_text(texts).T

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        """(image embeddings, text embeddings, logit scale) — embeddings L2-normalised float32, scale = exp()."""
        img = F.normalize(self.image_features(pixel_values).float(), dim=-1)
        txt = F.normalize(self.text_features(input_ids).float(), dim=-1)
        return img, txt, self.logit_scale.float().exp()

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.config.logit_scale_max)


# ----------------------------------------------------------------------------------------------- loss

class _GatherWithGrad(torch.autograd.Function):
    """all_gather of [n, D] rows (equal n on every rank) whose backward sums the gradient of every rank's copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)          # works on gloo and nccl (no reduce_scatter needed)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_features(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Rows of every rank, in rank order, with gradient → (all rows [N, D], offset of this rank's rows, N).

    Ranks may hold different numbers of rows: they are padded to the largest for the collective and cut back.
    """
    import torch.distributed as dist

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


def load_pixels(field, size: int, resize: str = "center_crop", random_crop: bool = False) -> np.ndarray:
    """An image field (base64 / bytes / path / PIL) → uint8 [size, size, 3] sized as the model expects."""
    from ..data.images import load_image, open_image

    if resize == "squash":
        from PIL import Image
        im = open_image(field, target_size=size)
        return np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    return load_image(field, size, random_crop=random_crop)


def _trim_padding(batch: dict, pad_id: int) -> dict:
    ids = batch.get("input_ids")
    if torch.is_tensor(ids) and ids.numel():
        used = (ids != pad_id).any(0).nonzero()
        if len(used):
            batch["input_ids"] = ids[:, : int(used.max()) + 1]
    return batch


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
            if not text:
                raise ValueError(f"empty text in column {text_col!r}")
            pixels = load_pixels(row[image_col], size, resize, random_crop=rc)
            ids = tok.encode(text, max_length=ctx, add_special_tokens=True, pad=True)
            return {"pixels": pixels, "input_ids": torch.tensor(ids, dtype=torch.long)}
        return transform

    def train_dataset(self):
        from ..data.tables import RowDataset
        return RowDataset(self.train_source, self._transform(True))

    def val_dataset(self):
        from ..data.tables import RowDataset
        return RowDataset(self.val_source, self._transform(False)) if self.val_source is not None else None

    def collate(self, samples: list) -> dict:
        from ..data.tables import collate_skip_bad
        return _trim_padding(collate_skip_bad(samples), self.tokenizer.pad_id)

    def after_step(self, module: nn.Module, step: int) -> None:
        module.clip.clamp_logit_scale()

    def save_model(self, module: nn.Module, out_dir: Path) -> None:
        module.clip.save_pretrained(out_dir)

    def describe(self) -> dict:
        return {"task": self.name, "text_col": self.text_col, "image_col": self.image_col,
                "image_size": self.image_size, "context_length": self.context_length,
                "freeze_vision": self.freeze_vision}


# ----------------------------------------------------------------------------------------------- EasyNLP entry

CLIP_PARAMS: dict[str, Param] = {
    "pretrain_model_name_or_path": Param(str | None, None, "a tuwen CLIP folder to start from (or to evaluate)"),
    "cnclip_ckpt_path": Param(str | None, None, "a Chinese-CLIP checkpoint (.pt) to start from; needs vocab="),
    "vit_ckpt_path": Param(str | None, None, "OpenAI CLIP .pt (TorchScript or state dict) for the image tower"),
    "bert_ckpt_path": Param(str | None, None, "HF BERT/RoBERTa weights (folder or file) for the text tower; "
                                             "needs its vocab.txt (vocab=)"),
    "vocab": Param(str | None, None, "vocab.txt (or a folder with it); default: built from the training texts"),
    "vocab_size": Param(int, 8000, "size of a vocabulary built from the training texts"),
    "vision": Param(str, "tiny", "image tower preset: tiny, small, base-64, ViT-B-32, ViT-B-16, ViT-L-14"),
    "text": Param(str, "tiny", "text tower preset: tiny, small, base-64, RBT3-chinese, RoBERTa-wwm-ext-base-chinese"),
    "image_size": Param(int | None, None, "input resolution (default: the preset's / checkpoint's)"),
    "patch_size": Param(int | None, None, "ViT patch size override"),
    "vision_width": Param(int | None, None, "ViT width override"),
    "vision_layers": Param(int | None, None, "ViT depth override"),
    "vision_heads": Param(int | None, None, "ViT heads override"),
    "text_width": Param(int | None, None, "text tower hidden size override"),
    "text_layers": Param(int | None, None, "text tower depth override"),
    "text_heads": Param(int | None, None, "text tower heads override"),
    "embed_dim": Param(int | None, None, "shared embedding size (default: the image tower's output_dim)"),
    "context_length": Param(int, 52, "text tokens incl. [CLS]/[SEP] (Chinese-CLIP: 52)"),
    "freeze_vision": Param(bool, False, "keep the image tower fixed (LiT, Chinese-CLIP stage 1)"),
    "random_crop": Param(bool, False, "random instead of center crops when training"),
    "grad_checkpointing": Param(bool, False, "recompute activations in backward (less memory)"),
    "batch_size": Param(int, 64, "evaluate/predict: images per forward pass"),
    "class_prompts": Param(str | None, None, "evaluate: zero-shot classes, one a line: label[<TAB>prompt…]"),
    "prompt_template": Param(str, "{}", "evaluate: prompt for a class line without prompts ('{}' = label)"),
    "label_column": Param(str | None, None, "evaluate: the column with each row's class label (default: the "
                                            "class whose label occurs in the text)"),
}


_ARCH_KEYS = ("vision", "text", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
              "text_layers", "text_heads", "embed_dim", "vit_ckpt_path", "bert_ckpt_path")


def _log(msg: str) -> None:
    if D.is_main():
        print(msg, file=sys.stderr, flush=True)


def _device(name: str | None) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TuwenError(f"--device {name}: CUDA is not available here")
    return torch.device(name)


def _split_tables(tables: str | None, flag: str = "--tables") -> list[str]:
    items = [t.strip() for t in (tables or "").split(",") if t.strip()]
    if not items:
        raise TuwenError(f"{flag} is required (train: train.tsv[,val.tsv]; evaluate/predict: the input table)")
    return items


def _open(path: str, args, text_col: str | None, image_col: str | None):
    """One table or image folder; checks that the columns that will be read (not None) are in the schema."""
    from ..data.tables import open_source, parse_schema, require_columns

    schema = args.input_schema
    if schema is None and not Path(path).is_dir():
        schema = "idx:str:1,text:str:1,imgbase64:str:1"
        _log(f"note: no --input_schema; assuming {schema}")
    src = open_source(path, schema, skip_first_line=args.skip_first_line, text_col=text_col or "text",
                      image_col=image_col or "imgbase64")
    if schema is not None and not Path(path).is_dir():
        cols = parse_schema(schema)
        require_columns(cols, {"--first_sequence": text_col, "--second_sequence": image_col})  # None: not needed
    return src


def _columns(args) -> tuple[str, str]:
    return args.first_sequence or "text", args.second_sequence or "imgbase64"


def _read_texts(source, text_col: str, limit: int = 200_000) -> list[str]:
    from ..data.tables import BadRow

    texts = []
    n = len(source)
    step = max(1, n // limit)
    for i in range(0, n, step):
        r = source.row(i)
        if not isinstance(r, BadRow) and str(r.get(text_col, "")).strip():
            texts.append(str(r[text_col]))
    return texts


def _load_tokenizer(p: dict, train_source, text_col: str) -> TextTokenizer:
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
    from ..convert import clip as conv

    if p["pretrain_model_name_or_path"]:
        from ..hub import resolve_model_path
        path = resolve_model_path(p["pretrain_model_name_or_path"], "CLIP")
        return CLIP._read_config(path), lambda: CLIP.from_pretrained(path).train()
    if p["cnclip_ckpt_path"]:
        sd, cfg = conv.chinese_clip_state_dict(p["cnclip_ckpt_path"], tokenizer, image_size=p["image_size"],
                                               context_length=p["context_length"])

        def make_cn() -> CLIP:
            model = CLIP(cfg, tokenizer)
            conv.load_clip_into(model, sd, p["cnclip_ckpt_path"])
            _log(f"CLIP initialised from the Chinese-CLIP checkpoint {p['cnclip_ckpt_path']}")
            return model.train()
        return cfg, make_cn

    sd_vit = None
    if p["vit_ckpt_path"]:
        sd_vit = conv.openai_visual_state_dict(p["vit_ckpt_path"])
        v = conv.vit_config_from_state_dict(sd_vit, image_size=p["image_size"])
        if p["embed_dim"] and p["embed_dim"] != v.output_dim:
            raise TuwenError(f"embed_dim={p['embed_dim']} differs from the image tower's output size {v.output_dim} "
                             f"in vit_ckpt_path; drop embed_dim")
    else:
        v = ViTConfig.preset(p["vision"], image_size=p["image_size"], patch_size=p["patch_size"],
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


def run_easynlp(args) -> int:
    p = parse_user_defined_parameters(args.user_defined_parameters, CLIP_PARAMS, "clip")
    if args.mode == "train":
        return _train(args, p)
    if args.mode == "evaluate":
        return _evaluate(args, p)
    return _predict(args, p)


def _train(args, p: dict) -> int:
    from ..cli.common import train_args_from
    from ..training.trainer import Trainer

    text_col, image_col = _columns(args)
    tables = _split_tables(args.tables)
    if len(tables) > 2:
        raise TuwenError(f"--tables: give train[,validation] ({len(tables)} given); join several training files "
                         f"into one first")
    targs = train_args_from(args, default_lr=5e-4, default_wd=0.2)
    train_src = _open(tables[0], args, text_col, image_col)
    val_src = _open(tables[1], args, text_col, image_col) if len(tables) > 1 else None
    if p["pretrain_model_name_or_path"]:
        from ..hub import resolve_model_path
        tok = TextTokenizer.from_pretrained(resolve_model_path(p["pretrain_model_name_or_path"], "CLIP"))
    else:
        if (p["cnclip_ckpt_path"] or p["bert_ckpt_path"]) and not p["vocab"]:
            raise TuwenError("cnclip_ckpt_path / bert_ckpt_path need vocab=/path/to/vocab.txt (the vocabulary the "
                             "text tower was trained with, e.g. Chinese-CLIP's 21128-line vocab.txt)")
        tok = _load_tokenizer(p, train_src, text_col)
    start = [k for k in ("pretrain_model_name_or_path", "cnclip_ckpt_path") if p[k]]
    ignored = [k for k in _ARCH_KEYS if p[k] != CLIP_PARAMS[k].default]
    if start and ignored:
        _log(f"note: {start[0]} fixes the architecture; ignoring {', '.join(ignored)}")
    cfg, make = model_factory(p, tok)

    def make_model() -> CLIP:
        m = make()
        if p["grad_checkpointing"]:
            m.visual.set_grad_checkpointing(True)
            m.bert.set_grad_checkpointing(True)
        return m
    task = CLIPTrainTask(make_model, tok, train_src, val_src, text_col, image_col, image_size=cfg.image_size,
                         context_length=cfg.context_length, freeze_vision=p["freeze_vision"],
                         random_crop=p["random_crop"], image_resize=cfg.image_resize)
    result = Trainer(targs, task).train()
    _log(f"CLIP saved to {targs.checkpoint_dir} (step {result['step']}, best val loss {result['best']})")
    D.cleanup()
    return 0


# ---------------------------------------------------------------- evaluate / predict

def _load_model(args, p: dict, device: torch.device) -> CLIP:
    path = p["pretrain_model_name_or_path"] or args.checkpoint_dir
    if not path:
        raise TuwenError("--checkpoint_dir (the trained CLIP folder) is required")
    model = CLIP.from_pretrained(path, device=device)
    if model.tokenizer is None:
        raise TuwenError(f"{path}: no vocab.txt in the model folder")
    return model.eval()


def _autocast(device: torch.device):
    import contextlib
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def embed_rows(model: CLIP, source, text_col: str | None, image_col: str | None, batch_size: int = 64,
               num_workers: int = 0, strict: bool = False, report=None, progress: bool | None = None):
    """Embed every good row of ``source``. Returns (indices of good rows, image embeddings [n, D] or None,
    text embeddings [n, D] or None, texts, report). Bad rows (undecodable image, empty text) are reported."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ..data.tables import BadRowError, BadRowReport, RowDataset, collate_skip_bad

    report = report or BadRowReport()
    size, ctx, tok = model.config.image_size, model.config.context_length, model.tokenizer
    resize = model.config.image_resize

    def transform(row: dict, i: int) -> dict:
        out: dict[str, Any] = {"index": i}
        if text_col:
            text = str(row[text_col]).strip()
            if not text:
                raise ValueError(f"empty text in column {text_col!r}")
            out["text"] = text
            out["input_ids"] = torch.tensor(tok.encode(text, max_length=ctx, add_special_tokens=True, pad=True))
        if image_col:
            out["pixels"] = load_pixels(row[image_col], size, resize)
        return out

    ds = RowDataset(source, transform)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_bad)
    idx, imgs, txts, texts = [], [], [], []
    dev = model.device
    for batch in tqdm(loader, desc="embedding", unit="batch", disable=(progress is False) or None, file=sys.stderr):
        for b in batch["bad_rows"]:
            if strict:
                raise BadRowError(f"{b} (--strict stops at the first bad row)")
            report.add(b)
        if not batch["size"]:
            continue
        idx += batch["index"].tolist()
        with _autocast(dev):
            if image_col:
                imgs.append(model.encode_image(batch["pixels"].to(dev)).cpu())
            if text_col:
                txts.append(model.encode_text(_trim_padding({"input_ids": batch["input_ids"]},
                                                            tok.pad_id)["input_ids"].to(dev)).cpu())
        texts += batch.get("text", [])
    cat = (lambda xs: torch.cat(xs).float() if xs else torch.zeros(0, model.config.embed_dim))
    return (np.asarray(idx, dtype=np.int64), cat(imgs) if image_col else None, cat(txts) if text_col else None,
            texts, report)


def read_class_prompts(path: str, template: str = "{}") -> list[tuple[str, list[str]]]:
    """``label[<TAB>prompt<TAB>prompt…]`` lines → [(label, prompts)]; a label alone uses ``template``."""
    lines = read_text_lines(path, f"class_prompts={path}")
    classes, seen = [], set()
    for n, line in enumerate(lines, 1):
        parts = [x.strip() for x in line.split("\t")]
        if not parts[0]:
            if any(parts):
                raise TuwenError(f"{path}:{n}: empty class label")
            continue
        if parts[0] in seen:
            raise TuwenError(f"{path}:{n}: class {parts[0]!r} appears twice")
        seen.add(parts[0])
        prompts = [x for x in parts[1:] if x] or [template.replace("{}", parts[0])]
        classes.append((parts[0], prompts))
    if len(classes) < 2:
        raise TuwenError(f"class_prompts={path}: need at least 2 classes, found {len(classes)}")
    return classes


@torch.inference_mode()
def zero_shot_classifier(model: CLIP, classes: list[tuple[str, list[str]]]) -> torch.Tensor:
    """One unit vector per class: mean of its normalised prompt embeddings, re-normalised (open_clip) [C, D]."""
    out = []
    for _, prompts in classes:
        e = model.encode_text(prompts)
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out).float().cpu()


def _row_label(row: dict, text: str, labels: list[str], label_column: str | None) -> str:
    if label_column:
        lab = str(row.get(label_column, "")).strip()
        if lab not in labels:
            raise ValueError(f"label {lab!r} (column {label_column!r}) is not a class of class_prompts")
        return lab
    found = [lab for lab in labels if lab in text]
    found = [a for a in found if not any(a != b and a in b for b in found)]   # keep the longest matches
    if len(found) != 1:
        raise ValueError(f"the text names {'no' if not found else len(found)} class label(s)"
                         f"{': ' + ', '.join(found) if found else ''}; give label_column=")
    return found[0]


def _evaluate(args, p: dict) -> int:
    from ..data.tables import BadRow, BadRowReport
    from ..metrics.retrieval import image_text_retrieval

    text_col, image_col = _columns(args)
    tables = _split_tables(args.tables)
    path = tables[-1]
    if len(tables) > 1:
        _log(f"note: evaluating on the last table of --tables ({path})")
    device = _device(args.device)
    model = _load_model(args, p, device)
    src = _open(path, args, text_col, image_col)
    report = BadRowReport(args.max_bad_listed)
    idx, img, txt, texts, report = embed_rows(model, src, text_col, image_col, p["batch_size"], strict=args.strict,
                                              report=report)
    if len(idx) == 0:
        raise TuwenError(f"{path}: no usable rows to evaluate")
    metrics: dict[str, Any] = {"table": path, "rows": len(src), "evaluated": int(len(idx)), "bad_rows": report.count,
                               "unique_texts": len(set(texts))}
    # identical captions count as the same text (both directions)
    metrics.update(image_text_retrieval(img, txt, image_ids=texts, text_ids=texts))
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image")
                                            for k in (1, 5, 10)]))   # Chinese-CLIP's "mean recall" (6 R@K)
    if p["class_prompts"]:
        classes = read_class_prompts(p["class_prompts"], p["prompt_template"])
        labels = [c for c, _ in classes]
        W = zero_shot_classifier(model, classes)
        scores = img @ W.T                                             # [n, C]
        y, keep = [], []
        zs_report = BadRowReport(args.max_bad_listed)
        for k, i in enumerate(idx.tolist()):
            row = src.row(i)
            if isinstance(row, BadRow):
                continue
            try:
                y.append(labels.index(_row_label(row, texts[k], labels, p["label_column"])))
                keep.append(k)
            except ValueError as e:
                zs_report.add(src.bad(i, str(e)))
        if keep:
            s = scores[keep]
            yt = torch.tensor(y)
            top = s.topk(min(5, len(labels)), dim=1).indices
            metrics["zeroshot_classes"] = len(labels)
            metrics["zeroshot_rows"] = len(keep)
            metrics["zeroshot_top1"] = float((top[:, 0] == yt).float().mean())
            if len(labels) >= 5:
                metrics["zeroshot_top5"] = float((top == yt[:, None]).any(1).float().mean())
        else:
            metrics["zeroshot_rows"] = 0
        if zs_report.count:
            _log(f"zero-shot: {zs_report.summary(total=len(idx)).replace('bad row', 'unlabelled row')}")
    _print_metrics(metrics)
    if report.count:
        _log(report.summary(total=len(src)))
    if args.outputs:
        from ..hub import atomic_write_text
        atomic_write_text(args.outputs, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
        _log(f"wrote {args.outputs}")
    return 0


def _print_metrics(m: dict) -> None:
    lines = [f"CLIP evaluation on {m['table']}: {m['evaluated']} of {m['rows']} rows "
             f"({m['unique_texts']} distinct texts; identical texts count as matches)"]
    for d in ("image_to_text", "text_to_image"):
        lines.append(f"  {d.replace('_', ' ')}: R@1 {100 * m[d + '_R@1']:.1f}%  R@5 {100 * m[d + '_R@5']:.1f}%  "
                     f"R@10 {100 * m[d + '_R@10']:.1f}%  mean rank {m[d + '_mean_rank']:.2f}  "
                     f"median rank {m[d + '_median_rank']:.0f}")
    lines.append(f"  mean recall (6 R@K) {100 * m['mean_recall']:.1f}%")
    if "zeroshot_top1" in m:
        t5 = f"  top-5 {100 * m['zeroshot_top5']:.1f}%" if "zeroshot_top5" in m else ""
        lines.append(f"  zero-shot ({m['zeroshot_classes']} classes, {m['zeroshot_rows']} rows): "
                     f"top-1 {100 * m['zeroshot_top1']:.1f}%{t5}")
    if D.is_main():
        print("\n".join(lines), file=sys.stderr)
        print(json.dumps(m, ensure_ascii=False))


PREDICT_OUTPUTS = ("score", "logit", "text_embedding", "image_embedding")
# EasyNLP's CLIP predictor names; tuwen writes them as JSON lists (EasyNLP tab-joins the floats)
PREDICT_ALIASES = {"text_feat": "text_embedding", "image_feat": "image_embedding"}


def _predict(args, p: dict) -> int:
    from ..cli.predict import RowError, parse_columns, run_predict

    text_col, image_col = _columns(args)
    tables = _split_tables(args.tables)
    device = _device(args.device)
    model = _load_model(args, p, device)
    out_cols = parse_columns(args.output_schema, "--output_schema")
    wanted = {PREDICT_ALIASES.get(c, c) for c in out_cols} & set(PREDICT_OUTPUTS)
    need_text = bool(wanted & {"score", "logit", "text_embedding"})
    need_image = bool(wanted & {"score", "logit", "image_embedding"})
    src = _open(tables[0], args, text_col if need_text else None, image_col if need_image else None)
    size, scale = model.config.image_size, float(model.logit_scale.detach().exp())

    @torch.inference_mode()
    def predict_batch(rows: list[dict], indices: list[int]) -> list[dict]:
        outs: list[dict | Exception] = [{} for _ in rows]
        good_img, pix = [], []
        if need_image:
            for k, r in enumerate(rows):
                try:
                    pix.append(load_pixels(r[image_col], size, model.config.image_resize))
                    good_img.append(k)
                except (ValueError, KeyError, OSError) as e:
                    outs[k] = RowError(str(e) if not isinstance(e, KeyError) else f"missing column {e}")
        good_txt = [k for k in range(len(rows)) if not isinstance(outs[k], Exception)]
        if need_text:
            for k in list(good_txt):
                if not str(rows[k].get(text_col, "")).strip():
                    outs[k] = RowError(f"empty text in column {text_col!r}")
            good_txt = [k for k in good_txt if not isinstance(outs[k], Exception)]
        with _autocast(device):
            ie = model.encode_image(torch.from_numpy(np.stack(pix)).to(device)).cpu() if need_image and pix else None
            te = model.encode_text([str(rows[k][text_col]) for k in good_txt]).cpu() if need_text and good_txt else None
        img_pos = {k: j for j, k in enumerate(good_img)}
        txt_pos = {k: j for j, k in enumerate(good_txt)}
        for k in range(len(rows)):
            if isinstance(outs[k], Exception):
                continue
            o = outs[k]
            if ie is not None:
                o["image_embedding"] = [round(float(v), 6) for v in ie[img_pos[k]]]
            if te is not None:
                o["text_embedding"] = [round(float(v), 6) for v in te[txt_pos[k]]]
            if need_text and need_image:
                cos = float(ie[img_pos[k]] @ te[txt_pos[k]])
                o["score"] = round(cos, 6)
                o["logit"] = round(cos * scale, 6)
            for alias, name in PREDICT_ALIASES.items():
                if name in o:
                    o[alias] = o[name]
        return outs

    run_predict(src, predict_batch, args.outputs, out_cols,
                append_cols=parse_columns(args.append_cols, "--append_cols"), batch_size=p["batch_size"],
                strict=args.strict, max_listed=args.max_bad_listed, desc="clip")
    return 0
