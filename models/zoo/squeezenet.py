"""SqueezeNet 1.1: Fire modules (squeeze 1x1 -> expand 1x1 | expand 3x3,
concatenated), MaxPool 3x3/2 ceil_mode, Dropout, final 1x1 conv classifier,
global average pool.  Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import finish, seeded


class Fire(nn.Module):
    def __init__(self, cin, s, e1, e3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, s, 1)
        self.e1 = nn.Conv2d(s, e1, 1)
        self.e3 = nn.Conv2d(s, e3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.e1(x)), self.relu(self.e3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(8, 4, 8, 8), Fire(16, 4, 8, 8), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 6, 12, 12))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(24, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet(seed=0):
    seeded(seed)
    return finish(SqueezeNet(), (1, 3, 32, 32), seed)
