"""Flags shared by the EasyNLP-style entry point and the subcommands (training, data, prediction)."""
from __future__ import annotations

import argparse

from ..errors import TuwenError


def add_data_flags(p: argparse.ArgumentParser, required_tables: bool = False) -> None:
    g = p.add_argument_group("data (EasyNLP flags)")
    g.add_argument("--tables", required=required_tables,
                   help="comma-separated TSV files (train: train,valid; predict: input) or image folders")
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


def add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (EasyNLP flags)")
    g.add_argument("--checkpoint_dir", "--checkpoint_path", dest="checkpoint_dir",
                   help="training: where the model and checkpoints are written; predict/evaluate: the model folder")
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--weight_decay", "--wd", dest="weight_decay", type=float, default=None)
    g.add_argument("--max_grad_norm", "--mn", dest="max_grad_norm", type=float, default=1.0)
    g.add_argument("--optimizer_type", "--optimizer", dest="optimizer_type", default="AdamW",
                   help="AdamW (decoupled weight decay) or Adam (weight decay as an L2 gradient term, like EasyNLP)")
    g.add_argument("--warmup_proportion", type=float, default=0.1)
    g.add_argument("--epoch_num", type=int, default=3)
    g.add_argument("--random_seed", type=int, default=1234)
    g.add_argument("--logging_steps", type=int, default=100)
    g.add_argument("--save_checkpoint_steps", type=int, default=None)
    g.add_argument("--save_all_checkpoints", action="store_true")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--micro_batch_size", "--train_batch_size", dest="micro_batch_size", type=int, default=2)
    g.add_argument("--data_threads", "--num_workers", dest="num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: cores-1, at most 4)")
    g.add_argument("--use_amp", action="store_true", help="mixed precision (bf16 on CUDA; same as --precision bf16)")
    g.add_argument("--resume_from_checkpoint", "--resume", dest="resume", default=None,
                   help="'auto' (latest checkpoint in --checkpoint_dir) or a checkpoint file/folder")
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
    t.add_argument("--no_progress", dest="progress", action="store_false", default=None)


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
        epoch_num=ns.epoch_num, max_steps=ns.max_steps, micro_batch_size=ns.micro_batch_size,
        gradient_accumulation_steps=ns.gradient_accumulation_steps, max_grad_norm=ns.max_grad_norm,
        warmup_proportion=ns.warmup_proportion, lr_schedule=ns.lr_schedule, optimizer_type=ns.optimizer_type,
        random_seed=ns.random_seed, logging_steps=ns.logging_steps, save_checkpoint_steps=ns.save_checkpoint_steps,
        save_all_checkpoints=ns.save_all_checkpoints, keep_checkpoints=ns.keep_checkpoints, resume=ns.resume,
        precision=precision, device=ns.device, num_workers=ns.num_workers,
        strict=getattr(ns, "strict", False), tensorboard=ns.tensorboard,
        max_bad_listed=getattr(ns, "max_bad_listed", 20), compile=ns.compile, progress=ns.progress,
    )
    args.validate()
    return args


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prediction (EasyNLP flags)")
    g.add_argument("--outputs", help="output TSV file (predict)")
    g.add_argument("--output_schema", default="", help="output columns, e.g. idx,text,gen_imgbase64")
    g.add_argument("--append_cols", default=None, help="input columns appended to every output row")
    t = p.add_argument_group("prediction (tuwen)")
    t.add_argument("--output_dir", default=None, help="also write PNG files / grids / index.html here")
    t.add_argument("--rerank", default=None, help="clip:DIR or caption:DIR: score candidates and keep the best")
    t.add_argument("--keep", type=int, default=None, help="with --rerank: how many candidates to keep per prompt")
    t.add_argument("--metric", default=None, help="evaluate: extra metric, e.g. 'attributes' on the synthetic set")


# ----------------------------------------------------------------------------------------------- image output
# (text→image: `tuwen generate`, `tuwen demo` and `--mode=predict --output_dir`)

def sanitize_name(s, maxlen: int = 80) -> str:
    """A safe file-name part from user text (idx values): no path separators, no dot-files, bounded length."""
    import re
    s = re.sub(r"[^\w\-.]+", "_", str(s), flags=re.UNICODE).strip("._") or "row"
    return s[:maxlen]


def write_images(out_dir, key, images: list, scores: list[float] | None = None) -> list[str]:
    """``{key}_{k}.png`` (+ score in the name when reranked) and ``{key}_grid.png`` in ``out_dir``; returns the
    file names."""
    from pathlib import Path

    from ..data.images import make_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = sanitize_name(key)
    names = []
    for k, im in enumerate(images):
        name = f"{base}_{k}.png" if scores is None else f"{base}_{k}_score{scores[k]:.3f}.png"
        im.save(out_dir / name)
        names.append(name)
    if images:
        make_grid(images).save(out_dir / f"{base}_grid.png")
    return names
