"""Optimizers as ONNX subgraphs, with PyTorch's exact update rules.

Each optimizer emits, per trainable parameter ``p`` with gradient ``g``, the
new parameter and the new optimizer state.  Scalar coefficients that PyTorch
computes in Python (double precision) are computed here in float64 and cast
to the parameter type, as PyTorch does when it multiplies a float tensor by a
Python scalar.  ``lr`` is a float32 scalar input, ``step`` an int64 scalar
input holding the 1-based number of this update (torch's ``state['step']``
after its increment).

SGD (``torch.optim.SGD``)::

    d = g + weight_decay * p
    buf = d                                      (first step)
        = momentum * buf + (1 - dampening) * d   (later steps)
    d = d + momentum * buf  (nesterov)  else  d = buf      (when momentum != 0)
    p = p - lr * d

  The momentum buffer starts at zero; with ``dampening == 0`` the later-step
  formula gives exactly ``d`` on the first step, so no ``step`` input is
  needed.  With dampening a ``Where(step == 1, ...)`` selects the first-step
  rule.

Adam (``torch.optim.Adam``, L2 weight decay) and AdamW (``torch.optim.AdamW``,
decoupled ``p = p * (1 - lr * weight_decay)`` first)::

    m = m + (1 - beta1) * (g - m)                (torch's lerp)
    v = beta2 * v + (1 - beta2) * g * g
    v_max = max(v_max, v)                        (amsgrad)
    denom = sqrt(v) / sqrt(1 - beta2**step) + eps
    p = p - lr / (1 - beta1**step) * m / denom
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from onnx import TensorProto

from ..types import np_dtype
from .errors import TrainingError


@dataclass
class SGD:
    """torch.optim.SGD: momentum, dampening, Nesterov, (L2) weight decay."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name = "sgd"

    def __post_init__(self):
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise TrainingError("SGD: Nesterov momentum requires a momentum > 0 and zero dampening "
                                "(as in torch.optim.SGD)")
        if self.momentum < 0 or self.weight_decay < 0:
            raise TrainingError("SGD: momentum and weight_decay must be >= 0")

    def state_names(self) -> tuple:
        return ("momentum_buffer",) if self.momentum != 0 else ()

    @property
    def needs_step(self) -> bool:
        return self.momentum != 0 and self.dampening != 0

    def emit(self, w, p: str, grad: str, state: dict, lr: str, step: Optional[str], dtype: int):
        f = np_dtype(dtype)
        d = grad
        if self.weight_decay:
            d = w.op("Add", d, w.op("Mul", p, w.const(self.weight_decay, dtype=f), name="sgd/wd"), name="sgd/l2")
        new_state = {}
        if self.momentum:
            buf = state["momentum_buffer"]
            mom = w.const(self.momentum, dtype=f)
            scaled = d if self.dampening == 0 else w.op("Mul", d, w.const(1.0 - self.dampening, dtype=f))
            later = w.op("Add", w.op("Mul", buf, mom, name="sgd/momentum"), scaled, name="sgd/buf")
            if self.dampening != 0:
                first = w.op("Equal", step, w.const(1, dtype=np.int64), name="sgd/first_step")
                later = w.op("Where", first, d, later, name="sgd/buf_first")
            new_state["momentum_buffer"] = later
            d = w.op("Add", d, w.op("Mul", later, mom), name="sgd/nesterov") if self.nesterov else later
        neg_lr = w.op("Neg", w.cast(lr, dtype), name="sgd/neg_lr")
        new_p = w.op("Add", p, w.op("Mul", d, neg_lr, name="sgd/delta"), name="sgd/update")
        return new_p, new_state

    def config(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass
class Adam:
    """torch.optim.Adam (L2 weight decay added to the gradient), optionally AMSGrad."""

    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    name = "adam"
    decoupled = False

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise TrainingError(f"{self.name}: betas must be in [0, 1), got {tuple(self.betas)}")
        if self.eps < 0 or self.weight_decay < 0:
            raise TrainingError(f"{self.name}: eps and weight_decay must be >= 0")
        self.betas = (float(b1), float(b2))

    def state_names(self) -> tuple:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    needs_step = True

    def emit(self, w, p: str, grad: str, state: dict, lr: str, step: str, dtype: int):
        f = np_dtype(dtype)
        b1, b2 = self.betas
        neg_step, bc2_sqrt, decay = w.memo(("adam_scalars", self.name, lr, step, dtype),
                                            lambda: self._scalars(w, lr, step, dtype))
        if self.decoupled and self.weight_decay:
            p = w.op("Mul", p, decay, name=f"{self.name}/decoupled_decay")
        elif self.weight_decay:
            grad = w.op("Add", grad, w.op("Mul", p, w.const(self.weight_decay, dtype=f)), name=f"{self.name}/l2")
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m_new = w.op("Add", m, w.op("Mul", w.op("Sub", grad, m), w.const(1.0 - b1, dtype=f)), name=f"{self.name}/exp_avg")
        v_new = w.op("Add", w.op("Mul", v, w.const(b2, dtype=f)),
                      w.op("Mul", w.op("Mul", grad, grad), w.const(1.0 - b2, dtype=f)), name=f"{self.name}/exp_avg_sq")
        new_state = {"exp_avg": m_new, "exp_avg_sq": v_new}
        second = v_new
        if self.amsgrad:
            second = w.op("Max", state["max_exp_avg_sq"], v_new, name=f"{self.name}/max_exp_avg_sq")
            new_state["max_exp_avg_sq"] = second
        denom = w.op("Add", w.op("Div", w.op("Sqrt", second), bc2_sqrt), w.const(self.eps, dtype=f), name=f"{self.name}/denom")
        new_p = w.op("Add", p, w.op("Mul", w.op("Div", m_new, denom), neg_step), name=f"{self.name}/update")
        return new_p, new_state

    def _scalars(self, w, lr: str, step: str, dtype: int) -> tuple:
        """The bias corrections, once per graph, in float64 (as torch computes them in Python)."""
        b1, b2 = self.betas
        lr64 = w.op("Cast", lr, to=TensorProto.DOUBLE, name=f"{self.name}/lr64")
        t = w.op("Cast", step, to=TensorProto.DOUBLE, name=f"{self.name}/step64")
        one = w.const(1.0, dtype=np.float64)
        bc1 = w.op("Sub", one, w.op("Pow", w.const(b1, dtype=np.float64), t), name=f"{self.name}/bias_correction1")
        bc2 = w.op("Sub", one, w.op("Pow", w.const(b2, dtype=np.float64), t), name=f"{self.name}/bias_correction2")
        neg_step = w.op("Neg", w.op("Div", lr64, bc1), name=f"{self.name}/neg_step_size")
        bc2_sqrt = w.op("Sqrt", bc2, name=f"{self.name}/bias_correction2_sqrt")
        decay = None
        if self.decoupled and self.weight_decay:
            decay = w.op("Sub", one, w.op("Mul", lr64, w.const(self.weight_decay, dtype=np.float64)),
                          name=f"{self.name}/decay64")
            decay = w.op("Cast", decay, to=dtype, name=f"{self.name}/decay")
        return (w.op("Cast", neg_step, to=dtype, name=f"{self.name}/neg_step"),
                w.op("Cast", bc2_sqrt, to=dtype, name=f"{self.name}/bc2_sqrt"), decay)

    def config(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return {"name": self.name, **d}


@dataclass
class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay (default 0.01, as in torch)."""

    weight_decay: float = 0.01
    name = "adamw"
    decoupled = True


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, **kwargs):
    """``make_optimizer("adamw", weight_decay=0.01)``; unknown names raise :class:`TrainingError`."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise TrainingError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TrainingError(f"optimizer {name}: {exc}") from None


def optimizer_from_config(cfg: dict):
    cfg = dict(cfg)
    return make_optimizer(cfg.pop("name"), **cfg)


