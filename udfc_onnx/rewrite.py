"""Write a solution's arrays back into the graph: sliced producers, compensated consumers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .compensate import Layer
from .graph import GraphView, remove_unused, set_initializer

__all__ = ["RewriteRecord", "apply_arrays"]


@dataclass
class RewriteRecord:
    """Initializers replaced and biases created by :func:`apply_arrays`."""

    replaced: int = 0
    biases_added: int = 0


def apply_arrays(model: onnx.ModelProto, arrays: dict[str, np.ndarray], layers: dict[str, Layer], *,
                 inplace: bool = False) -> tuple[onnx.ModelProto, RewriteRecord]:
    """Return a copy of ``model`` whose initializers take the given values (and shapes).

    A bias named in ``layers`` but absent from its node is attached to the node. Stale
    value_info shapes are dropped (channel counts changed) and shapes are inferred again.
    ``inplace=True`` edits and returns ``model`` itself.
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
