"""What each task needs from a row, written once: ``tuwen data validate --app_name X`` and the task's training
transform apply the same rules, so a row that validates is a row that trains.

* text→image, CLIP: a non-empty text and ONE image (a JSON list of frames is a video row: refused);
* image→text: one image and a non-empty caption (a JSON list of references is fine);
* video→text: a list of frames (or one image, read as a one-frame clip) and a non-empty caption;
* VQGAN: one image; the text is not read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RowRules:
    app: str
    image: str          # "one" | "frames"
    text: bool          # a non-empty text is required
    text_flag: str      # which EasyNLP flag names the text column (for messages and defaults)
    image_flag: str


APPS = {
    "text2image_generation": RowRules("text2image_generation", "one", True, "--first_sequence", "--second_sequence"),
    "clip": RowRules("clip", "one", True, "--first_sequence", "--second_sequence"),
    "image2text_generation": RowRules("image2text_generation", "one", True, "--second_sequence", "--first_sequence"),
    "video2text_generation": RowRules("video2text_generation", "frames", True, "--second_sequence",
                                      "--first_sequence"),
    "vq": RowRules("vq", "one", False, "--first_sequence", "--second_sequence"),
}


def rules_for(app: str) -> RowRules:
    """EasyNLP-style prefix match (``image2text_generation_vqgan`` → image2text)."""
    for name in sorted(APPS, key=len, reverse=True):
        if app == name or app.startswith(name):
            return APPS[name]
    from ..errors import TuwenError
    raise TuwenError(f"--app_name {app!r}: not a task with row rules; one of {', '.join(APPS)}")


def is_frame_list(value) -> bool:
    return isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("["))


def check_image_field(value, column: str, rules: RowRules) -> None:
    """Raise ValueError when the field's form does not fit the task (decoding is checked by the caller)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"column {column!r}: empty image")
    if rules.image == "one" and is_frame_list(value) and not isinstance(value, Path):
        n = len(value) if isinstance(value, list) else value.count(",") + 1
        raise ValueError(f"column {column!r}: a list of {n} frames (a video row), but {rules.app} takes one image "
                         f"per row")


def check_text_field(value, column: str, rules: RowRules) -> None:
    if rules.text and not str(value if value is not None else "").strip():
        raise ValueError(f"empty text in column {column!r}")
