"""ZeroQ-style distilled inputs: synthetic images whose BN pre-activations match the BN statistics [EXT].

ZeroQ (Cai et al., CVPR 2020) optimises a batch of input images, started from standard normal
noise, with Adam so that at every BatchNorm the batch mean and standard deviation of the
pre-BN activations ``z`` equal the BN's running mean ``mu`` and ``sigma = sqrt(var + eps)``::

    loss = sum over BN layers of ||mean_NHW(z) - mu||_2 + ||std_NHW(z) - sigma||_2

Here the BN is folded (udfc_onnx.fold): the folded layer outputs ``y = a z + b`` with
``a = gamma / sigma``, so ``mean(z) - mu = (mean(y) - beta) / a`` and ``std(z) = std(y) / |a|``;
the loss is computed from ``y`` in the raw units of ZeroQ. Channels with ``|a|`` below
:data:`DEAD_MULTIPLIER` of their layer's largest are left out (``y`` is nearly constant there, ``z`` is
not recoverable from it).

The gradient with respect to the input comes from one ONNX graph that ONNX Runtime runs: the
folded graph up to the last BN layer, the loss, and a hand-built reverse pass per op (a Conv's
input gradient is a ConvTranspose with the same weights, a Relu's a Where on its output, a
MaxPool whose windows tile its input sends each window's gradient to the window's maximum, such an
AveragePool spreads it evenly...).
ORT runs a 16-channel 3x3 conv on 256 CIFAR images in 20 ms and the ConvTranspose in 26 ms on two
cores, an im2col conv in NumPy 115 ms: the graph is the faster of the two routes. Ops outside
:data:`DIFFERENTIABLE` on the path from the input to a BN layer raise
:class:`UnsupportedGraphError`; the caller then keeps Gaussian noise.

The graph is built for a fixed batch (every shape static): images are distilled in chunks of
that many, each chunk with its own Adam state, like ZeroQ's independent batches.

DeepInversion (Yin et al., CVPR 2020) terms can join the loss (:class:`Priors`): the cross-entropy
of the logits toward balanced random target classes (in the graph: the reverse pass then runs
through the head after the last BN, GlobalAveragePool-Flatten-Gemm), and total-variation and L2
priors of the images (NumPy, on the images themselves). To save cost, only ``images`` of the
samples can be distilled and the rest made from them by CIFAR's training augmentation
(:func:`augment_images`: horizontal flips, shifts by up to 4 pixels with zero fill): 32 images
and 20 steps take about 5 s on resnet56_nm and fit as well as 256 images and 50 steps (130 s).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphView, attribute
from .stats import BNStats

__all__ = ["DIFFERENTIABLE", "FILLS", "DistillResult", "Priors", "UnsupportedGraphError", "augment_images",
           "balanced_targets", "distill_inputs", "distillation_model", "l2_prior", "noise_inputs", "tv_prior"]

# Ops with a reverse rule below; any other op between the input and a BN layer is unsupported.
DIFFERENTIABLE = ("Conv", "Gemm", "Relu", "LeakyRelu", "Add", "Sub", "Mul", "Identity", "Reshape", "Flatten", "Slice",
                  "Pad", "GlobalAveragePool", "Concat", "MaxPool", "AveragePool")
# Ops whose output is the input's shape or size, not its values: no gradient flows through them.
SHAPE_ONLY = ("Shape", "Size")
# A channel whose folded multiplier |a| is under this fraction of its layer's largest stays out of
# the loss: its output y = a z + b hardly depends on z, so z = (y - b) / a is noise.
DEAD_MULTIPLIER = 1e-4
STD_EPS = 1e-12  # under the square root of the batch variance of y (a constant channel has no gradient)
NORM_EPS = 1e-12  # under the square root of each L2 norm (its gradient is u / ||u||)
LOSS = "distill_loss"  # the BN-statistic loss alone
TOTAL = "distill_total"  # BN-statistic loss + ce_weight x cross-entropy of the logits: what GRAD differentiates
GRAD = "distill_grad"
TARGETS = "distill_targets"  # one-hot target classes (batch, classes), an input of a graph with ce_weight > 0


class UnsupportedGraphError(ValueError):
    """The graph has an op (or a shape) the reverse pass does not cover."""


@dataclass(frozen=True)
class DistillResult:
    """Distilled inputs and how the optimisation went.

    Attributes
    ----------
    inputs : dict of str to ndarray
        The graph input's name to images (samples, ...), float32.
    loss_start, loss_end : float
        BN-statistic loss of the first chunk before the first and after the last Adam step
        (per chunk, summed over BN layers).
    iterations : int
    chunks : int
    notes : tuple of str
        What was left out (a cross-entropy the head does not allow).
    """

    inputs: dict[str, np.ndarray]
    loss_start: float
    loss_end: float
    iterations: int
    chunks: int
    notes: tuple[str, ...] = ()


def noise_inputs(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Standard normal noise (samples, ...) for every graph input that is not an initializer.

    Symbolic non-batch dimensions become 1 (the shapes of udfc_onnx.synthetic's noise).
    """
    init = {t.name for t in model.graph.initializer}
    feed = {}
    rng = np.random.default_rng(seed)
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
        dims[0] = samples
        feed[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


# ------------------------------------------------------------------------------------- graph pieces

class _Builder:
    """Accumulates the nodes and constants of the loss and reverse pass, with unique names."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"distill_{self.count}_{hint}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """ReduceMean/ReduceSum/ReduceSumSquare over ``axes``: attribute or input by opset."""
        takes_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if takes_input:
            return self.op(op_type, [x, self.const(axes, "axes", np.int64)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", [x, self.const(list(shape), "shape", np.int64)])

    def pad(self, x: str, begin: list[int], end: list[int]) -> str:
        if not any(begin) and not any(end):
            return x
        return self.op("Pad", [x, self.const(list(begin) + list(end), "pads", np.int64)], mode="constant")

    def slice(self, x: str, starts, ends, axes) -> str:
        return self.op("Slice", [x, self.const(starts, "starts", np.int64), self.const(ends, "ends", np.int64),
                                 self.const(axes, "axes", np.int64)])


def _unbroadcast(b: _Builder, grad: str, in_shape: list[int], out_shape: list[int]) -> str:
    """Sum ``grad`` (out_shape) over the axes an input of ``in_shape`` was broadcast along."""
    if list(in_shape) == list(out_shape):
        return grad
    lead = len(out_shape) - len(in_shape)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(in_shape) if d == 1 and out_shape[lead + i] != 1]
    if axes:
        grad = b.reduce("ReduceSum", grad, axes, keepdims=1)
    return b.reshape(grad, in_shape)


def _bn_seed(b: _Builder, y: str, shape: list[int], st: BNStats) -> tuple[str, str]:
    """ZeroQ loss of one folded BN layer's output ``y`` (shape (N, C, ...)) and its gradient seed dL/dy.

    Returns (loss, seed): a scalar tensor and a tensor shaped like ``y``. With m, s the batch mean
    and deviation of y per channel, u = (m - beta) / a, v = s / |a| - sigma, L = ||u|| + ||v||:
    dL/dy = (u / (a ||u||) + v / (|a| ||v||) (y - m) / s) / M, M = y.size / C.
    """
    a = st.a
    live = np.abs(a) > DEAD_MULTIPLIER * np.abs(a).max() if np.abs(a).max() > 0 else np.zeros_like(a, bool)
    inv_a = np.where(live, 1.0 / np.where(live, a, 1.0), 0.0)
    per_channel = [1, len(a)] + [1] * (len(shape) - 2)
    axes = [0] + list(range(2, len(shape)))
    rows = float(np.prod(shape) / shape[1])
    c = lambda v, hint: b.const(np.asarray(v, np.float64).reshape(per_channel), hint)  # noqa: E731
    mean = b.reduce("ReduceMean", y, axes)
    centred = b.op("Sub", [y, mean])
    var = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(STD_EPS)])])
    u = b.op("Mul", [b.op("Sub", [mean, c(st.beta, "beta")]), c(inv_a, "inv_a")], "u")
    v = b.op("Sub", [b.op("Mul", [std, c(np.abs(inv_a), "inv_abs_a")]), c(np.where(live, st.sigma, 0.0), "sigma")], "v")
    norm_u = b.op("Sqrt", [b.op("Add", [b.reduce("ReduceSumSquare", u, list(range(len(shape))), keepdims=0),
                                        b.const(NORM_EPS)])])
    norm_v = b.op("Sqrt", [b.op("Add", [b.reduce("ReduceSumSquare", v, list(range(len(shape))), keepdims=0),
                                        b.const(NORM_EPS)])])
    loss = b.op("Add", [norm_u, norm_v], "layer_loss")
    d_mean = b.op("Div", [b.op("Mul", [u, c(inv_a / rows, "inv_a_rows")]), norm_u])
    d_std = b.op("Div", [b.op("Mul", [v, c(np.abs(inv_a) / rows, "inv_abs_a_rows")]), norm_v])
    seed = b.op("Add", [d_mean, b.op("Mul", [centred, b.op("Div", [d_std, std])])], "seed")
    return loss, seed


def _ce_seed(b: _Builder, logits: str, shape: list[int], weight: float) -> tuple[str, str]:
    """``weight`` x mean cross-entropy of ``logits`` (batch, classes) toward :data:`TARGETS`, and its seed.

    Returns (loss, seed): a scalar and dL/dlogits = weight (softmax(logits) - targets) / batch.
    """
    log_p = b.op("LogSoftmax", [logits], axis=1)
    picked = b.reduce("ReduceSum", b.op("Mul", [log_p, TARGETS]), [0, 1], keepdims=0)
    loss = b.op("Mul", [picked, b.const(-weight / shape[0])], "ce_loss")
    seed = b.op("Mul", [b.op("Sub", [b.op("Softmax", [logits], axis=1), TARGETS]), b.const(weight / shape[0])], "ce_seed")
    return loss, seed


def _logits_tensor(folded: onnx.ModelProto, view: GraphView) -> str:
    """The model's first output, or the input of a final Softmax/LogSoftmax (the logits themselves)."""
    out = folded.graph.output[0].name
    node = view.producer.get(out)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        out = node.input[0]
    return out


# ------------------------------------------------------------------------------------- reverse rules

def _conv_grad(b, node, view, shapes, gy):
    """dX of Conv(X, W[, B]): ConvTranspose of dY with the same weights and geometry."""
    if attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedGraphError(f"Conv {node.name!r} with auto_pad")
    if not view.is_constant(node.input[1]):
        raise UnsupportedGraphError(f"Conv {node.name!r} with non-constant weights")
    w_shape = list(view.initializers[node.input[1]].dims)
    x_shape, y_shape = shapes[node.input[0]], shapes[node.output[0]]
    spatial = len(w_shape) - 2
    kernel = attribute(node, "kernel_shape", w_shape[2:])
    strides = attribute(node, "strides", [1] * spatial)
    dilations = attribute(node, "dilations", [1] * spatial)
    pads = attribute(node, "pads", [0] * 2 * spatial)
    out_pad = []
    for i in range(spatial):  # rows of X the forward conv never reached (a stride that does not divide)
        reach = (y_shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[spatial + i]
        extra = x_shape[2 + i] - reach
        if not 0 <= extra < max(strides[i], dilations[i]):
            raise UnsupportedGraphError(f"Conv {node.name!r}: no ConvTranspose gives its input shape")
        out_pad.append(extra)
    gx = b.op("ConvTranspose", [gy, node.input[1]], "conv_grad", kernel_shape=list(kernel), strides=list(strides),
              dilations=list(dilations), pads=list(pads), group=attribute(node, "group", 1), output_padding=out_pad)
    return {0: gx}


def _gemm_grad(b, node, view, shapes, gy):
    """dA of Gemm(A, B[, C]) = alpha A' B' + beta C with constant B, no transA: alpha dY B'^T (batch, K)."""
    if attribute(node, "transA", 0):
        raise UnsupportedGraphError(f"Gemm {node.name!r} with transA")
    if not view.is_constant(node.input[1]):
        raise UnsupportedGraphError(f"Gemm {node.name!r} with non-constant weights")
    # B'^T is B itself when transB (B is (N, K)), else B's transpose
    weight = node.input[1] if attribute(node, "transB", 0) else b.op("Transpose", [node.input[1]], perm=[1, 0])
    ga = b.op("MatMul", [gy, weight], "gemm_grad")
    alpha = attribute(node, "alpha", 1.0)
    return {0: ga if alpha == 1.0 else b.op("Mul", [ga, b.const(alpha)])}


def _slice_grad(b, node, view, shapes, gy, constants):
    """dX of Slice with constant starts/ends/axes/steps > 0: dY spread back with zeros, axis by axis."""
    if len(node.input) < 3:
        raise UnsupportedGraphError(f"Slice {node.name!r} of opset < 10")
    params = [constants.get(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(1, 5)]
    starts, ends, axes, steps = params
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) or (
            len(node.input) > 4 and node.input[4] and steps is None):
        raise UnsupportedGraphError(f"Slice {node.name!r} with computed parameters")
    x_shape = list(shapes[node.input[0]])
    rank = len(x_shape)
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    grad, shape = gy, list(shapes[node.output[0]])
    for axis, start, step in zip(axes, starts, steps):
        length = x_shape[axis]
        if step <= 0:
            raise UnsupportedGraphError(f"Slice {node.name!r} with step {step}")
        start = min(max(int(start) + length if start < 0 else int(start), 0), length)
        count = shape[axis]  # rows kept (the end only bounds them)
        if step > 1:  # interleave step-1 zeros after every kept row: (.., n, ..) -> (.., n * step, ..)
            grad = b.reshape(grad, shape[:axis + 1] + [1] + shape[axis + 1:])
            grad = b.pad(grad, [0] * (rank + 1), [0] * (axis + 1) + [step - 1] + [0] * (rank - axis - 1))
            grad = b.reshape(grad, shape[:axis] + [count * step] + shape[axis + 1:])
        span = min(count * step, length - start)
        if span < count * step:
            grad = b.slice(grad, [0], [span], [axis])
        grad = b.pad(grad, [0] * axis + [start] + [0] * (rank - axis - 1),
                     [0] * axis + [length - start - span] + [0] * (rank - axis - 1))
        shape[axis] = length
    return {0: grad}


def _pad_grad(b, node, view, shapes, gy, constants):
    """dX of a constant-mode Pad with non-negative amounts: the unpadded window of dY."""
    mode = attribute(node, "mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise UnsupportedGraphError(f"Pad {node.name!r} in mode {mode!r}")
    pads = attribute(node, "pads") if len(node.input) < 2 else constants.get(node.input[1])
    if pads is None or (len(node.input) > 3 and node.input[3]):
        raise UnsupportedGraphError(f"Pad {node.name!r} with computed amounts or axes")
    x_shape = shapes[node.input[0]]
    rank = len(x_shape)
    begin = [int(p) for p in pads[:rank]]
    if min(int(p) for p in pads) < 0:
        raise UnsupportedGraphError(f"Pad {node.name!r} with negative amounts")
    return {0: b.slice(gy, begin, [p + d for p, d in zip(begin, x_shape)], list(range(rank)))}


def _pool_grad(b, node, shapes, gy):
    """dX of a MaxPool or AveragePool whose windows tile its input (kernel = strides, no padding or dilation).

    MaxPool: dY goes back to the positions that hold their window's maximum (a tie gives each the
    whole gradient: the subgradient is not unique there, and ties do not happen on continuous
    images). AveragePool: dY / window size to every position of the window (a CIFAR ResNet's
    8x8 head). Overlapping windows (a 3x3 / 2 ImageNet stem) would need a scatter-add: unsupported.
    """
    kernel = [int(k) for k in attribute(node, "kernel_shape")]
    rank = len(kernel)
    strides = [int(s) for s in attribute(node, "strides", [1] * rank)]
    if (strides != kernel or any(attribute(node, "pads", [0] * 2 * rank))
            or any(d != 1 for d in attribute(node, "dilations", [1] * rank))
            or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or (len(node.output) > 1 and node.output[1])):
        raise UnsupportedGraphError(f"{node.op_type} {node.name!r} whose windows overlap, pad or give indices")
    x_shape, y_shape = shapes[node.input[0]], shapes[node.output[0]]
    if any(x_shape[2 + i] != y_shape[2 + i] * k for i, k in enumerate(kernel)):
        raise UnsupportedGraphError(f"{node.op_type} {node.name!r} that leaves input rows out")

    def spread(t: str) -> str:  # (N, C, h, w) -> (N, C, h k, w k), each value repeated over its window
        split, tiled = list(y_shape[:2]), list(y_shape[:2])
        for i, k in enumerate(kernel):
            split += [y_shape[2 + i], 1]
            tiled += [y_shape[2 + i], k]
        t = b.op("Expand", [b.reshape(t, split), b.const(tiled, "shape", np.int64)])
        return b.reshape(t, x_shape)

    if node.op_type == "AveragePool":
        return {0: spread(b.op("Mul", [gy, b.const(1.0 / float(np.prod(kernel)))]))}
    at_max = b.op("Equal", [node.input[0], spread(node.output[0])])
    return {0: b.op("Where", [at_max, spread(gy), b.const(0.0)], "maxpool_grad")}


def _reverse(b: _Builder, node, view: GraphView, shapes, constants, gy: str, on_path: set[str]) -> dict[int, str]:
    """Gradients of ``node``'s on-path inputs (input index -> tensor) given its output gradient ``gy``."""
    op = node.op_type
    y = node.output[0]
    if op == "Conv":
        return _conv_grad(b, node, view, shapes, gy)
    if op == "Gemm":
        return _gemm_grad(b, node, view, shapes, gy)
    if op == "Relu":
        return {0: b.op("Where", [b.op("Greater", [y, b.const(0.0)]), gy, b.const(0.0)], "relu_grad")}
    if op == "LeakyRelu":
        slope = b.op("Mul", [gy, b.const(attribute(node, "alpha", 0.01))])
        return {0: b.op("Where", [b.op("Greater", [node.input[0], b.const(0.0)]), gy, slope], "leaky_grad")}
    if op in ("Add", "Sub"):
        grads = {}
        for i in (0, 1):
            if node.input[i] in on_path:
                g = gy if (op == "Add" or i == 0) else b.op("Neg", [gy])
                grads[i] = _unbroadcast(b, g, shapes[node.input[i]], shapes[y])
        return grads
    if op == "Mul":
        return {i: _unbroadcast(b, b.op("Mul", [gy, node.input[1 - i]]), shapes[node.input[i]], shapes[y])
                for i in (0, 1) if node.input[i] in on_path}
    if op in ("Identity", "Reshape", "Flatten"):
        return {0: b.reshape(gy, shapes[node.input[0]])}
    if op == "GlobalAveragePool":
        x_shape = shapes[node.input[0]]
        scaled = b.op("Mul", [gy, b.const(1.0 / np.prod(x_shape[2:]))])
        return {0: b.op("Expand", [scaled, b.const(x_shape, "shape", np.int64)], "gap_grad")}
    if op in ("MaxPool", "AveragePool"):
        return _pool_grad(b, node, shapes, gy)
    if op == "Slice":
        return _slice_grad(b, node, view, shapes, gy, constants)
    if op == "Pad":
        return _pad_grad(b, node, view, shapes, gy, constants)
    if op == "Concat":
        axis = attribute(node, "axis") % len(shapes[y])
        grads, offset = {}, 0
        for i, name in enumerate(node.input):
            size = shapes[name][axis]
            if name in on_path:
                grads[i] = b.slice(gy, [offset], [offset + size], [axis])
            offset += size
        return grads
    raise UnsupportedGraphError(f"{op} node {node.name!r} between the input and a BN layer")


# ------------------------------------------------------------------------------------- the model

def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully known shapes of every tensor that ONNX shape inference resolves."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _probe(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of ``names`` computed by ONNX Runtime on ``feed`` (shapes inference left open, pad amounts)."""
    from .synthetic import _session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)  # ORT infers the types
    return dict(zip(names, _session(probe).run(names, feed)))


def distillation_model(folded: onnx.ModelProto, stats: Mapping[str, BNStats], batch: int,
                       ce_weight: float = 0.0) -> onnx.ModelProto:
    """Graph that maps a batch of images to the ZeroQ loss and its gradient.

    Parameters
    ----------
    folded : ModelProto
        BN-folded model (udfc_onnx.fold) with one float input (N, ...) whose non-batch dimensions
        are known, and its weights as initializers.
    stats : mapping of str to BNStats
        BN statistics keyed by the Conv/Gemm they were folded into.
    batch : int
        Images per run; every shape in the graph is static.
    ce_weight : float, default=0.0
        Weight of DeepInversion's cross-entropy of the logits (the model's output, shape
        (batch, classes)) toward one-hot targets; > 0 adds the head after the last BN to the
        reverse pass and the input :data:`TARGETS`.

    Returns
    -------
    ModelProto
        Inputs: the model's input, shape (batch, ...), and with ``ce_weight`` > 0 ``distill_targets``
        (batch, classes). Outputs: ``distill_loss`` (scalar, the sum over BN layers),
        ``distill_total`` (that plus ``ce_weight`` x the mean cross-entropy) and ``distill_grad``
        (d total / d input, shaped like the input).

    Raises
    ------
    UnsupportedGraphError
        An op without a reverse rule (see :data:`DIFFERENTIABLE`), an unknown shape, several
        inputs, no BN layer reachable from the input, or (``ce_weight`` > 0) logits that are not
        (batch, classes) or do not depend on the input.
    """
    init_names = {t.name for t in folded.graph.initializer}
    inputs = [i for i in folded.graph.input if i.name not in init_names]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedGraphError("distillation needs exactly one float input")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2 or not all(d.HasField("dim_value") for d in dims[1:]):
        raise UnsupportedGraphError("distillation needs an input with known non-batch dimensions")
    x = inputs[0].name
    view = GraphView(folded)
    layers = {name: st for name, st in stats.items() if st.layer == name and name in view.nodes_by_name
              and view.nodes_by_name[name].op_type in ("Conv", "Gemm")}
    # forward: tensors that depend on the input (through values: a Shape's output only depends on
    # static shapes here, and a head that flattens with Shape/Gather/Reshape carries no gradient there)
    on_path = {x}
    for node in folded.graph.node:
        if node.op_type not in SHAPE_ONLY and any(i in on_path for i in node.input):
            on_path.update(o for o in node.output if o)
    targets = {view.nodes_by_name[name].output[0]: st for name, st in layers.items()}
    targets = {t: st for t, st in targets.items() if t in on_path}
    if not targets:
        raise UnsupportedGraphError("no BN layer depends on the input")
    logits = _logits_tensor(folded, view) if ce_weight > 0 else None
    if logits is not None and logits not in on_path:
        raise UnsupportedGraphError("the logits do not depend on the input")
    # backward: the nodes the targets need (the head after the last BN only for the cross-entropy)
    needed: set[str] = set()
    stack = list(targets) + ([logits] if logits else [])
    while stack:
        node = view.producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(i for i in node.input if i)
    nodes = [n for n in folded.graph.node if n.name in needed]
    for node in nodes:
        if any(i in on_path for i in node.input) and node.op_type not in DIFFERENTIABLE + SHAPE_ONLY:
            raise UnsupportedGraphError(f"{node.op_type} node {node.name!r} between the input and a BN layer"
                                        + (" or the logits" if logits else ""))
    opset = next((o.version for o in folded.opset_import if o.domain in ("", "ai.onnx")), 13)
    used = {i for n in nodes for i in n.input}
    sized_input = helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [batch] + [d.dim_value for d in dims[1:]])
    forward = helper.make_model(
        helper.make_graph(nodes, "distill", [sized_input],
                          [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                           for t in list(targets) + ([logits] if logits and logits not in targets else [])],
                          [t for t in folded.graph.initializer if t.name in used]),
        opset_imports=list(folded.opset_import), ir_version=folded.ir_version)
    shapes = _static_shapes(forward)
    constants = {t.name: numpy_helper.to_array(t) for t in forward.graph.initializer
                 if t.data_type == onnx.TensorProto.INT64}
    for node in nodes:
        if node.op_type == "Constant":
            value = attribute(node, "value")
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value)
    # tensors the rules need but neither inference nor constants give: one ORT run on zeros
    differentiable = [n for n in nodes if n.op_type not in SHAPE_ONLY and any(i in on_path for i in n.input)]
    unknown = sorted({t for n in differentiable for t in (*n.input, *n.output) if t and t in on_path and t not in shapes})
    open_params = sorted({n.input[1] for n in differentiable if n.op_type == "Pad" and len(n.input) > 1
                          and n.input[1] not in constants})
    if unknown or open_params:
        values = _probe(forward, unknown + open_params, {x: np.zeros(_shape_of(sized_input), np.float32)})
        shapes.update({t: list(values[t].shape) for t in unknown})
        constants.update({t: values[t] for t in open_params})
    b = _Builder(opset)
    grads: dict[str, list[str]] = {}
    losses = []
    for tensor, st in targets.items():
        loss, seed = _bn_seed(b, tensor, shapes[tensor], st)
        losses.append(loss)
        grads.setdefault(tensor, []).append(seed)
    graph_inputs = [sized_input]
    ce_loss = None
    if logits is not None:
        if len(shapes.get(logits, [])) != 2:
            raise UnsupportedGraphError(f"logits {logits!r} of shape {shapes.get(logits)}, not (batch, classes)")
        ce_loss, seed = _ce_seed(b, logits, shapes[logits], ce_weight)
        grads.setdefault(logits, []).append(seed)
        graph_inputs.append(helper.make_tensor_value_info(TARGETS, onnx.TensorProto.FLOAT, shapes[logits]))
    for node in reversed(differentiable):
        outs = [o for o in node.output if o in grads]
        if not outs:
            continue
        if outs != [node.output[0]]:
            raise UnsupportedGraphError(f"{node.op_type} node {node.name!r} with several differentiated outputs")
        parts = grads.pop(node.output[0])
        gy = parts[0] if len(parts) == 1 else b.op("Sum", parts, "grad_sum")
        for index, g in _reverse(b, node, view, shapes, constants, gy, on_path).items():
            grads.setdefault(node.input[index], []).append(g)
    if x not in grads:
        raise UnsupportedGraphError("the input gets no gradient")
    parts = grads.pop(x)
    total_grad = parts[0] if len(parts) == 1 else b.op("Sum", parts, "grad_sum")
    b.nodes.append(helper.make_node("Identity", [total_grad], [GRAD], name="distill_grad_out"))
    bn_loss = losses[0] if len(losses) == 1 else b.op("Sum", losses, "loss_sum")
    b.nodes.append(helper.make_node("Identity", [bn_loss], [LOSS], name="distill_loss_out"))
    total = bn_loss if ce_loss is None else b.op("Add", [bn_loss, ce_loss], "total")
    b.nodes.append(helper.make_node("Identity", [total], [TOTAL], name="distill_total_out"))
    graph = helper.make_graph(
        nodes + b.nodes, "distill", graph_inputs,
        [helper.make_tensor_value_info(LOSS, onnx.TensorProto.FLOAT, []),
         helper.make_tensor_value_info(TOTAL, onnx.TensorProto.FLOAT, []),
         helper.make_tensor_value_info(GRAD, onnx.TensorProto.FLOAT, _shape_of(sized_input))],
        list(forward.graph.initializer) + b.inits)
    return helper.make_model(graph, opset_imports=list(folded.opset_import), ir_version=folded.ir_version)


