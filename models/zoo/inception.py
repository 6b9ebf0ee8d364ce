"""Inception / GoogLeNet: four-branch modules (1x1; 1x1->3x3; 1x1->3x3->3x3;
MaxPool 3x3/1 -> 1x1) concatenated, AveragePool 3x3/1 (count_include_pad=False)
between modules, MaxPool stride 2.  Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import conv_bn, finish, seeded


class InceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 3), conv_bn(c5, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), conv_bn(8, 12, 3))
        self.a = InceptionBlock(12, 4, 4, 6, 2, 4, 2)          # -> 16
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.b = InceptionBlock(16, 6, 4, 8, 2, 4, 4)          # -> 22
        self.down = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.c = InceptionBlock(22, 8, 6, 8, 4, 6, 4)          # -> 26
        self.drop = nn.Dropout(0.4)
        self.fc = nn.Linear(26, classes)

    def forward(self, x):
        x = self.c(self.down(self.b(self.avg(self.a(self.stem(x))))))
        return self.fc(self.drop(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def inception(seed=0):
    seeded(seed)
    return finish(GoogLeNet(), (1, 3, 32, 32), seed)
