"""Text→image training on the shared trainer: from EasyNLP TSVs (images encoded on the fly by the frozen VQGAN) or
from pre-tokenized code shards (``tuwen vq tokenize`` output folders).

``T2ITask.from_udp(args, udp)`` reads EasyNLP's flags and ``user_defined_parameters`` (finetune a pretrained model,
or train from scratch on a given VQGAN); ``T2ITask(args, udp, config=…, tokenizer=…, vqgan=…)`` wraps pieces that
are already loaded (``--mode=evaluate`` reuses the data code with a loaded model).
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ...data.codes import CodeShards
from ...data.images import load_image, to_tensor
from ...data.rules import APPS as _RULES, check_image_field, check_text_field
from ...data.tables import BadRow, RowDataset, check_columns, open_source
from ...convert.taming import load_vqgan
from ...errors import TuwenError
from ...models.gpt import GPT, PRESETS
from ...models.text2image import GPT_STABILITY_FIELDS, SAMPLING_FIELDS, TextToImage, TextToImageConfig, \
    image_logits
from ...models.vqgan import VQGAN
from ...sampling import SamplingParams
from ...text.tokenizer import TextTokenizer
from ..trainer import Task
from .common import WithFrozen, split_tables


RULES = _RULES["text2image_generation"]


class T2ITrainModule(WithFrozen):
    """What the trainer trains: the GPT, with the frozen VQGAN that encodes images (None when the data are codes)."""

    def __init__(self, gpt: GPT, vqgan: VQGAN | None, text_len: int, img_vocab_size: int, uncond_id: int,
                 cfg_drop_prob: float = 0.0, pkeep: float = 1.0):
        super().__init__()
        self.gpt = gpt
        self.set_frozen("vqgan", vqgan)
        self.text_len, self.img_vocab_size, self.uncond_id = text_len, img_vocab_size, uncond_id
        self.cfg_drop_prob, self.pkeep = cfg_drop_prob, pkeep

    @property
    def vqgan(self) -> VQGAN | None:
        return self.frozen("vqgan")

    def codes(self, batch: dict) -> torch.Tensor:
        if "codes" in batch:
            return batch["codes"]
        with torch.no_grad():
            return self.vqgan.encode(batch["image"]).flatten(1).clone()  # [B, img_len] (clone: not an inference tensor)

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        text, z = batch["text_ids"], self.codes(batch)  # [B, text_len], [B, img_len]
        if self.training and self.cfg_drop_prob > 0:
            drop = torch.rand(text.shape[0], device=text.device) < self.cfg_drop_prob
            text = torch.where(drop[:, None], torch.full_like(text, self.uncond_id), text)
        inp = z
        if self.training and self.pkeep < 1.0:  # taming's corruption: feed some random codes, predict the real ones
            keep = torch.bernoulli(torch.full(z.shape, self.pkeep, device=z.device)).bool()
            inp = torch.where(keep, z, torch.randint_like(z, self.img_vocab_size))
        logits = image_logits(self.gpt, text, inp, self.text_len)  # [B, img_len, img_vocab]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), z.reshape(-1))
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2)}


def is_code_dir(p: str) -> bool:
    """A ``tuwen vq tokenize`` output folder (code shards + meta.json)."""
    return Path(p).is_dir() and (Path(p) / "meta.json").exists()


class T2ITask(Task):
    name = "text2image"
    betas = (0.9, 0.95)  # minGPT

    def __init__(self, args, udp: dict, *, config: TextToImageConfig, tokenizer: TextTokenizer, vqgan: VQGAN,
                 base: TextToImage | None = None):
        self.args, self.udp = args, udp
        self.train_tables, self.val_tables = split_tables(args.tables)
        self.text_col = args.first_sequence or "text"
        self.image_col = args.second_sequence or "imgbase64"
        self.config, self.tokenizer, self.vqgan, self.base = config, tokenizer, vqgan, base

    @classmethod
    def from_udp(cls, args, udp: dict, log=print) -> "T2ITask":
        """Finetune ``pretrain_model_name_or_path``, or build a new model on ``vqgan_ckpt_path`` (see USER_PARAMS)."""
        check_no_txt_loss(udp)
        train_tables, _ = split_tables(args.tables)
        first = next((t for t in train_tables if not is_code_dir(t)), None)
        if first is not None:  # before any vocabulary or model is built: are the column flags the right way round?
            text_col, image_col = args.first_sequence or "text", args.second_sequence or "imgbase64"
            src = open_source([first], args.input_schema, args.skip_first_line, text_col=text_col,
                              image_col=image_col)
            check_columns(src, text_col, image_col, "--first_sequence", "--second_sequence")
        pre = udp["pretrain_model_name_or_path"]
        if pre:  # finetune: everything comes from the pretrained model
            sizes = {k: udp[k] for k in ("size", "text_len", "img_len") if udp[k] is not None}
            vq = {"vqgan_config": udp["vqgan_config"]} if udp["vqgan_config"] else {}
            # an EasyNLP folder takes its sizes from the udp; a tuwen folder checks them against its own
            base = TextToImage.from_pretrained(pre, **vq, **sizes)
            cfg = base.config
            for k, ck in (("text_len", "text_len"), ("img_len", "img_len"), ("size", "image_size"),
                          ("img_vocab_size", "img_vocab_size")):
                if udp[k] is not None and udp[k] != getattr(cfg, ck):
                    raise TuwenError(f"--user_defined_parameters {k}={udp[k]} does not match the pretrained model "
                                     f"{pre} ({ck}={getattr(cfg, ck)})")
            for k in GPT_STABILITY_FIELDS:  # an architecture choice: the pretrained model has it or not
                if udp.get(k) is not None and bool(udp[k]) != getattr(cfg.gpt, k):
                    raise TuwenError(f"--user_defined_parameters {k}={udp[k]}: the pretrained model {pre} has "
                                     f"{k}={getattr(cfg.gpt, k)}; it is part of the architecture (drop the key)")
            drop = _cfg_drop_prob(udp)
            config = cfg.replace(cfg_drop_prob=drop) if drop is not None else cfg
            given = {k: udp[k] for k in SAMPLING_FIELDS if udp.get(k) is not None}
            if given:  # sampling settings named at training time are saved with the model
                config = config.replace(sampling=config.sampling.replace(**given))
            task = cls(args, udp, config=config, tokenizer=base.tokenizer, vqgan=base.vqgan, base=base)
        else:
            vqgan = _scratch_vqgan(udp)
            size, img_len = _image_sizes(udp, vqgan)
            tokenizer = _make_tokenizer(udp, args, train_tables, log)
            config = _scratch_config(udp, vqgan, tokenizer, size, img_len)
            task = cls(args, udp, config=config, tokenizer=tokenizer, vqgan=vqgan)
        block = task.config.gpt.block_size
        if udp["block_size"] and udp["block_size"] != block:
            raise TuwenError(f"block_size={udp['block_size']} but text_len + img_len = {block}")
        seq = getattr(args, "sequence_length", None)
        if seq and seq != block:
            raise TuwenError(f"--sequence_length={seq} but text_len ({task.config.text_len}) + img_len "
                             f"({task.config.img_len}) = {block}; fix one of them")
        return task

    # -------------------------------------------------------------- data
    def dataset(self, tables: list[str], random_crop: bool = False):
        """Rows of TSV tables (text + image) or code-shard folders → {"text_ids", "image" | "codes"}."""
        c, tok = self.config, self.tokenizer
        offset = c.img_vocab_size
        text_col, image_col = self.text_col, self.image_col
        seed = self.args.random_seed

        if all(is_code_dir(t) for t in tables):
            shards = [CodeShards(t) for t in tables]
            for t, s in zip(tables, shards):
                if s.seq_len != c.img_len or s.n_embed != c.img_vocab_size:
                    raise TuwenError(f"{t}: code shards hold {s.seq_len} codes per image from a {s.n_embed}-code "
                                     f"codebook; this model has img_len={c.img_len}, img_vocab_size={c.img_vocab_size}")
            return _CodesDataset(shards, tok, c.text_len, offset)
        if any(is_code_dir(t) for t in tables):
            raise TuwenError("--tables: do not mix code-shard folders and TSV tables in one split")
        src = open_source(tables, self.args.input_schema, self.args.skip_first_line, text_col=text_col,
                          image_col=image_col)
        for col, flag in ((text_col, "--first_sequence"), (image_col, "--second_sequence")):
            if col not in src.columns:
                raise TuwenError(f"{flag}={col!r} is not a column of --input_schema ({', '.join(src.columns)})")

        def transform(row: dict, index: int, epoch: int) -> dict:
            text = row[text_col]
            check_text_field(text, text_col, RULES)         # the rules `tuwen data validate` applies too
            check_image_field(row[image_col], image_col, RULES)
            ids = tok.encode(text, c.text_len, pad=True)
            rng = random.Random(f"{seed}-{epoch}-{index}") if random_crop else None
            img = load_image(row[image_col], c.image_size, random_crop=random_crop, rng=rng)
            return {"text_ids": torch.tensor(ids, dtype=torch.long) + offset, "image": to_tensor(img)}

        return RowDataset(src, transform)

    def train_dataset(self):
        return self.dataset(self.train_tables, self.udp["random_crop"])

    def val_dataset(self):
        return self.dataset(self.val_tables, False) if self.val_tables else None

    # -------------------------------------------------------------- model
    def build_module(self, gpt: GPT | None = None) -> T2ITrainModule:
        """The trained module around ``gpt`` (default: a new GPT, with the pretrained weights when finetuning)."""
        c = self.config
        gpt = self.new_gpt() if gpt is None else gpt
        uncond = self.tokenizer.pad_id + c.img_vocab_size
        return T2ITrainModule(gpt, self.vqgan, c.text_len, c.img_vocab_size, uncond, c.cfg_drop_prob,
                              self.udp["pkeep"])

    def new_gpt(self) -> GPT:
        """A new GPT of the config, with the pretrained model's weights when finetuning."""
        gpt = GPT(self.config.gpt)
        if self.base is not None:
            gpt.load_state_dict(self.base.gpt.state_dict())
        return gpt

    def param_groups(self, module, weight_decay):
        return module.gpt.configure_param_groups(weight_decay)

    def _model(self, module: T2ITrainModule) -> TextToImage:
        return TextToImage(self.config, module.vqgan, self.tokenizer, gpt=module.gpt)

    def save_model(self, module, out_dir):
        self._model(module).save_pretrained(out_dir)

    def sample_images(self, module, batch):
        imgs = self._model(module).generate(text_ids=batch["text_ids"][:4], num_images_per_prompt=2, seed=0)
        return [im for row in imgs for im in row]

    def describe(self):
        return {"task": self.name, "config": self.config.to_dict(), "tables": self.args.tables,
                "finetune_from": self.udp["pretrain_model_name_or_path"]}


