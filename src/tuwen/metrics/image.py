"""Distribution metrics between two image sets — Fréchet distance (FD/FID) and KID — in a feature space the user
chooses, plus CLIP score. Nothing is downloaded: every network comes from a local path.

Feature spaces (``load_feature_extractor(spec)``):

* ``clip:DIR`` — tuwen CLIP image tower (``tuwen.models.clip.CLIP`` folder): L2-normalised image embeddings
  [N, embed_dim]; images sized by the model's own rule (OpenAI center crop, or Chinese-CLIP squash) to its
  ``image_size``.
* ``vqgan:DIR`` — tuwen VQGAN encoder: pre-quantisation latents ``quant_conv(encoder(x))`` pooled over the code
  grid, mean and standard deviation concatenated [N, 2·embed_dim] (the std keeps texture/sharpness, which the mean
  of a mostly flat image loses); images resized (shortest side, bicubic) + center-cropped to the VQGAN's ``resolution``,
  scaled to [-1, 1].
* ``inception:FILE`` — the FID Inception-v3 (TF 2015-12-05 graph) in plain torch, loading pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` state dict (``torch.load(weights_only=True)``); 2048-d pool3
  features. Images → [0, 1] → bilinear resize to 299×299 (``align_corners=False``) → [-1, 1], as pytorch-fid's
  ``InceptionV3(resize_input=True, normalize_input=True)``. Values are pytorch-fid-style FID, but the image
  decoding/resizing before the network is tuwen's, so expect small differences against other tools.
* ``random:SEED`` — the fixed random CNN of ``--retrieval`` (``image_retrieval.random_feature_net``, 2048-d):
  nothing to download; a relative distance, to be read against the references-against-themselves floor.

Values from different feature spaces (or different ``--size``) are not comparable, and none of the ``clip:`` /
``vqgan:`` numbers are comparable to published FID; the output always states the feature network, the sample
counts and the resize rule.

Maths (float64 throughout): FD = ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), with tr √(Σ₁Σ₂) computed as the sum of
square roots of the eigenvalues of the symmetric PSD matrix √Σ₁ Σ₂ √Σ₁ (eigen-decomposition; no scipy). KID is the
unbiased MMD² with the polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over ``subsets`` random subsets of
``subset_size`` from each set (torch-fidelity's / clean-fid's estimator; mean and std reported).
CLIP score = 100 · max(cos(image, prompt), 0) per generated image, averaged. Every feature network and CLIP
runs in fp32 with autocast off (``runtime.autocast(device, torch.float32)``), so numbers do not depend on bf16.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.images import (ImageDecodeError, decode_frames, looks_like_base64_image, open_image, resize_crop, to_rgb,
                           to_uint8_batch)
from ..data.pngmeta import folder_prompts, image_files, png_prompt
from ..data.tables import IMAGE_EXTS, BadRow, BadRowReport
from ..errors import TuwenError
from ..hub import atomic_write_text, load_state_dict_checked, load_torch_file
from ..models.clip import CLIP
from ..models.vqgan import VQGAN
from ..runtime import autocast, resolve_device
from .features import random_feature_net, random_features

# ----------------------------------------------------------------------------------------------- statistics

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] → (mean [D], covariance [D, D]) in float64 (unbiased covariance, N − 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise TuwenError(f"need at least 2 feature vectors [N, D] for a covariance, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr √(Σ₁Σ₂) for PSD Σ₁, Σ₂: Σ₁Σ₂ is similar to √Σ₁ Σ₂ √Σ₁ (symmetric PSD), so the trace of its square root
    is the sum of the square roots of that matrix's eigenvalues."""
    s1 = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    m = s1 @ np.asarray(sigma2, dtype=np.float64) @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (float64)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise TuwenError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(fd, 0.0)


