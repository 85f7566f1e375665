"""Training a ``tuwen.models.captioner.Captioner`` on EasyNLP TSV tables: the module the trainer runs, the row
transform, the task.

Loss (``loss``, what is trained): cross-entropy over the caption's tokens and its end token (the first [PAD]);
with ``loss_on_padding=true``, EasyNLP's definition over all ``text_len`` positions (with ~4-character captions and
``text_len=32`` almost 90 % of that gradient teaches the model to predict padding). Both are always reported:
``caption_loss`` (caption + end) and ``loss_all_positions``; ``token_acc`` is on the caption + end tokens. Start
points: a captioner folder to finetune (tuwen or EasyNLP ``mingpt_i2t``), or from scratch with a tokenizer
(``vocab.txt``, or one built from the training texts) and an image tower (OpenAI CLIP weights / a tuwen CLIP folder
via ``vit_ckpt_path``, a random ViT preset, or a frozen VQGAN for the VQ prefix). The EasyNLP command line around
this is ``tuwen.cli.easynlp.captioning``.
"""
from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...convert import easynlp_i2t
from ...data.images import fit_frames, frames_of
from ...data.tables import check_columns, open_source
from ...errors import TuwenError
from ...hub import read_model_type, tuwen_home
from ...models.captioner import (EASYNLP_MODEL_TYPES, MODEL_TYPE, Captioner, CaptionerConfig, load_image_tower,
                                 vit_features, vq_prefix_ids)
from ...models.gpt import GPT
from ...models.vit import CLIP_MEAN, CLIP_STD, ViTConfig, VisionTransformer
from ...text.tokenizer import TextTokenizer
from ..trainer import Task
from .common import WithFrozen, split_tables


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CaptionTrainModule(WithFrozen):
    """What the trainer trains: the GPT and (unless frozen) the ViT. A VQGAN is frozen and not in the state dict."""

    def __init__(self, config: CaptionerConfig, gpt: GPT, vit: VisionTransformer | None = None, vqgan=None,
                 end_id: int = 0, pkeep: float = 1.0, loss_on_padding: bool = False):
        super().__init__()
        self.config, self.gpt, self.end_id, self.pkeep = config, gpt, end_id, pkeep
        self.loss_on_padding = loss_on_padding  # EasyNLP: mean over all text_len positions, padding included
        self.vit = vit
        self.set_frozen("vqgan", vqgan)
        self.train_vit = vit is not None and not config.freeze_vit
        if vit is not None:
            for p in vit.parameters():
                p.requires_grad_(self.train_vit)

    @property
    def vqgan(self):
        return self.frozen("vqgan")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vit is not None and not self.train_vit:
            self.vit.eval()
        return self

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        c = self.config
        pv = c.image_processor().normalize(batch["pixels"])
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
        all_positions = nll.mean()
        loss = all_positions if self.loss_on_padding else caption_loss
        return {"loss": loss, "caption_loss": caption_loss.detach(), "loss_all_positions": all_positions.detach(),
                "token_acc": acc.detach()}


def columns(args) -> tuple[str, str]:
    """(image column, text column): EasyNLP's I2T/V2T first_sequence = image(s), second_sequence = text."""
    return args.first_sequence or "imgbase64", args.second_sequence or "text"


def make_transform(config: CaptionerConfig, tokenizer: TextTokenizer | None, source, image_col: str,
                   text_col: str | None, udp: dict, strict: bool = False, seed: int = 0,
                   first_reference: bool = False):
    """Row → {"pixels": uint8 [(F,) S, S, 3], "text_ids": [text_len]} (text omitted when ``text_col`` is None).

    Several references in one text field (JSON list or ``a || b``) → one of them, chosen by (seed, epoch, row);
    with ``first_reference`` (evaluation) always the first."""
    from ...metrics.captions import split_references

    root = udp.get("img_root_dir") if udp.get("enable_img_path") else None
    if udp.get("enable_img_path") and not root:
        raise TuwenError("enable_img_path=true needs img_root_dir=/folder/with/the/images")
    proc = config.image_processor()

    def transform(row: dict, index: int, epoch: int = 0) -> dict:
        field = row[image_col]
        if config.video:
            frames = frames_of(field, root)
            where = "{}:{}".format(*source.location(index))
            frames = fit_frames(frames, config.frame_num, where=where, strict=strict)
            pixels = np.stack([proc.load(f, root) for f in frames])
        else:
            pixels = proc.load(field, root)
        out = {"pixels": torch.from_numpy(pixels)}
        if text_col is not None:
            refs = split_references(row.get(text_col, ""))
            if not refs:
                raise ValueError(f"empty caption in column {text_col!r}")
            if len(refs) == 1 or first_reference:
                text = refs[0]
            else:
                text = random.Random(f"{seed}-{epoch}-{index}").choice(refs)
            ids = tokenizer.encode(text, config.text_len, pad=True)
            if all(i == tokenizer.pad_id for i in ids):
                raise ValueError(f"caption {text[:40]!r} has no tokens")
            out["text_ids"] = torch.tensor(ids, dtype=torch.long)
        return out

    return transform


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
    if read_model_type(p) in (MODEL_TYPE,) + EASYNLP_MODEL_TYPES:
        return "model", p
    if (p / "vocab.txt").exists():
        return "tokenizer", p
    raise TuwenError(f"pretrain_model_name_or_path={spec!r} ({p}): neither a captioner folder (config.json with "
                     f"model_type captioner / mingpt_i2t) nor a tokenizer (vocab.txt)")


