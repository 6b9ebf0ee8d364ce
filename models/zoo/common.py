"""Shared helpers for the zoo builders: seeding and BatchNorm warm-up."""

from __future__ import annotations

import torch
from torch import nn


def finish(model: nn.Module, input_shape, seed: int, warmup: int = 3):
    """Give BatchNorm layers non-trivial running stats and affine params, then eval().

    A few forward passes in train mode on random data (seeded) move the
    running mean/var away from 0/1; the BN weight/bias are re-drawn so they
    are not the trivial 1/0 either.
    """
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.momentum = 0.5
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    has_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    if has_bn:
        model.train()
        with torch.no_grad():
            for _ in range(warmup):
                x = 1.5 * torch.randn((4,) + tuple(input_shape[1:]), generator=g) + 0.3
                model(x)
    model.eval()
    return model, tuple(input_shape)


def seeded(seed: int):
    torch.manual_seed(seed)


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)
