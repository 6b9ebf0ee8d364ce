"""MobileNetV2 (inverted residuals, depthwise 3x3, ReLU6 -> Clip) and MobileNetV3
(Hardswish, squeeze-excitation with Hardsigmoid).  Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import conv_bn, finish, seeded
from .resnet import SE


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, k=3, act=nn.ReLU6, se=False):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, mid, 1, act=act)]
        layers.append(conv_bn(mid, mid, k, stride, groups=mid, act=act))  # depthwise
        if se:
            layers.append(SE(mid, 4, gate=nn.Hardsigmoid))
        layers.append(conv_bn(mid, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class MobileNet(nn.Module):
    def __init__(self, cfg, act, head_act, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, act=act)
        blocks, cin = [], 8
        for cout, stride, expand, k, blk_act, se in cfg:
            blocks.append(InvertedResidual(cin, cout, stride, expand, k, blk_act, se))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, 32, 1, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(32, 24), head_act(), nn.Dropout(0.2), nn.Linear(24, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


SHAPE = (1, 3, 32, 32)


def mobilenet_v2(seed=0):
    seeded(seed)
    R6 = nn.ReLU6
    cfg = [(8, 1, 1, 3, R6, False), (12, 2, 4, 3, R6, False), (12, 1, 4, 3, R6, False),
           (16, 2, 4, 3, R6, False)]
    return finish(MobileNet(cfg, R6, R6), SHAPE, seed)


def mobilenet_v3(seed=0):
    seeded(seed)
    HS, RE = nn.Hardswish, nn.ReLU
    cfg = [(8, 2, 1, 3, RE, True), (12, 2, 3, 3, RE, False), (12, 1, 3, 5, HS, True),
           (16, 1, 4, 5, HS, True)]
    return finish(MobileNet(cfg, HS, HS), SHAPE, seed)
