"""VGG (3x3 conv stacks + MaxPool, MLP classifier with Dropout) and AlexNet
(large strided first conv, LocalResponseNorm, overlapping MaxPool 3x3/2,
Dropout).  Inputs 1x3x32x32 (VGG) and 1x3x64x64 (AlexNet).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import finish, seeded


class _LRNFunction(torch.autograd.Function):
    """Exported as the ONNX LRN op (torch has no aten op for LRN, so the plain
    module would be exported as its Pad/AveragePool/Pow decomposition)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.LocalResponseNorm):
    """LocalResponseNorm that exports to ONNX LRN; plain torch math (autograd) otherwise."""

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)
        return super().forward(x)


class VGG(nn.Module):
    def __init__(self, cfg=(8, "M", 16, 16, "M", 24, 24, "M"), classes=10):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * 16, 32), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 7, 2, 2), nn.ReLU(), LRN(5, 1e-2, 0.75, 2.0), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), LRN(5, 1e-2, 0.75, 2.0), nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(16 * 3 * 3, 32), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(seed=0):
    seeded(seed)
    return finish(VGG(), (1, 3, 32, 32), seed)


def alexnet(seed=0):
    seeded(seed)
    return finish(AlexNet(), (1, 3, 64, 64), seed)
