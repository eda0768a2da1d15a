"""BN-matched synthetic activations: data-free second moments from the model's own BN statistics [EXT].

Every BatchNorm that was folded into a Conv/Gemm is replaced, in a copy of the folded graph, by a
batch-statistic renormalisation of that layer's output::

    y = (x - mean_NHW(x)) / sqrt(var_NHW(x) + eps) * |gamma| + beta

(with x = a Z + b the folded output, |gamma| carries the sign of a = gamma / sigma back in, so this
equals ``gamma (Z - mean Z) / std Z + beta``). Fed with Gaussian noise shaped like the input, every
BN's pre-activations then have exactly the BN's mean beta and standard deviation |gamma| over the
synthetic batch, whatever the input distribution; the first BN fixes the scale of the noise. The
activations a consumer reads (after ReLU, through any op ONNX Runtime runs: Slice/Pad shortcuts
included) give the empirical mean and covariance of each unit's channels, which the solver uses
like the oracle uses real activations: post-activation regression plus a constant
(udfc_onnx.compensate), either per layer (:func:`synthetic_unit_moments`: pruned on kept channels
of the original network) or sequentially (:class:`SequentialSampler`: every original channel on the
kept channels of the network as compressed so far, the default). The sampler also gives the
patch moments of a consumer's input (:meth:`SequentialSampler.patch_moments`, the patch refit) and
of any layer's input (:meth:`SequentialSampler.input_second_moment`, GPTQ rounding).

With ``synthetic_inputs="distilled"`` (the default) the noise is first optimised ZeroQ/DeepInversion-style
(udfc_onnx.distill: a few images, then flipped and shifted copies of them)
so that the original network's BN layers see their running statistics without renormalisation;
``synthetic_renorm=False`` then runs those images through the folded graph as it is.

The cost is about two ORT passes of ``samples`` images and one float32 per layer output element and
sample; :func:`sample_count` picks the count from a MAC and a memory budget and returns 0 (use the
analytic moments, udfc_onnx.moment_graph) when the model is too big for useful samples.
This module runs graphs; the solver it feeds stays pure NumPy and only sees the moments.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .distill import Priors, distill_inputs, noise_inputs
from .graph import GraphView, attribute, copy_model
from .patches import MAX_ROWS, ConvGeometry, PatchMoments, output_positions, patch_moments
from .resources import narrow_heap_blocks
from .stats import BNStats

__all__ = ["ActivationMoments", "PairedMoments", "SequentialSampler", "bn_matched_model", "model_cost", "model_macs",
           "sample_count", "synthetic_moments", "synthetic_unit_moments", "MAC_BUDGET", "ELEMENT_BUDGET", "MIN_SAMPLES",
           "MAX_SAMPLES"]

# Samples x MACs per sample: 256 CIFAR ResNet-56 images (0.126 GMAC each), seconds of ORT on two
# cores for the sequential fit; a 224x224 ResNet-50 (4.1 GMAC) gets 8 and a ResNet-18 (1.8 GMAC)
# 18, under MIN_SAMPLES: they keep the analytic moments (no sampling cost on big models).
MAC_BUDGET = 3.3e10
# Samples x Conv/Gemm output elements per sample: the sequential sampler keeps one float32 offset per
# element (ResNet-56: 0.53 M per image, 256 images = 0.55 GB); a 224x224 MobileNetV2 (about 7 M per
# image) would get 21 samples and keeps the analytic moments.
ELEMENT_BUDGET = 1.5e8
# resnet56_nm, 4-bit, L1, 2000 images, seeds 0/1/2: at 50 % pruning 64 samples give 78.10 / 78.45 /
# 74.35 %, 256 samples 78.50 / 78.55 / 77.45 % (at 40 %: 85.80 / 87.10 / 86.00 vs 86.30 / 86.70 /
# 86.35); 32 samples 77.25 / 86.15 (seed 0). Fewer samples give noisy fits.
MIN_SAMPLES = 32
MAX_SAMPLES = 256
RENORM_EPS = 1e-12
# Quantization-only runs (nothing pruned) take the synthetic pass for GPTQ rounding below this width.
GPTQ_ALONE_BELOW_BITS = 8


@dataclass(frozen=True)
class ActivationMoments:
    """Empirical first and second moments of one unit's channels as its consumers read them.

    Attributes
    ----------
    mean : ndarray of shape (C,)
        E[A_c] over samples and positions.
    cov : ndarray of shape (C, C)
        Centred covariance E[(A - mean)(A - mean)^T].
    samples : int
        Rows the moments were averaged over (images x positions).
    """

    mean: np.ndarray
    cov: np.ndarray
    samples: int


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _reduce_mean(inp: str, out: str, axes: list[int], opset: int, name: str, extra: list) -> onnx.NodeProto:
    if opset >= 18:
        axes_name = f"{name}_axes"
        extra.append(numpy_helper.from_array(np.asarray(axes, np.int64), axes_name))
        return helper.make_node("ReduceMean", [inp, axes_name], [out], name=name, keepdims=1)
    return helper.make_node("ReduceMean", [inp], [out], name=name, axes=axes, keepdims=1)


def bn_matched_model(folded: onnx.ModelProto, stats: Mapping[str, BNStats]) -> onnx.ModelProto:
    """Copy of a BN-folded model whose folded layers renormalise their output to (beta, |gamma|) per batch.

    Parameters
    ----------
    folded : ModelProto
        The model after udfc_onnx.fold (BN folded into the preceding Conv/Gemm).
    stats : mapping of str to BNStats
        BN statistics keyed by the layer they were folded into (udfc_onnx.stats.read_bn_stats).

    Returns
    -------
    ModelProto
        Same inputs and outputs; each such layer's output ``x`` (N, C, ...) is replaced by
        ``(x - mean) / sqrt(var + eps) * |gamma| + beta`` with mean, var over every axis but 1.
    """
    model = onnx.ModelProto()
    model.CopyFrom(folded)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    view = GraphView(model)
    extra: list[onnx.TensorProto] = []
    renamed: dict[str, str] = {}
    after: dict[int, list[onnx.NodeProto]] = {}
    for index, node in enumerate(graph.node):
        st = stats.get(node.name)
        if st is None or st.layer != node.name or node.op_type not in ("Conv", "Gemm"):
            continue
        x = node.output[0]
        rank = 2 if node.op_type == "Gemm" else len(view.array(node.input[1]).shape)
        axes = [0] + list(range(2, rank))
        shape = [1, len(st.gamma)] + [1] * (rank - 2)
        p = f"{node.name}_bnmatch"
        extra += [_const(f"{p}_gamma", np.abs(st.gamma).reshape(shape)), _const(f"{p}_beta", st.beta.reshape(shape)),
                  _const(f"{p}_eps", np.asarray(RENORM_EPS))]
        after[index] = [
            _reduce_mean(x, f"{p}_mean", axes, opset, f"{p}_reduce_mean", extra),
            helper.make_node("Sub", [x, f"{p}_mean"], [f"{p}_centred"], name=f"{p}_sub"),
            helper.make_node("Mul", [f"{p}_centred", f"{p}_centred"], [f"{p}_sq"], name=f"{p}_sq"),
            _reduce_mean(f"{p}_sq", f"{p}_var", axes, opset, f"{p}_reduce_var", extra),
            helper.make_node("Add", [f"{p}_var", f"{p}_eps"], [f"{p}_var_eps"], name=f"{p}_add_eps"),
            helper.make_node("Sqrt", [f"{p}_var_eps"], [f"{p}_sd"], name=f"{p}_sqrt"),
            helper.make_node("Div", [f"{p}_centred", f"{p}_sd"], [f"{p}_unit"], name=f"{p}_div"),
            helper.make_node("Mul", [f"{p}_unit", f"{p}_gamma"], [f"{p}_scaled"], name=f"{p}_mul_gamma"),
            helper.make_node("Add", [f"{p}_scaled", f"{p}_beta"], [f"{p}_out"], name=f"{p}_add_beta"),
        ]
        renamed[x] = f"{p}_out"
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        for i, name in enumerate(node.input):  # every original reader sees the renormalised output
            if name in renamed:
                node.input[i] = renamed[name]
        new_nodes.append(node)
        new_nodes.extend(after.get(index, ()))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(extra)
    return model


def model_macs(model: onnx.ModelProto) -> float:
    """Multiply-accumulates of one input sample through every Conv and Gemm (shape inference, batch 1).

    Runs on a skeleton of the graph (initializers as shaped inputs, no weight data), so it costs
    milliseconds on a 100 MB model; inf when the shapes cannot be inferred.
    """
    return model_cost(model)[0]


def model_cost(model: onnx.ModelProto) -> tuple[float, float]:
    """(MACs, output elements) of one input sample over every Conv and Gemm; (inf, inf) if unknown.

    The output elements bound the sampler's memory: it keeps one offset per element and sample.
    """
    graph = model.graph
    inputs = []
    for inp in graph.input:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(inp)
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
        inputs.append(vi)
    known = {i.name for i in graph.input}
    inits = {}
    for t in graph.initializer:
        inits[t.name] = list(t.dims)
        if t.name not in known:
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    # shape-carrying constants (Reshape targets, Pad amounts...) keep their values
    small = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT64]
    skeleton = helper.make_graph(list(graph.node), "macs", [i for i in inputs if i.name not in {t.name for t in small}],
                                 list(graph.output), small)
    probe = helper.make_model(skeleton, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # unknown shapes: treat the model as too big for sampling
        return float("inf"), float("inf")
    shapes = {}  # per sample: the batch axis may stay symbolic behind shape-computing shortcuts
    for vi in list(probe.graph.value_info) + list(probe.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[vi.name] = [d.dim_value for d in dims[1:]]
    total = elements = 0.0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        out = shapes.get(node.output[0])
        if out is None:
            return float("inf"), float("inf")
        elements += float(np.prod(out))
        w = inits[node.input[1]]
        if node.op_type == "Conv":
            total += float(np.prod(out)) * float(np.prod(w[1:]))
        else:
            total += float(np.prod(out)) * float(w[1] if attribute(node, "transB", 0) else w[0])
    return total, elements


def sample_count(model: onnx.ModelProto, budget: float | None = None) -> int:
    """Synthetic images within the MAC and memory budgets, capped at MAX_SAMPLES; 0 below MIN_SAMPLES.

    ``budget`` replaces :data:`MAC_BUDGET`; the memory budget is :data:`ELEMENT_BUDGET`.
    """
    return _samples_within_budget(*model_cost(model), MAC_BUDGET if budget is None else budget)


def _samples_within_budget(macs: float, elements: float, budget: float) -> int:
    """:func:`sample_count` for a model of known cost per sample."""
    if not np.isfinite(macs) or macs <= 0 or not np.isfinite(elements):
        return 0
    n = int(min(MAX_SAMPLES, budget // macs, ELEMENT_BUDGET // max(elements, 1.0)))
    return n if n >= MIN_SAMPLES else 0


# A unit whose consumer reads fewer rows than this many per channel (a Gemm after global pooling
# sees one row per image) keeps the analytic moments: its regression would be underdetermined.
MIN_ROWS_PER_CHANNEL = 4
# A patch refit has (kept channels x taps) unknowns per consumer row; below this many patches per
# unknown it overfits the synthetic samples (a 32-sample VGG-16 at 2x2 maps: 128 patches for 3225
# unknowns, output error 6.1 against 1.3 for plain pruning), and the consumer gets the channel refit.
MIN_PATCHES_PER_UNKNOWN = 16


def _activation_tensor(view: GraphView, consumer) -> str | None:
    """The tensor a unit's consumer reads: a Conv's input, or a Gemm's input with one column per channel."""
    node = view.nodes_by_name.get(consumer.node)
    if node is None or node.op_type not in ("Conv", "Gemm") or (node.op_type == "Gemm" and consumer.block != 1):
        return None
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return None
    return node.input[0]


