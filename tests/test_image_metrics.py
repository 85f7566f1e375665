"""Image metrics: Fréchet distance (closed forms), KID, the FID Inception layout, ``tuwen evaluate-images``."""
import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tuwen.errors import TuwenError
from tuwen.metrics.image import (FIDInceptionV3, fd_from_features, feature_statistics, frechet_distance, kid,
                                 mmd2_unbiased, trace_sqrt_product)


def test_fd_identical_sets_is_zero_and_grows_with_shift():
    rng = np.random.RandomState(0)
    a = rng.randn(500, 16)
    assert fd_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = [fd_from_features(a, a + s) for s in (0.1, 0.5, 1.0)]
    assert shifted == pytest.approx([16 * s * s for s in (0.1, 0.5, 1.0)], rel=1e-6)   # pure mean shift: ‖Δμ‖²
    noisy = fd_from_features(a, a + 0.5 * rng.randn(500, 16))      # Σ: I → 1.25 I, FD ≈ 16·(2.25 − 2√1.25)
    assert noisy == pytest.approx(16 * (2.25 - 2 * math.sqrt(1.25)), rel=0.5)


def test_fd_closed_form_gaussians():
    # N(0, I) vs N(1, 4I) in d dims: d·1 + d + 4d − 2·d·2 = 2d
    d = 8
    assert frechet_distance(np.zeros(d), np.eye(d), np.ones(d), 4 * np.eye(d)) == pytest.approx(2 * d, abs=1e-9)
    # non-commuting 2×2 covariances: tr √(AB) = √(tr AB + 2 √det AB)
    A = np.array([[2.0, 0.7], [0.7, 1.0]])
    B = np.array([[1.0, -0.4], [-0.4, 3.0]])
    ab = A @ B
    want_tr = math.sqrt(np.trace(ab) + 2 * math.sqrt(np.linalg.det(ab)))
    assert trace_sqrt_product(A, B) == pytest.approx(want_tr, rel=1e-10)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([1.0, 1.0])
    want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(A) + np.trace(B) - 2 * want_tr)
    assert frechet_distance(mu1, A, mu2, B) == pytest.approx(want, rel=1e-10)
    # sampled features converge to the closed form
    rng = np.random.RandomState(1)
    x = rng.multivariate_normal(mu1, A, size=200_000)
    y = rng.multivariate_normal(mu2, B, size=200_000)
    assert fd_from_features(x, y) == pytest.approx(want, rel=0.02)
    mu, sig = feature_statistics(x)
    assert sig.shape == (2, 2) and np.allclose(sig, A, atol=0.03)
    # singular covariances (fewer samples than dims) still give a finite, non-negative value
    assert fd_from_features(rng.randn(5, 32), rng.randn(5, 32)) >= 0
    with pytest.raises(TuwenError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))


def test_kid_unbiased_estimator():
    rng = np.random.RandomState(0)
    x, y = rng.randn(6, 3), rng.randn(6, 3) + 0.3
    # brute force: unbiased MMD² with k(a, b) = (aᵀb/d + 1)³
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    a = rng.randn(400, 16)
    same = kid(a, a, subset_size=200, subsets=20)
    far = kid(a, a + 1.0, subset_size=200, subsets=20)
    assert abs(same["mean"]) < 0.05 and far["mean"] > 1.0
    assert kid(a, a, 1000, 5)["subset_size"] == 400                      # clamped to the set size
    assert kid(a, a + 1, 100, 5, seed=3) == kid(a, a + 1, 100, 5, seed=3)  # deterministic


