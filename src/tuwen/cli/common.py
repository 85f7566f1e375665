"""Flags shared by the EasyNLP-style entry point and the subcommands (training, data, prediction)."""
from __future__ import annotations

import argparse

from ..data.pngmeta import GRID_DIR  # grids go in this sub-folder; readers of image folders skip it
from ..errors import TuwenError


class Parser(argparse.ArgumentParser):
    """Every tuwen parser: no prefix matching (``--lr`` must never silently become ``--lr_schedule``); its
    subparsers are of this class too (``add_subparsers`` uses the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """argparse's error, with "did you mean" for a mistyped flag or subcommand."""
        super().error(message + suggest_flags(self, message))


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and its subcommand parsers, recursively (a subcommand's unknown flags reach the root parser)."""
    out = [parser]
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sub in dict.fromkeys(act.choices.values()):
                out += _all_parsers(sub)
    return out


def suggest_flags(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean --x?)`` for the unknown flags / invalid choice named in an argparse ``message``."""
    import difflib
    import re

    hints = []
    if "unrecognized arguments" in message or "unrecognized argument" in message:
        known = sorted({o for q in _all_parsers(parser) for o in q._option_string_actions if o.startswith("--")})
        for bad in re.findall(r"(--?[\w-]+)", message.split(":", 1)[-1]):
            near = difflib.get_close_matches(bad.split("=")[0], known, n=1, cutoff=0.6)
            if near and near[0] != bad.split("=")[0]:  # (an exact match: a flag of another command)
                hints.append(f"{bad} → {near[0]}")
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
        near = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
        if near:
            hints.append(f"{m.group(1)} → {near[0]}")
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def add_reader_flags(p: argparse.ArgumentParser) -> None:
    """How CSV / JSONL / WebDataset / Parquet inputs are read (``tuwen.data.formats``; open_clip's spellings)."""
    g = p.add_argument_group("data formats (CSV, JSONL, WebDataset, Parquet)")
    g.add_argument("--table_format", default=None, choices=["tsv", "csv", "jsonl", "webdataset", "parquet", "folder"],
                   help="read every input as this format (default: by extension: .csv .jsonl .tar .parquet, "
                        "folders; other files are headerless EasyNLP TSV)")
    g.add_argument("--csv-img-key", "--csv_img_key", dest="csv_img_key", default=None,
                   help="image column of a CSV/JSONL/Parquet (a path, base64 or bytes; default: image, filepath, …)")
    g.add_argument("--csv-caption-key", "--csv_caption_key", dest="csv_caption_key", default=None,
                   help="caption column (default: caption, text, title)")
    g.add_argument("--csv-separator", "--csv_separator", dest="csv_separator", default=None,
                   help="CSV field separator (default: tab when the header has one, else comma; '\\t' for tab)")
    g.add_argument("--img_root_dir", "--img-root-dir", dest="img_root_dir", default=None,
                   help="image paths in CSV/JSONL/Parquet are relative to this folder (default: the file's folder)")


def add_data_flags(p: argparse.ArgumentParser, required_tables: bool = False) -> None:
    g = p.add_argument_group("data (EasyNLP flags)")
    g.add_argument("--tables", required=required_tables,
                   help="comma-separated inputs (train: train,valid; predict: input): EasyNLP TSV files, image "
                        "folders, .csv, .jsonl, WebDataset .tar shards (shards/{000..099}.tar) or .parquet")
    g.add_argument("--input_schema", help="name:type:len,... e.g. idx:str:1,text:str:1,imgbase64:str:1")
    g.add_argument("--first_sequence", help="column name of the first input (T2I: text; I2T/V2T: image)")
    g.add_argument("--second_sequence", help="column name of the second input (T2I: image; I2T/V2T: text)")
    g.add_argument("--skip_first_line", action="store_true", help="skip a header line in every table")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first bad row (default: skip bad rows and report them at the end)")
    g.add_argument("--max_bad_listed", type=int, default=20, help="how many bad rows to list (all are counted)")
    g.add_argument("--max_image_pixels", type=int, default=None,
                   help="images with more pixels are bad rows, refused before decoding (default 16777216 = 4096²; "
                        "accepted by every command)")
    add_reader_flags(p)


DEFAULT_MICRO_BATCH = 2   # EasyNLP's --micro_batch_size default
APP_MICRO_BATCH = {"clip": 64}  # contrastive: the batch's other pairs are the negatives (see --micro_batch_size)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (EasyNLP flags)")
    g.add_argument("--checkpoint_dir", "--checkpoint_path", dest="checkpoint_dir",
                   help="training: where the model and checkpoints are written; predict/evaluate: the model folder")
    g.add_argument("--learning_rate", "--lr", dest="learning_rate", type=float, default=None)
    g.add_argument("--weight_decay", "--wd", dest="weight_decay", type=float, default=None)
    g.add_argument("--max_grad_norm", "--mn", dest="max_grad_norm", type=float, default=1.0)
    g.add_argument("--optimizer_type", "--optimizer", dest="optimizer_type", default="AdamW",
                   help="AdamW (decoupled weight decay) or Adam (weight decay as an L2 gradient term, like EasyNLP)")
    g.add_argument("--warmup_proportion", type=float, default=0.1)
    g.add_argument("--epoch_num", "--epochs", dest="epoch_num", type=int, default=3)
    g.add_argument("--random_seed", type=int, default=1234)
    g.add_argument("--logging_steps", type=int, default=100)
    g.add_argument("--save_checkpoint_steps", type=int, default=None,
                   help="evaluate, save the best model and a checkpoint every N optimizer steps (default: each epoch)")
    g.add_argument("--save_checkpoint_minutes", type=float, default=None,
                   help="also save a checkpoint when this many minutes passed since the last one (long epochs)")
    g.add_argument("--save_all_checkpoints", action="store_true")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--micro_batch_size", "--train_batch_size", "--batch-size", "--batch_size", dest="micro_batch_size",
                   type=int, default=None,
                   help="examples per step and process (default 2, EasyNLP's; --app_name=clip: 64, because a "
                        "contrastive loss scores each pair against the other pairs of its batch, and a batch of 2 "
                        "gives each image one negative; open_clip / Chinese-CLIP use hundreds to thousands)")
    g.add_argument("--data_threads", "--num_workers", "--workers", dest="num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: CPU 0 up to 4 cores, else cores/4; GPU cores-1; at "
                        "most 4). On CPU torch then uses cores-1-workers threads unless OMP_NUM_THREADS is set")
    g.add_argument("--use_amp", "--amp", dest="use_amp", action="store_true",
                   help="mixed precision (bf16 on CUDA; same as --precision bf16)")
    g.add_argument("--resume_from_checkpoint", "--resume", dest="resume", default=None,
                   help="'auto' (latest checkpoint in --checkpoint_dir) or a checkpoint file/folder")
    o = p.add_argument_group("training (open_clip spellings)")
    o.add_argument("--warmup", dest="warmup_steps", type=int, default=None,
                   help="warmup in optimizer steps (open_clip; instead of --warmup_proportion)")
    o.add_argument("--save-frequency", "--save_frequency", dest="save_checkpoint_epochs", type=int, default=None,
                   help="save a checkpoint every N epochs (open_clip)")
    t = p.add_argument_group("training (tuwen)")
    t.add_argument("--max_steps", type=int, default=None, help="stop after N optimizer steps")
    t.add_argument("--lr_schedule", default="linear", choices=["linear", "cosine", "constant"])
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--keep_checkpoints", type=int, default=2, help="training checkpoints to keep")
    t.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None,
                   help="write TensorBoard logs to CHECKPOINT_DIR/log (default: when tensorboard is installed)")
    t.add_argument("--no_tensorboard", dest="tensorboard", action="store_false")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer states over the processes (FSDP2, "
                   "per transformer block; bf16 on CUDA); checkpoints become sharded step-N.dcp folders")
    t.add_argument("--fsdp_cpu_offload", action="store_true",
                   help="with --fsdp: keep the sharded weights, gradients and optimizer states in CPU memory "
                   "(FSDP2 CPUOffloadPolicy; the optimizer steps on the CPU) — for models whose states do not "
                   "fit on the GPUs")
    t.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bars even when stderr is not a terminal (default: only on a terminal, rank 0)")
    t.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")


