"""Per-op rules of the channel dependency analysis: what each ONNX op does to channels.

Torch-Pruning's dependency graph, on ONNX: each op type maps to a handler that classifies one
node into a :class:`Role`:

========  ==========================================================================================
role      meaning for channel c of the input
========  ==========================================================================================
link      output channel c depends on input channel c only (Relu, BN, pools, depthwise Conv, ...);
          ``effect`` says how: identity, linear (spatial), affine, nonlinear, max, depthwise
couple    elementwise op over several data inputs (residual Add, gating Mul): channel c of every
          input and of the output are one channel
concat    Concat on the channel axis: input k's channel c is output channel ``offset_k + c``
flatten   Flatten / flattening Reshape of an NCHW map: channel c becomes a block of H*W columns
layer     Conv (group 1) or Gemm: reads channels as a consumer, writes new ones as a producer
shape     reads only the batch dimension of the tensor's shape
block     anything else; the reason says why the channels cannot be followed through it
========  ==========================================================================================

An op type missing from the registry, or in a domain other than the default one, is a block, so
a model with an unknown op is analysed without crashing: the units around it are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .graph import GraphView, attribute
from .load import shape_skeleton

__all__ = ["Role", "Activation", "ParamSlice", "HANDLERS", "classify", "ChannelShapes"]

# Link effects, from harmless to compensation-breaking.
IDENTITY, LINEAR, AFFINE, NONLINEAR, MAX, DEPTHWISE = "identity", "linear", "affine", "nonlinear", "max", "depthwise"


@dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity on a channel, with what the compensation can assume of it.

    Attributes
    ----------
    kind : str
        "relu", "clip", "leakyrelu", "prelu", "sigmoid", "gate" (x * f(x)), or another lower-case op name.
    low, high : float
        Clip bounds (-inf / inf when absent).
    slope : float
        Negative-side slope of LeakyRelu.
    """

    kind: str
    low: float = -np.inf
    high: float = np.inf
    slope: float = 0.0

    @property
    def homogeneous(self) -> bool:
        """f(s x) = s f(x) for s > 0: the paper's ReLU argument holds for the quantization scale."""
        return self.kind in ("relu", "leakyrelu", "prelu") or (
            self.kind == "clip" and self.low == 0 and self.high == np.inf)


@dataclass(frozen=True)
class ParamSlice:
    """A per-channel parameter input of a link node, sliced with the channels.

    Attributes
    ----------
    input_index : int
        Which input of the node holds the parameter.
    axis : int
        Its channel axis.
    """

    input_index: int
    axis: int


@dataclass(frozen=True)
class Role:
    """What a node does to channels (see the module docstring)."""

    kind: str
    reason: str = ""
    effect: str = IDENTITY
    activation: Activation | None = None
    params: tuple[ParamSlice, ...] = ()
    axis: int = 1
    produces: bool = False
    produce_reason: str = ""
    consumes: bool = False
    consume_reason: str = ""
    layer_kind: str = ""
    flatten_block: int | None = None
    data_inputs: tuple[int, ...] = (0,)
    notes: tuple[str, ...] = field(default_factory=tuple)


class ChannelShapes:
    """Static dims of the graph's tensors, from ONNX shape inference (None where unknown)."""

    def __init__(self, model: onnx.ModelProto):
        self.dims: dict[str, list[int | None]] = {}
        try:
            # On a skeleton: serialising the weights for inference cost as much as loading the model.
            inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model, value_info=True))
        except Exception:  # an unknown op or a broken shape function: fall back to what the graph states
            inferred = model
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for init in model.graph.initializer:
            self.dims[init.name] = list(init.dims)

    def rank(self, name: str) -> int | None:
        d = self.dims.get(name)
        return None if d is None else len(d)

    def dim(self, name: str, axis: int) -> int | None:
        d = self.dims.get(name)
        if d is None or not -len(d) <= axis < len(d):
            return None
        return d[axis]


@dataclass
class Context:
    view: GraphView
    shapes: ChannelShapes

    def constant(self, name: str) -> np.ndarray | None:
        if name and self.view.is_constant(name):
            return self.view.array(name)
        prod = self.view.producer.get(name)
        if prod is not None and prod.op_type == "Constant":
            for a in prod.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
        return None


Handler = Callable[[onnx.NodeProto, Context], Role]
HANDLERS: dict[str, Handler] = {}


def _register(*op_types: str):
    def deco(fn: Handler) -> Handler:
        for op in op_types:
            HANDLERS[op] = fn
        return fn
    return deco