def fd_from_features(f1, f2) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N1, D], [N2, D]."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m = kxx.shape[0]
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float((sxx + syy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                  coef0: float = 1.0) -> float:
    """Unbiased MMD² of two equal-size samples with the polynomial kernel (torch-fidelity's 'unbiased' estimator)."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError("mmd2_unbiased needs two samples of the same size ≥ 2")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return _mmd2_from_kernels(_poly_kernel(x, x, degree, gamma, coef0), _poly_kernel(y, y, degree, gamma, coef0),
                              _poly_kernel(x, y, degree, gamma, coef0))


_FULL_KERNEL_MAX = 1 << 24   # precompute the full kernel matrices when each has at most this many entries (128 MB)


def kid(f1, f2, subset_size: int = 1000, subsets: int = 100, degree: int = 3, gamma: float | None = None,
        coef0: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Kernel Inception Distance (in any feature space): mean and std of the unbiased MMD² over random subsets.

    ``subset_size`` is clamped to the smaller set (reported as ``subset_size``). Deterministic given ``seed``.
    For sets of up to 4096 images the three kernel matrices are computed once and each subset indexes them.
    """
    x, y = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise TuwenError(f"KID: feature sets must be [N, D] with the same D, got {x.shape} and {y.shape}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise TuwenError("KID needs at least 2 images in each set")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    full = max(x.shape[0], y.shape[0]) ** 2 <= _FULL_KERNEL_MAX
    if full:
        kxx_f = _poly_kernel(x, x, degree, gamma, coef0)
        kyy_f = _poly_kernel(y, y, degree, gamma, coef0)
        kxy_f = _poly_kernel(x, y, degree, gamma, coef0)
        dxx, dyy = np.diagonal(kxx_f), np.diagonal(kyy_f)
    vals = np.empty(subsets)
    for i in range(subsets):
        ix = rng.choice(x.shape[0], m, replace=False)
        iy = rng.choice(y.shape[0], m, replace=False)
        if full:   # sums over the sub-matrices as wᵀKw with 0/1 indicator vectors (no gathers)
            wx = np.bincount(ix, minlength=x.shape[0]).astype(np.float64)
            wy = np.bincount(iy, minlength=y.shape[0]).astype(np.float64)
            sxx = wx @ kxx_f @ wx - dxx[ix].sum()
            syy = wy @ kyy_f @ wy - dyy[iy].sum()
            vals[i] = (sxx + syy) / (m * (m - 1)) - 2.0 * (wx @ kxy_f @ wy) / (m * m)
        else:
            vals[i] = mmd2_unbiased(x[ix], y[iy], degree, gamma, coef0)
    return {"mean": float(vals.mean()), "std": float(vals.std()), "subset_size": int(m), "subsets": int(subsets)}


# ----------------------------------------------------------------------------------------------- FID Inception

class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the TF graph's average pool excludes the padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b1, b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool="avg"``: pytorch-fid's FIDInceptionE_1 (Mixed_7b); ``"max"``: FIDInceptionE_2 (Mixed_7c)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3()`` (torchvision Inception3 names, 1008-way fc kept for the state dict):
    images [B, 3, H, W] in [0, 1] → 2048-d pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)    # [B, 2048]

    @classmethod
    def from_file(cls, path: str | Path) -> "FIDInceptionV3":
        obj = load_torch_file(path)
        if not isinstance(obj, dict):
            raise TuwenError(f"{path}: expected pytorch-fid's pt_inception-2015-12-05 state dict")
        model = cls()
        own = model.state_dict()
        sd = {k: v for k, v in obj.items() if not k.startswith("AuxLogits.")}
        for k in own:   # old BatchNorm files have no num_batches_tracked buffers
            if k.endswith("num_batches_tracked") and k not in sd:
                sd[k] = own[k]
        load_state_dict_checked(model, sd, f"{path} (FID Inception-v3)")
        return model.eval()


# ----------------------------------------------------------------------------------------------- feature networks

@dataclasses.dataclass
class FeatureExtractor:
    """A feature network: ``extract(list of PIL) -> float32 [B, dim]``, with a description for reports."""

    spec: str
    network: str
    dim: int
    input_size: int
    resize_rule: str
    fn: Any = dataclasses.field(repr=False, default=None)
    batch_size: int = 32
    model: Any = dataclasses.field(repr=False, default=None)   # the CLIP behind a clip: extractor

    def extract(self, images: Sequence) -> np.ndarray:
        out = [self.fn(list(images[i:i + self.batch_size])) for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def describe(self) -> dict:
        return {"spec": self.spec, "network": self.network, "dim": self.dim, "input_size": self.input_size,
                "resize": self.resize_rule}


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
    if ":" not in spec:
        raise TuwenError(f"{flag} {spec!r}: expected KIND:PATH, e.g. clip:runs/clip, vqgan:runs/vq, "
                         f"inception:pt_inception-2015-12-05-6726825d.pth")
    kind, path = spec.split(":", 1)
    return kind.strip().lower(), path.strip()


def clip_extractor(model, spec: str, batch_size: int = 32) -> FeatureExtractor:
    dev = model.device
    rule = ("shortest side → {s} px (bicubic) + center crop" if model.config.image_resize == "center_crop"
            else "resize to {s}×{s} (bicubic, aspect not kept)").format(s=model.config.image_size)

    @torch.inference_mode()
    def fn(images):
        with autocast(dev, torch.float32):
            return model.encode_image(images).float().cpu().numpy()
    return FeatureExtractor(spec, "tuwen CLIP image tower (L2-normalised embeddings)", model.config.embed_dim,
                            model.config.image_size, rule, fn, batch_size, model)


def load_feature_extractor(spec: str, device=None, batch_size: int = 32, flag: str = "--features") -> FeatureExtractor:
    """``clip:DIR`` | ``vqgan:DIR`` | ``inception:FILE`` | ``random:SEED`` → FeatureExtractor (see the module docstring)."""
    kind, path = _split_spec(spec, flag)
    dev = resolve_device(device)
    if kind == "clip":
        return clip_extractor(CLIP.from_pretrained(path, device=dev).eval(), spec, batch_size)
    if kind == "vqgan":
        vq = VQGAN.from_pretrained(path, device=dev).eval()
        res = int(vq.config.resolution)

        @torch.inference_mode()
        def fn(images):
            x = torch.from_numpy(to_uint8_batch(images, res)).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with autocast(dev, torch.float32):
                z = vq.encode_latent(x.to(next(vq.parameters()).dtype))     # [B, embed_dim, h, w]
            z = z.float().flatten(2)                              # [B, D, h·w]
            return torch.cat([z.mean(2), z.std(2)], 1).cpu().numpy()
        return FeatureExtractor(spec, "tuwen VQGAN encoder (pre-quantisation latents; mean ‖ std over the grid)",
                                2 * int(vq.config.embed_dim), res,
                                f"shortest side → {res} px (bicubic) + center crop, scaled to [-1, 1]", fn, batch_size)
    if kind == "random":   # random:SEED — the fixed random CNN of --retrieval (nothing to download; not FID)
        try:
            seed = int(path or 0)
        except ValueError:
            raise TuwenError(f"{flag} {spec!r}: random:SEED takes an integer seed, e.g. random:0") from None
        net = random_feature_net(seed)

        def fn(images):
            return random_features([np.asarray(to_rgb(im)) for im in images], net).float().numpy()
        return FeatureExtractor(spec, f"fixed random CNN (seed {seed}), 2048-d", 2048, 64,
                                "bilinear (antialiased) resize to 64×64", fn, batch_size)
    if kind == "inception":
        if not Path(path).expanduser().is_file():
            raise TuwenError(f"{flag} inception:{path}: no such file (pass pytorch-fid's "
                             f"pt_inception-2015-12-05-6726825d.pth; tuwen downloads nothing)")
        net = FIDInceptionV3.from_file(Path(path).expanduser()).to(dev)

        @torch.inference_mode()
        def fn(images):
            xs = []
            for im in images:   # [0, 1] floats, each resized to 299 like pytorch-fid
                t = torch.from_numpy(np.asarray(to_rgb(im), dtype=np.uint8).copy()).to(dev)
                t = t.permute(2, 0, 1)[None].float() / 255.0
                xs.append(F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False))
            return net(torch.cat(xs)).float().cpu().numpy()     # fp32: the TF graph's BN statistics
        return FeatureExtractor(spec, "FID Inception-v3 (pt_inception-2015-12-05), pool3", 2048, 299,
                                "bilinear resize to 299×299 (align_corners=False), as pytorch-fid", fn, batch_size)
    raise TuwenError(f"{flag} {spec!r}: unknown feature network {kind!r}; use clip:DIR, vqgan:DIR, "
                     f"inception:FILE or random:SEED")


# ----------------------------------------------------------------------------------------------- image sets

@dataclasses.dataclass
class ImageItem:
    image: Any            # PIL.Image
    text: str | None
    where: str            # file:line or file
    key: str | None = None  # the item's id: TSV first column (idx) when it is not the image; folder: file stem


def _image_field(fields: list[str]) -> int:
    """Index of the last field after the first that starts like a base64 image (or a JSON list of them); the last
    field when none does (its decode error then names the row)."""
    return next((j for j in range(len(fields) - 1, 0, -1) if looks_like_base64_image(fields[j])), len(fields) - 1)


def iter_image_set(path: str | Path, size: int | None = None, report=None, text_column: int | None = None,
                   image_column: int | None = None, skip_first_line: bool = False,
                   limit: int | None = None) -> Iterator[ImageItem]:
    """Images of a folder (recursively; captions from ``name.txt`` beside ``name.png``) or of an EasyNLP TSV.

    TSV rows: the image column (default: the last one that holds an image, so that predict's ``scores`` or
    ``gen_info`` columns after ``gen_imgbase64`` are passed over; the last column if none does) holds one base64
    image or a JSON list of them (``gen_imgbase64``); the text column (default: the second of ≥3 columns, else
    none) is the prompt. Rows/images that cannot be decoded are added to ``report`` (``file:line: reason``) and
    skipped. ``size``: every image is first resized (shortest side, bicubic) + center-cropped to ``size``×``size``.
    """
    report = report if report is not None else BadRowReport()
    p = Path(path).expanduser()
    count = 0

    def prep(img):
        return resize_crop(img, size) if size else img

    if p.is_dir():
        files = image_files(p, IMAGE_EXTS)  # grids/ (tuwen generate, demo, predict) are not samples
        generated = folder_prompts(p)  # prompts.json of a tuwen output folder
        if not files:
            raise TuwenError(f"{p}: no images found (looked for {', '.join(IMAGE_EXTS)})")
        for f in files:
            try:
                img = prep(open_image(f, target_size=size))
            except ImageDecodeError as e:
                report.add(BadRow(str(f), 0, str(e)))
                continue
            txt = f.with_suffix(".txt")
            text = None
            if txt.exists():
                lines = [t.strip() for t in txt.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
                text = lines[0] if lines else None
            if text is None:
                text = generated.get(f.relative_to(p).as_posix()) or png_prompt(f)
            yield ImageItem(img, text, str(f), f.stem)
            count += 1
            if limit and count >= limit:
                return
        return
    if not p.is_file():
        raise TuwenError(f"{p}: no such file or folder (pass an image folder or an EasyNLP TSV)")
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if skip_first_line and lineno == 1:
                continue
            try:
                line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as e:
                report.add(BadRow(str(p), lineno, f"invalid UTF-8 at byte {e.start}"))
                continue
            if not line.strip():
                continue
            fields = line.split("\t")
            ic = image_column if image_column is not None else _image_field(fields)
            tc = text_column if text_column is not None else (1 if len(fields) >= 3 and ic != 1 else None)
            if ic >= len(fields) or (tc is not None and tc >= len(fields)) or (image_column is None and len(fields) < 2):
                report.add(BadRow(str(p), lineno, f"expected an image column, got {len(fields)} column(s)"))
                continue
            text = fields[tc].strip() if tc is not None else None
            try:
                frames = decode_frames(fields[ic])
            except ImageDecodeError as e:
                report.add(BadRow(str(p), lineno, str(e)))
                continue
            for k, fr in enumerate(frames):
                where = f"{p}:{lineno}" + (f" image {k}" if len(frames) > 1 else "")
                try:
                    img = prep(open_image(fr, target_size=size))
                except ImageDecodeError as e:
                    report.add(BadRow(str(p), lineno, f"image {k}: {e}" if len(frames) > 1 else str(e)))
                    continue
                yield ImageItem(img, text, where, fields[0] if ic != 0 else None)
                count += 1
                if limit and count >= limit:
                    return


def _batches(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def extract_set(extractor: FeatureExtractor, path, size: int | None = None, report=None, clip_model=None,
                batch_size: int = 64, progress: bool | None = None, **set_kw) -> dict:
    """Stream an image set through the extractor (and CLIP for CLIP score). Returns {"features", "clip_scores"
    (or None), "n_images", "n_with_text"}."""
    feats, scores = [], []
    n_text = 0
    reuse = clip_model is not None and extractor.model is clip_model   # features are CLIP embeddings already
    bar = tqdm(desc=f"features {Path(path).name}", unit="img", disable=(progress is False) or None, file=sys.stderr)
    for batch in _batches(iter_image_set(path, size, report, **set_kw), batch_size):
        imgs = [b.image for b in batch]
        f = extractor.extract(imgs)
        feats.append(f)
        if clip_model is not None:
            with_text = [k for k, b in enumerate(batch) if b.text]
            n_text += len(with_text)
            if with_text:
                with torch.inference_mode(), autocast(clip_model.device, torch.float32):
                    ie = torch.from_numpy(f[with_text]) if reuse else \
                        clip_model.encode_image([imgs[k] for k in with_text]).float().cpu()
                    te = clip_model.encode_text([batch[k].text for k in with_text]).float().cpu()
                cos = (ie.float() * te).sum(-1)
                scores.append((100.0 * cos.clamp(min=0)).numpy())
        bar.update(len(batch))
    bar.close()
    features = np.concatenate(feats) if feats else np.zeros((0, extractor.dim), np.float32)
    return {"features": features, "clip_scores": np.concatenate(scores) if scores else None,
            "n_images": int(features.shape[0]), "n_with_text": n_text}


@torch.inference_mode()
def clip_score(model, texts: Sequence[str], images: Sequence, batch_size: int = 64) -> np.ndarray:
    """Per-pair CLIP score 100 · max(cos(image_i, text_i), 0) with a tuwen CLIP → float array [N]."""
    if len(texts) != len(images):
        raise TuwenError(f"clip_score: {len(texts)} texts for {len(images)} images")
    out = []
    for i in range(0, len(images), batch_size):
        with autocast(model.device, torch.float32):
            ie = model.encode_image(list(images[i:i + batch_size])).float()
            te = model.encode_text(list(texts[i:i + batch_size])).float()
        out.append((100.0 * (ie * te).sum(-1).clamp(min=0)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_images(generated, reference=None, features: str | None = None, clip: str | None = None,
                    size: int | None = None, kid_subset_size: int = 1000, kid_subsets: int = 100,
                    batch_size: int = 32, device=None, seed: int = 0, max_images: int | None = None,
                    progress: bool | None = None, max_bad_listed: int = 20, **set_kw) -> dict:
    """FD and KID between ``generated`` and ``reference`` (folders or TSVs) in the ``features`` space, and/or the
    CLIP score of ``generated`` against its prompts with the CLIP at ``clip``. Returns a JSON-able dict."""
    if features is None and clip is None:
        raise TuwenError("nothing to compute: give --features (with --reference) and/or --clip")
    if features is not None and reference is None:
        raise TuwenError("--features needs --reference (the real images to compare against)")
    dev = resolve_device(device)
    clip_dir = (clip[len("clip:"):] if clip.startswith("clip:") else clip) if clip else None
    clip_model = CLIP.from_pretrained(clip_dir, device=dev).eval() if clip_dir else None
    out: dict[str, Any] = {"generated": {"path": str(generated)}, "size": size,
                           "pre_resize": (f"every image first resized (shortest side, bicubic) + center-cropped "
                                          f"to {size}×{size}" if size else "none (images fed at their own size)")}
    ext = None
    if features is not None:
        kind, path = _split_spec(features, "--features")
        if kind == "clip" and clip_model is not None and Path(path).resolve() == Path(clip_dir).resolve():
            ext = clip_extractor(clip_model, features, batch_size)
        else:
            ext = load_feature_extractor(features, dev, batch_size)
        out["features"] = ext.describe()
    rep_g = BadRowReport(max_bad_listed)
    if ext is not None:
        g = extract_set(ext, generated, size, rep_g, clip_model, batch_size, progress, limit=max_images, **set_kw)
    else:  # CLIP score only
        g = extract_set(clip_extractor(clip_model, "clip", batch_size), generated, size, rep_g, clip_model,
                        batch_size, progress, limit=max_images, **set_kw)
    out["generated"].update({"n_images": g["n_images"], "bad": rep_g.count})
    if rep_g.count:
        print(rep_g.summary(), file=sys.stderr)
    if ext is not None:
        rep_r = BadRowReport(max_bad_listed)
        r = extract_set(ext, reference, size, rep_r, None, batch_size, progress, limit=max_images, **set_kw)
        out["reference"] = {"path": str(reference), "n_images": r["n_images"], "bad": rep_r.count}
        if rep_r.count:
            print(rep_r.summary(), file=sys.stderr)
        fg, fr = g["features"], r["features"]
        if min(len(fg), len(fr)) < 2:
            raise TuwenError(f"need at least 2 decodable images in each set (generated {len(fg)}, reference {len(fr)})")
        out["fd"] = fd_from_features(fg, fr)
        k = kid(fg, fr, kid_subset_size, kid_subsets, seed=seed)
        out["kid"] = k["mean"]
        out["kid_std"] = k["std"]
        out["kid_subset_size"] = k["subset_size"]
        out["kid_subsets"] = k["subsets"]
        if min(len(fg), len(fr)) <= ext.dim:
            out["warning"] = (f"fewer images ({min(len(fg), len(fr))}) than feature dimensions ({ext.dim}): the "
                              f"covariances are singular and FD is strongly biased by the sample count")
    if clip_model is not None:
        cs = g["clip_scores"]
        out["clip_score"] = {"model": str(clip), "n_pairs": int(0 if cs is None else len(cs)),
                             "mean": None if cs is None else float(cs.mean()),
                             "std": None if cs is None else float(cs.std()),
                             "definition": "100 * max(cos(image, prompt), 0), averaged over generated images "
                                           "that have a prompt"}
        if cs is None:
            out["clip_score"]["note"] = "no generated image has a prompt (TSV text column or name.txt)"
    return out


def format_report(res: dict) -> str:
    """A human-readable summary of ``evaluate_images``' result."""
    lines = []
    if "features" in res:
        f = res["features"]
        lines.append(f"feature network: {f['network']} [{f['spec']}], {f['dim']}-d, input {f['input_size']} px "
                     f"({f['resize']})")
    lines.append(f"pre-resize: {res['pre_resize']}")
    g = res["generated"]
    lines.append(f"generated: {g['path']}: {g['n_images']} images" + (f" ({g['bad']} skipped)" if g["bad"] else ""))
    if "reference" in res:
        r = res["reference"]
        lines.append(f"reference: {r['path']}: {r['n_images']} images" + (f" ({r['bad']} skipped)" if r["bad"] else ""))
        lines.append(f"FD  = {res['fd']:.5g}")
        lines.append(f"KID = {res['kid']:.5g} ± {res['kid_std']:.3g} ({res['kid_subsets']} subsets of "
                     f"{res['kid_subset_size']})")
    if "clip_score" in res:
        c = res["clip_score"]
        if c["mean"] is not None:
            lines.append(f"CLIP score = {c['mean']:.2f} ± {c['std']:.2f} over {c['n_pairs']} image–prompt pairs "
                         f"({c['model']})")
        else:
            lines.append(f"CLIP score: {c.get('note')}")
    if "warning" in res:
        lines.append(f"warning: {res['warning']}")
    return "\n".join(lines)


def save_json(res: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