def train_args_from(ns: argparse.Namespace, *, default_lr: float, default_wd: float = 0.01):
    """Build TrainArgs from parsed flags (task-specific learning-rate/weight-decay defaults)."""
    from ..training.trainer import TrainArgs

    if not ns.checkpoint_dir:
        raise TuwenError("--checkpoint_dir is required for training (where the model and checkpoints go)")
    precision = ns.precision
    if getattr(ns, "use_amp", False) and precision == "auto":
        precision = "bf16"
    args = TrainArgs(
        checkpoint_dir=ns.checkpoint_dir,
        learning_rate=ns.learning_rate if ns.learning_rate is not None else default_lr,
        weight_decay=ns.weight_decay if ns.weight_decay is not None else default_wd,
        epoch_num=ns.epoch_num, max_steps=ns.max_steps,
        micro_batch_size=ns.micro_batch_size if ns.micro_batch_size is not None else DEFAULT_MICRO_BATCH,
        gradient_accumulation_steps=ns.gradient_accumulation_steps, max_grad_norm=ns.max_grad_norm,
        warmup_proportion=ns.warmup_proportion, lr_schedule=ns.lr_schedule, optimizer_type=ns.optimizer_type,
        random_seed=ns.random_seed, logging_steps=ns.logging_steps, save_checkpoint_steps=ns.save_checkpoint_steps,
        save_checkpoint_minutes=getattr(ns, "save_checkpoint_minutes", None), save_all_checkpoints=ns.save_all_checkpoints, keep_checkpoints=ns.keep_checkpoints, resume=ns.resume,
        precision=precision, device=ns.device, num_workers=ns.num_workers,
        strict=getattr(ns, "strict", False), tensorboard=ns.tensorboard,
        max_bad_listed=getattr(ns, "max_bad_listed", 20), compile=ns.compile, progress=ns.progress,
        fsdp=getattr(ns, "fsdp", False), fsdp_cpu_offload=getattr(ns, "fsdp_cpu_offload", False),
    )
    for flag, attr in (("--warmup", "warmup_steps"), ("--save-frequency", "save_checkpoint_epochs")):
        value = getattr(ns, attr, None)
        if value is None:
            continue
        if value < (0 if attr == "warmup_steps" else 1):
            raise TuwenError(f"{flag} {value}: must be ≥ {0 if attr == 'warmup_steps' else 1}")
        setattr(args, attr, value)
    args.validate()
    return args


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prediction (EasyNLP flags)")
    g.add_argument("--outputs", help="output TSV file (predict)")
    g.add_argument("--output_schema", default="", help="output columns, e.g. idx,text,gen_imgbase64")
    g.add_argument("--append_cols", default=None, help="input columns appended to every output row")
    t = p.add_argument_group("prediction (tuwen)")
    t.add_argument("--output_dir", default=None,
                   help="text→image: also write each row's PNGs here as {idx}_{k}.png (with their prompt, seed, "
                        "settings and model in PNG text chunks) and grids/{idx}.png; idx values that are not safe "
                        "file names get a short hash")
    t.add_argument("--rerank", default=None, help="clip:DIR or caption:DIR: score candidates and keep the best")
    t.add_argument("--keep", type=int, default=None, help="with --rerank: how many candidates to keep per prompt")
    t.add_argument("--metric", default=None, help="evaluate: extra metric, e.g. 'attributes' on the synthetic set")
    t.add_argument("--weights_dtype", default=None, choices=["auto", "fp32", "bf16", "int8", "w8a8"],
                   help="text→image predict/evaluate: GPT Linear weights (default auto: w8a8 on x86 CPUs, else int8; "
                        "as loaded on GPU); same as user_defined_parameters weights_dtype=")
    t.add_argument("--vq_dtype", default=None, choices=["fp32", "bf16", "auto"],
                   help="text→image predict: VQGAN decode dtype (default fp32; auto: bf16 on CUDA and CPUs with "
                        "AVX512-BF16/AMX); recorded in each PNG; same as user_defined_parameters vq_dtype=")