def classify(node: onnx.NodeProto, ctx: Context) -> Role:
    """The :class:`Role` of ``node``; unknown ops and other domains are blocks, never errors."""
    if node.domain not in ("", "ai.onnx"):
        return Role("block", f"op {node.domain}::{node.op_type} ({node.name}) is not a standard ONNX op")
    handler = HANDLERS.get(node.op_type)
    if handler is None:
        return Role("block", f"op {node.op_type} ({node.name}) is not known to the channel analysis")
    try:
        return handler(node, ctx)
    except Exception as exc:  # a malformed node must not stop the analysis of the rest
        return Role("block", f"{node.op_type} {node.name} could not be analysed: {exc}")


def _block(node: onnx.NodeProto, why: str) -> Role:
    return Role("block", f"{node.op_type} {node.name}: {why}")


# ---------------------------------------------------------------------------------------------
# channel-wise links
# ---------------------------------------------------------------------------------------------
@_register("Identity", "Dropout")
def _identity(node, ctx):
    return Role("link", effect=IDENTITY)


@_register("Cast")
def _cast(node, ctx):
    to = attribute(node, "to", 0)
    if to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
        return _block(node, "casts to a non-float type")
    return Role("link", effect=IDENTITY)


@_register("AveragePool", "GlobalAveragePool", "LpPool")
def _avgpool(node, ctx):
    if node.op_type == "LpPool":
        return Role("link", effect=NONLINEAR, activation=Activation("lppool"))
    return Role("link", effect=LINEAR)


@_register("MaxPool", "GlobalMaxPool")
def _maxpool(node, ctx):
    if len([o for o in node.output if o]) > 1 and ctx.view.uses(node.output[1]):
        return _block(node, "its indices output is used")
    return Role("link", effect=MAX)


def _axes(node, ctx, input_index: int = 1) -> list[int] | None:
    axes = attribute(node, "axes", None)
    if axes is None and len(node.input) > input_index and node.input[input_index]:
        value = ctx.constant(node.input[input_index])
        if value is None:
            return None
        axes = [int(a) for a in np.ravel(value)]
    return None if axes is None else list(axes)


@_register("ReduceMean", "ReduceMax")
def _reduce(node, ctx):
    axes = _axes(node, ctx)
    rank = ctx.shapes.rank(node.input[0])
    if axes is None or rank is None:
        return _block(node, "reduction axes or input rank unknown")
    axes = [a % rank for a in axes]
    if 0 in axes or 1 in axes or not attribute(node, "keepdims", 1):
        return _block(node, "reduces over the batch or channel axis, or drops axes")
    return Role("link", effect=LINEAR if node.op_type == "ReduceMean" else MAX)


@_register("Squeeze", "Unsqueeze")
def _squeeze(node, ctx):
    axes = _axes(node, ctx)
    rank = ctx.shapes.rank(node.input[0])
    if axes is None or rank is None:
        return _block(node, "axes or input rank unknown")
    out_rank = rank - len(axes) if node.op_type == "Squeeze" else rank + len(axes)
    norm = [a % (rank if node.op_type == "Squeeze" else out_rank) for a in axes]
    if any(a <= 1 for a in norm):
        return _block(node, "changes the batch or channel axis")
    return Role("link", effect=IDENTITY)


@_register("Pad")
def _pad(node, ctx):
    pads = attribute(node, "pads", None)
    if pads is None and len(node.input) > 1:
        value = ctx.constant(node.input[1])
        pads = None if value is None else [int(p) for p in np.ravel(value)]
    rank = ctx.shapes.rank(node.input[0])
    if pads is None or rank is None:
        return _block(node, "pads not constant or input rank unknown")
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:  # opset 18 axes input
        value = ctx.constant(node.input[3])
        if value is None:
            return _block(node, "pad axes not constant")
        axes = [int(a) % rank for a in np.ravel(value)]
    half = len(pads) // 2
    for i, axis in enumerate(axes[:half]):
        if axis in (0, 1) and (pads[i] or pads[i + half]):
            return _block(node, "pads the batch or channel axis (e.g. an option-A shortcut)")
    mode = attribute(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant" and len(node.input) > 2 and node.input[2]:
        value = ctx.constant(node.input[2])
        if value is None or np.any(value != 0):
            return _block(node, "pads with a nonzero constant")
    return Role("link", effect=LINEAR)


@_register("Resize", "Upsample")
def _resize(node, ctx):
    # scales (input 2 for Resize >= 11, input 1 for Upsample) must keep batch and channels
    index = 1 if node.op_type == "Upsample" else 2
    if len(node.input) > index and node.input[index]:
        scales = ctx.constant(node.input[index])
        if scales is not None and scales.size:
            if scales.size < 2 or scales.ravel()[0] != 1 or scales.ravel()[1] != 1:
                return _block(node, "scales the batch or channel axis")
            return Role("link", effect=LINEAR)
    if len(node.input) > 3 and node.input[3]:
        return _block(node, "its sizes input hard-codes the channel count")
    return _block(node, "scales not constant")


_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Elu": "elu", "Selu": "selu",
                "Softplus": "softplus", "HardSigmoid": "hardsigmoid", "HardSwish": "hardswish",
                "Gelu": "gelu", "Mish": "mish", "Softsign": "softsign", "ThresholdedRelu": "thresholdedrelu",
                "Celu": "celu", "Abs": "abs", "Neg": "neg", "Exp": "exp", "Sqrt": "sqrt", "Erf": "erf",
                "Reciprocal": "reciprocal", "Log": "log", "Floor": "floor", "Ceil": "ceil", "Round": "round",
                "Sign": "sign"}