def _wanted_tensors(view: GraphView, units: Iterable) -> dict[str, str]:
    """Producer -> the tensor its unit's only consumer reads, for the simple units that have one."""
    wanted = {}
    for unit in units:
        if unit.is_simple and len(unit.consumers) == 1:
            tensor = _activation_tensor(view, unit.consumers[0])
            if tensor is not None:
                wanted[unit.producer] = tensor
    return wanted


def synthetic_unit_moments(folded: onnx.ModelProto, stats: Mapping[str, BNStats], units: Iterable,
                           samples: int, *, seed: int = 0, inputs: Mapping[str, np.ndarray] | None = None,
                           renormalise: bool = True) -> dict[str, ActivationMoments]:
    """Empirical moments of each simple unit's channels under BN-matched synthetic inputs.

    Parameters
    ----------
    folded : ModelProto
        BN-folded model.
    stats : mapping of str to BNStats
    units : iterable of PruneUnit
        Units whose consumers are Convs reading the channels directly get moments.
    samples : int
        Synthetic images (standard normal noise shaped like each input).
    seed : int, default=0
    inputs : mapping of str to ndarray, optional
        Images to use instead of the noise (udfc_onnx.distill), each (samples, ...).
    renormalise : bool, default=True
        Run the BN-matched graph (:func:`bn_matched_model`); False: the folded graph as it is.

    Returns
    -------
    dict of str to ActivationMoments
        Keyed by producer name.
    """
    wanted = _wanted_tensors(GraphView(folded), units)
    if not wanted or samples <= 0:
        return {}
    model = bn_matched_model(folded, stats) if renormalise else copy_model(folded)
    present = {o.name for o in model.graph.output}
    for tensor in sorted(set(wanted.values()) - present):
        model.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    names = sorted(set(wanted.values()))
    feed = dict(inputs) if inputs is not None else noise_inputs(model, samples, seed)
    outputs = dict(zip(names, _session(model).run(names, feed)))
    result = {}
    for producer, tensor in wanted.items():
        value = outputs[tensor]
        rows = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1]).astype(np.float64)
        if len(rows) < MIN_ROWS_PER_CHANNEL * rows.shape[1]:
            continue
        mean = rows.mean(axis=0)
        centred = rows - mean
        result[producer] = ActivationMoments(mean, centred.T @ centred / len(rows), len(rows))
    return result