# ---------------------------------------------------------------------------------------------- from scratch

def check_no_txt_loss(udp: dict) -> None:
    """``txt_loss_scale`` (CogView's text-token loss weight) needs a head that predicts text; tuwen's text→image
    and super-resolution GPTs predict image codes only (0 = no text loss, which is what they do, is accepted)."""
    if udp.get("txt_loss_scale"):
        raise TuwenError(f"txt_loss_scale={udp['txt_loss_scale']:g}: the option needs a model whose head covers the "
                         f"text vocabulary (a CogView-format model: pretrain_model_name_or_path=a CogView folder); "
                         f"this model's head predicts image codes only (drop the key)")


def _cfg_drop_prob(udp: dict) -> float | None:
    """cfg_drop_prob, or its DALLE-pytorch alias null_cond_prob; None when neither is given."""
    return udp["cfg_drop_prob"] if udp["cfg_drop_prob"] is not None else udp["null_cond_prob"]


def _scratch_vqgan(udp: dict) -> VQGAN:
    if not udp["vqgan_ckpt_path"]:
        raise TuwenError("training from scratch needs an image tokenizer: add vqgan_ckpt_path=... to "
                         "--user_defined_parameters (a tuwen VQGAN folder from `tuwen vq train`/`tuwen vq "
                         "import`, a taming .ckpt, or EasyNLP's vqgan_f16_16384.bin); or finetune with "
                         "pretrain_model_name_or_path=...")
    return load_vqgan(udp["vqgan_ckpt_path"], config=udp["vqgan_config"])


