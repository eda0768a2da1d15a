"""Full int8 QDQ output that ONNX Runtime fuses into QLinear kernels.

Weight-only QDQ keeps float activations and runs slower than float on ORT's CPU provider
(shared/ort-qdq-notes.md). The fast path is full QDQ: every activation between quantizable ops
is uint8 (QuantizeLinear -> DequantizeLinear), weights are int8 per output channel with zero
point 0, biases int32 with scale x_scale * w_scale[c]. The placement copies ORT's own
``quantize_static`` (QDQ format) so that ORT's QDQ selectors fuse each group:

    DQ(x) DQ(w) DQ(b) -> Conv -> Q         QLinearConv   (a Relu/Clip in between is absorbed by
                                                          the Q: uint8 with zero point 0 clamps)
    DQ(a) DQ(w) DQ(b) -> Gemm [-> Q]       QGemm         (float output when nothing follows)
    DQ(a) DQ(b) -> Add -> Q                QLinearAdd
    DQ(x) -> GlobalAveragePool|AveragePool -> Q           QLinearGlobalAveragePool / QLinearAveragePool
    DQ(x_i)... -> Concat -> Q              QLinearConcat
    DQ(x) -> MaxPool|Flatten|Reshape|... -> Q   dropped (the op runs on uint8), so Q and DQ must
                                                share scale and zero point

Each quantized tensor gets one Q and one DQ per consumer (ORT would duplicate a shared DQ anyway).
Activation ranges come from :mod:`udfc_onnx.activations` (BN statistics, no data) or from
calibration samples (:func:`calibrate_ranges`). :func:`check_fusion` reads ORT's optimised graph
back and counts what was fused.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .activations import INPUT_DIST, Dist, uint8_params
from .compensate import Layer
from .graph import GraphView, attribute, remove_unused, set_initializer
from .lazy import materialized
from .quant import QuantizedTensor
from .resources import narrow_heap_blocks
from .solve import median
from .stats import BNStats
from .validate import session

__all__ = ["Int8Record", "FusionReport", "estimate_dists", "data_free_ranges", "calibrate_ranges",
           "load_calibration", "emit_int8_qdq", "check_fusion", "fusion_report", "save_optimized_graph", "INT4_OPSET",
           "NORMALIZATIONS", "CONV_INPUT_CHANNEL_MULTIPLE"]

INT4_OPSET = 21
# Ops whose output is the input's values rearranged: ORT drops their Q/DQ when both share params.
SHARED_PARAM_OPS = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Expand", "Tile"}
# Ops with a QLinear form whose output gets its own params.
OWN_PARAM_OPS = {"Conv", "Gemm", "Add", "GlobalAveragePool", "AveragePool", "Concat"}
QUANT_OPS = SHARED_PARAM_OPS | OWN_PARAM_OPS
# Per-channel ops whose output moments equal the input's.
_PASSTHROUGH = SHARED_PARAM_OPS | {"Identity", "Dropout", "GlobalMaxPool", "Pad"}
# Variance factor of an average pool (see activations module docstring); measured, see README.
POOL_VARIANCE = 1.0
# Per-channel normalisations after x/255 for uint8 calibration images.
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
# ORT's fast int8 conv (MLAS's symmetric indirect-conv kernel, MlasConvSymPackWSize) takes only
# convs whose input channels are a multiple of 4; any other falls back to im2col + int8 GEMM.
# An RGB stem (3 channels) does: a 3->16 QDQ conv at batch 32, 32x32 ran 1.04 ms with 3 input
# channels and 0.58 ms with a fourth, zero one (tools/int8_kernels.py).
CONV_INPUT_CHANNEL_MULTIPLE = 4
# ... and output channel counts of at least 16 in multiples of 8 (same function). Pruned counts are
# kept on it (config.INT8_CHANNEL_MULTIPLE); other convs are reported (FusionReport.slow_convs).
FAST_CONV_MIN_OUTPUT_CHANNELS = 16
FAST_CONV_OUTPUT_CHANNEL_MULTIPLE = 8
# Its depthwise kernel takes channel counts in multiples of 16: depthwise 40 ran 2.6x the time of
# depthwise 48 per channel, 24 1.5x that of 32 (tools/int8_kernels.py --cases dw16,dw24,dw32,dw40,dw48).
FAST_DEPTHWISE_CHANNEL_MULTIPLE = 16
_QLINEAR = {"QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool",
            "QLinearAveragePool", "QLinearConcat", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu"}


@dataclass
class Int8Record:
    """What :func:`emit_int8_qdq` emitted.

    Attributes
    ----------
    int8_layers : list of str
        Conv/Gemm nodes emitted as full QDQ (candidates for QLinearConv/QGemm).
    weight_only : dict of str to str
        Conv/Gemm nodes left with float activations (weight-only DQ), with the reason.
    quantized_tensors : int
        Activation tensors given a QuantizeLinear.
    absorbed_activations : int
        Relu/Clip nodes made redundant by a zero-point-0 QuantizeLinear.
    range_source : str
        "bn statistics" or "calibration (N samples)".
    padded_inputs : dict of str to (int, int)
        Convs whose int8 input was given zero channels (node -> (channels, padded channels)),
        see :data:`CONV_INPUT_CHANNEL_MULTIPLE`.
    """

    int8_layers: list = field(default_factory=list)
    weight_only: dict = field(default_factory=dict)
    quantized_tensors: int = 0
    absorbed_activations: int = 0
    range_source: str = ""
    padded_inputs: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Activation ranges
# ----------------------------------------------------------------------------------------------
def _const_value(view: GraphView, name: str):
    """Value of a constant tensor (initializer or Constant node), else None."""
    if not name:
        return None
    if view.is_constant(name):
        return view.array(name)
    prod = view.producer.get(name)
    if prod is not None and prod.op_type == "Constant" and prod.attribute and prod.attribute[0].name == "value":
        return numpy_helper.to_array(prod.attribute[0].t)
    return None


def _clip_bounds(view: GraphView, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, optional inputs after); None if computed at run time."""
    names = {a.name for a in node.attribute}
    if "min" in names or "max" in names:
        return float(attribute(node, "min", -math.inf)), float(attribute(node, "max", math.inf))
    bounds = [-math.inf, math.inf]
    for k in (1, 2):
        if len(node.input) > k and node.input[k]:
            value = _const_value(view, node.input[k])
            if value is None:
                return None
            bounds[k - 1] = float(np.asarray(value).reshape(-1)[0])
    return bounds[0], bounds[1]