def _shape_of(value_info: onnx.ValueInfoProto) -> list[int]:
    """Static shape of a value info whose dimensions are all known."""
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------------- image priors

def tv_prior(x: np.ndarray) -> tuple[float, np.ndarray]:
    """DeepInversion's L2 total variation of images ``x`` (N, C, H, W) and its gradient (same shape).

    loss = mean of squared vertical neighbour differences + mean of squared horizontal ones
    (standard normal noise: about 4; smooth images: near 0).
    """
    x = x.astype(np.float64)
    grad = np.zeros_like(x)
    loss = 0.0
    for axis in (-2, -1):
        d = np.diff(x, axis=axis)
        loss += float(np.mean(d * d))
        g = 2.0 * d / d.size
        lead = [slice(None)] * x.ndim
        lead[axis] = slice(1, None)
        grad[tuple(lead)] += g
        lead[axis] = slice(None, -1)
        grad[tuple(lead)] -= g
    return loss, grad


def l2_prior(x: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean square of the images ``x`` (any shape) and its gradient (same shape)."""
    x = x.astype(np.float64)
    return float(np.mean(x * x)), 2.0 * x / x.size


def balanced_targets(count: int, classes: int, seed: int) -> np.ndarray:
    """One-hot targets (count, classes), float32: every class count // classes or one more times, shuffled."""
    labels = np.random.default_rng(seed).permutation(np.arange(count) % classes)
    return np.eye(classes, dtype=np.float32)[labels]


def augment_images(images: np.ndarray, samples: int, seed: int, shift: int = 4) -> np.ndarray:
    """``samples`` images (samples, C, H, W) made from ``images`` (K, C, H, W) by CIFAR training augmentation.

    Sample i comes from image i mod K. The first K are the images as they are; every later one
    is flipped horizontally with probability 1/2 and shifted by up to ``shift`` pixels along
    each spatial axis, with zero fill (a random crop of the image padded by ``shift``).
    """
    k = len(images)
    rng = np.random.default_rng(seed)
    out = np.empty((samples,) + images.shape[1:], images.dtype)
    out[:min(k, samples)] = images[:samples]
    h, w = images.shape[-2:]
    padded = np.pad(images, [(0, 0)] * (images.ndim - 2) + [(shift, shift), (shift, shift)])
    for i in range(k, samples):
        dy, dx = rng.integers(0, 2 * shift + 1, size=2)
        crop = padded[i % k, ..., dy:dy + h, dx:dx + w]
        out[i] = crop[..., ::-1] if rng.random() < 0.5 else crop
    return out


# ------------------------------------------------------------------------------------- optimisation

@dataclass(frozen=True)
class Priors:
    """Weights of the terms added to the BN-statistic loss (DeepInversion, Yin et al. 2020); 0 leaves one out.

    Attributes
    ----------
    ce : float
        Cross-entropy of the logits toward balanced random target classes (in the graph).
    tv : float
        :func:`tv_prior` of the images.
    l2 : float
        :func:`l2_prior` of the images.
    """

    ce: float = 0.0
    tv: float = 0.0
    l2: float = 0.0


def _objective(session, x: np.ndarray, name: str, targets: np.ndarray | None,
               priors: Priors) -> tuple[float, np.ndarray]:
    """(BN-statistic loss, gradient of the whole objective) at images ``x`` (batch, ...)."""
    feed = {name: x} if targets is None else {name: x, TARGETS: targets}
    bn_loss, grad = session.run([LOSS, GRAD], feed)
    grad = grad.astype(np.float64)
    for weight, prior in ((priors.tv, tv_prior), (priors.l2, l2_prior)):
        if weight > 0:
            grad += weight * prior(x)[1]
    return float(bn_loss), grad


def _adam(session, x: np.ndarray, name: str, iterations: int, lr: float, targets: np.ndarray | None = None,
          priors: Priors = Priors()) -> tuple[np.ndarray, float, float]:
    """Adam (betas 0.9, 0.999) on the images ``x`` (batch, ...); returns (images, first loss, last loss).

    The losses are the BN-statistic part of the objective; the last is evaluated after the last step.
    """
    m = np.zeros_like(x, np.float64)
    v = np.zeros_like(x, np.float64)
    first = None
    for t in range(1, iterations + 1):
        loss, grad = _objective(session, x, name, targets, priors)
        first = loss if first is None else first
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        step = lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        x = (x - step).astype(np.float32)
    last = _objective(session, x, name, targets, priors)[0]
    return x, (last if first is None else first), last


FILLS = ("flip-shift", "noise")


def distill_inputs(folded: onnx.ModelProto, stats: Mapping[str, BNStats], samples: int, *, iterations: int,
                   batch: int | None = None, lr: float = 0.2, seed: int = 0, images: int | None = None,
                   fill: str = "flip-shift", priors: Priors = Priors()) -> DistillResult:
    """Images whose BN pre-activation statistics match the BN's, started from :func:`noise_inputs`.

    Parameters
    ----------
    folded : ModelProto
        BN-folded model with its weights as initializers.
    stats : mapping of str to BNStats
    samples : int
        Images returned.
    iterations : int
        Adam steps per chunk (0 returns the noise itself).
    batch : int or None, default=None
        Images per chunk (the batch each BN statistic is matched over); None: all in one.
        The distilled images are split into equal chunks of at most this many.
    lr : float, default=0.2
        Adam step size, in units of the input (standard normal at the start).
    seed : int, default=0
        Seed of the starting noise (the same noise the "noise" inputs use), the targets and
        the augmentation.
    images : int or None, default=None
        Images distilled (the first of the noise); None: all ``samples``. The other samples
        are made by ``fill``.
    fill : {"flip-shift", "noise"}, default="flip-shift"
        "flip-shift": :func:`augment_images` of the distilled images; "noise": the starting noise.
    priors : Priors, default=Priors()
        Weights of the cross-entropy, total-variation and L2 terms added to the loss.

    Returns
    -------
    DistillResult

    Raises
    ------
    UnsupportedGraphError
        See :func:`distillation_model`.
    """
    from .synthetic import _session

    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    start = noise_inputs(folded, samples, seed)
    if len(start) != 1:
        raise UnsupportedGraphError("distillation needs exactly one float input")
    (name, noise), = start.items()
    if iterations <= 0:
        return DistillResult(start, float("nan"), float("nan"), 0, 0)
    count = min(images or samples, samples)
    chunks = -(-count // min(batch or count, count))
    size = -(-count // chunks)  # equal chunks; the last may overlap the one before it
    notes = []
    try:
        model = distillation_model(folded, stats, size, ce_weight=priors.ce)
    except UnsupportedGraphError as exc:
        if priors.ce <= 0:
            raise
        # a head without reverse rules (AveragePool, computed Reshape...) still allows the BN-statistic loss
        notes.append(f"cross-entropy left out ({exc})")
        priors = Priors(0.0, priors.tv, priors.l2)
        model = distillation_model(folded, stats, size)
    session = _session(model)
    targets = None
    if priors.ce > 0:
        classes = next(i for i in model.graph.input if i.name == TARGETS).type.tensor_type.shape.dim[1].dim_value
        targets = balanced_targets(count, classes, seed)
    distilled = noise[:count].copy()
    first_loss = last_loss = float("nan")
    for k in range(chunks):
        lo = min(k * size, count - size)
        x, loss0, loss1 = _adam(session, np.ascontiguousarray(noise[lo:lo + size]), name, iterations, lr,
                                None if targets is None else targets[lo:lo + size], priors)
        distilled[lo:lo + size] = x
        if k == 0:
            first_loss, last_loss = loss0, loss1
    if count == samples:
        out = distilled
    elif fill == "noise":
        out = np.concatenate([distilled, noise[count:]])
    else:
        out = augment_images(distilled, samples, seed)
    return DistillResult({name: out}, first_loss, last_loss, iterations, chunks, tuple(notes))
