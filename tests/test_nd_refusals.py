"""The one-line refusals of the Einsum, GatherND and ScatterND rules (the numbers are in the op table)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxbp
from onnxbp.errors import UnsupportedAttributeError
from onnxbp.testing import constant, one_node_model


def _refused(op, inputs, attrs, opset=17, wrt=("X0",)):
    model = one_node_model(op, inputs, attrs, opset=opset)
    with pytest.raises(UnsupportedAttributeError) as exc:
        onnxbp.gradient(model, list(wrt))
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_einsum_diagonal_is_refused():
    text = _refused("Einsum", {"X0": (3, 3)}, {"equation": "ii->i"})
    assert text == ("node 'op' (Einsum, opset 17): equation 'ii->i': operand 0 repeats a subscript (a diagonal); "
                    "supported are equations whose operands each have distinct subscripts")


def test_einsum_broadcasting_ellipsis_is_refused():
    text = _refused("Einsum", {"X0": (1, 2, 3), "X1": (4, 3, 2)}, {"equation": "...ij,...jk->...ik"})
    assert text == ("node 'op' (Einsum, opset 17): equation '...ij,...jk->...ik': the '...' dims of operand 0 "
                    "([1]) are not the output's ([4]); broadcasting within '...' is not supported")


def test_einsum_other_operand_still_differentiated():
    """Only the requested operand is checked: the broadcasting X0 is not asked for here."""
    model = one_node_model("Einsum", {"X0": (1, 2, 3), "X1": (4, 3, 2)}, {"equation": "...ij,...jk->...ik"})
    gm = onnxbp.gradient(model, ["X1"])
    assert [o.name for o in gm.graph.output][-1] == "X1_grad"


def test_gathernd_batch_dims_is_refused():
    text = _refused("GatherND", {"X0": (2, 3, 4), "indices": constant(np.array([[1], [2]], np.int64))},
                    {"batch_dims": 1})
    assert text == ("node 'op' (GatherND, opset 17): batch_dims=1 is not supported (ScatterND has no batch_dims); "
                    "supported: batch_dims=0")


def test_scatternd_mul_is_refused():
    text = _refused("ScatterND", {"X0": (4, 3), "indices": constant(np.array([[1]], np.int64)), "X1": (1, 3)},
                    {"reduction": "mul"})
    assert text == "node 'op' (ScatterND, opset 17): reduction='mul' is not linear; supported: none, add"
