"""Fold inference BatchNormalization into the preceding Conv (or Gemm) initializers.

    BN(conv(x)) = gamma (W*x + c - mu)/sqrt(var+eps) + beta
                = (a W) * x + (a (c - mu) + beta),        a = gamma/sqrt(var+eps)

A BN is folded only when its layer's output feeds nothing but the BN, its parameters and the
layer's weight/bias are initializers used by nobody else; otherwise it is left in place with
a reason (onnxscript's rule: never fold a weight shared outside the match).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import GraphView, attribute, copy_model, remove_unused, set_initializer

__all__ = ["FoldRecord", "fold_batchnorm"]


@dataclass
class FoldRecord:
    """What :func:`fold_batchnorm` did: folded (layer, bn) pairs and skipped BNs with reasons."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _why_not_foldable(view: GraphView, bn: onnx.NodeProto) -> str:
    if len(bn.input) < 5 or len([o for o in bn.output if o]) != 1 or attribute(bn, "training_mode", 0):
        return "BatchNormalization is not in inference form"
    if not all(view.is_constant(n) and view.uses(n) == 1 for n in bn.input[1:5]):
        return "BN parameters are not constants used only by this BN"
    layer = view.producer.get(bn.input[0])
    if layer is None or layer.op_type not in ("Conv", "Gemm"):
        return "BN does not follow a Conv or Gemm (pre-activation BN)"
    if view.sole_consumer(bn.input[0]) is None:
        return f"output of {layer.name} is also read by other nodes"
    weight = layer.input[1]
    if not view.is_constant(weight) or view.uses(weight) != 1:
        return f"weight of {layer.name} is not a constant used only there"
    if len(layer.input) > 2 and layer.input[2] and (not view.is_constant(layer.input[2]) or view.uses(layer.input[2]) != 1):
        return f"bias of {layer.name} is not a constant used only there"
    if layer.op_type == "Gemm":
        if attribute(layer, "transA", 0) or attribute(layer, "alpha", 1.0) != 1.0 or attribute(layer, "beta", 1.0) != 1.0:
            return f"Gemm {layer.name} has transA/alpha/beta"
    return ""


def fold_batchnorm(model: onnx.ModelProto, *, inplace: bool = False,
                   weights_out: dict[str, np.ndarray] | None = None,
                   weights_read: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, FoldRecord]:
    """Return a copy of ``model`` with every foldable BN folded into its Conv/Gemm.

    The layer takes over the BN's output name, so downstream names are unchanged.
    ``inplace=True`` edits and returns ``model`` itself (no copy of a large model).
    ``weights_out``: the folded Conv/Gemm weights go into this dict (by initializer name) instead
    of the model, whose weight initializers keep their unfolded values until the caller writes
    them (biases are written as usual). A protobuf message never frees a replaced value before
    the whole model goes, so writing them would hold every weight twice.
    ``weights_read``: private arrays of weights read already (``LoadedModel.weights``); the fold
    takes the ones it folds out of this dict and folds them in place instead of reading them again.
    """
    model = model if inplace else copy_model(model)
    view = GraphView(model)
    record = FoldRecord()
    drop: list[onnx.NodeProto] = []
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        reason = _why_not_foldable(view, bn)
        if reason:
            record.skipped.append((bn.name, reason))
            continue
        layer = view.producer[bn.input[0]]
        gamma, beta, mean, var = (view.array(n).astype(np.float64) for n in bn.input[1:5])
        a = gamma / np.sqrt(var + float(attribute(bn, "epsilon", 1e-5)))
        folded = view.take(layer.input[1], weights_read)  # private (read before, read now, or a copy)
        dtype = folded.dtype
        if layer.op_type == "Conv":
            out_channels = folded.shape[0]
            scale = a.reshape((-1,) + (1,) * (folded.ndim - 1))
        else:
            trans_b = attribute(layer, "transB", 0)
            out_channels = folded.shape[0] if trans_b else folded.shape[1]
            scale = a[:, None] if trans_b else a[None, :]
        # in place, in the weight's own type: no weight-sized temporary (a float64 product took
        # twice the memory, or 3x the time when buffered)
        folded *= scale.astype(dtype)
        has_bias = len(layer.input) > 2 and layer.input[2]
        bias = view.array(layer.input[2]).astype(np.float64) if has_bias else np.zeros(out_channels)
        new_bias = a * (bias - mean) + beta
        if weights_out is None:
            set_initializer(model, layer.input[1], folded)
        else:
            weights_out[layer.input[1]] = folded
        bias_name = layer.input[2] if has_bias else f"{layer.name}.folded_bias"
        set_initializer(model, bias_name, new_bias.astype(dtype))
        if not has_bias:
            while len(layer.input) < 3:
                layer.input.append("")
            layer.input[2] = bias_name
        layer.output[0] = bn.output[0]
        drop.append(bn)
        record.folded.append((layer.name, bn.name))
    for bn in drop:
        model.graph.node.remove(bn)
    remove_unused(model)
    return model, record