def with_values(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the initializers named in ``weights`` holding those values (a copy when any)."""
    if not weights:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in weights:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(weights[tensor.name], dtype=dtype), tensor.name))
    return out


def synthetic_moments(folded: onnx.ModelProto, stats: Mapping[str, BNStats], plan, config, layers: Mapping,
                      notes: list[str] | None = None, weights: Mapping[str, np.ndarray] | None = None):
    """The pipeline's hook: the statistics of a ``regression="synthetic"`` UDFC run, or None.

    Returns a :class:`SequentialSampler` (``synthetic_fit="sequential"``, every unit simple) or a
    dict of per-unit :class:`ActivationMoments` (``"layer"``, or a plan with channel groups,
    whose slicing the sampler does not follow). None when the run does not use them, the model
    is too big for the sample budget (``config.synthetic_samples`` None: :func:`sample_count`),
    or ONNX Runtime cannot run the BN-matched graph; every unit then uses the analytic moments.
    The reason goes to ``notes``. ``config.synthetic_inputs="distilled"`` replaces the noise by
    distilled images (a graph the distillation cannot differentiate keeps the noise, with a note). ``weights`` holds the values of initializers that ``folded``
    does not (the pipeline keeps folded weights in NumPy, not in the protobuf); they are written
    into a copy only once the budget allows sampling, so big models never pay for that copy.
    """
    pruned = any(up.drop for up in plan.units)
    if config.method != "udfc" or config.regression != "synthetic" or not (pruned or rounds_with_gptq_alone(config)):
        return None
    samples = config.synthetic_samples
    if samples is None:
        macs, elements = model_cost(folded)  # once: the fallback note quotes it
        samples = _samples_within_budget(macs, elements, MAC_BUDGET)
    if samples <= 0:
        if notes is not None:
            notes.append(f"synthetic activations: {macs / 1e9:.2f} GMAC and {elements / 1e6:.2f} M outputs per sample "
                         f"leave fewer than {MIN_SAMPLES} samples in the budgets ({MAC_BUDGET / 1e9:g} GMAC, "
                         f"{ELEMENT_BUDGET / 1e6:g} M elements); analytic moments used")
        return None
    units = [up.unit for up in plan.units] if pruned else []  # quantization only: layer inputs, no unit moments
    narrow_heap_blocks()  # its activation batches and sessions fragment a heap that keeps large blocks
    folded = with_values(folded, weights or {})
    inputs = _synthetic_inputs(folded, stats, samples, config, notes)
    renormalise = config.synthetic_renorm
    try:
        if (config.synthetic_fit == "sequential" or not pruned) and all(u.is_simple for u in units):
            return SequentialSampler(folded, stats, layers, units, samples, seed=config.seed, inputs=inputs,
                                     renormalise=renormalise)
        return synthetic_unit_moments(folded, stats, units, samples, seed=config.seed, inputs=inputs,
                                      renormalise=renormalise)
    except Exception as exc:  # an op or input ORT cannot run on noise: fall back rather than fail the run
        if notes is not None:
            notes.append(f"synthetic activations unavailable ({type(exc).__name__}: {str(exc)[:200]}); analytic moments used")
        return None


def rounds_with_gptq_alone(config) -> bool:
    """Whether a run that prunes nothing still takes a synthetic pass, for GPTQ rounding alone.

    Only below ``GPTQ_ALONE_BELOW_BITS`` bits: resnet56_nm at ratio 0, first 2 000 images, GPTQ
    against nearest rounding: 3-bit 93.00 vs 92.60 %, 4-bit 93.65 vs 93.00 %, 8-bit 93.45 vs 93.35 %,
    and the pass costs 13-20 s against 0.3 s.
    """
    bits = config.weight_bits
    return config.uses_gptq and bits is not None and bits < GPTQ_ALONE_BELOW_BITS


def _synthetic_inputs(folded: onnx.ModelProto, stats: Mapping[str, BNStats], samples: int, config,
                      notes: list[str] | None) -> dict[str, np.ndarray] | None:
    """Distilled images when ``config.synthetic_inputs`` asks for them, else None (the noise).

    A graph the distillation cannot differentiate, or any failure of it, keeps the noise and says so.
    """
    if config.synthetic_inputs != "distilled":
        return None
    start = time.perf_counter()
    try:
        result = distill_inputs(folded, stats, samples, iterations=config.distill_iterations,
                                batch=config.distill_batch, lr=config.distill_lr, seed=config.seed,
                                images=config.distill_images, fill=config.distill_fill,
                                priors=Priors(config.distill_ce, config.distill_tv, config.distill_l2))
    except Exception as exc:  # unsupported op, ORT failure: the noise still works
        if notes is not None:
            notes.append(f"distilled inputs unavailable ({type(exc).__name__}: {str(exc)[:200]}); Gaussian noise used")
        return None
    if notes is not None:
        distilled = min(config.distill_images or samples, samples)
        made = f" ({distilled} distilled, the rest {config.distill_fill})" if distilled < samples else ""
        notes.append(f"distilled inputs: {samples} images{made}, {result.iterations} Adam steps in {result.chunks} chunk(s), "
                     f"BN-statistic loss {result.loss_start:.3g} -> {result.loss_end:.3g} "
                     f"({time.perf_counter() - start:.1f} s)" + "".join(f"; {n}" for n in result.notes))
    return result.inputs


@dataclass(frozen=True)
class PairedMoments:
    """Moments of one unit's channels in the network compressed so far, against the original network.

    Attributes
    ----------
    mean : ndarray of shape (C,)
        E[A_c] of the compressed network's channels (regressors).
    cov : ndarray of shape (C, C)
        Their centred covariance.
    target_mean : ndarray of shape (C,)
        E[A_o] of the original network's channels (targets).
    cross : ndarray of shape (C, C)
        E[(A_c - mean)(A_o - target_mean)^T].
    samples : int
    """

    mean: np.ndarray
    cov: np.ndarray
    target_mean: np.ndarray
    cross: np.ndarray
    samples: int


def _session(model: onnx.ModelProto):
    """CPU session with basic graph optimisation (constant folding; no relaid-out copies of the weights).

    No memory arena: the sampler builds one session per partial graph, and each arena's high-water
    mark stayed in the process (resnet56_nm at 50 %, 4-bit, noise inputs: peak 2168 MB with the
    arena, 1526 MB without, same time).
    """
    import onnxruntime as ort

    from .validate import session

    return session(model, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                   enable_cpu_mem_arena=False)


class SequentialSampler:
    """BN-matched samples of the network as it is being compressed, unit by unit [EXT].

    One BN-matched pass of the original network (:func:`bn_matched_model`) records, after every
    folded layer, the element-wise offset between the renormalised value and the layer's own
    output, ``o = y_matched - x``. The fixed network "layer output + o" reproduces the
    BN-matched activations exactly on the same noise, yet reacts to a change of its weights
    with the real network's slopes. Running the network as compressed so far in that form
    gives, at each unit, the activations its consumer will read; the solver regresses the
    original activations on them (the oracle's "sequential" fit, without data).

    (Freezing the renormalisation as a per-channel affine map instead amplifies compression
    errors by its gains, up to 17x on resnet56_nm: 54.65 % vs 79.55 % at 50 % pruning, float.)

    Only the part of the graph downstream of what changed since the last call is rerun: tensors
    computed earlier are cached while no weight above them changed.

    Parameters
    ----------
    folded : ModelProto
        BN-folded model.
    stats : mapping of str to BNStats
    layers : mapping of str to Layer
        Every Conv/Gemm with constant weights (udfc_onnx.pipeline.collect_layers).
    units : iterable of PruneUnit
        Simple units whose single consumer is a Conv get moments.
    samples : int
    seed : int, default=0
    inputs : mapping of str to ndarray, optional
        Images to use instead of the noise (udfc_onnx.distill), each (samples, ...).
    renormalise : bool, default=True
        Freeze the BN-matched offsets; False: run the folded graph as it is (no offsets).
    """

    def __init__(self, folded: onnx.ModelProto, stats: Mapping[str, BNStats], layers: Mapping, units: Iterable,
                 samples: int, *, seed: int = 0, inputs: Mapping[str, np.ndarray] | None = None,
                 renormalise: bool = True):
        self.folded = folded
        self.layers = dict(layers)
        self.view = GraphView(folded)
        self.wanted = _wanted_tensors(self.view, units)
        matched = bn_matched_model(folded, stats) if renormalise else copy_model(folded)
        renormalised = [name for name, st in stats.items() if st.layer == name and name in self.layers and renormalise]
        offsets = []
        for name in renormalised:
            raw = self.view.nodes_by_name[name].output[0]
            matched.graph.node.append(helper.make_node("Sub", [f"{name}_bnmatch_out", raw], [f"{name}_bnmatch_offset"],
                                                       name=f"{name}_bnmatch_offset"))
            offsets.append(f"{name}_bnmatch_offset")
        names = sorted(set(self.wanted.values()))
        for tensor in names + offsets:
            matched.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        feed = dict(inputs) if inputs is not None else noise_inputs(folded, samples, seed)
        values = _session(matched).run(names + offsets, feed)
        self.targets = dict(zip(names, values[:len(names)]))
        self.offsets: dict[str, np.ndarray] = dict(zip(renormalised, values[len(names):]))
        del values
        self.cache: dict[str, np.ndarray] = dict(feed)
        # tensor -> the weight arrays it was computed with (held, so identity compares are safe)
        self.cache_arrays: dict[str, dict[str, np.ndarray]] = {k: {} for k in feed}
        self.kept: dict[str, np.ndarray] = {}
        self.samples = samples
        self.failure = ""
        self._order = {n.name: i for i, n in enumerate(folded.graph.node)}
        # (tensor, geometry) -> (the cached tensor, its PatchMoments): the last patch refit's, for GPTQ
        self._patch_memo: dict = {}

    def __contains__(self, producer: str) -> bool:
        return producer in self.wanted

    def record(self, producer: str, keep: np.ndarray) -> None:
        """Note the channels a producer kept (its offsets are sliced the same way)."""
        self.kept[producer] = np.asarray(keep, np.int64)

    def _node_weights(self, node: onnx.NodeProto, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        layer = self.layers.get(node.name)
        if layer is None or layer.weight not in arrays:
            return {}
        return {layer.weight: arrays[layer.weight].astype(np.float32), layer.bias: arrays[layer.bias].astype(np.float32)}

    def moments(self, producer: str, arrays: Mapping[str, np.ndarray]) -> PairedMoments | None:
        """Paired moments of ``producer``'s unit under the current (compressed) ``arrays``.

        ``arrays`` holds every Conv/Gemm weight and bias by initializer name, as the network
        computes them now (pruned, compensated, dequantized where quantized).
        """
        target = self.wanted.get(producer)
        value = None if target is None else self._tensor(target, arrays)
        if value is None:
            return None
        rows_c = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1]).astype(np.float64)
        if len(rows_c) < MIN_ROWS_PER_CHANNEL * rows_c.shape[1]:
            return None
        orig = self.targets[target]
        rows_o = np.moveaxis(orig, 1, -1).reshape(-1, orig.shape[1]).astype(np.float64)
        mean_c, mean_o = rows_c.mean(axis=0), rows_o.mean(axis=0)
        cc, co = rows_c - mean_c, rows_o - mean_o
        n = len(rows_c)
        return PairedMoments(mean_c, cc.T @ cc / n, mean_o, cc.T @ co / n, n)

    def input_second_moment(self, layer_name: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """``E[x x^T]`` (D, D) of the input entries one output of ``layer_name`` reads, under ``arrays``.

        For a Conv, x is one input patch flattened like a filter (group 1, 2-D, explicit pads);
        for a Gemm without transA, one input row. None for any other layer or when ORT fails.
        Feeds the GPTQ rounding of the layer's weights (udfc_onnx.quant.gptq_quantize).
        """
        node = self.view.nodes_by_name.get(layer_name)
        if node is None or self.failure or node.input[0] in self.view.initializers:
            return None
        if node.op_type == "Gemm" and not attribute(node, "transA", 0):
            geometry = None
        else:
            geometry = self._conv_geometry(node)
            if geometry is None:
                return None
        x = self._tensor(node.input[0], arrays)
        if x is None or x.ndim != (2 if geometry is None else 4):
            return None
        memo = self._patch_memo.get((node.input[0], geometry))
        if memo is not None and memo[0] is x:  # the patch refit just measured these patches
            return memo[1].second
        return patch_moments(x, geometry).second

    def _conv_geometry(self, node: onnx.NodeProto) -> ConvGeometry | None:
        """The window of a plain 2-D group-1 Conv with explicit pads, else None."""
        if node.op_type != "Conv" or attribute(node, "group", 1) != 1:
            return None
        if attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        kernel = tuple(int(k) for k in attribute(node, "kernel_shape", self.view.initializers[node.input[1]].dims[2:]))
        if len(kernel) != 2:
            return None
        return ConvGeometry(kernel, tuple(attribute(node, "strides", [1, 1])), tuple(attribute(node, "pads", [0, 0, 0, 0])),
                            tuple(attribute(node, "dilations", [1, 1])))

    def _tensor(self, tensor: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """``tensor`` in the network under ``arrays``; None (and no more sampling) when ORT fails."""
        if self.failure:
            return None
        self._drop_stale(arrays)
        try:
            return self._compute(tensor, arrays)
        except Exception as exc:  # ORT cannot run a part: this and later units use the analytic moments
            self.failure = f"{type(exc).__name__}: {str(exc)[:200]}"
            return None

    def patch_moments(self, producer: str, consumer: str, arrays: Mapping[str, np.ndarray],
                      keep: np.ndarray) -> PatchMoments | None:
        """Moments of the patches ``consumer`` reads from ``producer``'s unit, compressed vs original.

        None unless the consumer is a plain Conv (group 1, 2-D, explicit pads) whose data input is
        the unit's activation itself; ``keep`` selects the kept channels when the compressed
        network still computes all of them.
        """
        target = self.wanted.get(producer)
        node = self.view.nodes_by_name.get(consumer)
        if target is None or node is None or node.input[0] != target:
            return None
        geometry = self._conv_geometry(node)
        if geometry is None:
            return None
        value = self._tensor(target, arrays)
        if value is None or value.ndim != 4:
            return None
        keep = np.asarray(keep, np.int64)
        patches = len(value) * output_positions(value.shape[2], value.shape[3], geometry)
        if min(patches, MAX_ROWS) < MIN_PATCHES_PER_UNKNOWN * len(keep) * geometry.kernel[0] * geometry.kernel[1]:
            return None
        sliced = value if value.shape[1] == len(keep) else value[:, keep]
        result = patch_moments(sliced, geometry, target=self.targets[target])
        if sliced is value:
            self._patch_memo = {(target, geometry): (value, result)}
        return result

    def _drop_stale(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Forget cached tensors computed with arrays that have been replaced since."""
        for tensor in list(self.cache):
            if any(arrays.get(name) is not value for name, value in self.cache_arrays[tensor].items()):
                del self.cache[tensor], self.cache_arrays[tensor]

    def _compute(self, target: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        if target in self.cache:
            return self.cache[target]
        producers = self.view.producer
        inits = self.view.initializers
        needed: dict[str, onnx.NodeProto] = {}
        frontier: set[str] = set()
        stack = [target]
        while stack:
            tensor = stack.pop()
            if tensor in self.cache:
                frontier.add(tensor)
                continue
            node = producers.get(tensor)
            if node is None or node.name in needed:
                continue
            needed[node.name] = node
            stack.extend(i for i in node.input if i and i not in inits)
        nodes = sorted(needed.values(), key=lambda n: self._order[n.name])
        weights: dict[str, np.ndarray] = {}
        used: dict[str, np.ndarray] = {}
        graph_nodes = []
        offset_feeds: dict[str, np.ndarray] = {}
        for node in nodes:
            own = self._node_weights(node, arrays)
            weights.update(own)
            for name in own:
                used[name] = arrays[name]
            layer = self.layers.get(node.name)
            if layer is not None and own and (len(node.input) < 3 or not node.input[2]):
                node = onnx.NodeProto.FromString(node.SerializeToString())
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = layer.bias
            if node.name in self.offsets:
                # the BN-matched value's deviation from this layer's own output, frozen per element
                offset = self.offsets[node.name]
                keep_rows = self.kept.get(node.name)
                if keep_rows is not None and len(keep_rows) != offset.shape[1]:
                    offset = offset[:, keep_rows]
                out = node.output[0]
                node = onnx.NodeProto.FromString(node.SerializeToString())
                node.output[0] = f"{out}_raw"
                graph_nodes.append(node)
                graph_nodes.append(helper.make_node("Add", [f"{out}_raw", f"{out}_offset"], [out], name=f"{out}_add_offset"))
                offset_feeds[f"{out}_offset"] = np.ascontiguousarray(offset)
                continue
            graph_nodes.append(node)
        for frontier_tensor in frontier:
            used.update(self.cache_arrays[frontier_tensor])
        produced = {o for n in nodes for o in n.output if o}
        read_later = {i for n in self.folded.graph.node if n.name not in needed for i in n.input}
        keep = sorted((produced & read_later) | {target})
        init = []
        for node in nodes:
            for name in node.input:
                if name and name in inits and name not in weights and all(t.name != name for t in init):
                    init.append(inits[name])
        init += [numpy_helper.from_array(v, k) for k, v in weights.items()]
        graph = helper.make_graph(
            graph_nodes, "synthetic_part",
            [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in sorted(frontier) + sorted(offset_feeds)],
            [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in keep], init)
        part = helper.make_model(graph, opset_imports=list(self.folded.opset_import), ir_version=self.folded.ir_version)
        outputs = _session(part).run(keep, {**{t: self.cache[t] for t in frontier}, **offset_feeds})
        for name, value in zip(keep, outputs):
            self.cache[name] = value
            self.cache_arrays[name] = dict(used)
        return self.cache[target]
