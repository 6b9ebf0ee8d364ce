"""ResNet (basic and bottleneck blocks), ResNeXt (grouped 3x3) and RegNetY (grouped + SE).

Stem: Conv 3x3 + BN + ReLU + MaxPool 3x3/2; stages of residual blocks, the
first block of a stage with stride 2 and a 1x1 Conv+BN projection shortcut;
GlobalAveragePool, Flatten, Linear.  Input 1x3x32x32 (symbolic batch).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import conv_bn, finish, seeded


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1, groups=1, se=False):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn(cin, width, 3, stride)
        self.conv2 = conv_bn(width, cout, 3, 1, act=None)
        self.short = None if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return self.relu(self.conv2(self.conv1(x)) + s)


class SE(nn.Module):
    """Squeeze-excitation: GAP -> 1x1 conv -> ReLU -> 1x1 conv -> Sigmoid -> scale."""

    def __init__(self, c, r=4, gate=nn.Sigmoid, act=nn.ReLU):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, max(c // r, 2), 1)
        self.act = act()
        self.fc2 = nn.Conv2d(max(c // r, 2), c, 1)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1, groups=1, se=False):
        super().__init__()
        cout = width * self.expansion
        mid = width * (2 if groups > 1 else 1)
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=groups)
        self.se = SE(mid) if se else nn.Identity()
        self.conv3 = conv_bn(mid, cout, 1, act=None)
        self.short = None if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return self.relu(self.conv3(self.se(self.conv2(self.conv1(x)))) + s)


class ResNet(nn.Module):
    def __init__(self, block, widths, blocks, groups=1, se=False, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 8
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(block(cin, w, 2 if (j == 0 and i > 0) else 1, groups, se))
                cin = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


SHAPE = (1, 3, 32, 32)


def resnet_basic(seed=0):
    seeded(seed)
    return finish(ResNet(Basic, (8, 16), (2, 1)), SHAPE, seed)


def resnet_bottleneck(seed=0):
    seeded(seed)
    return finish(ResNet(Bottleneck, (4, 8), (2, 1)), SHAPE, seed)


def resnext(seed=0):
    seeded(seed)
    return finish(ResNet(Bottleneck, (4, 8), (1, 1), groups=4), SHAPE, seed)


def regnet(seed=0):
    seeded(seed)
    return finish(ResNet(Bottleneck, (4, 8), (1, 1), groups=2, se=True), SHAPE, seed)
