"""EasyNLP's command line, verbatim: ``tuwen --mode=train|predict|evaluate --app_name=... --tables=... ...``.

The same flags as ``easynlp`` / ``examples/.../main.py`` (see ``tuwen --mode=train --help``). Every EasyNLP
flag is accepted; those with no meaning in tuwen are accepted and ignored (listed in ``IGNORED``). Unknown
flags are an error that names them. ``--user_defined_parameters`` is parsed with typed keys per app.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ...errors import TuwenError
from ..common import add_data_flags, add_predict_flags, add_train_flags
from .course import add_course_flags, apply_course_flags

# app name (EasyNLP --app_name, matched by prefix like EasyNLP does) -> task module
APPS = {
    "text2image_generation": "tuwen.cli.easynlp.text2image",
    "image2text_generation": "tuwen.cli.easynlp.captioning",
    "video2text_generation": "tuwen.cli.easynlp.captioning",
    "clip": "tuwen.cli.easynlp.clip",
    "super_resolution": "tuwen.cli.easynlp.superres",
}

IGNORED = ("worker_gpu", "worker_count", "master_port", "worker_hosts", "local_rank", "distributed_backend",
           "use_torchacc", "modelzoo_base_dir", "buckets", "odps_config", "user_script", "user_entry_file",
           "predict_slice_size", "predict_queue_size", "predict_thread_num", "predict_table_read_thread_num",
           "do_lower_case", "mg_model", "label_name", "label_enumerate_values", "export_tf_checkpoint_type")


def build_parser() -> argparse.ArgumentParser:
    from ..common import Parser

    p = Parser(
        prog="tuwen --mode=...",
        description="EasyNLP-compatible entry point: train, predict or evaluate an app on EasyNLP TSV tables. "
                    "Launch on several GPUs with: torchrun --nproc_per_node=N -m tuwen --mode=train ...",
    )
    p.add_argument("--mode", required=True, choices=["train", "predict", "evaluate"])
    p.add_argument("--app_name", required=True, help=f"one of {', '.join(APPS)}")
    p.add_argument("--user_defined_parameters", default=None,
                   help="app settings as 'key=value key2=value2' (typed; unknown keys are an error)")
    p.add_argument("--sequence_length", type=int, default=None,
                   help="EasyNLP's total sequence length; checked against text_len + img_len")
    add_data_flags(p)
    add_train_flags(p)
    add_predict_flags(p)
    add_course_flags(p)
    ig = p.add_argument_group("accepted for EasyNLP compatibility, no effect in tuwen")
    for name in IGNORED:
        ig.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    return p


def resolve_app(app_name: str) -> tuple[str, str]:
    """EasyNLP matches apps by prefix (``image2text_generation_vqgan`` → image2text)."""
    for name in sorted(APPS, key=len, reverse=True):
        if app_name == name or app_name.startswith(name):
            return name, APPS[name]
    raise TuwenError(f"--app_name {app_name!r}: not supported; tuwen runs {', '.join(APPS)}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        from ..common import suggest_flags
        flags = [u for u in unknown if u.startswith("-")] or unknown
        msg = f"unrecognized argument(s): {' '.join(flags)}"
        raise TuwenError(f"{msg}{suggest_flags(parser, msg)} (see: tuwen --mode=train --app_name=X --help)")
    args.app, args.app_module = resolve_app(args.app_name)
    if args.micro_batch_size is None:  # not given: the app's default (CLIP needs negatives in its batch)
        from ..common import APP_MICRO_BATCH, DEFAULT_MICRO_BATCH
        args.micro_batch_size = APP_MICRO_BATCH.get(args.app, DEFAULT_MICRO_BATCH)
    apply_course_flags(args)
    from ...data.formats import configure_from_args
    configure_from_args(args)
    ignored = [n for n in IGNORED if getattr(args, n) is not None and n != "local_rank"]
    if ignored:
        print(f"note: ignoring EasyNLP flag(s) with no effect in tuwen: {', '.join('--' + n for n in ignored)}",
              file=sys.stderr)
    return args


def app_help(argv: list[str]) -> str:
    """The ``--user_defined_parameters`` keys of the app named in ``argv`` (types, defaults, meaning), or how
    to see them."""
    from ...config import describe_params

    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--app_name=")), None)
    if name is None and "--app_name" in argv and argv.index("--app_name") + 1 < len(argv):
        name = argv[argv.index("--app_name") + 1]
    if not name:
        return f"add --app_name=APP --help to list an app's --user_defined_parameters keys (apps: {', '.join(APPS)})"
    app, module = resolve_app(name)
    mod = importlib.import_module(module)
    spec = getattr(mod, "USER_PARAMS", None) or getattr(mod, "CLIP_PARAMS", None) or {}
    return f"--user_defined_parameters keys of {app} (key (type, default): meaning):\n" + describe_params(spec)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        print()
        print(app_help(argv))
        return 0
    args = parse(argv)
    if getattr(args, "weights_dtype", None) not in (None, "auto", "fp32") and args.app != "text2image_generation":
        raise TuwenError(f"--weights_dtype {args.weights_dtype}: low-precision weights apply to text→image "
                         f"generation; {args.app_name} runs in fp32 (drop the flag)")
    if getattr(args, "vq_dtype", None) not in (None, "fp32") and args.app != "text2image_generation":
        raise TuwenError(f"--vq_dtype {args.vq_dtype}: the VQGAN decode dtype applies to text→image generation; "
                         f"{args.app_name} decodes no codes (drop the flag)")
    try:
        mod = importlib.import_module(args.app_module)
    except ModuleNotFoundError as e:
        if e.name == args.app_module:
            raise TuwenError(f"--app_name {args.app_name}: not available in this build") from None
        raise
    return int(mod.run_easynlp(args) or 0)
