"""Command line: ``tuwen <subcommand> ...`` and EasyNLP's flag style ``tuwen --mode=train --app_name=... ...``.

Each subcommand lives in its own module with ``add_parser(subparsers)``; modules import torch lazily so that
``tuwen --help`` is fast. A ``TuwenError`` is printed as one line (no traceback) and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import TuwenError

# subcommand name -> module under tuwen.cli (each defines add_parser(subparsers))
SUBCOMMANDS = {
    "data": "data",
    "vq": "vq",
    "generate": "generate",
    "complete": "complete",
    "upscale": "upscale",
    "caption": "caption",
    "convert": "convert",
    "demo": "demo",
    "rerank": "rerank",
    "evaluate-images": "evaluate_images",
    "export": "export",
    "recipe": "recipe",
    "serve": "serve",
}

# optional packages a subcommand module may import at load time -> the pip extra that installs them
EXTRAS = {"tensorboard": "tensorboard", "fastapi": "serve", "uvicorn": "serve", "sacrebleu": "metrics",
          "yaml": "yaml"}


def _import_subcommand(name: str):
    """The module of subcommand ``name``, or a TuwenError naming the extra to install when an optional package
    it needs is missing (any other import error is a bug and propagates)."""
    try:
        return importlib.import_module(f"tuwen.cli.{SUBCOMMANDS[name]}")
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if top not in EXTRAS:
            raise
        return TuwenError(f"tuwen {name} needs the optional package {top}: pip install 'tuwen[{EXTRAS[top]}]'")


def build_parser() -> argparse.ArgumentParser:
    from .common import Parser  # allow_abbrev=False for this parser and all its subparsers

    p = Parser(
        prog="tuwen",
        description="tuwen (图文): text→image generation and image/video→text captioning. "
                    "EasyNLP style also works: tuwen --mode=train|predict|evaluate --app_name=... (see README).",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        m = _import_subcommand(name)
        if isinstance(m, TuwenError):  # still listed by --help; running it gives the error (main)
            sub.add_parser(name, help=str(m), add_help=False)
        else:
            m.add_parser(sub)
    return p


def _version() -> str:
    import platform

    from ..data.pngmeta import tuwen_version
    __version__ = tuwen_version()
    try:
        from importlib.metadata import version
        torch_v = version("torch")
    except Exception:  # noqa: BLE001 - torch's version is only informative here
        torch_v = "?"
    return f"tuwen {__version__} (torch {torch_v}, Python {platform.python_version()})"


def _is_easynlp_style(argv: list[str]) -> bool:
    """``tuwen --mode=... --app_name=...``; a subcommand that takes ``--app_name`` itself (data validate) is not."""
    if argv and argv[0] in SUBCOMMANDS:
        return False
    return any(a in ("--mode", "--app_name") or a.startswith(("--mode=", "--app_name=")) for a in argv)


def _take_global_flags(argv: list[str]) -> list[str]:
    """Flags every command accepts, applied before dispatch: ``--max_image_pixels N``, and the launcher's
    ``--local-rank=N`` / ``--local_rank N`` (→ ``LOCAL_RANK``)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--local-rank", "--local_rank") or a.startswith(("--local-rank=", "--local_rank=")):
            # torch.distributed.launch passes --local-rank=N (older: --local_rank N); tuwen reads LOCAL_RANK
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise TuwenError(f"{a} needs a number (the launcher sets it)")
            if not value.isdigit():
                raise TuwenError(f"{a} {value!r}: not a GPU index")
            os.environ.setdefault("LOCAL_RANK", value)
        elif a == "--max_image_pixels" or a.startswith("--max_image_pixels="):
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise TuwenError("--max_image_pixels needs a number (pixels, e.g. 16777216 = 4096²)")
            try:
                n = int(value)
            except ValueError:
                raise TuwenError(f"--max_image_pixels {value!r}: not a whole number of pixels") from None
            from ..data.images import set_max_image_pixels
            set_max_image_pixels(n)
        else:
            out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        argv = _take_global_flags(argv)
        if _is_easynlp_style(argv):
            from . import easynlp
            return int(easynlp.main(argv) or 0)
        if argv and argv[0] in SUBCOMMANDS and isinstance(m := _import_subcommand(argv[0]), TuwenError):
            raise m
        parser = build_parser()
        args = parser.parse_args(argv)
        from ..data.formats import configure_from_args
        configure_from_args(args)  # --table_format, --csv-img-key, … (commands that have them)
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except TuwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