def _input_channels(value_info: onnx.ValueInfoProto) -> int:
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) >= 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
        return int(dims[1].dim_value)
    return 1


def estimate_dists(model: onnx.ModelProto, stats: dict[str, BNStats], keep: dict[str, Iterable[int]] | None = None,
                   *, pool_variance: float = POOL_VARIANCE, arrays: dict[str, np.ndarray] | None = None) -> dict[str, Dist]:
    """Per-channel Gaussian description of every activation tensor, from BN statistics only.

    Parameters
    ----------
    model : onnx.ModelProto
        BN-folded (and possibly pruned) float model, Relu nodes still present.
    stats : dict of str to BNStats
        From :func:`udfc_onnx.stats.read_bn_stats` on the unfolded model: keyed by the Conv/Gemm the
        BN was folded into (its output is then N(beta, gamma^2)), or by the BN node left in place.
    keep : dict of str to sequence of int, optional
        Kept output channels of each pruned producer (its BN statistics are sliced to them).
    pool_variance : float
        Variance factor of an average pool.
    arrays : dict of str to ndarray, optional
        Current values of initializers that the model itself may still hold stale (the pipeline
        does not write float weights that are about to be replaced by integers).

    Returns
    -------
    dict of str to Dist
        Keyed by tensor name; tensors whose distribution cannot be derived are absent.
    """
    keep = keep or {}
    view = _ArrayView(model, arrays or {})
    # A BN left in the graph (not foldable) describes its own output, not its layer's.
    present = {n.name for n in model.graph.node if n.op_type == "BatchNormalization"}
    by_bn = {st.bn_node: st for st in stats.values()}
    stats = {k: st for k, st in stats.items() if st.bn_node not in present}
    stats.update({name: by_bn[name] for name in present if name in by_bn})
    dists: dict[str, Dist] = {}
    for inp in model.graph.input:
        if inp.name not in view.initializers and inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            dists[inp.name] = _input_dist(view, inp, stats, keep) or INPUT_DIST(_input_channels(inp))
    for node in model.graph.node:
        out = _node_dist(view, node, dists, stats, keep, pool_variance)
        if out is not None and node.output and node.output[0]:
            dists[node.output[0]] = out
    return dists


class _ArrayView(GraphView):
    """GraphView whose ``array`` prefers values given aside over the model's own initializers."""

    def __init__(self, model: onnx.ModelProto, arrays: dict[str, np.ndarray]):
        super().__init__(model)
        self.overrides = arrays

    def array(self, name: str) -> np.ndarray:
        return self.overrides[name] if name in self.overrides else super().array(name)

    def dims(self, name: str) -> list[int] | None:
        if name in self.overrides:
            return list(self.overrides[name].shape)
        return list(self.initializers[name].dims) if name in self.initializers else None


