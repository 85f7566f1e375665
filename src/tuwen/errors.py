"""The one exception type for mistakes a user can make (bad file, bad row, bad flag, missing model).

The CLI prints a ``TuwenError`` as ``error: <message>`` without a traceback and exits with status 2.
Internal bugs keep their tracebacks. Messages name the file/line/flag and say what to do.
"""

from __future__ import annotations

import os
from pathlib import Path


class TuwenError(Exception):
    """A user-caused error whose message says what went wrong and how to fix it."""


def read_text_lines(path: str | os.PathLike, label: str, what: str = "file") -> list[str]:
    """The lines of a UTF-8 text file the user named; a missing or non-UTF-8 file is a TuwenError that starts
    with ``label`` (the flag or path the user gave): ``"{label}: {what} not found"`` / ``"not UTF-8 (byte N)"``."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TuwenError(f"{label}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise TuwenError(f"{label}: not UTF-8 (byte {e.start})") from None
