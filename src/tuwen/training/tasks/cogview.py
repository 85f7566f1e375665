"""Finetuning CogView-format text→image models on the shared trainer (``--app_name=text2image_generation`` with
``pretrain_model_name_or_path`` = a CogView Megatron/DeepSpeed folder or a tuwen ``cogview`` folder).

Each row (EasyNLP TSV: idx, text, base64 image; or any table format tuwen reads) becomes CogView's training
sequence (``data_utils/templates.py`` ``TextCodeTemplate``: ``[ROI1]`` + text + ``wrap_code(codes)``)::

    [ROI1] text [BASE] [BOI1] code_0 … code_1023 [EOI1] [PAD]…

— the text→image query template of generation with its 1024 ``[MASK]`` s replaced by the image's codes from the
model's own VQ-VAE (frozen, CogView's Resize + CenterCrop and mean/std normalisation) and ``[EOI1]`` appended; the
text is tokenized as generation tokenizes it (``parse_query``), position ids are 0, 1, 2, … as in generation
(no ``[ROI2]``). The loss is CogView's ``pretrain_gpt2.py`` ``forward_step``: next-token cross-entropy over the
whole unified vocabulary at every position whose label is not padding, weighted per position —

    w_t = 1                 when the *input* token x_t is an image code   (predicts code_1 … code_1023, [EOI1])
    w_t = txt_loss_scale    otherwise                                    (predicts the text, [BASE], [BOI1], code_0)
    loss = Σ_t w_t · CE_t / Σ_t w_t

so ``txt_loss_scale=1`` is the plain LM loss over all non-padding tokens and ``txt_loss_scale=0`` the mean over
the positions fed an image code (CogView's split is by input token: the first code, predicted from ``[BOI1]``,
falls on the text side). Default 1 (CogView's ``--txt-loss-scale`` default in ``arguments.py``; its
``scripts/pretrain_single_node.sh`` uses 5). The logged ``img_loss`` / ``txt_loss`` are the unweighted means of
the two groups, as CogView logs them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...data.images import open_image
from ...data.rules import APPS as _RULES, check_image_field, check_text_field
from ...data.tables import RowDataset, check_columns, open_source
from ...errors import TuwenError
from ...models.cogview import CogView
from ...models.cogview_vqvae import cogview_resize_crop
from ...models.gpt import GPT
from ...models.text2image import GPT_STABILITY_FIELDS, SAMPLING_FIELDS
from ..task import Task
from .common import WithFrozen, split_tables

__all__ = ["CogViewTask", "CogViewTrainModule", "cogview_lm_loss", "DEFAULT_TXT_LOSS_SCALE"]

#: CogView's ``--txt-loss-scale`` default (``arguments.py``)
DEFAULT_TXT_LOSS_SCALE = 1.0
RULES = _RULES["text2image_generation"]
#: udp keys of text→image that describe a new tuwen model or tuwen-only training tricks: refused here
NOT_FOR_COGVIEW = {
    "n_layer": "the architecture comes from the CogView model", "n_embd": "the architecture comes from the model",
    "gpt_preset": "the architecture comes from the CogView model", "block_size": "positions come from the model",
    "img_len": "CogView models use 32×32 = 1024 codes", "text_vocab_size": "the vocabulary is the model's",
    "img_vocab_size": "the codebook is the model's VQ-VAE", "vqgan_config": "CogView's VQ-VAE needs no config",
    "cfg_drop_prob": "CogView models are not trained for classifier-free guidance",
    "null_cond_prob": "CogView models are not trained for classifier-free guidance",
    "guidance_scale": "CogView models are not trained for classifier-free guidance",
    "random_crop": "CogView encodes images with Resize + CenterCrop",
}


def cogview_lm_loss(logits: torch.Tensor, seq: torch.Tensor, lengths: torch.Tensor, n_image: int,
                    txt_loss_scale: float) -> dict[str, torch.Tensor]:
    """CogView's weighted LM loss (see the module docstring).

    logits [B, T-1, V] for the inputs ``seq[:, :-1]``; seq [B, T] (labels ``seq[:, 1:]``); lengths [B] = real
    tokens of each row (the rest is padding); ``n_image``: ids below it are image codes.
    Returns {"loss", "img_loss", "txt_loss"} (the last two detached, unweighted means)."""
    inputs, labels = seq[:, :-1], seq[:, 1:]
    T = labels.shape[1]
    valid = torch.arange(T, device=seq.device)[None, :] < (lengths.to(seq.device)[:, None] - 1)
    img = (inputs < n_image) & valid
    txt = ~(inputs < n_image) & valid
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         reduction="none").view(labels.shape)
    w = img.float() + txt.float() * float(txt_loss_scale)
    total = w.sum()
    if float(total) <= 0:
        raise TuwenError("txt_loss_scale=0 and no image positions in the batch: nothing to learn")
    loss = (ce * w).sum() / total
    d = ce.detach()
    return {"loss": loss, "img_loss": (d * img).sum() / img.sum().clamp(min=1),
            "txt_loss": (d * txt).sum() / txt.sum().clamp(min=1)}


class CogViewTrainModule(WithFrozen):
    """The CogView GPT (trained), with its VQ-VAE beside it (frozen, not in the state dict)."""

    def __init__(self, gpt: GPT, vqvae, *, n_image: int, ids: dict[str, int], txt_loss_scale: float,
                 image_size: int):
        super().__init__()
        self.gpt = gpt
        self.set_frozen("vqvae", vqvae)
        self.n_image, self.ids, self.txt_loss_scale, self.image_size = n_image, dict(ids), txt_loss_scale, image_size

    def sequences(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq [B, T] = ``[ROI1] text [BASE] [BOI1] codes [EOI1]`` padded with [PAD], lengths [B])."""
        if "codes" in batch:
            codes = batch["codes"]
        else:
            with torch.no_grad():
                codes = self.frozen("vqvae").encode(batch["image"]).flatten(1).clone()  # uint8 [B, H, W, 3]
        text, tlen = batch["text_ids"], batch["text_len"].tolist()
        B, n = codes.shape
        L = max(tlen) + 3 + n
        seq = torch.full((B, L), self.ids["[PAD]"], dtype=torch.long, device=codes.device)
        mid = torch.tensor([self.ids["[BASE]"], self.ids["[BOI1]"]], device=codes.device)
        for i, k in enumerate(tlen):
            seq[i, :k] = text[i, :k]
            seq[i, k:k + 2] = mid
            seq[i, k + 2:k + 2 + n] = codes[i]
            seq[i, k + 2 + n] = self.ids["[EOI1]"]
        return seq, torch.tensor(tlen, device=codes.device) + 3 + n

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        seq, lengths = self.sequences(batch)
        logits = self.gpt(seq[:, :-1])  # positions 0, 1, 2, … (CogView's ids without [ROI2])
        out = cogview_lm_loss(logits, seq, lengths, self.n_image, self.txt_loss_scale)
        out["bits_per_token"] = out["img_loss"] / math.log(2)  # per image position (evaluate: bits_per_image_token)
        return out


