"""The op handler registry and the pure-NumPy moments used by the mean transfer."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from udfc_onnx.graph import GraphView
from udfc_onnx.handlers import HANDLERS, ChannelShapes, Context, Role, classify
from udfc_onnx.activation_means import activation_mean


def _context_for(node: onnx.NodeProto) -> Context:
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 4, 5, 5]) for name in node.input if name]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return Context(GraphView(model), ChannelShapes(model))


@pytest.mark.parametrize("op_type", sorted(HANDLERS))
def test_every_registered_handler_answers_a_role_for_a_bare_node(op_type):
    """Contract: any node (here with data-only inputs, no attributes) is classified, never raised on."""
    node = helper.make_node(op_type, ["a", "b"], ["y"], name="n")
    role = classify(node, _context_for(node))
    assert isinstance(role, Role)
    assert role.kind in ("link", "couple", "concat", "flatten", "layer", "shape", "block")
    assert role.kind != "block" or role.reason


def test_unknown_and_foreign_ops_are_blocks_with_reasons():
    for node in (helper.make_node("Frobnicate", ["a"], ["y"], name="n"),
                 helper.make_node("Relu", ["a"], ["y"], name="n", domain="example.custom")):
        role = classify(node, _context_for(node))
        assert role.kind == "block" and "n" in role.reason


@pytest.mark.parametrize("activation, args, fn", [
    ("none", (), lambda p: p),
    ("relu", (), lambda p: np.maximum(p, 0)),
    ("clip", (0.0, 6.0, 0.0), lambda p: np.clip(p, 0, 6)),
    ("leakyrelu", (-np.inf, np.inf, 0.1), lambda p: np.where(p > 0, p, 0.1 * p)),
    ("sigmoid", (), lambda p: 1 / (1 + np.exp(-p))),
])
def test_activation_mean_matches_monte_carlo(activation, args, fn):
    rng = np.random.default_rng(0)
    beta = np.array([-2.0, -0.3, 0.0, 0.7, 5.5])
    gamma = np.array([1.0, 0.5, 2.0, -1.5, 1.0])
    samples = beta + np.abs(gamma) * rng.standard_normal((400_000, 5))
    expected = fn(samples).mean(axis=0)
    tol = 0.02 if activation == "sigmoid" else 5e-3  # sigmoid uses the probit approximation
    np.testing.assert_allclose(activation_mean(beta, gamma, activation, args), expected, atol=tol)


def test_activation_mean_of_dead_channel_is_the_clipped_shift():
    np.testing.assert_allclose(activation_mean(np.array([7.0, -1.0]), np.zeros(2), "clip", (0.0, 6.0, 0.0)), [6.0, 0.0])
    with pytest.raises(ValueError, match="no closed-form mean"):
        activation_mean(np.zeros(1), np.ones(1), "gelu")
