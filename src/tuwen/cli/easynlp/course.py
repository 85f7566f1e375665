"""The flags of the course project's tools (DALLE-pytorch ``train_dalle.py``, open_clip ``main.py``) on the EasyNLP
entry point, mapped onto tuwen's own settings (README "Data": the mapping table).

    train_dalle.py --image_text_folder=DALLE.train.jsonl --vae_path=VAE --chinese --amp
      → tuwen --mode=train --app_name=text2image_generation --tables=DALLE.train.jsonl
            --user_defined_parameters='vqgan_ckpt_path=VAE' --use_amp
    open_clip main.py --train-data train.csv --val-data val.csv --csv-img-key filepath --csv-caption-key title
                      --batch-size 64 --lr 1e-4 --wd 0.1 --epochs 30 --warmup 500 --save-frequency 10 --model RN50
      → tuwen --mode=train --app_name=clip with the same flags (--model → vision=)
"""
from __future__ import annotations

import argparse
import shlex
import sys

from ...errors import TuwenError

IGNORED_COURSE = {"report_to": "--report-to", "dalle_output_file_name": "--dalle_output_file_name",
                  "horovod": "--horovod (launch with torchrun)"}


def add_course_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DALLE-pytorch / open_clip spellings (course project)")
    g.add_argument("--image_text_folder", default=None,
                   help="train_dalle.py: the training data (folder of jpg+txt, .jsonl, .csv, shards) → --tables")
    g.add_argument("--vae_path", default=None, help="train_dalle.py: the image tokenizer → vqgan_ckpt_path=")
    g.add_argument("--chinese", action="store_true",
                   help="train_dalle.py: Chinese text (tuwen's default: a Chinese WordPiece vocabulary)")
    g.add_argument("--train-data", "--train_data", dest="train_data", default=None,
                   help="open_clip: training data → first --tables entry")
    g.add_argument("--val-data", "--val_data", dest="val_data", default=None,
                   help="open_clip: validation data → last --tables entry")
    g.add_argument("--dataset-type", "--dataset_type", dest="dataset_type", default=None,
                   choices=["auto", "csv", "webdataset", "parquet", "jsonl"], help="open_clip: → --table_format")
    g.add_argument("--model", dest="clip_model", default=None,
                   help="open_clip: image tower (RN50, ViT-B-32, …) → vision= (app clip)")
    g.add_argument("--report-to", "--report_to", dest="report_to", default=None, help=argparse.SUPPRESS)
    g.add_argument("--dalle_output_file_name", default=None, help=argparse.SUPPRESS)
    g.add_argument("--horovod", action="store_true", default=None, help=argparse.SUPPRESS)


def _add_udp(args, key: str, value: str, flag: str) -> None:
    udp = args.user_defined_parameters or ""
    if any(item.split("=", 1)[0] == key for item in shlex.split(udp)):
        raise TuwenError(f"{flag} and --user_defined_parameters {key}= both given; keep one")
    args.user_defined_parameters = f"{udp} {key}={shlex.quote(value)}".strip()


def apply_course_flags(args) -> None:
    """Fold the course project's flags into tuwen's (``args.app`` is resolved)."""
    data = [x for x in (args.image_text_folder, args.train_data) if x]
    if len(data) > 1:
        raise TuwenError("--image_text_folder and --train-data both name the training data; keep one")
    if data or args.val_data:
        if args.tables:
            raise TuwenError("--tables and --image_text_folder/--train-data/--val-data both given; keep one")
        if not data:
            raise TuwenError("--val-data needs --train-data (or --tables train,val)")
        args.tables = ",".join(data + ([args.val_data] if args.val_data else []))
    if args.vae_path:
        if args.app != "text2image_generation":
            raise TuwenError(f"--vae_path is for --app_name=text2image_generation, not {args.app}")
        _add_udp(args, "vqgan_ckpt_path", args.vae_path, "--vae_path")
    if args.clip_model:
        if args.app != "clip":
            raise TuwenError(f"--model {args.clip_model} is open_clip's image tower: for --app_name=clip only")
        _add_udp(args, "vision", args.clip_model, "--model")
    if args.dataset_type and args.dataset_type != "auto":
        if args.table_format and args.table_format != args.dataset_type:
            raise TuwenError(f"--dataset-type {args.dataset_type} and --table_format {args.table_format} disagree")
        args.table_format = args.dataset_type
    if args.dalle_output_file_name and not args.checkpoint_dir:
        args.checkpoint_dir = args.dalle_output_file_name
    noted = [flag for attr, flag in IGNORED_COURSE.items()
             if getattr(args, attr, None) and not (attr == "dalle_output_file_name" and
                                                   args.checkpoint_dir == args.dalle_output_file_name)]
    if noted:
        print(f"note: ignoring flag(s) with no effect in tuwen: {', '.join(noted)}", file=sys.stderr)
