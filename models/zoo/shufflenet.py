"""ShuffleNetV2: units that split channels in two (chunk -> Split, or Slice in
older exports), run one half through 1x1 -> depthwise 3x3 -> 1x1, concatenate
and channel-shuffle (Reshape -> Transpose -> Reshape).  Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import conv_bn, finish, seeded


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class Unit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, half, 1))
            src = cin
        else:
            self.left = None
            src = half
        self.right = nn.Sequential(conv_bn(src, half, 1), conv_bn(half, half, 3, stride, groups=half, act=None),
                                   conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(Unit(8, 16, 2), Unit(16, 16, 1), Unit(16, 24, 2), Unit(24, 24, 1))
        self.head = conv_bn(24, 32, 1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


def shufflenet(seed=0):
    seeded(seed)
    return finish(ShuffleNet(), (1, 3, 32, 32), seed)