def _input_dist(view: GraphView, inp: onnx.ValueInfoProto, stats: dict[str, BNStats],
                keep: dict[str, Iterable[int]]) -> Dist | None:
    """The input's moments read back from the BN folded into the first Conv that reads it.

    After folding, that Conv's output P_c = w_c . x + b_c has mean beta_c and variance
    a_c^2 var_c (a = gamma / sigma) over the training inputs. The means give E[x] per channel by
    least squares; the variances give the input's scale under a white-noise model,
    ``a_c^2 var_c ~ s^2 ||w_c||^2`` (median over channels). Images are bounded, so the range is
    mean +- 3 s rather than a Gaussian tail. This keeps an input that was not normalised to
    N(0, 1) (raw 0..255 pixels, say) from being clipped.
    """
    for node in view.consumers.get(inp.name, []):
        st = stats.get(node.name)
        if node.op_type != "Conv" or node.input[0] != inp.name or st is None or int(attribute(node, "group", 1)) != 1:
            continue
        if not view.is_constant(node.input[1]) and view.dims(node.input[1]) is None:
            continue
        w = view.array(node.input[1]).astype(np.float64)  # folded (and possibly pruned) weight
        idx = np.asarray(keep.get(node.name, range(len(st.beta))), np.int64)
        if w.shape[0] != len(idx):
            continue
        bias = _const_value(view, node.input[2]) if len(node.input) > 2 else None
        target = st.beta[idx] - (np.asarray(bias, np.float64).reshape(-1) if bias is not None else 0.0)
        mean = np.linalg.lstsq(w.sum(axis=tuple(range(2, w.ndim))), target, rcond=None)[0]
        norms = (w.reshape(w.shape[0], -1) ** 2).sum(1)
        live = norms > 1e-12
        if not live.any():
            continue
        folded_var = (st.a[idx] ** 2) * st.var[idx]
        scale = float(np.sqrt(median(folded_var[live] / norms[live])))
        if not (np.all(np.isfinite(mean)) and math.isfinite(scale) and scale > 0):
            continue
        return Dist(mean, np.full(len(mean), scale), floor=float(mean.min()) - 3 * scale,
                    cap=float(mean.max()) + 3 * scale, source="input (from the first BN)")
    return None


def _layer_out_channels(view: _ArrayView, node: onnx.NodeProto) -> int | None:
    dims = view.dims(node.input[1]) if len(node.input) > 1 else None
    if not dims:
        return None
    if node.op_type == "Gemm" and not attribute(node, "transB", 0):
        return int(dims[1])
    return int(dims[0])


def _node_dist(view, node, dists, stats, keep, pool_variance) -> Dist | None:
    op = node.op_type
    src = dists.get(node.input[0]) if node.input else None
    if op in ("Conv", "Gemm"):
        st = stats.get(node.name)
        channels = _layer_out_channels(view, node)
        if st is not None and channels is not None:
            idx = np.asarray(keep.get(node.name, range(len(st.beta))), np.int64)
            if len(idx) == channels:
                return Dist(st.beta[idx], np.abs(st.gamma[idx]), source="bn")
        if src is None or channels is None or not view.is_constant(node.input[1]):
            return None
        w = view.array(node.input[1])
        if op == "Gemm":
            if attribute(node, "transA", 0):
                return None
            w = w if attribute(node, "transB", 0) else w.T
            if src.channels != w.shape[1]:
                if src.channels == 0 or w.shape[1] % src.channels:
                    return None
                src = src.repeated(w.shape[1] // src.channels)
        bias = _const_value(view, node.input[2]) if len(node.input) > 2 else None
        try:
            return Dist.linear(w, bias, src, int(attribute(node, "group", 1)) if op == "Conv" else 1)
        except ValueError:
            return None
    if op == "BatchNormalization":
        if len(node.input) >= 3 and all(view.is_constant(i) for i in node.input[1:3]):
            # Its scale and bias as the graph holds them now: a BN left in place after a Concat
            # (DenseNet) loses the channels pruned upstream, which its statistics still count.
            gamma, beta = (np.asarray(view.array(i), np.float64).reshape(-1) for i in node.input[1:3])
            return Dist(beta, np.abs(gamma), source="bn")
        st = stats.get(node.name)
        return Dist(st.beta, np.abs(st.gamma), source="bn") if st is not None else None
    if src is None:
        return None
    if op == "Relu":
        return src.with_relu()
    if op == "Clip":
        bounds = _clip_bounds(view, node)
        return src.clipped(*bounds) if bounds is not None else None
    if op in ("GlobalAveragePool", "AveragePool"):
        return src.pooled(pool_variance)
    if op in _PASSTHROUGH:
        return src
    if op == "Add" and len(node.input) == 2:
        other = dists.get(node.input[1])
        if other is None:
            return None
        try:
            return src.added(other)
        except ValueError:
            return None
    if op == "Concat" and int(attribute(node, "axis", 1)) == 1:
        parts = [dists.get(i) for i in node.input]
        return Dist.concatenated(parts) if all(p is not None for p in parts) else None
    return None


def data_free_ranges(dists: dict[str, Dist], sigmas: float) -> dict[str, tuple[float, float]]:
    """[lo, hi] of every tensor with a distribution (see :meth:`Dist.range`)."""
    return {name: d.range(sigmas) for name, d in dists.items()}


def load_calibration(path: str | os.PathLike, input_name: str, norm: str | None = None) -> np.ndarray:
    """Float model inputs from an npz file.

    The file holds either an array keyed by the model's input name (already preprocessed float
    inputs, used as they are) or ``x``: uint8 images (N, C, H, W) normalised here as
    ``(x / 255 - mean) / std`` with ``norm`` ("cifar" or "imagenet"), or float ``x`` used as is.

    Raises
    ------
    ValueError
        No usable array, or uint8 images without ``norm``.
    """
    with np.load(path) as data:
        if input_name in data.files:
            return np.asarray(data[input_name], np.float32)
        if "x" not in data.files:
            raise ValueError(f"{path}: no array named {input_name!r} or 'x' (found {', '.join(data.files) or 'nothing'})")
        x = data["x"]
    if x.dtype == np.uint8:
        if norm is None:
            raise ValueError(f"{path}: 'x' holds uint8 images; say how to normalise them with calibration_norm "
                             f"({', '.join(sorted(NORMALIZATIONS))}) or store preprocessed floats under {input_name!r}")
        mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in NORMALIZATIONS[norm])
        return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    return np.asarray(x, np.float32)


