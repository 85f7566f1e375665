"""Vocabulary building streams the texts (bounded memory on a table of any size)."""
from __future__ import annotations

import weakref

import pytest

from tuwen.errors import TuwenError
from tuwen.text import TextTokenizer


class _Text(str):
    __slots__ = ("__weakref__",)


def test_train_streams_texts_and_keeps_every_character():
    alive, peak = [0], [0]

    def texts(n):
        for i in range(n):
            s = _Text(f"第{i % 97}个{'红黄蓝'[i % 3]}色的圆形 in the box {i % 13}")
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(s, lambda: alive.__setitem__(0, alive[0] - 1))
            yield s

    tok = TextTokenizer.train(texts(5000), vocab_size=200)
    assert peak[0] < 100, f"{peak[0]} texts were held at once: the trainer must not keep the table in memory"
    for ch in "第个红黄蓝色的圆形0123456789":
        assert ch in tok.vocab, ch
    assert tok.count_unknown("第12个蓝色的圆形 in the box") == 0
    assert tok.vocab["[PAD]"] == 0


def test_train_on_nothing_is_an_error():
    with pytest.raises(TuwenError, match="no training texts"):
        TextTokenizer.train(iter(()), vocab_size=100)
