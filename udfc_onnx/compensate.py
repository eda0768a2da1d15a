"""Solve a plan: new weight arrays for every pruned unit, then quantize every layer.

This step sees arrays and names only (no ONNX): the pipeline hands it the BN-folded
initializers, a description of each Conv/Gemm, the BN statistics and the plan, and gets back
the arrays to write plus the quantized form of each weight. Order (spec 4, per network):

    for each unit in topological order:
        [udfc, selection="greedy"] choose the kept channels by compensated error [EXT]
        quantize the producer's kept filters (if quantizing) and find s^q
        solve the pruned->kept coefficients (UDFC / NM / none)
        fold them into the consumer's input slices, add the bias transfer
        slice the producer's output channels
    quantize every remaining weight, after its compensation was multiplied in
    [bias_correction] every quantized layer: bias -= sum_t frac_t (Q(W) - W)_t E[x]   (DFQ, data-free)

UDFC's moment regression, greedy selection and the bias correction need the data-free input
moments of each layer (``layer_inputs``, from udfc_onnx.moment_graph); a layer without them
falls back to the Euclidean regression, norm selection and no correction.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .config import CompressConfig
from .moments import LayerInput, patch_covariance
from .plan import Plan, UnitPlan
from .quant import QuantizedTensor, quantize_per_channel
from .solve import (apply_compensation, bn_row_scales, consumer_gram, equalization_scales, filter_second_moments,
                    mean_residual_bias,
                    neuron_merging_coefficients, relu_mean, select_keep_greedy, solve_moment_coefficients,
                    solve_prune_coefficients, solve_quant_scales)
from .stats import BNStats
from .units import ConsumerSlice

__all__ = ["Layer", "UnitRecord", "Solution", "solve_plan", "layer_bits_for"]


@dataclass(frozen=True)
class Layer:
    """A Conv or Gemm as the solver needs it.

    Attributes
    ----------
    name : str
    kind : {"conv", "gemm"}
    weight : str
        Initializer name of the weight.
    bias : str
        Initializer name of the bias (the pipeline creates one when missing).
    trans_b : bool
        Gemm only: weight stored (O, K) when True, (K, O) when False.
    """

    name: str
    kind: str
    weight: str
    bias: str
    trans_b: bool = True

    def out_major(self, w: np.ndarray) -> np.ndarray:
        """Weight with output channels on axis 0."""
        return w if self.kind == "conv" or self.trans_b else w.T

    def stored(self, w: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`out_major`."""
        return self.out_major(w)


@dataclass
class UnitRecord:
    """What was done to one unit (for the report)."""

    producer: str
    consumers: tuple[str, ...]
    channels: int
    kept: int
    method: str
    compensated: bool
    bias_transfer: bool
    max_abs_coef: float = 0.0
    regression: str = ""
    selection: str = "norm"


@dataclass
class Solution:
    """Arrays to write back and quantized weights, keyed by initializer name."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    units: list[UnitRecord] = field(default_factory=list)


def _consumer_view(layer: Layer, w: np.ndarray, slice_: ConsumerSlice, channels: int) -> np.ndarray:
    """(O, C_total, B) view of a consumer's weight per input channel."""
    om = layer.out_major(w)
    if layer.kind == "conv":
        return om.reshape(om.shape[0], om.shape[1], -1)
    return om.reshape(om.shape[0], -1, slice_.block)


def _from_consumer_view(layer: Layer, view: np.ndarray, like: np.ndarray) -> np.ndarray:
    om = layer.out_major(like)
    if layer.kind == "conv":
        out = view.reshape((om.shape[0], view.shape[1]) + om.shape[2:])
    else:
        out = view.reshape(om.shape[0], -1)
    return layer.stored(out)


def layer_bits_for(name: str, config: CompressConfig, overrides: Mapping | None) -> int | None:
    """Weight bits of one layer: its ``--config`` override (skip means float), else the run's."""
    override = (overrides or {}).get(name)
    if override is None:
        return config.weight_bits
    return None if override.skip else override.bits if override.bits is not None else config.weight_bits