def calibrate_ranges(model: onnx.ModelProto, inputs: np.ndarray, tensors: Iterable[str], *,
                     batch: int = 32, arrays: dict[str, np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """Per-tensor min/max of ``tensors`` over ``inputs`` (ORT MinMax calibration).

    Parameters
    ----------
    model : onnx.ModelProto
        Float model with one float input (not modified).
    inputs : ndarray of shape (N, ...)
        Preprocessed samples.
    tensors : iterable of str
        Intermediate tensors to observe.
    arrays : dict of str to ndarray, optional
        Initializer values to use instead of the model's own (see :func:`estimate_dists`).

    Returns
    -------
    dict of str to (lo, hi)
    """
    import onnxruntime as ort

    narrow_heap_blocks()  # activation batches, as in the synthetic sampler
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name, value in (arrays or {}).items():
        set_initializer(probe, name, value)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    names = [t for t in dict.fromkeys(tensors) if t and t not in graph_inputs]
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(materialized(probe).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    input_name = sess.get_inputs()[0].name
    lo = {n: math.inf for n in names}
    hi = {n: -math.inf for n in names}
    for start in range(0, len(inputs), batch):
        outs = sess.run(names, {input_name: inputs[start:start + batch]})
        for name, value in zip(names, outs):
            if value.size:
                lo[name] = min(lo[name], float(value.min()))
                hi[name] = max(hi[name], float(value.max()))
    ranges = {n: (lo[n], hi[n]) for n in names if math.isfinite(lo[n])}
    ranges[input_name] = (float(inputs.min()), float(inputs.max()))
    return ranges


# ----------------------------------------------------------------------------------------------
# Emission
# ----------------------------------------------------------------------------------------------
def _activation_slots(node: onnx.NodeProto) -> list[int]:
    if node.op_type == "Add":
        return [0, 1]
    if node.op_type == "Concat":
        return list(range(len(node.input)))
    return [0]


class _Names:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto):
        self.used = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
        for node in model.graph.node:
            self.used.update(node.input)
            self.used.update(node.output)
            self.used.add(node.name)

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _absorb_activations(model: onnx.ModelProto, ranges: dict, able) -> int:
    """Remove each Relu/Clip(0, m) whose producer will get a zero-point-0 QuantizeLinear."""
    view = GraphView(model)
    drop = []
    for node in model.graph.node:
        if node.op_type not in ("Relu", "Clip") or not node.input or node.output[0] in view.graph_outputs:
            continue
        rng = ranges.get(node.output[0])
        if rng is None or rng[0] != 0.0:
            continue  # the Q would not clamp at zero
        if node.op_type == "Clip":
            bounds = _clip_bounds(view, node)
            if bounds is None or bounds[0] != 0.0 or rng[1] > bounds[1]:
                continue
        prod = view.producer.get(node.input[0])
        if (prod is None or prod.op_type not in ("Conv", "Gemm", "Add") or view.sole_consumer(node.input[0]) is not node
                or not able(prod)):
            continue
        prod.output[0] = node.output[0]
        drop.append(node)
    for node in drop:
        model.graph.node.remove(node)
    return len(drop)


def _add_initializer(graph: onnx.GraphProto, name: str, values: np.ndarray) -> None:
    """Append ``numpy_helper.from_array(values, name)`` to ``graph.initializer``, made in place.

    The same tensor (it serialises to the same bytes) without the copy that appending a made
    TensorProto costs (ResNet-50-sized output: 18 MB of int8 weights).
    """
    values = np.asarray(values, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
    tensor.dims.extend(values.shape)
    tensor.raw_data = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def _add_int_initializer(graph: onnx.GraphProto, name: str, values: np.ndarray, int4: bool) -> None:
    if int4:
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT4, values.shape,
                                                    values.astype(np.int8).ravel().tolist()))
    else:
        _add_initializer(graph, name, values.astype(np.int8, copy=False))


def emit_int8_qdq(model: onnx.ModelProto, quantized: dict[str, QuantizedTensor], layers: dict[str, Layer],
                  ranges: dict[str, tuple[float, float]], *, int4_storage: bool = False) -> tuple[onnx.ModelProto, Int8Record]:
    """Turn a float model into full QDQ (edits ``model`` in place and returns it).

    Parameters
    ----------
    model : onnx.ModelProto
        BN-folded float model (opset >= 13; >= 21 with ``int4_storage``), Relu nodes present.
    quantized : dict of str to QuantizedTensor
        Weight initializer name -> symmetric integers (zero point 0), out-channel-major.
    layers : dict of str to Layer
        Every Conv/Gemm the solver describes, by node name.
    ranges : dict of str to (lo, hi)
        Range of each activation tensor (by the name it has in ``model``); tensors without a
        range stay float, and layers reading them keep weight-only QDQ.
    int4_storage : bool
        Store weights as INT4 (opset 21): a smaller file that ORT does not fuse (slower).

    Returns
    -------
    model, Int8Record
    """
    record = Int8Record()
    view = GraphView(model)
    layer_of = {lay.name: lay for lay in layers.values()}

    def weight_ok(node) -> str:
        lay = layer_of.get(node.name)
        if lay is None or lay.weight not in quantized:
            return "weight is not quantized"
        if np.any(quantized[lay.weight].zero_point != 0):
            return "asymmetric weight grid (uint8 activations need zero point 0)"
        return ""

    def able(node) -> bool:
        op = node.op_type
        if op not in QUANT_OPS or len([o for o in node.output if o]) != 1:
            return False
        slots = _activation_slots(node)
        if any(i >= len(node.input) or not node.input[i] or view.is_constant(node.input[i])
               or node.input[i] not in ranges for i in slots):
            return False
        if op in ("Conv", "Gemm") and weight_ok(node):
            return False
        if op == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                             or attribute(node, "beta", 1.0) != 1.0):
            return False
        if op == "Concat" and int(attribute(node, "axis", 1)) != 1:
            return False
        return op == "Gemm" or op in SHARED_PARAM_OPS or node.output[0] in ranges

    record.absorbed_activations = _absorb_activations(model, ranges, able)
    view = GraphView(model)
    int8_nodes = {n.name for n in model.graph.node if able(n)}

    # Quantization parameters in topological order; shared-param ops inherit their input's.
    params: dict[str, tuple[float, int]] = {}
    for inp in model.graph.input:
        if inp.name in ranges:
            params[inp.name] = uint8_params(*ranges[inp.name])
    for node in model.graph.node:
        out = node.output[0] if node.output else ""
        if node.name in int8_nodes and node.op_type in SHARED_PARAM_OPS:
            params[out] = params[node.input[0]] if node.input[0] in params else uint8_params(*ranges[node.input[0]])
        elif node.name in int8_nodes and node.op_type == "Concat":
            lo = min(ranges[i][0] for i in node.input)
            hi = max(ranges[i][1] for i in node.input)
            params[out] = uint8_params(lo, hi)
        elif out in ranges:
            params[out] = uint8_params(*ranges[out])

    # Which tensors get a Q: activation inputs of int8 nodes, and outputs of int8 nodes (a Gemm's
    # output only when something quantized reads it).
    qset: set[str] = set()
    for node in model.graph.node:
        if node.name not in int8_nodes:
            continue
        qset.update(node.input[i] for i in _activation_slots(node))
        if node.op_type != "Gemm":
            qset.add(node.output[0])
    for node in model.graph.node:
        if node.name in int8_nodes and node.op_type == "Gemm":
            if any(c.name in int8_nodes for c in view.consumers.get(node.output[0], [])):
                qset.add(node.output[0])
    qset = {t for t in qset if t in params}
    record.quantized_tensors = len(qset)

    names = _Names(model)
    new_nodes: list[onnx.NodeProto] = []
    # New initializers go straight to the end of the graph's list (nothing below reads them from
    # there: ``view`` indexed the graph before)
    graph = model.graph
    qnames: dict[str, tuple[str, str, str]] = {}  # tensor -> (quantized tensor, scale, zero point)

    def add_q(tensor: str, source: str) -> None:
        scale, zp = params[tensor]
        s_name, z_name, q_name = names(f"{tensor}_scale"), names(f"{tensor}_zero_point"), names(f"{tensor}_quantized")
        _add_initializer(graph, s_name, np.array(scale, np.float32))
        _add_initializer(graph, z_name, np.array(zp, np.uint8))
        new_nodes.append(helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_name],
                                          name=names(f"{tensor}_QuantizeLinear")))
        qnames[tensor] = (q_name, s_name, z_name)

    def add_dq(tensor: str, out: str | None = None, source: str | None = None) -> str:
        """DQ of ``tensor``'s quantized values (or of ``source``, uint8 values on the same grid)."""
        q_name, s_name, z_name = qnames[tensor]
        out = out or names(f"{tensor}_dequantized")
        new_nodes.append(helper.make_node("DequantizeLinear", [source or q_name, s_name, z_name], [out],
                                          name=names(f"{tensor}_DequantizeLinear")))
        return out

    def add_padded_dq(tensor: str, pad: int, rank: int) -> str:
        """DQ of ``tensor`` with ``pad`` more channels of its zero point (Pad on the uint8 values:
        they dequantize to exact zeros, which the padded weight's zero channels multiply)."""
        q_name, _, z_name = qnames[tensor]
        pads = np.zeros(2 * rank, np.int64)
        pads[rank + 1] = pad  # after the last channel
        p_name, padded = names(f"{tensor}_channel_pads"), names(f"{tensor}_quantized_padded")
        _add_initializer(graph, p_name, pads)
        new_nodes.append(helper.make_node("Pad", [q_name, p_name, z_name], [padded], mode="constant",
                                          name=names(f"{tensor}_channel_Pad")))
        return add_dq(tensor, source=padded)

    def input_pad(node: onnx.NodeProto) -> int:
        """Zero input channels that put an int8 Conv on ORT's fast kernel (see CONV_INPUT_CHANNEL_MULTIPLE)."""
        if node.op_type != "Conv" or node.name not in int8_nodes or int(attribute(node, "group", 1)) != 1 \
                or int4_storage or node.input[0] not in qnames:
            return 0
        return -quantized[layer_of[node.name].weight].q.shape[1] % CONV_INPUT_CHANNEL_MULTIPLE

    def add_weight(node: onnx.NodeProto, full: bool, x_name: str, pad: int = 0) -> None:
        lay = layer_of[node.name]
        qt = quantized[lay.weight]
        axis = 0 if lay.kind == "conv" or lay.trans_b else 1
        base = lay.weight
        w_name, ws_name, wz_name = names(f"{base}_quantized"), names(f"{base}_scale"), names(f"{base}_zero_point")
        q = lay.stored(qt.q)
        if pad:  # zero weights for the zero input channels (a conv's weight is stored out-channel-major)
            q = np.pad(q, [(0, 0), (0, pad)] + [(0, 0)] * (q.ndim - 2))
        _add_int_initializer(graph, w_name, q, int4_storage)
        _add_initializer(graph, ws_name, qt.scale.astype(np.float32, copy=False))
        _add_int_initializer(graph, wz_name, qt.zero_point, int4_storage)
        w_out = names(f"{base}_dequantized")
        new_nodes.append(helper.make_node("DequantizeLinear", [w_name, ws_name, wz_name], [w_out],
                                          name=names(f"{node.name}_weight_DequantizeLinear"), axis=axis))
        node.input[1] = w_out
        if not full or len(node.input) < 3 or not node.input[2] or not view.is_constant(node.input[2]):
            return
        x_scale = np.float64(np.float32(params[x_name][0]))
        bias_scale = (x_scale * qt.scale.astype(np.float64)).astype(np.float32)
        bias = view.array(node.input[2]).astype(np.float64).reshape(-1)
        q_bias = np.clip(np.rint(bias / bias_scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        b_name, bs_name, bz_name = names(f"{node.input[2]}_quantized"), names(f"{node.input[2]}_scale"), names(f"{node.input[2]}_zero_point")
        _add_initializer(graph, b_name, q_bias)
        _add_initializer(graph, bs_name, bias_scale)
        _add_initializer(graph, bz_name, np.zeros(len(q_bias), np.int32))
        b_out = names(f"{node.input[2]}_dequantized")
        new_nodes.append(helper.make_node("DequantizeLinear", [b_name, bs_name, bz_name], [b_out],
                                          name=names(f"{node.name}_bias_DequantizeLinear"), axis=0))
        node.input[2] = b_out

    graph_outputs = {o.name for o in model.graph.output}
    for inp in model.graph.input:
        if inp.name in qset:
            add_q(inp.name, inp.name)
    pending_outputs: list[str] = []
    for node in list(model.graph.node):
        x_name = node.input[0] if node.input else ""
        pad = input_pad(node)
        for i, name in enumerate(node.input):
            if i == 0 and pad:
                weight = quantized[layer_of[node.name].weight].q
                node.input[0] = add_padded_dq(name, pad, weight.ndim)
                record.padded_inputs[node.name] = (weight.shape[1], weight.shape[1] + pad)
            elif name in qnames:
                node.input[i] = add_dq(name)
        if node.op_type in ("Conv", "Gemm") and node.name in layer_of and layer_of[node.name].weight in quantized:
            full = node.name in int8_nodes
            add_weight(node, full, x_name, pad)
            if full:
                record.int8_layers.append(node.name)
            else:
                record.weight_only[node.name] = _why_float(x_name, view, ranges, weight_ok(node))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)  # detach from the container about to be cleared
        new_nodes.append(copy)
        for j, out in enumerate(copy.output):
            if out in qset:
                if out in graph_outputs:  # the graph output becomes the DQ's output
                    source = names(f"{out}_float")
                    copy.output[j] = source
                    add_q(out, source)
                    pending_outputs.append(out)
                else:
                    add_q(out, out)
    for out in pending_outputs:
        add_dq(out, out)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    del model.graph.value_info[:]
    remove_unused(model)
    return model, record


def _why_float(x: str, view: GraphView, ranges: dict, weight_reason: str) -> str:
    if weight_reason:
        return weight_reason
    if x not in ranges:
        prod = view.producer.get(x)
        return f"no range for its input {x!r} (after {prod.op_type if prod is not None else 'graph input'})"
    return "pattern not quantizable (attributes)"


# ----------------------------------------------------------------------------------------------
# What ORT made of it
# ----------------------------------------------------------------------------------------------
@dataclass
class FusionReport:
    """Counts from ORT's optimised graph of a written model (CPU provider; see :func:`fusion_report`).

    Attributes
    ----------
    convs, fused_convs : int
        Conv nodes in the written model; QLinearConv nodes in ORT's optimised graph.
    gemms, fused_gemms : int
        Gemm/MatMul nodes written; QGemm/QLinearMatMul/MatMulIntegerToFloat after optimisation.
    qlinear_ops : dict of str to int
        Every QLinear*/QGemm op type in the optimised graph.
    float_weight_dq : int
        Float Conv/Gemm/MatMul whose weight still goes through a DequantizeLinear at run time.
    leftover_q, leftover_dq : int
        Activation QuantizeLinear/DequantizeLinear nodes ORT could not fold into a kernel.
    slow_convs : list of str
        QLinearConv nodes whose channel counts ORT's fast int8 conv kernels do not take (see
        :data:`CONV_INPUT_CHANNEL_MULTIPLE`), as ``"name: in->out"`` or ``"name: depthwise C"``.
    warnings : list of str
    """

    convs: int = 0
    fused_convs: int = 0
    gemms: int = 0
    fused_gemms: int = 0
    qlinear_ops: dict = field(default_factory=dict)
    float_weight_dq: int = 0
    leftover_q: int = 0
    leftover_dq: int = 0
    slow_convs: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.qlinear_ops.items())) or "none"
        return (f"ORT CPU fusion: {self.fused_convs}/{self.convs} Conv -> QLinearConv, {self.fused_gemms}/{self.gemms} "
                f"Gemm/MatMul -> int8; int8 kernels: {ops}; unfused Q/DQ on activations: {self.leftover_q}/{self.leftover_dq}")


