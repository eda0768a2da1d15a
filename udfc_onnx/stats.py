"""BatchNorm statistics, read before folding: the solver's only stand-in for data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphView, attribute

__all__ = ["BNStats", "read_bn_stats"]


@dataclass(frozen=True)
class BNStats:
    """Inference BatchNorm of one channel set, with the layer it follows.

    Attributes
    ----------
    bn_node : str
        Name of the BatchNormalization node.
    layer : str
        Name of the Conv/Gemm node whose output it normalises ("" if none).
    gamma, beta, mean, var : ndarray of shape (C,), float64
    eps : float
    """

    bn_node: str
    layer: str
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @property
    def sigma(self) -> np.ndarray:
        """sqrt(var + eps), the standard deviation BN divides by."""
        return np.sqrt(self.var + self.eps)

    @property
    def a(self) -> np.ndarray:
        """Folded multiplier gamma / sigma."""
        return self.gamma / self.sigma

    @property
    def b(self) -> np.ndarray:
        """Folded bias beta - a * mean (add a * conv_bias for a conv with a bias)."""
        return self.beta - self.a * self.mean


def read_bn_stats(model: onnx.ModelProto) -> dict[str, BNStats]:
    """Every inference-form BatchNormalization whose parameters are constants.

    Returns
    -------
    dict
        Keyed by the name of the Conv/Gemm the BN follows when it follows one directly,
        else by the BN node's own name.
    """
    view = GraphView(model)
    stats: dict[str, BNStats] = {}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.input) < 5:
            continue
        if len([o for o in node.output if o]) != 1 or attribute(node, "training_mode", 0):
            continue
        if not all(view.is_constant(n) for n in node.input[1:5]):
            continue
        gamma, beta, mean, var = (view.array(n).astype(np.float64) for n in node.input[1:5])
        prev = view.producer.get(node.input[0])
        layer = prev.name if prev is not None and prev.op_type in ("Conv", "Gemm") else ""
        stats[layer or node.name] = BNStats(node.name, layer, gamma, beta, mean, var, float(attribute(node, "epsilon", 1e-5)))
    return stats
