"""CogView's unified vocabulary: [image codes][SentencePiece text tokens][command tokens], and its query language.

Ids (``data_utils/unified_tokenizer.py``): ``0 … n_image-1`` image codes (8192), then the SentencePiece ids of
``cog-pretrain.model`` shifted by ``n_image`` (50,000), then 27 command tokens ``[PAD] [BOI1-3] [EOI1-3]
[ROI1-3] [SEP] [MASK] [CLS] [ENC] [TINY] [SMALL] [BASE] [BIG] [POS0-8]`` — 58,219 in all, and the model's
embedding is padded to a multiple of 128 (58,240). The ``sentencepiece`` package reads the ``.model`` file
(``pip install 'tuwen[cogview]'``); it is imported only when a tokenizer is built.

A *query* (``parse_query``) is CogView's template language: parts separated by single spaces; a command token
is itself, ``[MASK]`` is one position to fill (-1), ``[MASK]*N`` is N of them, ``[Image]path`` /
``[ImageN]path`` is the image's codes (the first N kept, the rest -1 = to fill), and runs of other parts are
joined with spaces and encoded as text.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import TuwenError

__all__ = ["COMMAND_TOKENS", "SentencePieceTokenizer", "CogViewVocab", "pad_vocab_size"]

COMMAND_TOKENS = ("[PAD]", "[BOI1]", "[BOI2]", "[BOI3]", "[EOI1]", "[EOI2]", "[EOI3]", "[ROI1]", "[ROI2]", "[ROI3]",
                  "[SEP]", "[MASK]", "[CLS]", "[ENC]", "[TINY]", "[SMALL]", "[BASE]", "[BIG]",
                  "[POS0]", "[POS1]", "[POS2]", "[POS3]", "[POS4]", "[POS5]", "[POS6]", "[POS7]", "[POS8]")
SIZE_TOKENS = {8: "[TINY]", 16: "[SMALL]", 32: "[BASE]", 64: "[BIG]"}
SPM_NAME = "cog-pretrain.model"


def pad_vocab_size(n: int, multiple: int = 128) -> int:
    """CogView's ``--make-vocab-size-divisible-by`` (times the model-parallel size)."""
    return -(-n // multiple) * multiple


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (CogView's ``Encoder_SP``): ``encode`` = ``EncodeAsIds``, ``decode`` =
    ``DecodeIds``."""

    def __init__(self, model_file: str | os.PathLike):
        try:
            import sentencepiece as spm
        except ImportError:
            raise TuwenError("reading a SentencePiece model needs the sentencepiece package: "
                             "pip install 'tuwen[cogview]' (or pip install sentencepiece)") from None
        self.path = Path(model_file)
        if not self.path.is_file():
            raise TuwenError(f"{self.path}: SentencePiece model not found (CogView's is "
                             f"pretrained/chinese_sentencepiece/{SPM_NAME})")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TuwenError(f"{self.path}: not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return int(self.sp.vocab_size())

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def tokenize(self, text: str) -> list[str]:
        return list(self.sp.EncodeAsPieces(text))


class CogViewVocab:
    """The unified id space of a CogView model. ``text`` may be None (image-only use: no text encoding)."""

    def __init__(self, text: SentencePieceTokenizer | None, n_image: int = 8192, n_text: int | None = None):
        self.text = text
        self.n_image = int(n_image)
        self.n_text = int(n_text if n_text is not None else (text.vocab_size if text is not None else 0))
        if text is not None and text.vocab_size != self.n_text:
            raise TuwenError(f"{text.path}: {text.vocab_size} text tokens, the model was made with {self.n_text}")
        base = self.n_image + self.n_text
        self.command = {name: base + i for i, name in enumerate(COMMAND_TOKENS)}
        self.size = base + len(COMMAND_TOKENS)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, name: str) -> int:
        try:
            return self.command[name]
        except KeyError:
            raise TuwenError(f"unknown CogView command token {name!r}; known: {' '.join(COMMAND_TOKENS)}") from None

    # --------------------------------------------------------------------------------------------- ranges
    @property
    def image_range(self) -> tuple[int, int]:
        return 0, self.n_image

    @property
    def text_range(self) -> tuple[int, int]:
        return self.n_image, self.n_image + self.n_text

    def is_command(self, i: int) -> bool:
        return self.n_image + self.n_text <= i < self.size

    # --------------------------------------------------------------------------------------------- text
    def _need_text(self) -> SentencePieceTokenizer:
        if self.text is None:
            raise TuwenError(f"this CogView model has no text tokenizer ({SPM_NAME}); give its path")
        return self.text

    def encode_text(self, text: str) -> list[int]:
        return [i + self.n_image for i in self._need_text().encode(text)]

    def decode_text(self, ids) -> str:
        lo, hi = self.text_range
        return self._need_text().decode([i - lo for i in ids if lo <= i < hi])

    def decode(self, ids) -> list[str | list[int]]:
        """CogView's ``DecodeIds`` without the image decoder: a list of text strings, command-token names and
        lists of image codes (an image run ends at ``[EOI*]`` or at the end)."""
        out, img, txt = [], [], []
        for x in (int(i) for i in ids):
            if self.is_command(x):
                name = COMMAND_TOKENS[x - self.n_image - self.n_text]
                if name.startswith("[EOI") and img:
                    out.append(img)
                    img = []
                if txt:
                    out.append(self.decode_text(txt))
                    txt = []
                out.append(name)
            elif x < self.n_image:
                img.append(x)
            elif x < self.size:
                txt.append(x)
        if img:
            out.append(img)
        if txt:
            out.append(self.decode_text(txt))
        return out

    def wrap_code(self, codes: list[int], idx: int = 1) -> list[int]:
        """``[SIZE] [BOIidx] codes [EOIidx]`` (CogView's ``wrap_code``; the grid must be 8², 16², 32² or 64²)."""
        side = int(round(len(codes) ** 0.5))
        if side * side != len(codes) or side not in SIZE_TOKENS:
            raise TuwenError(f"wrap_code: {len(codes)} codes is not an 8², 16², 32² or 64² grid")
        return [self[SIZE_TOKENS[side]], self[f"[BOI{idx}]"], *codes, self[f"[EOI{idx}]"]]

    # --------------------------------------------------------------------------------------------- queries
    def parse_query(self, query: str, encode_image: Callable[[str], list[int]] | None = None) -> list[int]:
        """CogView's ``parse_query``: a template string → ids, with -1 at the positions to generate.

        ``encode_image(path)`` returns the image's codes (raster order); needed only for ``[Image]`` parts.
        """
        ret, buf = [], []

        def flush():
            if buf:
                ret.extend(self.encode_text(" ".join(buf)))
                buf.clear()

        for part in query.split(" "):
            if part in self.command:
                flush()
                ret.append(-1 if part == "[MASK]" else self.command[part])
            elif part.startswith("[MASK]*"):
                try:
                    n = int(part[7:])
                except ValueError:
                    n = 0
                if n <= 0:
                    raise TuwenError(f"query part {part!r}: [MASK]*N needs a positive integer N")
                flush()
                ret.extend([-1] * n)
            elif part.startswith("[Image"):
                rest = part[6:]
                if "]" not in rest:
                    raise TuwenError(f"query part {part!r}: expected [Image]path or [Image*N]path")
                num, path = rest.split("]", 1)
                num = num.lstrip("*")  # CogView's code reads [ImageN]path; its comment says [Image*N]path
                if num and not num.isdigit():
                    raise TuwenError(f"query part {part!r}: expected [Image]path or [ImageN]path")
                if encode_image is None:
                    raise TuwenError(f"query part {part!r}: this task takes no image")
                flush()
                codes = list(encode_image(path))
                keep = int(num) if num else len(codes)
                ret.extend(c if i < keep else -1 for i, c in enumerate(codes))
            else:
                buf.append(part)
        flush()
        return ret