def _quantize(w_out_major: np.ndarray, config: CompressConfig, bits: int) -> QuantizedTensor:
    symmetric = config.symmetric_for(bits)
    if config.granularity == "tensor":
        whole = quantize_per_channel(w_out_major.reshape(1, -1), bits, symmetric=symmetric)
        C = w_out_major.shape[0]
        return QuantizedTensor(whole.q.reshape(w_out_major.shape), np.repeat(whole.scale, C),
                               np.repeat(whole.zero_point, C), bits)
    qt = quantize_per_channel(w_out_major, bits, symmetric=symmetric)
    if config.quant_compensation == "own" and config.method == "udfc":
        # s^q inside the layer's own dequant step: exact in the pre-activation (spec 3.5).
        qt = qt.rescaled(solve_quant_scales(w_out_major, qt.dequantize(), None, alpha=0.0))
    return qt


def _mean_shift(layer: Layer, delta_w: np.ndarray, li: LayerInput | None) -> np.ndarray | None:
    """``sum_t frac_t delta_w[:, :, t] E[x]``: the output-mean change caused by a weight change, or None if unknown."""
    if li is None:
        return None
    mean = li.mean
    if layer.kind == "conv":
        d = delta_w.reshape(delta_w.shape[0], delta_w.shape[1], -1)
        frac = li.tap_fraction if li.tap_fraction.shape[0] == d.shape[2] else np.ones(d.shape[2])
        return np.einsum("oct,t,c->o", d, frac, mean) if d.shape[1] == mean.shape[0] else None
    d = delta_w.reshape(delta_w.shape[0], -1)
    return d @ mean if d.shape[1] == mean.shape[0] else None


def _quantize_layer(layer: Layer, w_out_major: np.ndarray, config: CompressConfig, bits: int,
                    li: LayerInput | None) -> tuple[QuantizedTensor, np.ndarray | None]:
    """Quantize one weight; with bias correction also the bias change that restores its output mean."""
    qt = _quantize(w_out_major, config, bits)
    if not config.use_bias_correction:
        return qt, None
    shift = _mean_shift(layer, qt.dequantize() - w_out_major, li)
    return qt, None if shift is None else -shift


