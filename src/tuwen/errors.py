"""The one exception type for mistakes a user can make (bad file, bad row, bad flag, missing model).

The CLI prints a ``TuwenError`` as ``error: <message>`` without a traceback and exits with status 2.
Internal bugs keep their tracebacks. Messages name the file/line/flag and say what to do.
"""


class TuwenError(Exception):
    """A user-caused error whose message says what went wrong and how to fix it."""