def test_fid_inception_layout(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():   # keep activations away from denormals (slow on CPU with the default init)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    assert sum(p.numel() for p in net.parameters()) == 23_850_960    # torchvision Inception3, no aux, 1008 classes
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    loaded = FIDInceptionV3.from_file(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with torch.no_grad():
        f = loaded(torch.rand(1, 3, 64, 64))
    assert f.shape == (1, 2048) and (f >= 0).all()                   # post-ReLU average pool
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(TuwenError, match="missing keys"):
        FIDInceptionV3.from_file(tmp_path / "bad.pth")


# ------------------------------------------------------------------ CLI

def _draw(color, shift, size=40):
    img = Image.new("RGB", (size, size), (250, 250, 250))
    ImageDraw.Draw(img).ellipse((5 + shift, 5, 30 + shift, 30), fill=color)
    return img


def _b64(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tuwen.models.clip import CLIP
    from tuwen.text.tokenizer import TextTokenizer

    tok = TextTokenizer.train(["红色的圆", "蓝色的圆"], vocab_size=100)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("clip")
    CLIP.build(tok).save_pretrained(d)
    return d


def test_evaluate_images_cli(tmp_path, clip_dir, capsys):
    from tuwen.cli import main

    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(12):
        _draw((200, 30, 30), i % 6).save(ref / f"{i:02d}.png")
        (ref / f"{i:02d}.txt").write_text("红色的圆", encoding="utf-8")
    # generated: EasyNLP predict output, a JSON list of 2 images per row (gen_imgbase64), plus one bad row
    rows = [f"{i}\t蓝色的圆\t{json.dumps([_b64(_draw((30, 30, 200), i)), _b64(_draw((30, 30, 220), i + 1))])}"
            for i in range(6)]
    rows.insert(2, "99\t坏的\tnot-an-image")
    gen = tmp_path / "gen.tsv"
    gen.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "res.json"
    rc = main(["evaluate-images", "--generated", str(gen), "--reference", str(ref), "--features", f"clip:{clip_dir}",
               "--clip", str(clip_dir), "--size", "32", "--kid_subset_size", "8", "--kid_subsets", "10",
               "--output", str(out), "--device", "cpu", "--no_progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(out.read_text())
    assert json.loads(cap.out) == res
    assert res["generated"]["n_images"] == 12 and res["generated"]["bad"] == 1
    assert res["reference"]["n_images"] == 12
    assert res["features"]["spec"] == f"clip:{clip_dir}" and res["features"]["input_size"] == 32
    assert "center crop" in res["features"]["resize"] and "32×32" in res["pre_resize"]
    assert res["fd"] > 0 and res["kid_subset_size"] == 8 and res["kid_subsets"] == 10
    assert res["clip_score"]["n_pairs"] == 12 and 0 <= res["clip_score"]["mean"] <= 100
    assert "gen.tsv:3" in cap.err and "FD  =" in cap.err and "CLIP score" in cap.err
    # identical sets: FD ≈ 0, KID ≈ 0
    rc = main(["evaluate-images", "--generated", str(ref), "--reference", str(ref), "--features", f"clip:{clip_dir}",
               "--kid_subset_size", "12", "--kid_subsets", "4", "--device", "cpu", "--no_progress"])
    same = json.loads(capsys.readouterr().out)
    assert rc == 0 and same["fd"] == pytest.approx(0, abs=1e-6) and abs(same["kid"]) < 1e-3
    assert same["fd"] < res["fd"]
    # user errors
    assert main(["evaluate-images", "--generated", str(gen), "--features", f"clip:{clip_dir}"]) == 2
    assert "needs --reference" in capsys.readouterr().err
    assert main(["evaluate-images", "--generated", str(gen), "--reference", str(ref), "--features", "fid"]) == 2
    assert "KIND:PATH" in capsys.readouterr().err
    assert main(["evaluate-images", "--generated", str(gen), "--reference", str(ref),
                 "--features", f"inception:{tmp_path}/none.pth"]) == 2
    assert "downloads nothing" in capsys.readouterr().err


def test_vqgan_feature_space(tmp_path):
    vqgan = pytest.importorskip("tuwen.models.vqgan")
    from tuwen.metrics.image import load_feature_extractor

    torch.manual_seed(0)
    vq = vqgan.VQGAN(vqgan.VQGANConfig.preset("tiny", resolution=32))
    vq.save_pretrained(tmp_path / "vq")
    ext = load_feature_extractor(f"vqgan:{tmp_path / 'vq'}", device="cpu", batch_size=4)
    imgs = [_draw((200, 30, 30), i) for i in range(6)]
    f = ext.extract(imgs)
    assert f.shape == (6, 2 * vq.config.embed_dim) and ext.describe()["input_size"] == 32
    assert fd_from_features(f, f) == pytest.approx(0, abs=1e-6)
