"""Feature spaces that need no downloaded network: raw pixels, and a fixed random CNN (same weights on every
machine). ``tuwen evaluate-images --retrieval`` ranks in both; ``--features random:SEED`` uses the second for FD/KID.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RANDOM_NET_INPUT = 64


def random_feature_net(seed: int = 0) -> nn.Module:
    """The fixed random CNN of the ``random_features`` space (same weights on every machine: CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for cin, cout in ((3, 32), (32, 64), (64, 128)):
        conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 16)) ** 0.5)
            conv.bias.zero_()
        layers += [conv, nn.ReLU()]
    layers.append(nn.AdaptiveAvgPool2d(4))
    return nn.Sequential(*layers, nn.Flatten()).eval()


def _to_float(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HWC arrays → float [N, 3, size, size] in [0, 1]."""
    out = []
    for a in images:
        x = torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)


def pixel_features(images: Sequence[np.ndarray], size: int = 32) -> torch.Tensor:
    return _to_float(images, size).flatten(1).double()                       # [N, 3·size²]


@torch.no_grad()
def random_features(images: Sequence[np.ndarray], net: nn.Module | None = None, batch_size: int = 256
                    ) -> torch.Tensor:
    net = net or random_feature_net()
    feats = []
    for i in range(0, len(images), batch_size):
        x = _to_float(images[i:i + batch_size], RANDOM_NET_INPUT) * 2 - 1
        feats.append(net(x).double())
    return torch.cat(feats) if feats else torch.zeros(0, 2048, dtype=torch.float64)
