"""Propagate data-free activation moments through a BN-folded ONNX graph (the ONNX half of moments).

Walks the nodes in graph order and keeps, per tensor, the channel means and the channel covariance
at one spatial position (``udfc_onnx.moments`` does the maths):

    graph input         mean 0, covariance I (no data: an uninformative prior)
    Conv (+ folded BN)  mean beta, covariance |gamma| corr(sum_tu W_t K W_u^T R_r(t,u)) |gamma|;
                        r fitted so the predicted variances match the BN's (fit_spatial_correlation)
    Conv / Gemm, no BN  mean W E[x] + bias, covariance from the same formula (r = 0.5 for a conv)
    Relu, Clip(min=0)   rectified Gaussian (relu_moments); Clip's upper bound is ignored
    Add / Sum           means add, covariances add (branches treated as independent)
    Concat (axis 1)     block diagonal
    pools, Flatten, Identity, Dropout   passed through (approximate for max pooling)

Anything else ends the propagation on that path; layers whose input moments are unknown are absent
from the result and the solver falls back to its moment-free forms there.

Only the layers the solver regresses with moments read their input's covariance; every other layer
reads its input's means (the bias correction). Given those layers (``covariance_for``), a tensor
whose correlations nothing downstream needs keeps its channel variances only (a 1-D array where the
covariance would be): the means and variances are the same bit for bit, without the O(C^2)
bivariate-normal ReLU terms that are most of the cost (a quantize-only run needs none of them).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import onnx

from .graph import GraphView, attribute
from .load import shape_skeleton
from .moments import (LayerInput, conv_output_covariance, correlation, fit_spatial_correlation, relu_diagonal,
                      relu_moments, tap_fractions)
from .stats import BNStats

__all__ = ["LayerInput", "estimate_layer_inputs"]

# Above this many channels a covariance is not tracked: memory and the O(C^2) ReLU moments (at 2048,
# ResNet-50 took 109 s and 9 GB here); those layers fall back to the moment-free regression.
MAX_TRACKED_CHANNELS = 256
DEFAULT_SPATIAL_R = 0.5
# Stands for a layer output's covariance that nothing reads whole: never computed; the BN statistics
# give its variances (_with_stats(..., full=False)), or nothing reads those either.
_UNREAD = np.empty(0)
PASS_THROUGH = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Identity", "Dropout"}


def _spatial_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model, value_info=True))
    except Exception:  # sizes only refine border handling; without them every tap counts fully
        return {}
    sizes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            sizes[vi.name] = (int(dims[2].dim_value), int(dims[3].dim_value))
    return sizes


def _dense_weight(w: np.ndarray, group: int) -> np.ndarray:
    """(O, C, kh, kw) equivalent of a grouped conv weight (O, C/group, kh, kw)."""
    if group == 1:
        return w
    O, cg = w.shape[:2]
    og = O // group
    dense = np.zeros((O, cg * group) + w.shape[2:], w.dtype)
    for g in range(group):
        dense[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = w[g * og:(g + 1) * og]
    return dense


def _with_stats(mean_cov: tuple[np.ndarray, np.ndarray], st: BNStats | None, full: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Keep the model's correlations, take mean and variance from the BN when there is one
    (``full=False``: the variances only, the diagonal of the same product)."""
    mean, cov = mean_cov
    if st is None:
        if full:
            return mean, cov
        # variances nothing reads (covariance_needed) are not computed: NaN, so that a read shows
        return mean, np.full(len(mean), np.nan) if cov is _UNREAD else _variances(cov)
    g = np.abs(st.gamma)
    return st.beta.copy(), correlation(cov) * np.outer(g, g) if full else g * g


def _variances(cov: np.ndarray | None) -> np.ndarray | None:
    """The channel variances of a covariance kept whole (2-D) or as its diagonal (1-D)."""
    return cov if cov is None or cov.ndim == 1 else np.diag(cov).copy()


def covariance_needed(model: onnx.ModelProto, stats: Mapping[str, BNStats], layers: Collection[str]) -> set[str]:
    """Tensors whose full channel covariance :func:`estimate_layer_inputs` must keep so that the inputs
    of ``layers`` (Conv/Gemm node names) have theirs, and every mean it gives is what it would be.

    Walks the graph backwards with three demands per tensor: its means (a Conv/Gemm input; the
    inputs of whatever needs means), its variances (a ReLU's mean depends on its input's) and its
    whole covariance (the inputs of ``layers``, and of whatever needs one). A Conv/Gemm with BN
    statistics takes its output's mean and variance from them; one without computes its output
    variance from its input's whole covariance, so that input is needed whole when the variance is.
    """
    nodes = model.graph.node
    means = {n.input[0] for n in nodes if n.op_type in ("Conv", "Gemm") and n.input}
    variances: set[str] = set()
    whole = {n.input[0] for n in nodes if n.name in layers and n.op_type in ("Conv", "Gemm") and n.input}
    for node in reversed(nodes):
        op, out = node.op_type, node.output[0] if node.output else ""
        data = [name for name in node.input if name]
        if op in ("Conv", "Gemm"):
            if data and (out in whole or (node.name not in stats and out in variances)):
                whole.add(data[0])
        elif op in ("Relu", "Clip"):
            if out in whole:
                whole.update(data[:1])
            if out in means or out in variances:
                means.update(data[:1])
                variances.update(data[:1])
        elif op in ("Add", "Sum", "Concat", "BatchNormalization") or op in PASS_THROUGH:
            for demand in (whole, variances, means):
                if out in demand:
                    demand.update(data[:1] if op in PASS_THROUGH or op == "BatchNormalization" else data)
    return whole