@_register(*_ACTIVATIONS)
def _activation(node, ctx):
    kind = _ACTIVATIONS[node.op_type]
    if kind == "neg":  # a sign flip is affine
        return Role("link", effect=AFFINE)
    return Role("link", effect=NONLINEAR, activation=Activation(kind))


@_register("LeakyRelu")
def _leaky(node, ctx):
    slope = float(attribute(node, "alpha", 0.01))
    return Role("link", effect=NONLINEAR, activation=Activation("leakyrelu", slope=slope))


@_register("Clip")
def _clip(node, ctx):
    low, high = attribute(node, "min", None), attribute(node, "max", None)
    for i, name in ((1, "min"), (2, "max")):
        if len(node.input) > i and node.input[i]:
            value = ctx.constant(node.input[i])
            if value is None or value.size != 1:
                return _block(node, f"{name} bound is not a constant scalar")
            if i == 1:
                low = float(value.ravel()[0])
            else:
                high = float(value.ravel()[0])
    low = -np.inf if low is None else float(low)
    high = np.inf if high is None else float(high)
    kind = "relu" if low == 0 and high == np.inf else "clip"
    return Role("link", effect=NONLINEAR, activation=Activation(kind, low, high))


def _per_channel_axis(const_shape: tuple[int, ...], data_rank: int) -> int | None | str:
    """Axis of ``const_shape`` that lines up with the data's channel axis after broadcasting.

    Returns None when the constant is the same for every channel, "bad" when it broadcasts
    along the batch axis or otherwise cannot be a per-channel parameter.
    """
    if len(const_shape) > data_rank:
        return "bad"
    padded = (1,) * (data_rank - len(const_shape)) + tuple(const_shape)
    if padded[0] != 1:
        return "bad"
    if data_rank < 2 or padded[1] == 1:
        return None
    return 1 - (data_rank - len(const_shape))


@_register("BatchNormalization")
def _bn(node, ctx):
    if len(node.input) < 5 or attribute(node, "training_mode", 0) or len([o for o in node.output if o]) != 1:
        return _block(node, "BatchNormalization not in inference form")
    for name in node.input[1:5]:
        if ctx.constant(name) is None or ctx.view.uses(name) != 1:
            return _block(node, "BN parameters are not constants used only here")
    return Role("link", effect=AFFINE, params=tuple(ParamSlice(i, 0) for i in range(1, 5)))


@_register("InstanceNormalization")
def _instancenorm(node, ctx):
    for name in node.input[1:3]:
        if ctx.constant(name) is None or ctx.view.uses(name) != 1:
            return _block(node, "parameters are not constants used only here")
    return Role("link", effect=NONLINEAR, activation=Activation("instancenorm"),
                params=(ParamSlice(1, 0), ParamSlice(2, 0)))


@_register("PRelu")
def _prelu(node, ctx):
    slope = ctx.constant(node.input[1])
    rank = ctx.shapes.rank(node.input[0])
    if slope is None or rank is None:
        return _block(node, "slope not constant or input rank unknown")
    axis = _per_channel_axis(slope.shape, rank)
    if axis == "bad":
        return _block(node, f"slope shape {slope.shape} is not per channel")
    if axis is not None and ctx.view.uses(node.input[1]) != 1:
        return _block(node, "per-channel slope is shared with another node")
    if axis is None and slope.size == 1:  # one slope for every channel: a LeakyRelu
        return Role("link", effect=NONLINEAR, activation=Activation("leakyrelu", slope=float(slope.ravel()[0])))
    params = () if axis is None else (ParamSlice(1, axis),)
    return Role("link", effect=NONLINEAR, activation=Activation("prelu"), params=params)