def _image_sizes(udp: dict, vqgan: VQGAN) -> tuple[int, int]:
    """(image size in pixels, img_len) of a new model on ``vqgan``, checked against the udp."""
    size = udp["size"] or vqgan.config.resolution
    h, w = vqgan.grid_size(size)
    img_len = udp["img_len"] or h * w
    if img_len != h * w:
        raise TuwenError(f"--user_defined_parameters img_len={img_len} but the VQGAN gives a {h}×{w} grid "
                         f"for size={size} ({h * w} codes)")
    if udp["img_vocab_size"] and udp["img_vocab_size"] != vqgan.config.n_embed:
        raise TuwenError(f"img_vocab_size={udp['img_vocab_size']} but the VQGAN has {vqgan.config.n_embed} codes")
    return size, img_len


def _scratch_config(udp: dict, vqgan: VQGAN, tokenizer: TextTokenizer, size: int, img_len: int
                    ) -> TextToImageConfig:
    text_vocab = udp["text_vocab_size"] or tokenizer.vocab_size
    if text_vocab < tokenizer.vocab_size:
        raise TuwenError(f"text_vocab_size={text_vocab} is smaller than the vocabulary ({tokenizer.vocab_size})")
    preset = udp["gpt_preset"]
    if preset and preset not in PRESETS:
        raise TuwenError(f"gpt_preset={preset!r}: choose one of {', '.join(PRESETS)}")
    nl, nh, ne = PRESETS[preset] if preset else (12, 12, 768)
    drop = udp["dropout"] or 0.0
    cfg_drop = _cfg_drop_prob(udp) or 0.0
    return TextToImageConfig.build(
        text_len=udp["text_len"] or 32, img_len=img_len, img_vocab_size=vqgan.config.n_embed,
        text_vocab_size=text_vocab, image_size=size, n_layer=udp["n_layer"] or nl, n_head=udp["n_head"] or nh,
        n_embd=udp["n_embd"] or ne, embd_pdrop=drop, resid_pdrop=drop, attn_pdrop=drop,
        cfg_drop_prob=cfg_drop, sampling=default_sampling(udp, cfg_drop),
        **{k: bool(udp.get(k)) for k in GPT_STABILITY_FIELDS})