class CaptionTask(Task):
    """Training of a captioner on EasyNLP TSV tables (see ``tuwen.cli.easynlp.captioning``).

    ``check_pretrained(config, what)``: raises when a model to finetune does not fit the command line."""

    name = "captioning"
    betas = (0.9, 0.95)  # minGPT

    def __init__(self, args, udp: dict, video: bool, vq: bool, log=_log,
                 check_pretrained: Callable[[CaptionerConfig, str], None] | None = None):
        self.args, self.udp, self.log = args, udp, log
        self.check_pretrained = check_pretrained
        self.train_tables, self.val_tables = split_tables(args.tables)
        self.image_col, self.text_col = columns(args)
        first = open_source(self.train_tables[:1], args.input_schema, args.skip_first_line, text_col=self.text_col,
                            image_col=self.image_col)
        check_columns(first, self.text_col, self.image_col, "--second_sequence", "--first_sequence")
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
        if read_model_type(path) in EASYNLP_MODEL_TYPES:
            over.update(easynlp_i2t.load_kwargs_from_udp(udp, video))
        self.base = Captioner.from_pretrained(path, **over)
        c = self.base.config
        if self.check_pretrained is not None:
            self.check_pretrained(c, f"the pretrained model {path}")
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
            self.tokenizer = TextTokenizer.train(self._texts(self.train_tables), vocab_size=udp["vocab_size"],
                                                 lowercase=udp["do_lower_case"])
            self.log(f"tokenizer: {self.tokenizer.built_note()}")
        text_vocab = udp["text_vocab_size"] or self.tokenizer.vocab_size
        if text_vocab < self.tokenizer.vocab_size:
            raise TuwenError(f"text_vocab_size={text_vocab} is smaller than the vocabulary "
                             f"({self.tokenizer.vocab_size})")
        if udp["gpt_preset"]:
            from ...models.gpt import PRESETS
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
            from ...convert.taming import load_vqgan
            self.vqgan = load_vqgan(udp["vqgan_ckpt_path"], config=udp["vqgan_config"])
            size = udp["img_size"] or self.vqgan.config.resolution
            h, w = self.vqgan.grid_size(size)
            if udp["img_len"] and udp["img_len"] != h * w:
                raise TuwenError(f"img_len={udp['img_len']} but the VQGAN gives {h}×{w}={h * w} codes for "
                                 f"img_size={size}")
            if udp["img_vocab_size"] and udp["img_vocab_size"] != self.vqgan.config.n_embed:
                raise TuwenError(f"img_vocab_size={udp['img_vocab_size']} but the VQGAN has "
                                 f"{self.vqgan.config.n_embed} codes")
            self.config = CaptionerConfig.build(prefix_encoder="vqgan", img_len=h * w, image_size=size,
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
        self.config = CaptionerConfig.build(prefix_encoder="vit", frame_num=frame_num, img_len=img_len,
                                            image_size=v.image_size, vit=v, vit_proj=ne != v.width,
                                            freeze_vit=freeze, image_mean=mean, image_std=std, **common)

    def _texts(self, tables: list[str]):
        from ...data.tables import BadRow, open_source
        from ...metrics.captions import split_references
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
        from ...data.tables import RowDataset, open_source
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
        gpt = GPT(c.gpt)
        if self.base is not None:
            gpt.load_state_dict(self.base.gpt.state_dict())
        return CaptionTrainModule(c, gpt, self.vit, self.vqgan, self.tokenizer.pad_id, self.udp["pkeep"],
                                  loss_on_padding=bool(self.udp.get("loss_on_padding")))

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


class EvalTask(Task):
    """The trainer's task for a teacher-forced evaluation of a loaded captioner (``--mode=evaluate``)."""

    name = "captioning-eval"
