"""The built-in rules, one module per op family, listed explicitly.

Importing a module registers its rules through the ``@register_gradient``
decorators next to them.
"""

from . import (  # noqa: F401
    activation,  # Relu-like, sigmoid/tanh, Gelu/Erf, Exp/Log/Pow, Clip, ...
    attention,  # Attention (opset 23: grouped heads, masks, softcap)
    conv,  # Conv (seed derivations; conv_arith holds the pad arithmetic)
    conv_transpose,  # ConvTranspose (Convs; conv_arith's ConvTranspose pads)
    elementwise,  # Add/Sub/Mul/Div with broadcasting, Relu, Neg, Sum
    linalg,  # Gemm, MatMul
    loss,  # SoftmaxCrossEntropyLoss
    norm,  # BatchNormalization, Layer/Instance/Group/RMSNormalization, LRN, Dropout
    pool,  # MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool (pool_arith holds the geometry)
    reduce,  # Reduce*, Softmax/LogSoftmax, Mean/Max/Min
    resize,  # Resize (resize_arith holds the per-axis interpolation matrices)
    rounding,  # Mod; Floor, Ceil, Round, Sign pass no gradient (zero, as in torch and JAX)
    shape,  # Flatten, Reshape, Identity, Cast; no-gradient and not-differentiable ops
    tensor,  # Concat, Split, Slice, Transpose, Squeeze, Unsqueeze, Expand, Tile, Gather, Pad, Where
)
