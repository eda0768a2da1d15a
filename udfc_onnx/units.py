"""Find prunable units in a BN-folded graph, and the reason for every layer left alone.

A unit is a producer Conv whose output channels can be removed, the per-channel ops its output
passes through, and the consumer(s) whose input-channel slices absorb the compensation:

    Conv(producer) -> [Relu | MaxPool | AveragePool | GlobalAveragePool | ...] -> Conv(consumer)
    Conv(producer) -> [...] -> Flatten -> Gemm(consumer)        (column block per channel)

Each search step returns a reason when it does not apply (the onnxscript rewrite-rule habit),
so ``inspect`` can say why a layer is not pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import GraphView, attribute

__all__ = ["ConsumerSlice", "PruneUnit", "Skip", "find_units", "PER_CHANNEL_OPS"]

# Ops that map channel c of their input to channel c of their output and nothing else.
# The value says whether compensation passes through them exactly (linear in the channel).
PER_CHANNEL_OPS: dict[str, bool] = {
    "Relu": False,
    "MaxPool": False,
    "AveragePool": True,
    "GlobalAveragePool": True,
    "GlobalMaxPool": False,
    "Identity": True,
    "Dropout": True,
}
ACTIVATIONS = {"Relu": "relu"}


@dataclass(frozen=True)
class ConsumerSlice:
    """Where a unit's channels enter a consumer.

    Attributes
    ----------
    node : str
        Consumer Conv or Gemm.
    kind : {"conv", "gemm"}
    block : int
        Inputs per channel on the consumer's reduction axis beyond the channel itself:
        1 for a conv (its kernel taps are kept separately), H*W for a Gemm after Flatten.
    offset : int
        First input channel of the unit in the consumer (non-zero after a Concat).
    """

    node: str
    kind: str
    block: int = 1
    offset: int = 0


@dataclass(frozen=True)
class PruneUnit:
    """A producer whose output channels may be pruned and compensated downstream.

    Attributes
    ----------
    producer : str
        Conv node whose output channels are pruned.
    channels : int
        Its output channel count.
    path : tuple of str
        Nodes between producer and consumers (per-channel ops and Flatten).
    consumers : tuple of ConsumerSlice
    activation : str
        "relu" or "none": the nonlinearity between producer and consumer.
    linear_path : bool
        True when every op on the path is linear per channel, so compensation is exact in
        the linear regime (MaxPool and ReLU make it approximate).
    """

    producer: str
    channels: int
    path: tuple[str, ...]
    consumers: tuple[ConsumerSlice, ...]
    activation: str
    linear_path: bool


@dataclass(frozen=True)
class Skip:
    """A layer left alone and why."""

    node: str
    reason: str


def _conv_group(node: onnx.NodeProto) -> int:
    return int(attribute(node, "group", 1))


def _follow(view: GraphView, producer: onnx.NodeProto, channels: int) -> PruneUnit | Skip:
    tensor = producer.output[0]
    path: list[str] = []
    activation = "none"
    linear = True
    flattened = False
    while True:
        if tensor in view.graph_outputs:
            return Skip(producer.name, "output channels reach a graph output")
        users = view.consumers.get(tensor, [])
        if not users:
            return Skip(producer.name, "output is not used")
        if len(users) > 1:
            ops = ", ".join(sorted({u.op_type for u in users}))
            return Skip(producer.name, f"output feeds {len(users)} nodes ({ops}): channels are coupled (residual or branch)")
        node = users[0]
        op = node.op_type
        if op in PER_CHANNEL_OPS and not flattened:
            if op in ACTIVATIONS:
                if activation != "none":
                    return Skip(producer.name, f"two activations between producer and consumer ({node.name})")
                activation = ACTIVATIONS[op]
            linear = linear and PER_CHANNEL_OPS[op]
            path.append(node.name)
            tensor = node.output[0]
            continue
        if op == "Flatten" and not flattened:
            if int(attribute(node, "axis", 1)) != 1:
                return Skip(producer.name, f"Flatten {node.name} has axis != 1")
            flattened = True
            path.append(node.name)
            tensor = node.output[0]
            continue
        if op == "Conv" and not flattened:
            if node.input[0] != tensor:
                return Skip(producer.name, f"reaches {node.name} as a weight, not as data")
            if _conv_group(node) != 1:
                return Skip(producer.name, f"consumer {node.name} is grouped/depthwise: no cross-channel mixing to absorb compensation")
            if not view.is_constant(node.input[1]) or view.uses(node.input[1]) != 1:
                return Skip(producer.name, f"consumer {node.name} weight is not a constant used only there")
            return PruneUnit(producer.name, channels, tuple(path), (ConsumerSlice(node.name, "conv"),), activation, linear)
        if op == "Gemm" and flattened:
            if node.input[0] != tensor or attribute(node, "transA", 0):
                return Skip(producer.name, f"Gemm {node.name} reads the flattened map transposed or as a weight")
            if not view.is_constant(node.input[1]) or view.uses(node.input[1]) != 1:
                return Skip(producer.name, f"consumer {node.name} weight is not a constant used only there")
            weight = view.initializers[node.input[1]]
            k = weight.dims[1] if attribute(node, "transB", 0) else weight.dims[0]
            if k % channels:
                return Skip(producer.name, f"Gemm {node.name} has {k} inputs, not a multiple of {channels} channels")
            return PruneUnit(producer.name, channels, tuple(path), (ConsumerSlice(node.name, "gemm", k // channels),), activation, linear)
        return Skip(producer.name, f"path to a consumer goes through unsupported op {op} ({node.name})")


def find_units(model: onnx.ModelProto) -> tuple[list[PruneUnit], list[Skip]]:
    """Prunable units of a BN-folded model, in topological order, and the skipped Convs.

    Parameters
    ----------
    model : onnx.ModelProto
        Output of :func:`udfc_onnx.fold.fold_batchnorm` (a BN left unfolded blocks its unit).

    Returns
    -------
    units : list of PruneUnit
    skipped : list of Skip
        One entry for every Conv that is not the producer of a unit.
    """
    view = GraphView(model)
    units: list[PruneUnit] = []
    skipped: list[Skip] = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        if not view.is_constant(node.input[1]) or view.uses(node.input[1]) != 1:
            skipped.append(Skip(node.name, "weight is not a constant used only by this Conv"))
            continue
        if _conv_group(node) != 1:
            skipped.append(Skip(node.name, "grouped/depthwise producer: its channels are tied to its input channels"))
            continue
        channels = view.initializers[node.input[1]].dims[0]
        found = _follow(view, node, channels)
        (units if isinstance(found, PruneUnit) else skipped).append(found)
    return units, skipped