#: generation defaults of a model trained with classifier-free guidance: the settings the demo model's
#: validation prompts chose (README "The shipped demo model"); on sklearn digits they lifted the prompted-digit
#: accuracy of generated images from 76.5 % (top_k 100, no guidance) to 100 % (issue 15)
CFG_SAMPLING = {"top_k": 16, "guidance_scale": 2.0}


def default_sampling(udp: dict, cfg_drop_prob: float) -> SamplingParams:
    """The generation defaults saved with a new model: ``CFG_SAMPLING`` when it is trained with
    ``cfg_drop_prob`` > 0, else EasyNLP's top_k 100; any of top_k/top_p/temperature/guidance_scale given in the
    training command's user_defined_parameters replaces the default."""
    base = SamplingParams(**CFG_SAMPLING) if cfg_drop_prob > 0 else SamplingParams(top_k=100)
    return base.replace(**{k: udp[k] for k in SAMPLING_FIELDS if udp.get(k) is not None})


def _texts(tables: list[str], args, text_col: str, image_col: str) -> Iterator[str]:
    for t in tables:
        if is_code_dir(t):
            shards = CodeShards(t)
            for i in range(len(shards)):
                yield shards[i]["text"]
            continue
        src = open_source([t], args.input_schema, args.skip_first_line, text_col=text_col, image_col=image_col)
        for i in range(len(src)):
            r = src.row(i)
            if not isinstance(r, BadRow) and r.get(text_col):
                yield r[text_col]


def _make_tokenizer(udp: dict, args, train_tables: list[str], log) -> TextTokenizer:
    if udp["vocab_path"]:
        return TextTokenizer.from_pretrained(udp["vocab_path"])
    texts = _texts(train_tables, args, args.first_sequence or "text", args.second_sequence or "imgbase64")
    tok = TextTokenizer.train(texts, vocab_size=udp["vocab_size"], lowercase=udp["do_lower_case"])
    log(tok.built_note())
    return tok


class _CodesDataset:
    """Pre-tokenized codes (``tuwen vq tokenize`` folders) → {"text_ids", "codes"}."""

    def __init__(self, shards, tok: TextTokenizer, text_len: int, offset: int):
        import numpy as np
        self.shards, self.tok, self.text_len, self.offset = shards, tok, text_len, offset
        self._cum = np.cumsum([0] + [len(s) for s in shards])
        self.epoch = 0

    def __len__(self):
        return int(self._cum[-1])

    def __getitem__(self, i):
        import numpy as np
        k = int(np.searchsorted(self._cum, i, side="right") - 1)
        item = self.shards[k][i - int(self._cum[k])]
        ids = self.tok.encode(item["text"], self.text_len, pad=True)
        return {"text_ids": torch.tensor(ids, dtype=torch.long) + self.offset, "codes": item["codes"].long()}
