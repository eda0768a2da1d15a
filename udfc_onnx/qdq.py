"""Emit quantized weights as QDQ: int8 initializer -> DequantizeLinear(per channel) -> layer.

Weight-only QDQ keeps float activations. It stores weights as integers (a quarter of the size),
but ORT runs it no faster than float (shared/ort-qdq-notes.md); full int8 QDQ is separate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .compensate import Layer
from .graph import GraphView, remove_unused
from .quant import QuantizedTensor

__all__ = ["QdqRecord", "emit_weight_qdq", "MIN_QDQ_OPSET"]

MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear


@dataclass
class QdqRecord:
    """How many weights were emitted as DequantizeLinear, by layer kind."""

    conv: int = 0
    gemm: int = 0


def emit_weight_qdq(model: onnx.ModelProto, quantized: dict[str, QuantizedTensor], layers: dict[str, Layer], *,
                    inplace: bool = False) -> tuple[onnx.ModelProto, QdqRecord]:
    """Replace each quantized float weight with an int8 initializer and a DequantizeLinear.

    Parameters
    ----------
    model : onnx.ModelProto
        Default-domain opset >= 13.
    quantized : dict of str to QuantizedTensor
        Weight initializer name -> integers in out-channel-major layout.
    layers : dict of str to Layer
    inplace : bool, default=False
        Edit and return ``model`` itself (no copy of a large model).
    """
    if inplace:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    view = GraphView(out)
    record = QdqRecord()
    new_nodes = []
    for layer in layers.values():
        qt = quantized.get(layer.weight)
        if qt is None:
            continue
        node = view.nodes_by_name[layer.name]
        stored = layer.stored(qt.q)
        axis = 0 if layer.kind == "conv" or layer.trans_b else 1
        base = layer.weight
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(stored.astype(np.int8)), f"{base}_quantized"),
            numpy_helper.from_array(qt.scale.astype(np.float32), f"{base}_scale"),
            numpy_helper.from_array(qt.zero_point.astype(np.int8), f"{base}_zero_point"),
        ]
        out.graph.initializer.extend(inits)
        dq = helper.make_node("DequantizeLinear", [i.name for i in inits], [f"{base}_dequantized"],
                              name=f"{layer.name}_weight_DequantizeLinear", axis=axis)
        new_nodes.append((node, dq))
        node.input[1] = dq.output[0]
        if layer.kind == "conv":
            record.conv += 1
        else:
            record.gemm += 1
    # Put each DQ right before its layer so the graph stays topologically sorted.
    dq_for = {node.name: dq for node, dq in new_nodes}
    ordered = []
    for node in out.graph.node:
        if node.name in dq_for:
            ordered.append(dq_for[node.name])
        copy = onnx.NodeProto()
        copy.CopyFrom(node)  # detach from the container we are about to clear
        ordered.append(copy)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    remove_unused(out)
    return out, record
