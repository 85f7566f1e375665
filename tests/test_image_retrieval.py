"""``tuwen evaluate-images --retrieval``: a generated image retrieves its own prompt's reference image."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tuwen.cli import main
from tuwen.data import synth
from tuwen.metrics.image_retrieval import random_feature_net, retrieval_eval


def _b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ret")
    rows = []
    for i in range(40):
        img, text = synth.make_sample(i, size=32)[:2]
        rows.append((f"r{i}", text, np.asarray(img.convert("RGB"))))
    (d / "ref.tsv").write_text("".join(f"{k}\t{t}\t{_b64(a)}\n" for k, t, a in rows), encoding="utf-8")
    return d, rows


def _noisy(a, rng, amount=12):
    return np.clip(a.astype(int) + rng.integers(-amount, amount + 1, a.shape), 0, 255).astype(np.uint8)


def test_own_images_are_retrieved_and_shuffled_ones_are_not(refs, capsys):
    d, rows = refs
    rng = np.random.default_rng(0)
    # predict's output layout: idx \t text \t gen_imgbase64 (a JSON list: two images per prompt)
    good = d / "gen.tsv"
    good.write_text("".join(f"{k}\t{t}\t{json.dumps([_b64(_noisy(a, rng)), _b64(_noisy(a, rng))])}\n"
                            for k, t, a in rows), encoding="utf-8")
    res = retrieval_eval(good, d / "ref.tsv")
    assert res["n_queries"] == 80 and res["n_candidates"] == 40 and res["unmatched"] == 0
    for space in ("pixel", "random_features"):
        assert res[space]["R@1"] == 1.0 and res[space]["mean_rank"] == 1.0
        assert res[space]["chance@1"] == pytest.approx(1 / 40)
    # every image paired with another prompt's idx: far below 1 (R@1 counts only the own reference)
    bad = d / "shuffled.tsv"
    bad.write_text("".join(f"{rows[(i + 1) % 40][0]}\t-\t{_b64(a)}\n" for i, (_, _, a) in enumerate(rows)),
                   encoding="utf-8")
    res = retrieval_eval(bad, d / "ref.tsv")
    assert res["pixel"]["R@1"] <= 0.1 and res["random_features"]["R@1"] <= 0.1
    # the command: JSON on stdout, a readable summary on stderr
    assert main(["evaluate-images", "--generated", str(good), "--reference", str(d / "ref.tsv"), "--retrieval"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["retrieval"]["pixel"]["R@1"] == 1.0 and "fd" not in out
    assert "self-retrieval (idx): 80 generated images among 40 references" in cap.err


def test_match_by_text_and_folders(refs, tmp_path, capsys):
    d, rows = refs
    folder = tmp_path / "out"
    folder.mkdir()
    for k, _, a in rows[:10]:
        Image.fromarray(a).save(folder / f"{k}_0.png")   # predict --output_dir names
        Image.fromarray(a).save(folder / f"{k}_grid.png")  # grids are left out
    res = retrieval_eval(folder, d / "ref.tsv")
    assert res["n_queries"] == 10 and res["pixel"]["R@1"] == 1.0
    gen = tmp_path / "by_text.tsv"
    gen.write_text("".join(f"x{i}\t{t}\t{_b64(a)}\n" for i, (_, t, a) in enumerate(rows)), encoding="utf-8")
    res = retrieval_eval(gen, d / "ref.tsv", match="text")
    assert res["n_queries"] == 40 and res["random_features"]["R@1"] == 1.0
    assert main(["evaluate-images", "--generated", str(gen), "--reference", str(d / "ref.tsv"), "--retrieval"]) == 2
    assert "no generated image has a reference with the same idx" in capsys.readouterr().err
    assert main(["evaluate-images", "--generated", str(gen), "--retrieval"]) == 2
    assert "--retrieval needs --reference" in capsys.readouterr().err


def test_random_net_is_fixed():
    a, b = random_feature_net(), random_feature_net()
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))


def test_folder_names_of_path_like_idx_match_their_reference(tmp_path):
    """predict --output_dir writes ``{sanitize_name(idx)}_{k}.png``; an idx such as ``animals/birds/crow`` (the
    stamps set) becomes ``animals_birds_crow_<hash>_0.png`` and must still find its reference."""
    from tuwen.fileio import sanitize_name

    rows = []
    for i in range(12):
        img, text = synth.make_sample(i, size=32)[:2]
        rows.append((f"animals/birds/b{i}", text, np.asarray(img.convert("RGB"))))
    ref = tmp_path / "ref.tsv"
    ref.write_text("".join(f"{k}\t{t}\t{_b64(a)}\n" for k, t, a in rows), encoding="utf-8")
    gen = tmp_path / "gen"
    gen.mkdir()
    for k, _, a in rows:
        Image.fromarray(a).save(gen / f"{sanitize_name(k)}_0.png")
    res = retrieval_eval(gen, ref)
    assert res["unmatched"] == 0 and res["n_queries"] == 12
    assert res["pixel"]["R@1"] == 1.0


def test_random_feature_fd_is_zero_on_itself_and_grows_with_noise(refs):
    """``--features random:SEED``: a relative FD in the fixed random-CNN space (nothing downloaded)."""
    from tuwen.errors import TuwenError
    from tuwen.metrics.image import evaluate_images, load_feature_extractor

    d, rows = refs
    rng = np.random.default_rng(1)
    noisy = d / "noisy.tsv"
    noisy.write_text("".join(f"{k}\t{t}\t{_b64(_noisy(a, rng, 60))}\n" for k, t, a in rows), encoding="utf-8")
    same = evaluate_images(d / "ref.tsv", d / "ref.tsv", "random:0")
    far = evaluate_images(noisy, d / "ref.tsv", "random:0")
    assert abs(same["fd"]) < 1e-6 and far["fd"] > 1e-3
    with pytest.raises(TuwenError, match="integer seed"):
        load_feature_extractor("random:x")


def test_predict_columns_after_the_images_are_passed_over(refs, tmp_path, capsys):
    """predict --output_schema idx,text,gen_imgbase64,scores (README's reranking example): the image column is the
    last one that holds images, not the scores; a table without images names its first bad row."""
    d, rows = refs
    gen = tmp_path / "reranked.tsv"
    gen.write_text("".join(f"{k}\t{t}\t{json.dumps([_b64(a)])}\t[-1.5]\n" for k, t, a in rows), encoding="utf-8")
    res = retrieval_eval(gen, d / "ref.tsv")
    assert res["n_queries"] == 40 and res["pixel"]["R@1"] == 1.0 and res["bad_generated"] == 0
    no_images = tmp_path / "scores_only.tsv"
    no_images.write_text("".join(f"{k}\t{t}\t[-1.5]\n" for k, t, _ in rows), encoding="utf-8")
    assert main(["evaluate-images", "--generated", str(no_images), "--reference", str(d / "ref.tsv"),
                 "--retrieval"]) == 2
    err = capsys.readouterr().err
    assert "--generated: 40 bad row(s), the first" in err and f"{no_images}:1" in err
