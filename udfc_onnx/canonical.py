"""Rewrite equivalent patterns into the forms the later passes handle: MatMul(+Add) heads -> Gemm.

Exporters write a classifier head either as ``Gemm`` (PyTorch) or as ``MatMul`` with a constant
``(K, N)`` weight, often followed by ``Add`` of a constant bias (tf2onnx, Keras, some ``Linear``
exports). On a 2-D input both are one ``Gemm(transB=0)``; writing them so lets the pruning groups,
the solver and the int8 emitter (QGemm) treat them as any fully connected layer.

Like onnxscript's rewrite rules, every candidate that is not rewritten gets its reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx
from onnx import helper

from .graph import GraphView

__all__ = ["CanonicalRecord", "matmul_to_gemm"]

# Ops whose output is 2-D whatever their input (or 2-D when their input is).
_RANK2_OPS = {"Flatten", "Gemm"}


@dataclass
class CanonicalRecord:
    """What :func:`matmul_to_gemm` did: rewritten node names, and the reason for each one left."""

    rewritten: list[str] = field(default_factory=list)
    biases_absorbed: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)


def _rank(view: GraphView, tensor: str, value_info: dict[str, onnx.ValueInfoProto]) -> int | None:
    """Rank of ``tensor`` when the graph states it (value info, graph input) or its producer fixes it."""
    info = value_info.get(tensor)
    if info is not None and info.type.tensor_type.HasField("shape"):
        return len(info.type.tensor_type.shape.dim)
    prod = view.producer.get(tensor)
    if prod is None:
        return None
    if prod.op_type in _RANK2_OPS:
        return 2
    if prod.op_type == "Reshape" and view.is_constant(prod.input[1]):
        return int(math.prod(view.initializers[prod.input[1]].dims))
    if prod.op_type in ("Relu", "Clip", "Sigmoid", "LeakyRelu", "Dropout", "Identity"):
        return _rank(view, prod.input[0], value_info)
    return None


def _constant_bias(view: GraphView, node: onnx.NodeProto, columns: int) -> tuple[onnx.NodeProto, str] | None:
    """The ``Add`` of a constant (N,) or (1, N) bias that alone reads ``node``'s output, if any."""
    add = view.sole_consumer(node.output[0])
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if not view.is_constant(other) or view.uses(other) != 1:
        return None
    dims = list(view.initializers[other].dims)
    if dims not in ([columns], [1, columns]):
        return None
    return add, other


def matmul_to_gemm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, CanonicalRecord]:
    """Replace ``MatMul(x, W)`` (x 2-D, W a constant (K, N) read only there) by ``Gemm(x, W)``.

    A following ``Add`` of a constant (N,) bias becomes the Gemm's C input. Edits ``model`` in
    place (the pass owns the pipeline's private copy) and returns it with the record.
    """
    record = CanonicalRecord()
    if not any(n.op_type == "MatMul" for n in model.graph.node):
        return model, record
    view = GraphView(model)
    value_info = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    dropped: set[str] = set()
    gone: set[str] = set()  # MatMul outputs that an absorbed Add replaced
    graph = model.graph
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul":
            continue
        x, w = node.input[0], node.input[1]
        if not view.is_constant(w) or view.uses(w) != 1:
            record.left[node.name] = "weight is not a constant read only by this MatMul"
            continue
        if len(view.initializers[w].dims) != 2:
            record.left[node.name] = f"weight has rank {len(view.initializers[w].dims)}, not 2"
            continue
        rank = _rank(view, x, value_info)
        if rank != 2:
            record.left[node.name] = ("input rank unknown (no value info, producer does not fix it)" if rank is None
                                      else f"input has rank {rank}, Gemm takes 2")
            continue
        inputs = [x, w]
        output = node.output[0]
        bias = _constant_bias(view, node, int(view.initializers[w].dims[1]))
        if bias is not None:
            add, bias_name = bias
            tensor = view.initializers[bias_name]
            if len(tensor.dims) == 2:  # Gemm's C broadcasts either; keep it 1-D like PyTorch's exports
                del tensor.dims[:]
                tensor.dims.append(int(view.initializers[w].dims[1]))
            inputs.append(bias_name)
            output = add.output[0]
            gone.add(node.output[0])
            dropped.add(add.name)
            record.biases_absorbed.append(add.name)
        gemm = helper.make_node("Gemm", inputs, [output], name=node.name)
        graph.node[index].CopyFrom(gemm)
        record.rewritten.append(node.name)
    if dropped:
        keep = [n for n in graph.node if n.name not in dropped]
        del graph.node[:]
        graph.node.extend(keep)
    if gone:
        infos = [v for v in graph.value_info if v.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return model, record
