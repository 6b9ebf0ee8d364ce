"""EfficientNet-style: MBConv blocks with SiLU (exported as Sigmoid * x) and
squeeze-excitation (SiLU inside, Sigmoid gate).  Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import conv_bn, finish, seeded
from .mobilenet import InvertedResidual
from .resnet import SE


class EfficientNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        S = nn.SiLU
        self.stem = conv_bn(3, 8, 3, 2, act=S)
        cfg = [(8, 1, 1, 3), (12, 2, 4, 3), (12, 1, 4, 5), (16, 2, 4, 5)]
        blocks, cin = [], 8
        for cout, stride, expand, k in cfg:
            blk = InvertedResidual(cin, cout, stride, expand, k, S, se=False)
            # EfficientNet's SE: SiLU activation, Sigmoid gate, after the depthwise conv
            mid = cin * expand
            layers = list(blk.body)
            layers.insert(len(layers) - 1, SE(mid, 4, gate=nn.Sigmoid, act=S))
            blk.body = nn.Sequential(*layers)
            blocks.append(blk)
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, 32, 1, act=S)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1)))


def efficientnet(seed=0):
    seeded(seed)
    return finish(EfficientNet(), (1, 3, 32, 32), seed)
