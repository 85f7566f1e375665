"""BERT WordPiece tokenizer for Chinese (per character) and English (lower-cased WordPieces).

Backed by HF ``tokenizers``' ``BertWordPieceTokenizer`` (BertNormalizer + BertPreTokenizer + WordPiece), which
gives the same ids as EasyNLP's ``BertTokenizer`` on a ``vocab.txt`` (e.g. chinese-roberta-wwm-ext, 21128 lines).
A folder with ``vocab.txt`` is the on-disk format (EasyNLP-compatible); ``tokenizer_config.json`` records the
normalisation flags. ``TextTokenizer.train(texts)`` builds a vocabulary from training texts (every character seen
plus WordPieces) when the user gives none.
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import TuwenError, read_text_lines

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_NAME = "vocab.txt"
_COMMON_CJK_PUNCT = "，。！？、；：“”‘’（）《》【】…—"
CONFIG_NAME = "tokenizer_config.json"

# CJK ideographs, CJK symbols/punctuation, full-width forms, kana, hangul: characters that are written without spaces
_CJK = r"\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff" \
       r"\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
_CJK_SPACE = re.compile(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])")
_SPACE_BEFORE_CJK_PUNCT = re.compile(r"\s+(?=[\u3000-\u303f\uff00-\uff0f\uff1a-\uff20])")


def remove_cjk_spaces(text: str) -> str:
    """'一 只 狗 在 跑 ， a dog runs.' → '一只狗在跑， a dog runs.' (spaces kept between Latin words)."""
    text = _CJK_SPACE.sub("", text)
    return _SPACE_BEFORE_CJK_PUNCT.sub("", text).strip()


class TextTokenizer:
    """WordPiece tokenizer with BERT-Chinese behaviour.

    ``encode(text)`` gives ids without [CLS]/[SEP] unless ``add_special_tokens=True``; ``decode(ids)`` removes
    special tokens and the spaces WordPiece puts between CJK characters.
    """

    def __init__(self, vocab: dict[str, int], lowercase: bool = True, strip_accents: bool | None = None,
                 handle_chinese_chars: bool = True, source: str = "vocab"):
        from tokenizers import BertWordPieceTokenizer

        if "[PAD]" not in vocab or "[UNK]" not in vocab:
            raise TuwenError(f"{source}: the vocabulary must contain [PAD] and [UNK]")
        self.vocab = dict(vocab)
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.handle_chinese_chars = handle_chinese_chars
        self._tok = BertWordPieceTokenizer(self.vocab, lowercase=lowercase, strip_accents=strip_accents,
                                           handle_chinese_chars=handle_chinese_chars, clean_text=True)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.special_ids = {self.vocab[t] for t in SPECIAL_TOKENS if t in self.vocab}
        self.special_ids |= {i for t, i in self.vocab.items() if re.fullmatch(r"\[unused\d+\]", t)}

    # ---------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return self.vocab["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self.vocab["[UNK]"]

    @property
    def cls_id(self) -> int | None:
        return self.vocab.get("[CLS]")

    @property
    def sep_id(self) -> int | None:
        return self.vocab.get("[SEP]")

    # ---------------------------------------------------------------- I/O
    @classmethod
    def from_vocab_file(cls, path: str | Path, **kw) -> "TextTokenizer":
        path = Path(path)
        lines = read_text_lines(path, str(path), what="vocabulary file")
        vocab: dict[str, int] = {}
        for i, tok in enumerate(lines):
            tok = tok.rstrip("\r")
            if tok in vocab:  # BERT vocabs have no duplicates; keep the first id like HF does
                continue
            vocab[tok] = i
        return cls(vocab, source=str(path), **kw)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TextTokenizer":
        """A folder with ``vocab.txt`` (+ optional ``tokenizer_config.json``) or a ``vocab.txt`` path."""
        path = Path(path)
        if path.is_file():
            return cls.from_vocab_file(path)
        vocab = path / VOCAB_NAME
        if not vocab.exists():
            raise TuwenError(f"{path}: no {VOCAB_NAME} (every tuwen/EasyNLP model folder carries its tokenizer)")
        kw = {}
        cfg = path / CONFIG_NAME
        if cfg.exists():
            try:
                d = json.loads(cfg.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TuwenError(f"{cfg}: not valid JSON ({e})") from None
            lower = d.get("do_lower_case", d.get("lowercase", True))
            kw = {"lowercase": bool(lower), "strip_accents": d.get("strip_accents"),
                  "handle_chinese_chars": bool(d.get("tokenize_chinese_chars", True))}
        return cls.from_vocab_file(vocab, **kw)

    def save_pretrained(self, path: str | Path) -> None:
        from ..hub import atomic_write_text

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        by_id = [""] * self.vocab_size
        for t, i in self.vocab.items():
            by_id[i] = t
        atomic_write_text(path / VOCAB_NAME, "\n".join(by_id) + "\n")
        atomic_write_text(path / CONFIG_NAME, json.dumps({
            "tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
            "strip_accents": self.strip_accents, "tokenize_chinese_chars": self.handle_chinese_chars,
        }, indent=2) + "\n")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1,
              lowercase: bool = True) -> "TextTokenizer":
        """Build a vocabulary from training texts: special tokens, every character seen, then WordPieces.

        ``texts`` is read once, as a stream (the ``tokenizers`` trainer keeps word counts, not the texts), so a
        table of any size trains in bounded memory. Every character of the (normalised) texts is in the
        vocabulary, as are ASCII letters, digits, punctuation and common CJK punctuation, even beyond
        ``vocab_size``.
        """
        from tokenizers import BertWordPieceTokenizer

        base = sorted(set(string.ascii_lowercase + string.digits + string.punctuation) | set(_COMMON_CJK_PUNCT))
        if not lowercase:
            base = sorted(set(base) | set(string.ascii_uppercase))
        seen = [0]

        def stream():
            for t in texts:
                seen[0] += 1
                yield t

        tok = BertWordPieceTokenizer(lowercase=lowercase, handle_chinese_chars=True, clean_text=True)
        tok.train_from_iterator(stream(), vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=SPECIAL_TOKENS, limit_alphabet=1 << 30, initial_alphabet=base,
                                show_progress=False)
        if not seen[0]:
            raise TuwenError("cannot build a vocabulary: no training texts")
        # keep [PAD]=0 and the special tokens first, in a stable order
        ordered = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        return cls({t: i for t, i in ordered}, lowercase=lowercase, source="trained vocabulary")

    def built_note(self) -> str:
        """How a vocabulary made by :meth:`train` is announced by the trainers."""
        return (f"built a {self.vocab_size}-entry WordPiece vocabulary from the training texts"
                f"{'' if self.lowercase else ', case kept'} (saved with the model as vocab.txt)")

    # ---------------------------------------------------------------- encode / decode
    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, max_length: int | None = None, add_special_tokens: bool = False,
               pad: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            body = max_length - 2 if max_length else None
            ids = [self.cls_id] + ids[:body] + [self.sep_id]
        elif max_length is not None:
            ids = ids[:max_length]
        if pad and max_length is not None and len(ids) < max_length:
            ids = ids + [self.pad_id] * (max_length - len(ids))
        return ids

    def encode_batch(self, texts: Sequence[str], max_length: int, add_special_tokens: bool = False,
                     pad: bool = True) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for e in encs:
            ids = e.ids
            if add_special_tokens:
                ids = [self.cls_id] + ids[: max_length - 2] + [self.sep_id]
            else:
                ids = ids[:max_length]
            if pad and len(ids) < max_length:
                ids = ids + [self.pad_id] * (max_length - len(ids))
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        text = self._tok.decode(ids, skip_special_tokens=False)
        return remove_cjk_spaces(text)

    def count_unknown(self, text: str) -> int:
        return sum(1 for i in self.encode(text) if i == self.unk_id)

    def unknown_words(self, text: str) -> list[str]:
        """The pieces of ``text`` that become [UNK] (as written in ``text``, in order, repeats kept once):
        what a model never sees of this prompt."""
        enc = self._tok.encode(text, add_special_tokens=False)
        out: list[str] = []
        for i, (a, b) in zip(enc.ids, enc.offsets):
            w = text[a:b]
            if i == self.unk_id and w not in out:
                out.append(w)
        return out