def estimate_layer_inputs(model: onnx.ModelProto, stats: dict[str, BNStats], raw_weights: Mapping[str, np.ndarray],
                          weights: Mapping[str, np.ndarray] | None = None, *,
                          covariance_for: Collection[str] | None = None) -> dict[str, LayerInput]:
    """Input moments of every Conv/Gemm of a BN-folded model whose input can be reached.

    Parameters
    ----------
    model : onnx.ModelProto
        Output of :func:`udfc_onnx.fold.fold_batchnorm`.
    stats : dict of str to BNStats
        BN statistics by the name of the layer they followed (read before folding).
    raw_weights : mapping of str to ndarray
        Unfolded Conv weights by node name (the BN variances describe their outputs).
    weights : mapping of str to ndarray, optional
        Initializer values that replace the model's own (folded weights not yet written into it).
    covariance_for : collection of str, optional
        The layers whose input covariance (``LayerInput.cov``) the caller reads; the others get
        ``cov=None`` where theirs was not needed on the way (see the module docstring), with the
        same means. None: every layer's, as far as it is tracked.

    Returns
    -------
    dict of str to LayerInput
        By Conv/Gemm node name.
    """
    view = GraphView(model)
    weights = weights or {}
    need = None if covariance_for is None else covariance_needed(model, stats, covariance_for)

    def whole(tensor: str) -> bool:  # keep this tensor's full covariance (else its variances)
        return need is None or tensor in need

    def value(name: str) -> np.ndarray:
        return weights[name] if name in weights else view.array(name)

    sizes = _spatial_sizes(model)
    moments: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in view.initializers and len(dims) >= 2 and dims[1].HasField("dim_value"):
            c = int(dims[1].dim_value)
            moments[inp.name] = (np.zeros(c), np.eye(c) if c <= MAX_TRACKED_CHANNELS else None)
    result: dict[str, LayerInput] = {}
    for node in model.graph.node:
        op = node.op_type
        ins = [moments.get(name) for name in node.input[:1]]
        src = ins[0] if ins else None
        if op == "Conv" and src is not None and view.is_constant(node.input[1]):
            w = value(node.input[1]).astype(np.float64)
            group = int(attribute(node, "group", 1))
            kernel = tuple(int(k) for k in w.shape[2:4]) if w.ndim == 4 else (int(w.shape[2]), 1)
            pads = attribute(node, "pads", [0, 0, 0, 0])
            fractions = (tap_fractions(sizes.get(node.input[0]), kernel, attribute(node, "strides", [1, 1]), pads,
                                       attribute(node, "dilations", [1, 1]))
                         if w.ndim == 4 and attribute(node, "auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
                         else np.ones(int(np.prod(w.shape[2:]))))
            mean_in, cov_in = src
            full_in = cov_in is not None and cov_in.ndim == 2
            st = stats.get(node.name)
            dense = _dense_weight(w, group)
            r = DEFAULT_SPATIAL_R if int(np.prod(w.shape[2:])) > 1 else 0.0
            if full_in and st is not None and node.name in raw_weights:
                r = fit_spatial_correlation(_dense_weight(raw_weights[node.name].astype(np.float64), group), cov_in, st.var)
            result[node.name] = LayerInput(mean_in, cov_in if full_in else None, r, fractions)
            bias = value(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
            out_mean = np.einsum("oct,t,c->o", dense.reshape(dense.shape[0], dense.shape[1], -1), fractions, mean_in) + bias
            full_out = whole(node.output[0])
            out_cov = None
            if cov_in is not None and dense.shape[0] <= MAX_TRACKED_CHANNELS:
                # computed only when read: its correlations, or without BN statistics its variances
                # (covariance_needed then keeps the input whole)
                out_cov = conv_output_covariance(dense, cov_in, r) if full_in and (full_out or st is None) else _UNREAD
            if out_cov is None and st is not None:
                out_cov = np.diag(st.gamma**2) if len(st.gamma) <= MAX_TRACKED_CHANNELS else None
            moments[node.output[0]] = _with_stats((out_mean, out_cov), st, full_out) if out_cov is not None else (
                st.beta.copy() if st is not None else out_mean, None)
        elif op == "Gemm" and src is not None and view.is_constant(node.input[1]) and not attribute(node, "transA", 0):
            w = value(node.input[1]).astype(np.float64)
            w = w if attribute(node, "transB", 0) else w.T  # (O, K)
            mean_in, cov_in = src
            if mean_in.shape[0] != w.shape[1]:
                continue
            full_in = cov_in is not None and cov_in.ndim == 2
            result[node.name] = LayerInput(mean_in, cov_in if full_in else None, 0.0, np.ones(1))
            bias = value(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
            alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
            out_mean = alpha * (w @ mean_in) + beta * bias
            st = stats.get(node.name)
            full_out = whole(node.output[0])
            out_cov = None
            if cov_in is not None and w.shape[0] <= MAX_TRACKED_CHANNELS:
                out_cov = alpha**2 * (w @ cov_in @ w.T) if full_in and (full_out or st is None) else _UNREAD
            if out_cov is None and st is not None:
                out_cov = np.diag(st.gamma**2)
            moments[node.output[0]] = _with_stats((out_mean, out_cov), st, full_out) if out_cov is not None else (out_mean, None)
        elif op == "Relu" or (op == "Clip" and src is not None and _clip_min(view, node) == 0.0):
            if src is None:
                continue
            mean, cov = src
            if cov is None:
                continue
            if whole(node.output[0]):
                moments[node.output[0]] = relu_moments(mean, cov + 1e-12 * np.eye(len(mean)))
            else:
                moments[node.output[0]] = relu_diagonal(mean, _variances(cov) + 1e-12)
        elif op in ("Add", "Sum") and len(node.input) >= 2:
            parts = [moments.get(name) for name in node.input]
            if any(p is None or p[1] is None for p in parts) or len({p[0].shape for p in parts}) != 1:
                continue
            covs = [p[1] for p in parts] if whole(node.output[0]) else [_variances(p[1]) for p in parts]
            moments[node.output[0]] = (sum(p[0] for p in parts), sum(covs))
        elif op == "Concat" and int(attribute(node, "axis", 1)) == 1:
            parts = [moments.get(name) for name in node.input]
            if any(p is None or p[1] is None for p in parts):
                continue
            mean = np.concatenate([p[0] for p in parts])
            if len(mean) > MAX_TRACKED_CHANNELS:
                continue
            if not whole(node.output[0]):
                moments[node.output[0]] = (mean, np.concatenate([_variances(c) for _, c in parts]))
                continue
            cov = np.zeros((len(mean), len(mean)))
            at = 0
            for m, c in parts:
                cov[at:at + len(m), at:at + len(m)] = c
                at += len(m)
            moments[node.output[0]] = (mean, cov)
        elif op in PASS_THROUGH and src is not None:
            if op == "Flatten":
                block = _flatten_block(view, node, sizes, len(src[0]))
                if block is None:
                    continue
                if block > 1:  # each channel becomes `block` consecutive features; correlations kept
                    mean = np.repeat(src[0], block)
                    cov = None
                    if src[1] is not None and len(mean) <= MAX_TRACKED_CHANNELS:
                        cov = (np.kron(src[1], np.ones((block, block))) if whole(node.output[0])
                               else np.repeat(_variances(src[1]), block))
                    moments[node.output[0]] = (mean, cov)
                    continue
            moments[node.output[0]] = src
        elif op == "BatchNormalization" and src is not None and all(view.is_constant(n) for n in node.input[1:5]):
            gamma, beta, mu, var = (view.array(n).astype(np.float64) for n in node.input[1:5])
            a = gamma / np.sqrt(var + float(attribute(node, "epsilon", 1e-5)))
            mean, cov = src
            if cov is not None:
                cov = cov * np.outer(a, a) if whole(node.output[0]) else _variances(cov) * (a * a)
            moments[node.output[0]] = (a * (mean - mu) + beta, cov)
    return result


def _clip_min(view: GraphView, node: onnx.NodeProto) -> float | None:
    if len(node.input) > 1 and node.input[1]:
        if not view.is_constant(node.input[1]):
            return None
        value = view.array(node.input[1]).reshape(-1)
        return float(value[0]) if value.size == 1 else None
    value = attribute(node, "min", None)
    return None if value is None else float(value)


def _flatten_block(view: GraphView, node: onnx.NodeProto, sizes: dict, channels: int) -> int | None:
    """Features per channel after a Flatten(axis=1): H*W of its input (1 after global pooling)."""
    if int(attribute(node, "axis", 1)) != 1:
        return None
    producer = view.producer.get(node.input[0])
    if producer is not None and producer.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        return 1
    hw = sizes.get(node.input[0])
    return None if hw is None else hw[0] * hw[1]
