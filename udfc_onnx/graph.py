"""Read-only index over an ``onnx.ModelProto``: producers, consumers, initializers.

The ``ModelProto`` stays the source of truth; a ``GraphView`` is rebuilt after each pass
that changes the wiring (it is cheap: one sweep over the nodes).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from .lazy import is_lazy, tensor_array


class GraphView:
    """Producer/consumer/initializer lookup for the main graph of a model.

    Parameters
    ----------
    model : onnx.ModelProto
        The model to index. It is not copied: rebuild the view after editing the model.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.nodes_by_name: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            self.nodes_by_name[node.name] = node
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}

    def array(self, name: str, *, copy: bool = True) -> np.ndarray:
        """Return initializer ``name`` as a NumPy array (a copy; ``copy=False``: possibly read-only,
        one weight-sized allocation less for a caller that only reads it)."""
        tensor = self.initializers[name]
        value = tensor_array(tensor)
        return value.copy() if copy and not is_lazy(tensor) else value  # a lazy read is a new array already

    def take(self, name: str, read: dict[str, np.ndarray] | None) -> np.ndarray:
        """:meth:`array` of ``name``, or the private array ``read`` holds for it (taken out of ``read``)
        when that still has the initializer's dims and type (a value read once, not read again)."""
        value = read.pop(name, None) if read else None
        tensor = self.initializers[name]
        if value is not None and value.shape == tuple(tensor.dims) \
                and value.dtype == onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type):
            return value
        return self.array(name)

    def is_constant(self, name: str) -> bool:
        """True when ``name`` is an initializer and not overridable by a graph input."""
        return name in self.initializers and name not in self.graph_inputs

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The only node reading ``tensor``, or None if zero or several read it or it is a graph output."""
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.graph_outputs:
            return None
        return users[0]

    def uses(self, name: str) -> int:
        """How many node inputs read ``name``."""
        return len(self.consumers.get(name, []))


def attribute(node: onnx.NodeProto, name: str, default=None):
    """Value of attribute ``name`` of ``node``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace (or add) initializer ``name`` with ``value``, keeping its position."""
    tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def remove_unused(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nobody reads and initializers nobody uses; return how many went."""
    graph = model.graph
    removed = 0
    while True:
        used = {o.name for o in graph.output}
        for node in graph.node:
            used.update(i for i in node.input if i)
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
    # Delete in place, last first: rebuilding the list with extend() would copy every weight.
    dead_inits = [i for i, t in enumerate(graph.initializer) if t.name not in used]
    for i in reversed(dead_inits):
        del graph.initializer[i]
    return removed + len(dead_inits)


def ensure_node_names(model: onnx.ModelProto) -> int:
    """Give every unnamed or duplicate-named node a unique name; return how many were renamed.

    Reports and plans refer to nodes by name, so names must be unique.
    """
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 0
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model`` (protobuf ``CopyFrom``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def without_initializer_data(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``names`` keep name, type and dims but no values.

    For a caller that holds those values elsewhere and will write or drop them before saving: the
    copy never holds them, and once the original goes, the memory of their old values goes with it
    (a protobuf message frees nothing it held before the whole message is freed).
    """
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip="initializer")
    for t in model.graph.initializer:
        if t.name in names:
            graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        else:
            graph.initializer.append(t)
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    out.graph.CopyFrom(graph)
    return out


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except the one named ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated field (scalars or messages)
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # message field
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)
