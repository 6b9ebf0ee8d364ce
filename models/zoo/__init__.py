"""Small real-structure networks, written in torch and exported to ONNX.

Each family module defines ``build(seed=0) -> (torch.nn.Module, input_shape)``
with seeded weights and (where the net has BatchNorm) non-trivial running
statistics, already in eval mode.  :data:`FAMILIES` lists them; the
exporters live in :mod:`models.zoo.export` and the CLI in
:mod:`models.zoo.write`::

    python -m models.zoo.write OUTDIR          # every family, TorchScript opset 17
    python -m models.zoo.write OUTDIR --dynamo # plus the dynamo exporter

Widths and resolutions are tiny on purpose (tests build them on the fly);
the structure (blocks, branches, grouped/depthwise convs, shuffles, attention)
is the real one.
"""

from __future__ import annotations

import importlib

#: family name -> module name under models.zoo
FAMILIES = {
    "resnet_basic": "resnet",
    "resnet_bottleneck": "resnet",
    "resnext": "resnet",
    "regnet": "resnet",
    "mobilenet_v2": "mobilenet",
    "mobilenet_v3": "mobilenet",
    "efficientnet": "efficientnet",
    "densenet": "densenet",
    "inception": "inception",
    "squeezenet": "squeezenet",
    "shufflenet": "shufflenet",
    "vgg": "vgg",
    "alexnet": "vgg",
    "convnext": "convnext",
    "vit": "vit",
    "mlp_mixer": "vit",
}


def build(family: str, seed: int = 0):
    """``(model, input_shape)`` for one family: eval mode, seeded, BN stats warmed up."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    mod = importlib.import_module(f"{__name__}.{FAMILIES[family]}")
    return getattr(mod, family)(seed)