def _slice_input(li: LayerInput, cs: ConsumerSlice, channels: int, keep: np.ndarray) -> LayerInput:
    """A consumer's input moments after the unit's pruned channels are removed (like its weights)."""
    block = cs.block if cs.kind == "gemm" else 1
    n_in = li.mean.shape[0] // block
    index = np.arange(n_in)
    index = np.concatenate([index[:cs.offset], index[cs.offset:cs.offset + channels][keep], index[cs.offset + channels:]])
    feat = (index[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    cov = None if li.cov is None else li.cov[np.ix_(feat, feat)]
    return LayerInput(li.mean[feat], cov, li.spatial_r, li.tap_fraction)


def _moment_setup(prod: Layer, W: np.ndarray, b: np.ndarray, st: BNStats | None, li: LayerInput | None):
    """Patch covariance, per-channel scale and mean of the producer's pre-activations, or None.

    Means and variances come from the BN when the producer has one (the model only supplies
    correlations), else from the moment model itself.
    """
    if li is None or li.cov is None:
        return None
    mean_in = li.mean
    if prod.kind == "conv":
        if W.shape[1] != li.cov.shape[0]:
            return None
        patch_cov = patch_covariance(li.cov, li.spatial_r, tuple(W.shape[2:4]) if W.ndim == 4 else (int(np.prod(W.shape[2:])), 1))
        taps = int(np.prod(W.shape[2:]))
        frac = li.tap_fraction if li.tap_fraction.shape[0] == taps else np.ones(taps)
        patch_mean = np.kron(mean_in, frac)
    else:
        if W.shape[1] != li.cov.shape[0]:
            return None
        patch_cov, patch_mean = li.cov, mean_in
    flat = W.reshape(W.shape[0], -1)
    if st is not None:
        sd, mean = np.abs(st.gamma), st.beta.astype(np.float64)
    else:
        sd = np.sqrt(np.maximum(np.einsum("cd,de,ce->c", flat, patch_cov, flat), 0.0))
        mean = flat @ patch_mean + b
    scale = bn_row_scales(flat, patch_cov, sd)
    return patch_cov, patch_mean, scale, mean


def _euclidean_coefficients(kept: np.ndarray, W: np.ndarray, b: np.ndarray, keep: np.ndarray, drop: np.ndarray,
                            st: BNStats | None, config: CompressConfig) -> np.ndarray:
    V = kept.reshape(len(keep), -1).T
    P = W[drop].reshape(len(drop), -1).T
    if config.bias_units == "e" or st is None:
        return solve_prune_coefficients(V, P, b[keep], b[drop], alpha=config.alpha1, ridge=config.ridge)
    # raw filters with a folded-unit bias term: the folded loss with alpha1 * a_j^2 per pruned channel
    a2 = st.a[drop] ** 2
    cols = [solve_prune_coefficients(V, P[:, [k]], b[keep], b[drop][[k]], alpha=config.alpha1 * a2[k], ridge=config.ridge)
            for k in range(len(drop))]
    return np.concatenate(cols, axis=1)


def _equalize(plan: Plan, arrays: dict, layers: dict[str, Layer], stats: dict[str, BNStats],
              layer_inputs: Mapping[str, LayerInput] | None, sweeps: int = 20):
    """DFQ cross-layer equalization of every unit, in place on ``arrays``.

    Returns the BN statistics and input moments rescaled to match (gamma, beta and the
    consumers' input moments scale with the producer channel).
    """
    stats = dict(stats)
    inputs = dict(layer_inputs or {})
    for _ in range(sweeps):
        largest = 0.0
        for up in plan.units:
            unit = up.unit
            prod = layers[unit.producer]
            W = prod.out_major(arrays[prod.weight]).astype(np.float64)
            C = W.shape[0]
            views = [(cs, _consumer_view(layers[cs.node], arrays[layers[cs.node].weight], cs, C)) for cs in unit.consumers]
            r1 = np.abs(W.reshape(C, -1)).max(axis=1)
            r2 = np.max([np.abs(v[:, cs.offset:cs.offset + C]).max(axis=(0, 2)) for cs, v in views], axis=0)
            f = equalization_scales(r1, r2)
            largest = max(largest, float(np.abs(np.log(f)).max(initial=0.0)))
            arrays[prod.weight] = prod.stored(W * f.reshape((-1,) + (1,) * (W.ndim - 1))).astype(arrays[prod.weight].dtype)
            arrays[prod.bias] = (arrays[prod.bias].astype(np.float64) * f).astype(arrays[prod.bias].dtype)
            for cs, v in views:
                cons = layers[cs.node]
                v = v.astype(np.float64).copy()
                v[:, cs.offset:cs.offset + C] /= f[None, :, None]
                arrays[cons.weight] = _from_consumer_view(cons, v, arrays[cons.weight]).astype(arrays[cons.weight].dtype)
                li = inputs.get(cs.node)
                if li is not None:
                    per = np.ones(li.mean.shape[0] // (cs.block if cs.kind == "gemm" else 1))
                    per[cs.offset:cs.offset + C] = f
                    full = np.repeat(per, cs.block) if cs.kind == "gemm" else per
                    cov = None if li.cov is None else li.cov * np.outer(full, full)
                    inputs[cs.node] = LayerInput(li.mean * full, cov, li.spatial_r, li.tap_fraction)
            st = stats.get(unit.producer)
            if st is not None:
                stats[unit.producer] = dataclasses.replace(st, gamma=st.gamma * f, beta=st.beta * f)
        if largest < 1e-4:
            break
    return stats, inputs


def _solve_unit(up: UnitPlan, arrays: dict, layers: dict[str, Layer], stats: dict[str, BNStats],
                raw_filters: dict[str, np.ndarray], config: CompressConfig, solution: Solution,
                overrides: Mapping | None = None, inputs: dict[str, LayerInput] | None = None) -> UnitPlan:
    unit = up.unit
    prod = layers[unit.producer]
    keep = np.asarray(up.keep, np.int64)
    W = prod.out_major(arrays[prod.weight]).astype(np.float64)
    b = arrays[prod.bias].astype(np.float64)
    C = W.shape[0]
    udfc = config.method == "udfc"
    st = stats.get(unit.producer)
    li = (inputs or {}).get(prod.name)
    moments = _moment_setup(prod, W, b, st, li) if udfc and (
        config.regression == "moments" or config.selection == "greedy") else None

    selection = "norm"
    views = {cs.node: _consumer_view(layers[cs.node], arrays[layers[cs.node].weight], cs, C)[:, cs.offset:cs.offset + C]
             for cs in unit.consumers}
    if udfc and config.selection == "greedy" and moments is not None and len(keep) < C:
        patch_cov, _, scale, mean = moments
        flat = W.reshape(C, -1)
        second = filter_second_moments(flat, flat, patch_cov, scale, scale, mean, mean, mean_weight=config.mean_weight)
        gram = sum(consumer_gram(v) for v in views.values())
        keep = select_keep_greedy(second, gram, len(keep))
        selection = "greedy"
    drop = np.setdiff1d(np.arange(C), keep)

    kept_filters = W[keep]
    kept_bias = b[keep]
    next_scale = None
    bits = layer_bits_for(prod.name, config, overrides)
    if bits is not None:
        qt, bias_delta = _quantize_layer(prod, kept_filters, config, bits, li)
        if bias_delta is not None:
            kept_bias = kept_bias + bias_delta
        if udfc and config.quant_compensation == "next":
            next_scale = solve_quant_scales(kept_filters, qt.dequantize(), b[keep], alpha=config.alpha2)
        solution.quantized[prod.weight] = qt
        if config.regress_on_quantized:
            kept_filters = qt.dequantize()

    coef = None
    regression = ""
    if len(drop) and udfc:
        if config.regression == "moments" and moments is not None:
            patch_cov, patch_mean, scale, mean = moments
            rows_k = kept_filters.reshape(len(keep), -1)
            # the kept channels' mean as the (possibly quantized and corrected) layer computes it
            mean_k = mean[keep] + (rows_k - W[keep].reshape(len(keep), -1)) @ patch_mean + (kept_bias - b[keep])
            rows_p = W[drop].reshape(len(drop), -1)
            s_kk = filter_second_moments(rows_k, rows_k, patch_cov, scale[keep], scale[keep], mean_k, mean_k,
                                         mean_weight=config.mean_weight)
            s_kp = filter_second_moments(rows_k, rows_p, patch_cov, scale[keep], scale[drop], mean_k, mean[drop],
                                         mean_weight=config.mean_weight)
            coef = solve_moment_coefficients(s_kk, s_kp, ridge=config.ridge)
            regression = "moments"
        else:
            coef = _euclidean_coefficients(kept_filters, W, b, keep, drop, st, config)
            regression = "euclidean"
    elif len(drop) and config.method == "nm":
        raw = raw_filters[unit.producer]
        if st is not None:
            coef = neuron_merging_coefficients(raw, st.gamma, st.beta, st.mean, st.var, keep, ratio=config.nm_ratio)
        else:  # no BN: identity statistics, bias as beta
            ones = np.ones(C)
            coef = neuron_merging_coefficients(raw, ones, b, np.zeros(C), ones, keep, ratio=config.nm_ratio)

    transfer = config.use_bias_transfer and len(drop) > 0 and st is not None
    act_mean = relu_mean(st.beta, st.gamma, unit.activation == "relu") if transfer else None

    for cs in unit.consumers:
        cons = layers[cs.node]
        w2 = arrays[cons.weight]
        full = _consumer_view(cons, w2, cs, C)
        sub = full[:, cs.offset:cs.offset + C]
        if config.regress_on_quantized or next_scale is None:
            new_sub = apply_compensation(sub, keep, coef, next_scale)
        else:  # spec 4 variant (b): coefficients on float filters, whole slice rescaled
            new_sub = apply_compensation(sub, keep, coef) * next_scale[None, :, None]
        if transfer:
            delta = mean_residual_bias(sub, keep, coef, act_mean)
            arrays[cons.bias] = (arrays[cons.bias].astype(np.float64) + delta).astype(arrays[cons.bias].dtype)
        new_full = np.concatenate([full[:, :cs.offset], new_sub, full[:, cs.offset + C:]], axis=1)
        arrays[cons.weight] = _from_consumer_view(cons, new_full, w2).astype(w2.dtype)
        if inputs is not None and cs.node in inputs:
            inputs[cs.node] = _slice_input(inputs[cs.node], cs, C, keep)

    arrays[prod.weight] = prod.stored(W[keep]).astype(arrays[prod.weight].dtype)
    arrays[prod.bias] = kept_bias.astype(arrays[prod.bias].dtype)
    solution.units.append(UnitRecord(
        unit.producer, tuple(c.node for c in unit.consumers), C, len(keep), config.method,
        coef is not None, transfer, float(np.abs(coef).max()) if coef is not None and coef.size else 0.0,
        regression, selection))
    return UnitPlan(unit, tuple(int(k) for k in keep))


def solve_plan(plan: Plan, arrays: dict[str, np.ndarray], layers: dict[str, Layer], stats: dict[str, BNStats],
               raw_filters: dict[str, np.ndarray], config: CompressConfig, *,
               overrides: Mapping | None = None, layer_inputs: Mapping[str, LayerInput] | None = None) -> Solution:
    """Apply the plan's compensation and quantization to the arrays.

    Parameters
    ----------
    plan : Plan
        Its units are replaced by the kept sets actually used (greedy selection may change them).
    arrays : dict of str to ndarray
        BN-folded initializers of every Conv/Gemm weight and bias (not modified).
    layers : dict of str to Layer
        Every Conv/Gemm with constant weights, by node name.
    stats : dict of str to BNStats
        BN statistics by the name of the layer they followed.
    raw_filters : dict of str to ndarray
        Unfolded weights by producer name (for NM's criterion and coefficients).
    config : CompressConfig
    overrides : mapping of str to LayerOverride, optional
        Per-layer ``--config`` settings by node name: ``bits`` replaces the run's weight bits,
        ``skip`` keeps the layer's weights float.
    layer_inputs : mapping of str to LayerInput, optional
        Data-free input moments by layer name (udfc_onnx.moment_graph.estimate_layer_inputs);
        without them UDFC uses the Euclidean regression and norm selection, and no bias correction.

    Returns
    -------
    Solution
        ``arrays`` holds every changed initializer; ``quantized`` every weight to store as integers.
    """
    work = {k: v.copy() for k, v in arrays.items()}
    solution = Solution()
    if config.cross_layer_equalization:
        stats, layer_inputs = _equalize(plan, work, layers, stats, layer_inputs)
    inputs = dict(layer_inputs or {})  # sliced as producers lose channels
    plan.units = [_solve_unit(up, work, layers, stats, raw_filters, config, solution, overrides, inputs)
                  for up in plan.units]
    for layer in layers.values():
        bits = layer_bits_for(layer.name, config, overrides)
        if bits is not None and layer.weight not in solution.quantized:
            w = layer.out_major(work[layer.weight]).astype(np.float64)
            qt, bias_delta = _quantize_layer(layer, w, config, bits, inputs.get(layer.name))
            solution.quantized[layer.weight] = qt
            if bias_delta is not None:
                work[layer.bias] = (work[layer.bias].astype(np.float64) + bias_delta).astype(work[layer.bias].dtype)
    solution.arrays = {k: v for k, v in work.items() if v.shape != arrays[k].shape or not np.array_equal(v, arrays[k])}
    return solution
