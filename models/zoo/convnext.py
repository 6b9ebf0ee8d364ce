"""ConvNeXt: depthwise 7x7 conv, permute to channels-last (Transpose),
LayerNorm, Linear 4x expansion, GELU (Erf form), Linear, per-channel layer
scale ``gamma``, permute back, residual.  Stem 2x2/2 "patchify" conv with a
channels-first LayerNorm (written out: mean, variance, sqrt, divide) and the
same for the downsampling layer.  Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import finish, seeded


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW tensor, written out as in ConvNeXt."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(0.5 + 0.1 * torch.randn(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(8, 16), depths=(2, 1), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 2, 2), LayerNorm2d(dims[0]))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i > 0:
                stages += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages += [Block(d) for _ in range(n)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


def convnext(seed=0):
    seeded(seed)
    m = ConvNeXt()
    with torch.no_grad():  # non-trivial LayerNorm affine params
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return finish(m, (1, 3, 32, 32), seed)