@_register("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow")
def _elementwise(node, ctx):
    data = [i for i, name in enumerate(node.input) if name and ctx.constant(name) is None]
    consts = [i for i, name in enumerate(node.input) if name and ctx.constant(name) is not None]
    if len(data) >= 2:
        rank = ctx.shapes.rank(node.output[0])
        if rank is not None and rank >= 2:
            for i in data:
                c_in, c_out = ctx.shapes.dim(node.input[i], 1), ctx.shapes.dim(node.output[0], 1)
                if ctx.shapes.rank(node.input[i]) != rank or (c_in is not None and c_out is not None and c_in != c_out):
                    return _block(node, "inputs broadcast over the channel axis")
        elif rank is None:
            return _block(node, "input ranks unknown")
        return Role("couple", data_inputs=tuple(data))
    if len(data) != 1 or len(consts) != 1 or node.op_type in ("Sum", "Mean"):
        return _block(node, "not a channel-wise op of one tensor and one constant")
    rank = ctx.shapes.rank(node.input[data[0]])
    if rank is None:
        return _block(node, "input rank unknown")
    const = ctx.constant(node.input[consts[0]])
    axis = _per_channel_axis(const.shape, rank)
    if axis == "bad":
        return _block(node, f"constant of shape {const.shape} is not per channel")
    if axis is not None and not ctx.view.is_constant(node.input[consts[0]]):
        return _block(node, "per-channel constant is a Constant node, not an initializer")
    if axis is not None and ctx.view.uses(node.input[consts[0]]) != 1:
        return _block(node, "per-channel constant is shared with another node")
    params = () if axis is None else (ParamSlice(consts[0], axis),)
    op = node.op_type
    if op in ("Add", "Sub", "Mul") or (op == "Div" and consts[0] == 1):
        return Role("link", effect=AFFINE, params=params, data_inputs=tuple(data))
    return Role("link", effect=NONLINEAR, activation=Activation(op.lower()), params=params, data_inputs=tuple(data))


# ---------------------------------------------------------------------------------------------
# layers, concat, flatten
# ---------------------------------------------------------------------------------------------
def _constant_single_use(ctx: Context, name: str) -> bool:
    return ctx.view.is_constant(name) and ctx.view.uses(name) == 1


@_register("Conv")
def _conv(node, ctx):
    group = int(attribute(node, "group", 1))
    if len(node.input) < 2 or not ctx.view.is_constant(node.input[1]):  # (not its values: a copy of every weight)
        return _block(node, "weight is not a constant")
    weight = ctx.view.initializers.get(node.input[1])
    if weight is None or len(weight.dims) < 3:
        return _block(node, "weight is not an initializer of rank >= 3")
    out_channels, per_group = weight.dims[0], weight.dims[1]
    owned = _constant_single_use(ctx, node.input[1])
    has_bias = len(node.input) > 2 and node.input[2]
    bias_ok = not has_bias or _constant_single_use(ctx, node.input[2])
    if group > 1:
        in_channels = per_group * group
        if per_group == 1 and out_channels == in_channels == group:
            if not owned or not bias_ok:
                return _block(node, "depthwise weight or bias is not a constant used only here")
            params = (ParamSlice(1, 0),) + ((ParamSlice(2, 0),) if has_bias else ())
            return Role("link", effect=DEPTHWISE, params=params)
        return _block(node, f"grouped conv (group={group}, {per_group} inputs per group): pruning would break its "
                            "group partition")
    reason = "" if owned and bias_ok else "weight or bias is not a constant used only by this Conv"
    return Role("layer", layer_kind="conv", produces=not reason, produce_reason=reason,
                consumes=not reason, consume_reason=reason)


@_register("ConvTranspose")
def _convtranspose(node, ctx):
    return _block(node, "ConvTranspose is not supported")


