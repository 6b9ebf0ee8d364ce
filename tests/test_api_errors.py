"""Misuses of the Python API: each is an onnxbp exception with a one-line message naming the argument,
what was given and what is accepted (never a TypeError, KeyError or an onnxruntime exception)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxbp

MLP = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "mlp.onnx"))

CASES = [
    ("gradient(123)", lambda: onnxbp.gradient(123), onnxbp.ModelLoadError, "expected an onnx.ModelProto or a path, got int"),
    ("gradient(wrt=5)", lambda: onnxbp.gradient(MLP, wrt=5), onnxbp.WrtError,
     "wrt must be a tensor name or a list of names, got int 5"),
    ("gradient(wrt=[5])", lambda: onnxbp.gradient(MLP, wrt=[5]), onnxbp.WrtError,
     "wrt must hold tensor names (non-empty strings), got int 5"),
    ("gradient(wrt={'a': 1})", lambda: onnxbp.gradient(MLP, wrt={"a": 1}), onnxbp.WrtError,
     "wrt must be a tensor name or a list of names, got dict"),
    ("gradient(grad_suffix=5)", lambda: onnxbp.gradient(MLP, grad_suffix=5), onnxbp.OptionError,
     "grad_suffix must be a non-empty string, got int 5"),
    ("gradient(grad_suffix='')", lambda: onnxbp.gradient(MLP, grad_suffix=""), onnxbp.OptionError,
     "grad_suffix must be a non-empty string, got str ''"),
    ("gradient(registry=5)", lambda: onnxbp.gradient(MLP, registry=5), onnxbp.OptionError,
     "registry must be an instance of Registry (onnxbp.Registry), got int 5"),
    ("gradient(conv_strategy='x')", lambda: onnxbp.gradient(MLP, conv_strategy="x"), onnxbp.OptionError,
     "option conv_strategy='x' is not supported; choose one of"),
    ("gradient(unknown=1)", lambda: onnxbp.gradient(MLP, unknown=1), onnxbp.OptionError, "unknown option 'unknown'"),
    ("backward(seeds=5)", lambda: onnxbp.backward(MLP, None, 5), onnxbp.WrtError,
     "seeds must be a tensor name or a list of names, got int 5"),
    ("backward(seeds=[])", lambda: onnxbp.backward(MLP, None, []), onnxbp.WrtError, "seeds is empty"),
    ("backward(seeds={'logits': [1, 2]})", lambda: onnxbp.backward(MLP, None, {"logits": [1, 2]}), onnxbp.WrtError,
     "the seed of 'logits' is [1, 2]; give a number or a tensor name"),
    ("backward(frozen=5)", lambda: onnxbp.backward(MLP, None, ["logits"], frozen=5), onnxbp.WrtError,
     "frozen must be a tensor name or a list of names, got int 5"),
    ("backward(grad_names=5)", lambda: onnxbp.backward(MLP, None, ["logits"], grad_names=5), onnxbp.WrtError,
     "grad_names must be a dict, got int 5"),
    ("backward(grad_names={'fc1.weight': 5})",
     lambda: onnxbp.backward(MLP, None, ["logits"], grad_names={"fc1.weight": 5}), onnxbp.WrtError,
     "grad_names['fc1.weight'] must be a str, got int 5"),
    ("check_gradients(feeds=5)", lambda: onnxbp.check_gradients(MLP, feeds=5), onnxbp.OptionError,
     "feeds must be a dict, got int 5"),
    ("check_gradients(feeds wrong shape)", lambda: onnxbp.check_gradients(MLP, feeds={"x": np.zeros((2, 3), np.float32)}),
     onnxbp.OptionError, "feeds['x'] has shape (2, 3); the model input 'x' is N x 64"),
    ("check_gradients(feeds unknown input)", lambda: onnxbp.check_gradients(MLP, feeds={"y": np.zeros(2)}),
     onnxbp.OptionError, "feeds['y']: the model has no input 'y'"),
    ("check_gradients(rtol='x')", lambda: onnxbp.check_gradients(MLP, rtol="x"), onnxbp.OptionError, "rtol='x'"),
    ("check_gradients(batch_size=2.5)", lambda: onnxbp.check_gradients(MLP, batch_size=2.5), onnxbp.OptionError,
     "batch_size=2.5"),
]


def _trainer():
    from onnxbp.training import Trainer
    return Trainer(MLP, threads=1)


def _training_cases():
    from onnxbp.training import Trainer, TrainingError, DataError
    x = np.zeros((2, 3), np.float32)
    y = np.zeros(2, np.int64)
    return [
        ("Trainer(optimizer='sgd')", lambda: Trainer(MLP, optimizer="sgd"), TrainingError,
         "optimizer must be an instance of SGD, Adam or AdamW (onnxbp.training.SGD(...), Adam(...) or AdamW(...)), "
         "got str 'sgd'"),
        ("Trainer(threads='two')", lambda: Trainer(MLP, threads="two"), TrainingError,
         "threads must be a whole number >= 1 (or None: onnxruntime's default), got 'two'"),
        ("Trainer(loss='hinge')", lambda: Trainer(MLP, loss="hinge"), TrainingError, "unknown loss 'hinge'"),
        ("train_step(x of the wrong shape)", lambda: _trainer().train_step(x, y), DataError,
         "batch inputs has shape (2, 3), but model input 'x' expects N x 64"),
        ("train_step(lr='x')", lambda: _trainer().train_step(np.zeros((2, 64), np.float32), y, lr="x"),
         TrainingError, "lr must be a finite number, got 'x'"),
        ("evaluate(x of the wrong shape)", lambda: _trainer().evaluate(x), DataError,
         "batch inputs has shape (2, 3), but model input 'x' expects N x 64"),
        ("load_state_dict({})", lambda: _trainer().load_state_dict({}), TrainingError,
         "load_state_dict takes the dict state_dict() returns"),
        ("load_state_dict(5)", lambda: _trainer().load_state_dict(5), TrainingError, "got int"),
    ]


CASES += _training_cases()


@pytest.mark.parametrize("call, fn, error, text", CASES, ids=[c[0] for c in CASES])
def test_api_misuse_is_a_typed_one_line_error(call, fn, error, text):
    with pytest.raises(error) as exc:
        fn()
    message = str(exc.value)
    assert "\n" not in message and text in message, message


def test_single_wrt_name_is_one_name():
    g = onnxbp.gradient(MLP, wrt="fc1.weight")
    assert [o.name for o in g.graph.output][1:] == ["fc1.weight_grad"]
