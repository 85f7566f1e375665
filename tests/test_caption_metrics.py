"""Caption metrics against values computed with pycocoevalcap 1.2 (coco-caption) and hand-checked cases.

The expected numbers below were produced by ``pycocoevalcap`` 1.2 (``Bleu(4)``, ``Cider()``, ``Rouge()``, pure
Python, no Java) on the space-joined output of ``tuwen.metrics.captions.tokenize`` for the same captions.
"""
import math

import pytest

from tuwen.metrics.captions import (bleu, caption_metrics, cider_d, exact_match, meteor_available, rouge_l,
                                    split_references,
                                    tokenize)

ZH_PREDS = ["左上角有一个红色的圆形", "中间有一个蓝色的正方形，右侧有一个绿色的三角形", "一个黄色的长方形从左向右移动",
            "下方有一个紫色的圆形"]
ZH_REFS = [["左上角有一个红色的圆形", "在左上角有一个红色的圆形"],
           ["中间有一个蓝色的正方形，右下角有一个绿色的三角形"],
           ["一个黄色的长方形从左向右移动", "黄色的长方形向右移动", "一个黄色长方形从左往右移动"],
           ["上方有一个青色的三角形"]]
EN_PREDS = ["a man is riding a horse on the beach", "two dogs play in the snow", "a red circle in the top left", "the cat"]
EN_REFS = [["a man rides a horse along the beach", "a person riding a brown horse on a sandy beach"],
           ["two dogs are playing in the snow", "dogs running through snow", "a pair of dogs play outside in winter"],
           ["a red circle in the top left"],
           ["a black cat sits on the sofa", "a cat is sleeping"]]

# pycocoevalcap 1.2 values
COCO = {
    "zh": {"bleu": [0.8977648778698591, 0.8673673799321985, 0.8401249699598435, 0.8168874079045936],
           "cider": 6.481566245402672,
           "cider_items": [9.503673505320968, 8.010029783073415, 7.071895760752623, 1.3406659324636827],
           "rouge": 0.8976497099489097, "rouge_items": [1.0, 0.9296081277213352, 1.0, 0.6609907120743034]},
    "en": {"bleu": [0.8817092306129589, 0.7800056023251739, 0.594308353869765, 0.49373081585373485],
           "cider": 3.8322296523196533,
           "cider_items": [2.2060228845727687, 2.011739827808424, 10.0, 1.1111558968974196],
           "rouge": 0.6966474374375184, "rouge_items": [0.7134502923976607, 0.7587064676616916, 1.0, 0.31443298969072164]},
}


def test_tokenize_chinese_per_character_english_per_word():
    assert tokenize("左上角有一个红色的圆形，A red Circle.") == \
        ["左", "上", "角", "有", "一", "个", "红", "色", "的", "圆", "形", "a", "red", "circle"]
    assert tokenize("it's ＡＢＣ 123!") == ["it's", "abc", "123"]
    assert tokenize("，。！") == []


def test_split_references():
    assert split_references('["a b", "c"]') == ["a b", "c"]
    assert split_references("a b || c ||") == ["a b", "c"]
    assert split_references("just one") == ["just one"]
    assert split_references("[not json") == ["[not json"]


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_against_pycocoevalcap(lang):
    preds, refs = (ZH_PREDS, ZH_REFS) if lang == "zh" else (EN_PREDS, EN_REFS)
    want = COCO[lang]
    b = bleu(preds, refs)
    for k in range(4):
        assert b[f"bleu_{k + 1}"] == pytest.approx(want["bleu"][k], rel=1e-12)
    c, items = cider_d(preds, refs, return_per_item=True)
    assert c == pytest.approx(want["cider"], rel=1e-12)
    assert items == pytest.approx(want["cider_items"], rel=1e-12)
    r, ritems = rouge_l(preds, refs, return_per_item=True)
    assert r == pytest.approx(want["rouge"], rel=1e-12)
    assert ritems == pytest.approx(want["rouge_items"], rel=1e-12)
    m = caption_metrics(preds, refs, with_meteor=False)
    assert m["bleu_4"] == pytest.approx(want["bleu"][3]) and m["cider_d"] == pytest.approx(want["cider"])
    assert m["n_images"] == 4 and m["n_references"] == sum(map(len, refs))