@_register("Gemm")
def _gemm(node, ctx):
    if len(node.input) < 2 or not ctx.view.is_constant(node.input[1]):
        return _block(node, "weight is not a constant")
    reason = ""
    if attribute(node, "transA", 0):
        reason = "Gemm has transA=1"
    elif attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
        reason = "Gemm has alpha or beta != 1"
    elif ctx.view.uses(node.input[1]) != 1:
        reason = "weight is shared with another node"
    elif len(ctx.view.initializers[node.input[1]].dims) != 2:
        reason = "weight is not a matrix"
    elif len(node.input) > 2 and node.input[2]:
        bias = ctx.view.initializers.get(node.input[2])
        if bias is None or ctx.view.uses(node.input[2]) != 1 or len(bias.dims) != 1:
            reason = "bias is not a per-output constant used only here"
    return Role("layer", layer_kind="gemm", produces=not reason, produce_reason=reason,
                consumes=not reason, consume_reason=reason)


@_register("MatMul")
def _matmul(node, ctx):
    return _block(node, "MatMul layers are not pruned (only Conv and Gemm)")


@_register("Concat")
def _concat(node, ctx):
    axis = int(attribute(node, "axis", 0))
    rank = ctx.shapes.rank(node.output[0])
    if rank is None:
        return _block(node, "output rank unknown")
    if axis % rank != 1:
        return _block(node, f"concatenates on axis {axis}, not the channel axis")
    return Role("concat", axis=1, data_inputs=tuple(range(len(node.input))))


def _spatial_block(ctx: Context, name: str) -> int | None:
    dims = ctx.shapes.dims.get(name)
    if dims is None or len(dims) < 2:
        return None
    rest = dims[2:]
    if any(d is None for d in rest):
        return None
    return int(np.prod(rest)) if rest else 1


@_register("Flatten")
def _flatten(node, ctx):
    rank = ctx.shapes.rank(node.input[0])
    if int(attribute(node, "axis", 1)) % max(rank or 2, 1) != 1 and int(attribute(node, "axis", 1)) != 1:
        return _block(node, "Flatten axis is not 1")
    if rank == 2:
        return Role("link", effect=IDENTITY)
    return Role("flatten", flatten_block=_spatial_block(ctx, node.input[0]))


def _is_batch_dim(ctx: Context, name: str) -> bool:
    """True when ``name`` is computed as dim 0 of some tensor's shape (Shape -> Gather(0) [-> Unsqueeze])."""
    node = ctx.view.producer.get(name)
    if node is not None and node.op_type == "Unsqueeze":
        node = ctx.view.producer.get(node.input[0])
    if node is None or node.op_type != "Gather":
        return False
    index = ctx.constant(node.input[1])
    shape = ctx.view.producer.get(node.input[0])
    return index is not None and index.size == 1 and int(index.ravel()[0]) == 0 and shape is not None \
        and shape.op_type == "Shape"


@_register("Reshape")
def _reshape(node, ctx):
    rank = ctx.shapes.rank(node.input[0])
    shape = ctx.constant(node.input[1])
    if shape is None:
        # the export pattern Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]): keep the batch, flatten the rest
        cat = ctx.view.producer.get(node.input[1])
        if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
            return _block(node, "target shape is computed and not recognised as (batch, -1)")
        tail = ctx.constant(cat.input[1])
        if tail is None or tail.size != 1 or int(tail.ravel()[0]) != -1 or not _is_batch_dim(ctx, cat.input[0]):
            return _block(node, "target shape is computed and not recognised as (batch, -1)")
        shape = np.array([0, -1])
    shape = [int(s) for s in np.ravel(shape)]
    if len(shape) != 2 or rank is None:
        return _block(node, f"reshapes to {shape}, not (batch, features)")
    if shape[0] not in (0, -1) and shape[0] != ctx.shapes.dim(node.input[0], 0):
        return _block(node, f"reshapes to {shape}: first dim is not the batch")
    if shape[1] != -1 and (shape[0] == -1 or not ctx.view.is_constant(node.input[1])):
        return _block(node, f"reshapes to {shape}: feature count hard-coded")
    if rank == 2:
        return Role("link", effect=IDENTITY)
    notes = () if shape[1] == -1 else ("target shape hard-codes the feature count",)
    return Role("flatten", flatten_block=_spatial_block(ctx, node.input[0]), notes=notes)


@_register("Shape")
def _shape(node, ctx):
    start, end = attribute(node, "start", 0), attribute(node, "end", None)
    if start == 0 and end is not None and 0 < end <= 1:
        return Role("shape")
    for user in ctx.view.consumers.get(node.output[0], []):
        index = ctx.constant(user.input[1]) if user.op_type == "Gather" and len(user.input) > 1 else None
        if index is None or index.size != 1 or int(index.ravel()[0]) != 0 or attribute(user, "axis", 0) != 0:
            return _block(node, f"the tensor's shape feeds {user.op_type} {user.name}, which may use the channel count")
    return Role("shape")
