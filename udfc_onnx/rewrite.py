"""Write a solution's arrays back into the graph: sliced producers, compensated consumers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .compensate import Layer
from .graph import GraphView, attribute, remove_unused, set_initializer

__all__ = ["RewriteRecord", "apply_arrays"]


@dataclass
class RewriteRecord:
    """Initializers replaced and biases created by :func:`apply_arrays`."""

    replaced: int = 0
    biases_added: int = 0
    groups_updated: int = 0


def apply_arrays(model: onnx.ModelProto, arrays: dict[str, np.ndarray], layers: dict[str, Layer], *,
                 inplace: bool = False, new_shapes: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, RewriteRecord]:
    """Return a copy of ``model`` whose initializers take the given values (and shapes).

    A bias named in ``layers`` but absent from its node is attached to the node. A depthwise
    conv whose filters were sliced with a channel group gets its ``group`` attribute set to the
    new channel count. Stale value_info shapes are dropped (channel counts changed).
    ``inplace=True`` edits and returns ``model`` itself. ``new_shapes`` (default: ``arrays``) holds
    every changed weight, also those not written here because the QDQ pass replaces them.
    """
    if inplace:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    view = GraphView(out)
    record = RewriteRecord()
    for name, value in arrays.items():
        set_initializer(out, name, value)
        record.replaced += 1
    record.groups_updated = _update_depthwise_groups(out, arrays if new_shapes is None else new_shapes)
    for layer in layers.values():
        if layer.bias in arrays:
            node = view.nodes_by_name[layer.name]
            if len(node.input) < 3 or not node.input[2]:
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = layer.bias
                record.biases_added += 1
    del out.graph.value_info[:]
    remove_unused(out)
    return out, record


def _update_depthwise_groups(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> int:
    """Set ``group`` of every depthwise Conv whose (C, 1, k, k) weight changed channel count."""
    updated = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in arrays:
            continue
        group = int(attribute(node, "group", 1))
        weight = arrays[node.input[1]]
        if group > 1 and weight.ndim >= 3 and weight.shape[1] == 1 and weight.shape[0] != group:
            for attr in node.attribute:
                if attr.name == "group":
                    attr.i = int(weight.shape[0])
            updated += 1
    return updated