def test_hand_checked_values():
    # identical caption: every n-gram matches, no brevity penalty
    assert bleu(["a b c d"], [["a b c d"]])["bleu_4"] == pytest.approx(1.0)
    # "the the the" vs "the cat": unigram matches clipped to 1 of 3; hypothesis longer → no brevity penalty
    assert bleu(["the the the"], [["the cat"]])["bleu_1"] == pytest.approx(1 / 3)
    # brevity: hyp "a b" (2) vs ref "a b c d" (4): p1 = 1, BP = exp(1 - 4/2) = e^-1
    assert bleu(["a b"], [["a b c d"]])["bleu_1"] == pytest.approx(math.exp(-1))
    # closest reference length wins (3 over 6), so BP = 1
    assert bleu(["a b c"], [["a b c d e f", "x y z"]])["bleu_1"] == pytest.approx(1.0)
    # ROUGE-L: LCS("a b c d", "a c d e f") = 3 → P = 3/4, R = 3/5, F(β=1.2) = 2.44·P·R/(R + 1.44·P)
    P, R = 3 / 4, 3 / 5
    assert rouge_l(["a b c d"], [["a c d e f"]]) == pytest.approx(2.44 * P * R / (R + 1.44 * P))
    assert rouge_l(["x"], [["a b"]]) == 0.0
    # CIDEr-D with a single image: idf = log(1) - log(1) = 0 for every n-gram → 0
    assert cider_d(["a b c"], [["a b c"]]) == 0.0
    # two images with disjoint vocabularies, exact predictions: cosine 1 for every n → 10 each
    assert cider_d(["a b c d e", "f g h i j"], [["a b c d e"], ["f g h i j"]]) == pytest.approx(10.0)
    # Chinese text is scored per character: one wrong character out of four
    assert bleu(["红色圆形"], [["蓝色圆形"]], n=1)["bleu_1"] == pytest.approx(3 / 4)


def test_pre_tokenized_equals_tokenized():
    pre = [" ".join(tokenize(p)) for p in ZH_PREDS]
    refs = [[" ".join(tokenize(r)) for r in rs] for rs in ZH_REFS]
    assert bleu(pre, refs, pre_tokenized=True) == bleu(ZH_PREDS, ZH_REFS)
    assert cider_d(pre, refs, pre_tokenized=True) == pytest.approx(cider_d(ZH_PREDS, ZH_REFS))


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    for preds, refs in ((ZH_PREDS, ZH_REFS), (EN_PREDS, EN_REFS)):
        hyp = [" ".join(tokenize(p)) for p in preds]
        streams = [[(" ".join(tokenize(rs[k])) if k < len(rs) else None) for rs in refs]
                   for k in range(max(map(len, refs)))]
        s = sacrebleu.corpus_bleu(hyp, streams, tokenize="none").score / 100
        assert bleu(preds, refs)["bleu_4"] == pytest.approx(s, rel=1e-7)


def test_errors_and_meteor_flag():
    with pytest.raises(ValueError):
        bleu(["a"], [])
    with pytest.raises(ValueError):
        rouge_l(["a"], [[]])
    m = caption_metrics(["a b"], ["a b || a c"])
    assert ("meteor" in m) == meteor_available()


def test_exact_match_raw_and_as_the_tokenizer_writes_it():
    """Spaces ignored; with ``writable`` (an uncased WordPiece round trip) a capital the model cannot write is no
    miss, while a wrong caption still is."""
    from tuwen.text import TextTokenizer
    tok = TextTokenizer.train(["美国手语中字母A的标示", "美国手语中字母B的标示", "一只乌鸦"], vocab_size=120)
    preds = ["美 国 手 语 中 字 母 a 的 标 示", "一只乌鸦", "一只乌鸦"]
    refs = [["美国手语中字母A的标示"], ["别的", "一只乌鸦"], ["美国手语中字母B的标示"]]
    assert exact_match(preds, refs) == pytest.approx(1 / 3)
    writable = lambda r: tok.decode(tok.encode(r))  # noqa: E731
    assert writable("美国手语中字母A的标示").replace(" ", "") == "美国手语中字母a的标示"  # uncased, as bert-base-chinese
    assert exact_match(preds, refs, writable=writable) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(preds, refs[:2])