def save_optimized_graph(opts, path: str | os.PathLike) -> None:
    """Make a session built with ``opts`` write its optimised graph to ``path`` (weights to ``path.data``,
    so that models above 2 GB can be saved too)."""
    opts.optimized_model_filepath = str(path)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                  os.path.basename(str(path)) + ".data")


def check_fusion(model_path: str | os.PathLike) -> FusionReport:
    """Let ORT optimise ``model_path`` on the CPU provider (extended level) and count what it fused.

    See :func:`fusion_report`; this builds the session that writes the optimised graph.
    """
    import onnxruntime as ort

    fd, optimized_path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        session(str(model_path), optimized_path=optimized_path,
                graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        return fusion_report(model_path, optimized_path)
    finally:
        for path in (optimized_path, optimized_path + ".data"):
            if os.path.exists(path):
                os.unlink(path)


def fusion_report(model_path: str | os.PathLike, optimized_path: str | os.PathLike) -> FusionReport:
    """Count what ORT fused: ``optimized_path`` is the graph ORT saved (``optimized_model_filepath``)
    for the written model at ``model_path``.

    Any level from extended up fuses the QDQ groups (at the default, all, ORT also moves the int8
    kernels to its NHWC variants, in its own domain: counted alike). Warns (in
    ``FusionReport.warnings``) when the written patterns run slower than float: weight-only QDQ (a
    DequantizeLinear on a weight feeding a float Conv/Gemm runs on every inference) and INT4
    weights (ORT's Conv selector refuses them).
    """
    written = onnx.load(str(model_path), load_external_data=False)
    report = FusionReport()
    report.convs = sum(n.op_type == "Conv" for n in written.graph.node)
    report.gemms = sum(n.op_type in ("Gemm", "MatMul") for n in written.graph.node)
    int4_storage = any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in written.graph.initializer)
    del written
    optimized = onnx.load(str(optimized_path), load_external_data=False)
    producers = {o: n for n in optimized.graph.node for o in n.output}
    inits = {t.name: list(t.dims) for t in optimized.graph.initializer}
    for node in optimized.graph.node:
        op = node.op_type
        if op in _QLINEAR:
            report.qlinear_ops[op] = report.qlinear_ops.get(op, 0) + 1
        dims = inits.get(node.input[3]) if op == "QLinearConv" and len(node.input) > 3 else None  # (out, in/group, kh, kw)
        if dims and len(dims) > 2:
            group = int(attribute(node, "group", 1))
            if group == 1 and (dims[0] < FAST_CONV_MIN_OUTPUT_CHANNELS or dims[0] % FAST_CONV_OUTPUT_CHANNEL_MULTIPLE
                               or dims[1] % CONV_INPUT_CHANNEL_MULTIPLE):
                report.slow_convs.append(f"{node.name}: {dims[1]}->{dims[0]}")
            elif group == dims[0] > 1 and dims[1] == 1 and group % FAST_DEPTHWISE_CHANNEL_MULTIPLE:
                report.slow_convs.append(f"{node.name}: depthwise {group}")
        if op in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm") and len(node.input) > 1:
            prod = producers.get(node.input[1])
            if prod is not None and prod.op_type == "DequantizeLinear":
                report.float_weight_dq += 1
        if op == "QuantizeLinear":
            report.leftover_q += 1
        if op == "DequantizeLinear" and node.input[0] not in inits:
            report.leftover_dq += 1
    report.fused_convs = report.qlinear_ops.get("QLinearConv", 0)
    report.fused_gemms = sum(report.qlinear_ops.get(k, 0) for k in ("QGemm", "QLinearMatMul")) + sum(
        n.op_type == "MatMulIntegerToFloat" for n in optimized.graph.node)
    if report.float_weight_dq:
        report.warnings.append(
            f"{report.float_weight_dq} float Conv/Gemm layers dequantize their int8 weights on every inference "
            "(weight-only QDQ): ORT runs them slower than the float model. Use --activations uint8 for int8 "
            "kernels, or keep float weights where speed matters.")
    if int4_storage:
        report.warnings.append("INT4 weight storage only makes the file smaller: ORT does not fuse INT4 weights "
                               "into int8 kernels, so this model runs slower than float.")
    if report.slow_convs:
        report.warnings.append(
            f"{len(report.slow_convs)} QLinearConv(s) have channel counts ORT's fast int8 conv kernel does not take "
            f"(e.g. {report.slow_convs[0]}; it needs {FAST_CONV_MIN_OUTPUT_CHANNELS} or more output channels in multiples "
            f"of {FAST_CONV_OUTPUT_CHANNEL_MULTIPLE}, depthwise convs multiples of {FAST_DEPTHWISE_CHANNEL_MULTIPLE} "
            f"channels): they run on a slower int8 path, a 16->8 conv about as slow as float")
    if report.convs and report.fused_convs < report.convs and not report.float_weight_dq:
        report.warnings.append(f"only {report.fused_convs} of {report.convs} Convs became QLinearConv")
    return report