class CogViewTask(Task):
    name = "cogview_text2image"
    betas = (0.9, 0.95)  # CogView's --adam-beta2 default is 0.999; minGPT's 0.95 as tuwen's text→image

    def __init__(self, args, udp: dict, model: CogView, txt_loss_scale: float = DEFAULT_TXT_LOSS_SCALE,
                 max_text: int | None = None):
        self.args, self.udp = args, udp
        self.train_tables, self.val_tables = split_tables(args.tables)
        self.text_col = args.first_sequence or "text"
        self.image_col = args.second_sequence or "imgbase64"
        self.model, self.config = model, model.config
        self.txt_loss_scale = float(txt_loss_scale)
        if not math.isfinite(self.txt_loss_scale) or self.txt_loss_scale < 0:
            raise TuwenError(f"txt_loss_scale={txt_loss_scale}: must be a number ≥ 0")
        if model.vocab.text is None:
            raise TuwenError("this CogView model has no SentencePiece model (cog-pretrain.model); give "
                             "vocab_path=.../cog-pretrain.model in --user_defined_parameters")
        if model.vqvae is None:
            raise TuwenError("this CogView model has no image tokenizer; give vqgan_ckpt_path=.../"
                             "vqvae_hard_biggerset_011.pt in --user_defined_parameters")
        gh, gw = model.vqvae.grid_size(self.config.image_size)
        self.img_len = gh * gw
        room = self.config.gpt.num_positions + 1 - 4 - self.img_len  # [ROI1] + text + [BASE][BOI1] … [EOI1]
        if room < 1:
            raise TuwenError(f"the model has {self.config.gpt.num_positions} positions: no room for text before "
                             f"{self.img_len} image codes")
        if max_text is not None and max_text > room:
            raise TuwenError(f"text_len={max_text}: at most {room} text tokens fit before the {self.img_len} image "
                             f"codes in this model's {self.config.gpt.num_positions} positions")
        self.max_text = max_text or room
        self._base_gpt: GPT | None = model.gpt

    @classmethod
    def from_udp(cls, args, udp: dict, log=print) -> "CogViewTask":
        pre = udp["pretrain_model_name_or_path"]
        bad = [k for k in NOT_FOR_COGVIEW if udp.get(k) not in (None, False)]
        if bad:
            raise TuwenError("--user_defined_parameters " + "; ".join(f"{k}: {NOT_FOR_COGVIEW[k]}" for k in bad)
                             + f" ({pre} is a CogView-format model; drop the key)")
        if udp.get("pkeep") not in (None, 1.0):
            raise TuwenError("--user_defined_parameters pkeep: CogView-format models are finetuned on the real codes "
                             "(drop the key)")
        train_tables, _ = split_tables(args.tables)
        text_col, image_col = args.first_sequence or "text", args.second_sequence or "imgbase64"
        src = open_source([train_tables[0]], args.input_schema, args.skip_first_line, text_col=text_col,
                          image_col=image_col)
        check_columns(src, text_col, image_col, "--first_sequence", "--second_sequence")
        from ...convert import cogview as cv
        from ...hub import CONFIG_NAME, resolve_model_path

        path = resolve_model_path(pre, what="CogView model")
        megatron = cv.is_checkpoint_folder(path) and not (path / CONFIG_NAME).is_file()
        model = CogView.from_pretrained(path, vqvae=udp.get("vqgan_ckpt_path"), tokenizer=udp.get("vocab_path"),
                                        n_head=udp.get("n_head") if megatron else None, dtype=torch.float32)
        cfg = model.config
        if udp.get("n_head") is not None and udp["n_head"] != cfg.gpt.n_head:
            raise TuwenError(f"n_head={udp['n_head']}: the model {pre} has {cfg.gpt.n_head} heads (n_head is only "
                             f"needed for CogView's own checkpoint folders, which do not record it)")
        if cfg.task != "text2image":
            raise TuwenError(f"{pre} is a CogView {cfg.task} model; finetuning with text2image_generation trains "
                             f"CogView's text→image sequence ([ROI1] text [BASE] [BOI1] codes [EOI1]); give a "
                             f"text→image model such as cogview-base")
        if udp.get("size") is not None and udp["size"] != cfg.image_size:
            raise TuwenError(f"size={udp['size']}: the CogView model works on {cfg.image_size} px images")
        for k in GPT_STABILITY_FIELDS:
            if udp.get(k) is not None and bool(udp[k]) != getattr(cfg.gpt, k):
                raise TuwenError(f"--user_defined_parameters {k}={udp[k]}: the model {pre} has "
                                 f"{k}={getattr(cfg.gpt, k)}; it is part of the architecture (drop the key)")
        if udp.get("dropout") is not None:  # CogView's --hidden-dropout / --attention-dropout
            d = float(udp["dropout"])
            cfg.gpt = cfg.gpt.replace(embd_pdrop=d, resid_pdrop=d, attn_pdrop=d)
        given = {k: udp[k] for k in SAMPLING_FIELDS if udp.get(k) is not None}
        if given:  # saved with the model, like text→image's
            cfg.sampling = cfg.sampling.replace(**given)
        scale = udp.get("txt_loss_scale")
        scale = DEFAULT_TXT_LOSS_SCALE if scale is None else scale
        log(f"finetuning CogView model {pre} ({cfg.gpt.n_layer} layers, {cfg.gpt.n_embd} wide): loss over "
            f"[ROI1] text [BASE] [BOI1] codes [EOI1], txt_loss_scale={scale:g}")
        return cls(args, udp, model, scale, udp.get("text_len"))

    # -------------------------------------------------------------- data
    def dataset(self, tables: list[str]):
        vocab, size = self.model.vocab, self.config.image_size
        text_col, image_col, max_text = self.text_col, self.image_col, self.max_text
        roi1, pad = vocab["[ROI1]"], vocab["[PAD]"]
        src = open_source(tables, self.args.input_schema, self.args.skip_first_line, text_col=text_col,
                          image_col=image_col)
        check_columns(src, text_col, image_col, "--first_sequence", "--second_sequence")

        def transform(row: dict, index: int) -> dict:
            text = row[text_col]
            check_text_field(text, text_col, RULES)
            check_image_field(row[image_col], image_col, RULES)
            ids = vocab.parse_query(f"[ROI1] {text}")  # as generation parses "[ROI1] {text} [BASE] …"
            if ids[0] != roi1 or any(t < 0 or vocab.is_command(t) for t in ids[1:]):
                raise ValueError(f"column {text_col!r}: the text contains CogView command tokens ([MASK], [ROI1], …)")
            ids = ids[: 1 + max_text]  # CogView truncates what does not fit its positions
            img = cogview_resize_crop(open_image(row[image_col], target_size=size), size)
            padded = ids + [pad] * (1 + max_text - len(ids))
            return {"text_ids": torch.tensor(padded, dtype=torch.long), "text_len": len(ids),
                    "image": torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())}

        return RowDataset(src, transform)

    def train_dataset(self):
        return self.dataset(self.train_tables)

    def val_dataset(self):
        return self.dataset(self.val_tables) if self.val_tables else None

    # -------------------------------------------------------------- model
    def build_module(self, gpt: GPT | None = None) -> CogViewTrainModule:
        """The trained module around ``gpt``; by default the pretrained GPT the first time (its weights moved,
        not copied), a new GPT of the config after that (the trainer loads weights into it)."""
        if gpt is None and self._base_gpt is not None:
            with torch.device("meta"):
                gpt = GPT(self.config.gpt)  # dropout from the config (udp dropout=…)
            gpt.load_state_dict(self._base_gpt.state_dict(), assign=True)
            if self.config.gpt.tie_head:
                gpt.head.weight = gpt.tok_emb.weight
            gpt.requires_grad_(True)
            self._base_gpt = self.model.gpt = None  # one copy of the weights
        elif gpt is None:
            gpt = GPT(self.config.gpt)
        v = self.model.vocab
        ids = {k: v[k] for k in ("[PAD]", "[ROI1]", "[BASE]", "[BOI1]", "[EOI1]")}
        return CogViewTrainModule(gpt, self.model.vqvae, n_image=v.n_image, ids=ids,
                                  txt_loss_scale=self.txt_loss_scale, image_size=self.config.image_size)

    def param_groups(self, module, weight_decay):
        """CogView's ``gpt2_get_params_for_weight_decay_optimization``: decay every weight (the tied
        embedding/head and the position table included), not LayerNorm parameters or biases (the 1-D ones)."""
        decay, no_decay, seen = [], [], set()
        for p in module.gpt.parameters():  # a tied parameter is listed once
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]

    def _model(self, module: CogViewTrainModule) -> CogView:
        return CogView(self.config, module.frozen("vqvae"), self.model.vocab, gpt=module.gpt)

    def save_model(self, module, out_dir):
        self._model(module).save_pretrained(out_dir)

    def sample_images(self, module, batch):
        model = self._model(module)
        ids, n = batch["text_ids"][:2].tolist(), batch["text_len"][:2].tolist()
        v = model.vocab
        out = []
        for row, k in zip(ids, n):
            seq = row[:k] + [v["[BASE]"], v["[BOI1]"]] + [-1] * self.img_len
            codes = model.fill(seq, 1, seed=0)[:, -self.img_len:]
            out += model.vqvae.decode_to_pil(codes)
        return out

    def describe(self):
        return {"task": self.name, "config": self.config.to_dict(), "tables": self.args.tables,
                "finetune_from": self.udp.get("pretrain_model_name_or_path"), "txt_loss_scale": self.txt_loss_scale,
                "max_text_tokens": self.max_text}

