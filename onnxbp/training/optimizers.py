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

    def emit(self, em, p: str, grad: str, state: dict, lr: str, step: Optional[str], dtype: int):
        f = _np(dtype)
        d = grad
        if self.weight_decay:
            d = em.op("Add", d, em.op("Mul", p, em.const(self.weight_decay, f), hint="sgd/wd"), hint="sgd/l2")
        new_state = {}
        if self.momentum:
            buf = state["momentum_buffer"]
            mom = em.const(self.momentum, f)
            scaled = d if self.dampening == 0 else em.op("Mul", d, em.const(1.0 - self.dampening, f))
            later = em.op("Add", em.op("Mul", buf, mom, hint="sgd/momentum"), scaled, hint="sgd/buf")
            if self.dampening != 0:
                first = em.op("Equal", step, em.const(1, np.int64), hint="sgd/first_step")
                later = em.op("Where", first, d, later, hint="sgd/buf_first")
            new_state["momentum_buffer"] = later
            d = em.op("Add", d, em.op("Mul", later, mom), hint="sgd/nesterov") if self.nesterov else later
        neg_lr = em.op("Neg", _cast(em, lr, dtype), hint="sgd/neg_lr")
        new_p = em.op("Add", p, em.op("Mul", d, neg_lr, hint="sgd/delta"), hint="sgd/update")
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

    def emit(self, em, p: str, grad: str, state: dict, lr: str, step: str, dtype: int):
        f = _np(dtype)
        b1, b2 = self.betas
        key = ("adam_scalars", lr, step, dtype)
        if key not in em._consts:  # bias corrections once per graph, in float64
            lr64 = em.op("Cast", lr, to=TensorProto.DOUBLE, hint=f"{self.name}/lr64")
            t = em.op("Cast", step, to=TensorProto.DOUBLE, hint=f"{self.name}/step64")
            one = em.const(1.0, np.float64)
            bc1 = em.op("Sub", one, em.op("Pow", em.const(b1, np.float64), t), hint=f"{self.name}/bias_correction1")
            bc2 = em.op("Sub", one, em.op("Pow", em.const(b2, np.float64), t), hint=f"{self.name}/bias_correction2")
            neg_step = em.op("Neg", em.op("Div", lr64, bc1), hint=f"{self.name}/neg_step_size")
            bc2_sqrt = em.op("Sqrt", bc2, hint=f"{self.name}/bias_correction2_sqrt")
            decay = None
            if self.decoupled and self.weight_decay:
                decay = em.op("Sub", one, em.op("Mul", lr64, em.const(self.weight_decay, np.float64)),
                              hint=f"{self.name}/decay64")
                decay = em.op("Cast", decay, to=dtype, hint=f"{self.name}/decay")
            em._consts[key] = (em.op("Cast", neg_step, to=dtype, hint=f"{self.name}/neg_step"),
                               em.op("Cast", bc2_sqrt, to=dtype, hint=f"{self.name}/bc2_sqrt"), decay)
        neg_step, bc2_sqrt, decay = em._consts[key]
        if self.decoupled and self.weight_decay:
            p = em.op("Mul", p, decay, hint=f"{self.name}/decoupled_decay")
        elif self.weight_decay:
            grad = em.op("Add", grad, em.op("Mul", p, em.const(self.weight_decay, f)), hint=f"{self.name}/l2")
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m_new = em.op("Add", m, em.op("Mul", em.op("Sub", grad, m), em.const(1.0 - b1, f)), hint=f"{self.name}/exp_avg")
        v_new = em.op("Add", em.op("Mul", v, em.const(b2, f)),
                      em.op("Mul", em.op("Mul", grad, grad), em.const(1.0 - b2, f)), hint=f"{self.name}/exp_avg_sq")
        new_state = {"exp_avg": m_new, "exp_avg_sq": v_new}
        second = v_new
        if self.amsgrad:
            second = em.op("Max", state["max_exp_avg_sq"], v_new, hint=f"{self.name}/max_exp_avg_sq")
            new_state["max_exp_avg_sq"] = second
        denom = em.op("Add", em.op("Div", em.op("Sqrt", second), bc2_sqrt), em.const(self.eps, f), hint=f"{self.name}/denom")
        new_p = em.op("Add", p, em.op("Mul", em.op("Div", m_new, denom), neg_step), hint=f"{self.name}/update")
        return new_p, new_state

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


def _np(dtype: int):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(dtype)


def _cast(em, name: str, dtype: int) -> str:
    if dtype == TensorProto.FLOAT:
        return name
    return em.op("Cast", name, to=dtype)