# ----------------------------------------------------------------------------------------------
# The pass the pipeline calls
# ----------------------------------------------------------------------------------------------
def quantize_activations(model: onnx.ModelProto, quantized: dict[str, QuantizedTensor], layers: dict[str, Layer],
                         stats: dict[str, BNStats], keep: dict[str, Iterable[int]], config,
                         arrays: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, Int8Record]:
    """Ranges (from BN statistics, or calibration samples when configured), then full QDQ.

    Parameters
    ----------
    model : onnx.ModelProto
        BN-folded, rewritten float model; edited in place (converted first to opset 21 with
        ``config.int4_storage``).
    quantized, layers : see :func:`emit_int8_qdq`
    stats : dict of str to BNStats
    keep : dict of str to sequence of int
        Kept channels of each pruned producer.
    config : CompressConfig
    arrays : dict of str to ndarray, optional
        Solved float weights the model does not hold (see :func:`estimate_dists`).

    Raises
    ------
    ValueError
        An unreadable calibration file.
    """
    if config.int4_storage:
        from .load import default_opset

        if default_opset(model) < INT4_OPSET:
            model = onnx.version_converter.convert_version(model, INT4_OPSET)
    dists = estimate_dists(model, stats, keep, arrays=arrays)
    if config.activations != "uint8":  # INT4 weight-only storage
        ranges, source = {}, "none (float activations)"
    elif config.calibration:
        input_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
        samples = load_calibration(config.calibration, input_name, config.calibration_norm)
        ranges = calibrate_ranges(model, samples, list(dists) + [n.output[0] for n in model.graph.node if n.output],
                                  arrays=arrays)
        source = f"calibration ({len(samples)} samples, min/max)"
    else:
        ranges = data_free_ranges(dists, config.activation_sigmas)
        inputs = ", ".join(f"{d.source} [{lo:.3g}, {hi:.3g}]" for name, d in dists.items()
                           if d.source.startswith("input") for lo, hi in [d.range(config.activation_sigmas)])
        source = f"BN statistics, mu +- {config.activation_sigmas:g} sigma; {inputs or 'no float input'}"
    model, record = emit_int8_qdq(model, quantized, layers, ranges, int4_storage=config.int4_storage)
    record.range_source = source
    return model, record