# ----------------------------------------------------------------------------------------------- image output
# (text→image: `tuwen generate`, `tuwen demo` and `--mode=predict --output_dir`)



from ..fileio import sanitize_name  # file names of idx values (in fileio: the retrieval metric matches them)


class ImageWriter:
    """Writes the images of one run into ``out_dir``: ``{name}_{k}.png`` (+ the score when reranked) and
    ``grids/{name}.png``, each PNG with its generation record (``tuwen.data.pngmeta``).

    Names are unique per input row: ``sanitize_name(key)``; a key seen before in this run (a repeated idx) gets
    ``_rowN`` (its row number) or ``_dupN`` with a warning, never overwriting an image of this run. Files left in
    ``out_dir`` by an earlier run are announced once (``warn_if_not_empty``)."""

    def __init__(self, out_dir, warn=None):
        from pathlib import Path
        import sys

        self.out_dir = Path(out_dir)
        self.used: set[str] = set()
        self.warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))

    def warn_if_not_empty(self, flag: str = "--out") -> bool:
        """Warn when ``out_dir`` already holds files (an earlier run's images get mixed with or replaced by this
        run's); True when it did."""
        try:
            old = [p for p in self.out_dir.iterdir() if not p.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return False
        if old:
            self.warn(f"{flag} {self.out_dir} is not empty ({len(old)} entries); files with the same names are "
                      f"replaced and older ones stay mixed in with this run's: use an empty folder")
        return bool(old)

    def name_for(self, key, row: int | None = None) -> str:
        base = sanitize_name(key)
        name, n = base, 1
        while name in self.used:
            name = f"{base}_row{row}" if row is not None and n == 1 else f"{base}_dup{n}"
            n += 1
        if name != base:
            self.warn(f"idx {str(key)!r} repeats an earlier row's; its images are written as {name}_*.png")
        self.used.add(name)
        return name

    def write(self, key, images: list, scores: list[float] | None = None, records: list[dict] | None = None,
              row: int | None = None) -> list[str]:
        """Write one prompt's images (and its grid); returns the image file names (relative to ``out_dir``)."""
        from ..data.images import make_grid
        from ..data.pngmeta import save_png

        self.out_dir.mkdir(parents=True, exist_ok=True)
        base = self.name_for(key, row)
        names = []
        for k, im in enumerate(images):
            name = f"{base}_{k}.png" if scores is None else f"{base}_{k}_score{scores[k]:.3f}.png"
            save_png(im, self.out_dir / name, records[k] if records else None)
            names.append(name)
        if images:
            (self.out_dir / GRID_DIR).mkdir(exist_ok=True)
            make_grid(images).save(self.out_dir / GRID_DIR / f"{base}.png")
        self.last_grid = f"{GRID_DIR}/{base}.png"
        return names
