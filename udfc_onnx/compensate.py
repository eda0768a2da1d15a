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

With the sequential synthetic fit (``activation_moments`` a udfc_onnx.synthetic.SequentialSampler,
the default for models within its budget) two steps read the synthetic activations of the network
as compressed so far [EXT]: ``consumer_refit="patch"`` replaces the per-channel coefficients of a
plain-Conv consumer by a least-squares refit of its whole kept input slice over input patches
(``W2' = W2 S_ok S_kk^-1`` with the producer already quantized, the constant into its bias), and
``weight_rounding="gptq"`` rounds every weight with GPTQ under its layer's input second moment
(udfc_onnx.quant.gptq_quantize); the moments themselves come from udfc_onnx.patches.
"""
from __future__ import annotations

import dataclasses
import heapq
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from .config import CompressConfig
from .errors import SolverError
from .activation_means import activation_mean
from .moments import LayerInput, patch_covariance
from .plan import Plan, UnitPlan
from .quant import QuantizedTensor, gptq_quantize, quantize_per_channel
from .resources import worker_threads
from .solve import (apply_compensation, bn_row_scales, consumer_gram, dropped_channels, equalization_scales,
                    filter_second_moments, mean_residual_bias, median, neuron_merging_coefficients, relu_mean, row_blocks,
                    select_keep_greedy, solve_moment_coefficients, solve_prune_coefficients, solve_quant_scales)
from .stats import BNStats
from .units import ConsumerSlice, PruneUnit

__all__ = ["Layer", "UnitRecord", "Solution", "solve_plan", "layer_bits_for", "ChannelIndex", "solve_planned_unit"]


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
    kind: str = "chain"
    compensation: str = "full"
    note: str = ""
    regression: str = ""
    selection: str = "norm"


@dataclass
class Solution:
    """Arrays to write back and quantized weights, keyed by initializer name."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    units: list[UnitRecord] = field(default_factory=list)
    # weight name -> (QuantizedTensor, its dequantized array): stable objects for _dequantized_view
    dequantized: dict[str, tuple] = field(default_factory=dict, repr=False)


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


def _quantize(w_out_major: np.ndarray, config: CompressConfig, bits: int,
              second: np.ndarray | None = None) -> QuantizedTensor:
    symmetric = config.symmetric_for(bits)
    if second is not None and config.uses_gptq:
        return gptq_quantize(w_out_major, second, bits, symmetric=symmetric)
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
                    li: LayerInput | None, second: np.ndarray | None = None) -> tuple[QuantizedTensor, np.ndarray | None]:
    """Quantize one weight; with bias correction also the bias change that restores its output mean.

    ``second``: the input second moment for GPTQ rounding (``config.weight_rounding="gptq"``), or None.
    """
    qt = _quantize(w_out_major, config, bits, second)
    if not config.use_bias_correction:
        return qt, None
    shift = _rounding_mean_shift(layer, qt, w_out_major, li)
    return qt, None if shift is None else -shift


def _rounding_mean_shift(layer: Layer, qt: QuantizedTensor, w_out_major: np.ndarray,
                         li: LayerInput | None) -> np.ndarray | None:
    """:func:`_mean_shift` of ``qt.dequantize() - w_out_major``.

    A conv's in blocks of output rows: each row's shift is its own sum, so the values are those of
    one pass, without a weight-sized float64 temporary (fresh pages, zeroed by the kernel).
    """
    if li is None:
        return None
    if layer.kind != "conv":
        delta = qt.dequantize()
        delta -= w_out_major  # in place: one weight-sized float64 temporary less
        return _mean_shift(layer, delta, li)
    shift = np.empty(w_out_major.shape[0])
    for rows in row_blocks(w_out_major.shape[0], w_out_major[0].size if len(w_out_major) else 1):
        delta = QuantizedTensor(qt.q[rows], qt.scale[rows], qt.zero_point[rows], qt.bits).dequantize()
        delta -= w_out_major[rows]
        part = _mean_shift(layer, delta, li)
        if part is None:
            return None
        shift[rows] = part
    return shift


def _input_second(layer: Layer, config: CompressConfig, arrays: dict, layers: dict[str, Layer], solution: Solution,
                  activation_moments) -> np.ndarray | None:
    """The layer's synthetic input second moment when GPTQ rounding asks for it (the network as compressed so far)."""
    if not config.uses_gptq or not hasattr(activation_moments, "input_second_moment"):
        return None
    return activation_moments.input_second_moment(layer.name, _dequantized_view(arrays, layers, solution))


def _shift_bias(arrays: dict, name: str, delta: np.ndarray) -> None:
    """``arrays[name] += delta``, summed in float64 and stored in the bias's own type (a new array)."""
    arrays[name] = (arrays[name].astype(np.float64) + delta).astype(arrays[name].dtype)


def _slice_input(li: LayerInput, cs: ConsumerSlice, channels: int, keep: np.ndarray) -> LayerInput:
    """A consumer's input moments after the unit's pruned channels are removed (like its weights)."""
    block = cs.block if cs.kind == "gemm" else 1
    n_in = li.mean.shape[0] // block
    index = np.arange(n_in)
    index = np.concatenate([index[:cs.offset], index[cs.offset:cs.offset + channels][keep], index[cs.offset + channels:]])
    feat = (index[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    cov = None if li.cov is None else li.cov[np.ix_(feat, feat)]
    return LayerInput(li.mean[feat], cov, li.spatial_r, li.tap_fraction)


# Largest filter (Cin * k * k) solved with the moment regression and greedy selection: their cost
# grows as its square to cube (ResNet-50's 256 x 3 x 3 filters took 20 s of solving); wider layers use
# the paper's Euclidean regression and norm selection. ResNet-56's widest is 64 x 3 x 3 = 576.
MAX_MOMENT_PATCH = 1152


def _moment_setup(prod: Layer, W: np.ndarray, b: np.ndarray, st: BNStats | None, li: LayerInput | None):
    """Patch covariance, per-channel scale and mean of the producer's pre-activations, or None.

    Means and variances come from the BN when the producer has one (the model only supplies
    correlations), else from the moment model itself.
    """
    if li is None or li.cov is None or W[0].size > MAX_MOMENT_PATCH:
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
    flat = W.reshape(W.shape[0], -1).astype(np.float64, copy=False)
    if st is not None:
        sd, mean = np.abs(st.gamma), st.beta.astype(np.float64)
    else:
        sd = np.sqrt(np.maximum(np.einsum("cd,de,ce->c", flat, patch_cov, flat), 0.0))
        mean = flat @ patch_mean + b
    scale = bn_row_scales(flat, patch_cov, sd)
    return patch_cov, patch_mean, scale, mean


def _dequantized_view(arrays: dict, layers: dict[str, Layer], solution: Solution) -> dict:
    """``arrays`` with every weight quantized so far replaced by its dequantized value (stored layout).

    The dequantized arrays are kept per QuantizedTensor on the solution, so that the same
    quantization gives the same array object (the sequential sampler caches by identity).
    """
    cache = solution.dequantized
    view = dict(arrays)
    by_weight = {layer.weight: layer for layer in layers.values()}
    for name, qt in solution.quantized.items():
        hit = cache.get(name)
        if hit is None or hit[0] is not qt:
            layer = by_weight[name]
            hit = (qt, layer.stored(qt.dequantize()).astype(np.float32))
            cache[name] = hit
        view[name] = hit[1]
    return view


def _euclidean_coefficients(kept: np.ndarray, W: np.ndarray, b: np.ndarray, keep: np.ndarray, drop: np.ndarray,
                            st: BNStats | None, config: CompressConfig) -> np.ndarray:
    V = kept.reshape(len(keep), -1).T
    if W.dtype == np.float32:  # float32 products for a float32 model (see solve_prune_coefficients)
        V = V.astype(np.float32, copy=False)  # a copy only of quantized (float64) values
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
                overrides: Mapping | None = None, inputs: dict[str, LayerInput] | None = None,
                activation_moments: Mapping | None = None) -> UnitPlan:
    unit = up.unit
    prod = layers[unit.producer]
    keep = np.asarray(up.keep, np.int64)
    # The stored weights (float32): float64 rows are taken where they are used, not one copy of all.
    W = prod.out_major(arrays[prod.weight])
    b = arrays[prod.bias].astype(np.float64)
    C = W.shape[0]
    udfc = config.method == "udfc"
    st = stats.get(unit.producer)
    li = (inputs or {}).get(prod.name)
    # BN-matched synthetic activations (udfc_onnx.synthetic) replace the analytic moments where sampled
    act = None
    if udfc and config.regression == "synthetic" and activation_moments is not None:
        if hasattr(activation_moments, "moments"):  # sequential: sampled from the network compressed so far
            if prod.name in activation_moments:
                act = activation_moments.moments(prod.name, _dequantized_view(arrays, layers, solution))
        else:
            act = activation_moments.get(prod.name)
    if act is not None and act.mean.shape[0] != C:
        act = None
    sequential = act is not None and getattr(act, "cross", None) is not None
    moments = _moment_setup(prod, W, b, st, li) if udfc and act is None and (
        config.regression in ("moments", "synthetic") or config.selection != "norm") else None
    # selection None (auto): norm for the sequential synthetic refit, greedy for the other fits
    greedy = config.selection == "greedy" or (config.selection is None and not sequential)

    selection = "norm"
    views = {cs.node: _consumer_view(layers[cs.node], arrays[layers[cs.node].weight], cs, C)[:, cs.offset:cs.offset + C]
             for cs in unit.consumers}
    if udfc and greedy and act is not None and len(keep) < C:
        # the constant of the post-activation regression absorbs the mean: centred covariance.
        # (Choosing K for the sequential refit objective instead, tr(G (S_oo - X_K^T S_KK^-1 X_K)),
        # measured no better: 85.95 / 77.65 vs 86.30 / 78.50 at 40 / 50 %, 256 samples, 4-bit.)
        gram = sum(consumer_gram(v) for v in views.values())
        keep = select_keep_greedy(act.cov, gram, len(keep))
        selection = "greedy"
    elif udfc and greedy and moments is not None and len(keep) < C:
        patch_cov, _, scale, mean = moments
        flat = W.reshape(C, -1).astype(np.float64)
        second = filter_second_moments(flat, flat, patch_cov, scale, scale, mean, mean, mean_weight=config.mean_weight)
        gram = sum(consumer_gram(v) for v in views.values())
        keep = select_keep_greedy(second, gram, len(keep))
        selection = "greedy"
    drop = dropped_channels(C, keep)

    kept_rows = W[keep]  # stored type (float32): the quantizers read it as float64 exactly, without a copy
    kept_filters = kept_rows  # what the regression fits: these rows, or their quantized values
    kept_bias = b[keep]
    next_scale = None
    bits = layer_bits_for(prod.name, config, overrides)
    if bits is not None:
        second = _input_second(prod, config, arrays, layers, solution, activation_moments)
        qt, bias_delta = _quantize_layer(prod, kept_rows, config, bits, li, second)
        if bias_delta is not None:
            kept_bias = kept_bias + bias_delta
        if udfc and config.quant_compensation == "next":
            next_scale = solve_quant_scales(kept_rows, qt.dequantize(), b[keep], alpha=config.alpha2)
        solution.quantized[prod.weight] = qt
        if config.regress_on_quantized:
            kept_filters = qt.dequantize()

    kept_bias_stored = kept_bias.astype(arrays[prod.bias].dtype)

    coef = None
    regression = ""
    if len(drop) and udfc:
        if sequential:
            # every original channel (kept ones too) regressed on the compressed network's kept ones
            coef = solve_moment_coefficients(act.cov[np.ix_(keep, keep)], act.cross[keep], ridge=config.ridge)
            regression = "synthetic-sequential"
        elif act is not None:
            # post-activation regression with a constant; the constant is the mean transfer below
            coef = solve_moment_coefficients(act.cov[np.ix_(keep, keep)], act.cov[np.ix_(keep, drop)],
                                             ridge=config.ridge)
            regression = "synthetic"
        elif config.regression in ("moments", "synthetic") and moments is not None:
            patch_cov, patch_mean, scale, mean = moments
            rows_k = kept_filters.reshape(len(keep), -1).astype(np.float64, copy=False)
            # the kept channels' mean as the (possibly quantized and corrected) layer computes it
            mean_k = mean[keep] + (rows_k - kept_rows.reshape(len(keep), -1)) @ patch_mean + (kept_bias - b[keep])
            rows_p = W[drop].reshape(len(drop), -1).astype(np.float64)
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

    refit = sequential and coef is not None  # nothing pruned: the unit keeps its consumer as is
    transfer = config.use_bias_transfer and len(drop) > 0 and st is not None
    act_mean = None
    if transfer:
        act_mean = act.mean if act is not None else relu_mean(st.beta, st.gamma, unit.activation == "relu")

    for cs in unit.consumers:
        if not len(drop) and next_scale is None:  # nothing removed or rescaled: keep the array (no copy)
            continue
        cons = layers[cs.node]
        w2 = arrays[cons.weight]
        full = _consumer_view(cons, w2, cs, C)
        sub = full[:, cs.offset:cs.offset + C]
        patch = None
        if refit and config.consumer_refit == "patch" and next_scale is None and hasattr(activation_moments, "patch_moments") \
                and cs.offset == 0 and full.shape[1] == C:
            view = _dequantized_view(arrays, layers, solution)
            if prod.weight in solution.quantized:  # the producer as quantized: its kept rows only
                view[prod.bias] = kept_bias_stored
                activation_moments.record(prod.name, keep)
            patch = activation_moments.patch_moments(prod.name, cs.node, view, keep)
        if patch is not None:
            # the whole kept slice refitted to the original output: W2' = W2 S_ok S_kk^-1 over patches
            o = sub.shape[0]
            taps = sub.shape[2]
            coef_patch = solve_moment_coefficients(patch.cov, patch.cross, ridge=config.ridge)
            w_flat = sub.reshape(o, -1).astype(np.float64)
            new_flat = w_flat @ coef_patch.T
            new_sub = new_flat.reshape(o, len(keep), taps)
            delta = w_flat @ patch.target_mean - new_flat @ patch.mean
            _shift_bias(arrays, cons.bias, delta)
            regression = "synthetic-patch"
        elif refit:  # (O, C, B) slice refitted: column i of the kept set reads sum_c W2[:, c] coef[i, c]
            new_sub = np.einsum("ocb,ic->oib", sub.astype(np.float64), coef)
            if next_scale is not None:
                new_sub = new_sub * next_scale[None, :, None]
        elif config.regress_on_quantized or next_scale is None:
            new_sub = apply_compensation(sub, keep, coef, next_scale, dtype=w2.dtype)
        else:  # spec 4 variant (b): coefficients on float filters, whole slice rescaled
            new_sub = apply_compensation(sub, keep, coef) * next_scale[None, :, None]
        # taps that read zero padding on a small map carry no mean (issue 4: ConsumerSlice.taps)
        taps = np.asarray(cs.taps, np.float64) if cs.taps else None
        if refit and patch is None:  # the regression's constant, E[A_orig] - coef^T E[A_kept]: part of the refit
            # (O, C) tap sums, in row blocks: no slice-sized float64 copy
            tap_sums = np.concatenate([(sub[rows] * taps[None, None, :]).sum(axis=2)
                                       for rows in row_blocks(sub.shape[0], sub.shape[1] * sub.shape[2])]) \
                if taps is not None else sub.sum(axis=2)
            delta = tap_sums.astype(np.float64) @ (act.target_mean - coef.T @ act.mean[keep])
            _shift_bias(arrays, cons.bias, delta)
        elif transfer and patch is None:  # the pruned channels' tap sums only
            _shift_bias(arrays, cons.bias, mean_residual_bias(sub, keep, coef, act_mean, taps))
        if cs.offset == 0 and full.shape[1] == C:  # the unit feeds the whole input: nothing to splice
            new_full = new_sub
        else:
            new_full = np.concatenate([full[:, :cs.offset], new_sub, full[:, cs.offset + C:]], axis=1, dtype=w2.dtype)
        arrays[cons.weight] = _from_consumer_view(cons, new_full, w2).astype(w2.dtype, copy=False)
        if inputs is not None and cs.node in inputs:
            inputs[cs.node] = _slice_input(inputs[cs.node], cs, C, keep)

    arrays[prod.weight] = prod.stored(kept_rows).astype(arrays[prod.weight].dtype, copy=False)
    arrays[prod.bias] = kept_bias_stored  # the object the patch moments used: the sampler's cache stays valid
    if hasattr(activation_moments, "record"):
        activation_moments.record(prod.name, keep)
    solution.units.append(UnitRecord(
        unit.producer, tuple(c.node for c in unit.consumers), C, len(keep), config.method,
        coef is not None, transfer or refit, float(np.abs(coef).max()) if coef is not None and coef.size else 0.0,
        regression=regression, selection=selection))
    return UnitPlan(unit, tuple(int(k) for k in keep))


def solve_plan(plan: Plan, arrays: dict[str, np.ndarray], layers: dict[str, Layer], stats: dict[str, BNStats],
               raw_filters: dict[str, np.ndarray], config: CompressConfig, *,
               overrides: Mapping | None = None, layer_inputs: Mapping[str, LayerInput] | None = None,
               activation_moments: Mapping | None = None, consume: bool = False) -> Solution:
    """Apply the plan's compensation and quantization to the arrays.

    Parameters
    ----------
    plan : Plan
        Its units are replaced by the kept sets actually used (greedy selection may change them).
    arrays : dict of str to ndarray
        BN-folded initializers of every Conv/Gemm weight and bias (not modified unless ``consume``).
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
    activation_moments : mapping of str to ActivationMoments, optional
        ``regression="synthetic"``: empirical post-activation moments of each unit's channels by
        producer name (udfc_onnx.synthetic); a unit without them uses ``layer_inputs`` as "moments".
    consume : bool, default=False
        Solve in ``arrays`` itself: an array replaced by its pruned or compensated value is dropped
        as soon as it is replaced, so a caller that holds no other reference to it gets its memory
        back during the solve (ResNet-50: the old weights no longer stack on the new ones). On
        return ``arrays`` holds the current value of every entry.

    Returns
    -------
    Solution
        ``arrays`` holds every changed initializer; ``quantized`` every weight to store as integers.
    """
    # passes replace entries, never write into them: no copy of every weight needed
    work = _RecordingDict(arrays) if consume else dict(arrays)
    if consume:
        arrays.clear()  # the only references left to the old values are in ``work`` (until replaced)
    solution = Solution()
    if config.cross_layer_equalization:
        stats, layer_inputs = _equalize(plan, work, layers, stats, layer_inputs)
    inputs = dict(layer_inputs or {})  # sliced as producers lose channels
    index = ChannelIndex()

    def quantize_one(name: str, into: Solution, done: Callable[[str], bool]) -> None:
        """Quantize layer ``name`` into ``into`` unless ``done(weight)`` (a unit quantized it as a producer)."""
        layer = layers[name]
        bits = layer_bits_for(layer.name, config, overrides)
        if bits is not None and not done(layer.weight):
            w = layer.out_major(work[layer.weight])  # as stored: the quantizers read float32 without a float64 copy
            second = _input_second(layer, config, work, layers, solution, activation_moments)
            qt, bias_delta = _quantize_layer(layer, w, config, bits, inputs.get(layer.name), second)
            into.quantized[layer.weight] = qt
            if bias_delta is not None:
                _shift_bias(work, layer.bias, bias_delta)

    def quantize_rest(names) -> None:
        for name in names:
            quantize_one(name, solution, solution.quantized.__contains__)

    def solve_one(up: UnitPlan, into: Solution) -> UnitPlan:
        return solve_planned_unit(up, work, layers, stats, raw_filters, config, into, index,
                                  overrides=overrides, inputs=inputs, activation_moments=activation_moments)

    workers = worker_threads()
    if activation_moments is None and workers > 1 and len(plan.units) + len(layers) > 1:
        # Units, then the quantization of every layer, each after the earlier units that touch it.
        tasks: list[tuple[frozenset | None, Callable[[Solution], object]]] = [
            (_footprint(up, layers), lambda into, up=up: solve_one(up, into)) for up in plan.units]
        unit_parts: list[Solution] = []

        def quantized_by_a_unit(weight: str) -> bool:
            return any(weight in part.quantized for part in unit_parts)

        costs = [_unit_cost(up, layers, work) for up in plan.units]
        for name, layer in layers.items():
            tasks.append((frozenset({name, layer.weight, layer.bias}),
                          lambda into, name=name: quantize_one(name, into, quantized_by_a_unit)))
            costs.append(float(work[layer.weight].size))
        results = _run_in_order(tasks, solution, workers, unit_parts, len(plan.units), costs)
        plan.units = results[:len(plan.units)]
    else:
        # The sequential sampler fits each unit on the network as it will run: a layer is quantized as
        # soon as no later unit changes it (same result as quantizing it at the end, seen earlier).
        last_touch: dict[str, int] = {}
        if hasattr(activation_moments, "moments"):
            for i, up in enumerate(plan.units):
                for name in (*up.unit.all_producers, *(c.node for c in up.unit.consumers), *(m.node for m in up.unit.members)):
                    last_touch[name] = i
            quantize_rest([name for name in layers if name not in last_touch])
        solved = []
        for i, up in enumerate(plan.units):
            solved.append(solve_one(up, solution))
            if last_touch:
                quantize_rest([name for name, last in last_touch.items() if last == i and name in layers])
        plan.units = solved
        quantize_rest(list(layers))
    if consume:
        solution.arrays = {k: work[k] for k in work.replaced}
        arrays.update(work)
    else:
        solution.arrays = {k: v for k, v in work.items()
                           if v is not arrays[k] and (v.shape != arrays[k].shape or not np.array_equal(v, arrays[k]))}
    return solution


def _unit_cost(up: UnitPlan, layers: Mapping[str, Layer], arrays: Mapping[str, np.ndarray]) -> float:
    """Rough time of a unit's solve, in the units of a weight quantization's (one per entry): the
    entries of its producers' and consumers' weights times its channels (the Gram matrix and the
    compensation grow with both; ResNet-50's layer4 units take 10x layer1's)."""
    unit = up.unit
    names = {*unit.all_producers, *(c.node for c in unit.consumers), *(m.node for m in unit.members)}
    return float(sum(arrays[layers[n].weight].size for n in names if n in layers and layers[n].weight in arrays)
                 * unit.channels)


def _footprint(up: UnitPlan, layers: Mapping[str, Layer]) -> frozenset[str] | None:
    """Names a plain unit's solve reads or writes: its layers (the ``inputs`` and index keys) and
    their weights and biases. None for a group: it may reach further, so it runs alone."""
    unit = up.unit
    if not unit.is_simple:
        return None
    names = {unit.producer, *(c.node for c in unit.consumers)}
    arrays = {a for n in names if n in layers for a in (layers[n].weight, layers[n].bias)}
    return frozenset(names | arrays)


def _run_in_order(tasks: list[tuple[frozenset | None, Callable[[Solution], object]]], solution: Solution,
                  workers: int, first_parts: list[Solution], n_first: int,
                  costs: list[float] | None = None) -> list:
    """Run ``tasks`` on ``workers`` threads, each after every earlier task it shares a name with.

    A task is ``(footprint, fn)``: ``fn(part)`` solves or quantizes into a Solution of its own, and
    ``footprint`` names the layers and arrays it reads or writes (None: it may reach anything, so
    it runs alone, after all earlier tasks and before all later ones). Units of different blocks
    touch different arrays (ResNet-50: the two units of each bottleneck form a chain, the blocks
    are independent), and NumPy's BLAS, LAPACK and copies release the GIL, so two cores solve two
    blocks at once. A task sees exactly the arrays it would see in order, so the result is the same
    bit for bit; the parts are merged into ``solution`` in task order. The parts of the first
    ``n_first`` tasks are also appended to ``first_parts`` as they are made (a later task may look
    at them once the tasks it waits for are done).

    ``costs``: an estimate of each task's time (any unit). Of the tasks ready to run, a free thread
    takes the one with the longest chain of costs still behind it (itself and the tasks that wait
    for it), so that the widest layers' chains do not start last and leave one thread idle at the
    end (ResNet-50: layer4's units, in plan order, did). Without costs: in task order.

    Returns the tasks' results in order; raises the first failure in task order.
    """
    waits: list[list[int]] = []  # indices of the earlier tasks each one waits for
    last_user: dict[str, int] = {}  # name -> the latest task that touches it
    barrier: int | None = None  # the latest task without a footprint
    since_barrier: list[int] = []
    for i, (footprint, _) in enumerate(tasks):
        if footprint is None:
            before = since_barrier + ([barrier] if barrier is not None else [])
            barrier, since_barrier, last_user = i, [], {}
        else:
            before = sorted({last_user[n] for n in footprint if n in last_user}
                            | ({barrier} if barrier is not None else set()))
            since_barrier.append(i)
            last_user.update({n: i for n in footprint})
        waits.append(before)
    n = len(tasks)
    parts = [Solution() for _ in tasks]
    first_parts.extend(parts[:n_first])
    done: list[Future] = [Future() for _ in tasks]
    pending = [len(w) for w in waits]
    dependents: list[list[int]] = [[] for _ in tasks]
    for i, before in enumerate(waits):
        for j in before:
            dependents[j].append(i)
    # Priority: the costs along the longest chain from a task to the end (dependents come later).
    chain = [0.0] * n
    for i in reversed(range(n)):
        chain[i] = (costs[i] if costs else 0.0) + max((chain[k] for k in dependents[i]), default=0.0)
    ready = [(-chain[i], i) for i in range(n) if not waits[i]]
    heapq.heapify(ready)
    unfinished = [n]
    changed = threading.Condition()

    def work() -> None:
        while True:
            with changed:
                while not ready and unfinished[0]:
                    changed.wait()
                if not ready:  # every task has finished
                    return
                i = heapq.heappop(ready)[1]
            # One that waits for a failed task fails with that task's error, unrun.
            failed = next((done[j].exception() for j in waits[i] if done[j].exception() is not None), None)
            try:
                if failed is not None:
                    raise failed
                done[i].set_result(tasks[i][1](parts[i]))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                done[i].set_exception(exc)
            with changed:
                unfinished[0] -= 1
                for k in dependents[i]:
                    pending[k] -= 1
                    if not pending[k]:
                        heapq.heappush(ready, (-chain[k], k))
                changed.notify_all()

    threads = [threading.Thread(target=work, name=f"udfc-solve_{t}", daemon=True) for t in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for thread in threads:  # every task ends (run, or failed with what it waited for) before this returns
        thread.join()
    results = [f.result() for f in done]  # in task order: the first failure is the one raised
    for part in parts:
        solution.quantized.update(part.quantized)
        solution.units.extend(part.units)
    return results


class _RecordingDict(dict):
    """A dict that remembers which existing keys were given a new value (``solve_plan(consume=True)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replaced: set[str] = set()

    def __setitem__(self, key, value):
        if key in self and self[key] is not value:
            self.replaced.add(key)
        elif key not in self:
            self.replaced.add(key)
        super().__setitem__(key, value)


# ---------------------------------------------------------------------------------------------
# Channel groups (issue 4): several consumers at concat offsets, per-channel members (unfolded BN,
# depthwise conv, PRelu...), per-consumer BN ratios, mean-only compensation, several producers.
# Plain units (one producer, Relu or no activation, no members, t < d) still go through _solve_unit.
# ---------------------------------------------------------------------------------------------
class ChannelIndex:
    """Original channel numbers still present along one axis of each array.

    Groups are solved one after another and each removes channels, so a later group that meets
    the same array (a Concat's consumer, a DenseNet pre-activation BN) must translate its
    original offsets into current positions. Positions are counted in entries of the axis
    (columns of a Gemm, channels of a conv or a BN).
    """

    def __init__(self):
        self.alive: dict[tuple[str, int], np.ndarray] = {}

    def positions(self, array: str, axis: int, size: int, start: int, count: int) -> np.ndarray:
        """Current positions of original entries ``start .. start+count-1`` (``size``: current length)."""
        alive = self.alive.get((array, axis))
        if alive is None:
            alive = np.arange(size)
        wanted = np.arange(start, start + count)
        pos = np.searchsorted(alive, wanted)
        if len(wanted) and (pos.max() >= len(alive) or not np.array_equal(alive[pos], wanted)):
            raise SolverError(f"channels {start}..{start + count - 1} of {array} were already removed")
        return pos

    def remove(self, array: str, axis: int, size: int, positions: np.ndarray) -> None:
        """Record that the entries at current ``positions`` were removed."""
        alive = self.alive.get((array, axis))
        if alive is None:
            alive = np.arange(size)
        self.alive[(array, axis)] = np.delete(alive, positions)


def _input_entries(layer: Layer, weight: np.ndarray) -> int:
    """Length of a layer's input axis: input channels of a conv, input columns of a Gemm."""
    om = layer.out_major(weight)
    return int(np.prod(om.shape[1:])) if layer.kind == "gemm" else om.shape[1]


def _consumer_offset(index: ChannelIndex, layer: Layer, weight: np.ndarray, cs: ConsumerSlice,
                     channels: int) -> tuple[int, np.ndarray]:
    """Current channel offset of a consumer slice, and the current columns of its channels."""
    size = _input_entries(layer, weight)
    block = cs.block if layer.kind == "gemm" else 1
    cols = index.positions(layer.weight, 1, size, cs.offset * block, channels * block)
    if cols[0] % block:
        raise SolverError(f"{layer.name}: channel block not aligned")
    return int(cols[0] // block), cols


def _drop_columns(cols: np.ndarray, drop: np.ndarray, block: int) -> np.ndarray:
    return cols.reshape(-1, block)[drop].ravel()


def solve_planned_unit(up: UnitPlan, arrays: dict, layers: dict[str, Layer], stats: dict[str, BNStats],
                       raw_filters: dict[str, np.ndarray], config: CompressConfig, solution: Solution,
                       index: ChannelIndex, *, overrides: Mapping | None = None,
                       inputs: dict | None = None, activation_moments: Mapping | None = None) -> UnitPlan:
    """Solve one planned unit or group, translating its offsets through ``index``.

    Returns the plan as solved: a simple unit's kept channels may change (greedy selection).
    ``inputs`` (layer name -> LayerInput moments) is sliced along with the consumers.
    """
    unit = up.unit
    identifiable = _regression_identifiable(up, arrays, layers)
    if unit.is_simple and identifiable:
        current, touched = [], []
        for cs in unit.consumers:
            layer = layers[cs.node]
            offset, cols = _consumer_offset(index, layer, arrays[layer.weight], cs, unit.channels)
            current.append(replace(cs, offset=offset))
            touched.append((layer, cols, cs.block if layer.kind == "gemm" else 1, arrays[layer.weight]))
        solved = _solve_unit(UnitPlan(replace(unit, consumers=tuple(current)), up.keep), arrays, layers, stats,
                             raw_filters, config, solution, overrides, inputs, activation_moments)
        drop = np.asarray(solved.drop, np.int64)
        for layer, cols, block, before in touched:
            index.remove(layer.weight, 1, _input_entries(layer, before), _drop_columns(cols, drop, block))
        solution.units[-1].kind = unit.kind
        return UnitPlan(unit, solved.keep)
    _solve_group(up, arrays, layers, stats, raw_filters, config, solution, index, identifiable=identifiable,
                 overrides=overrides)
    if inputs is not None:  # group members and consumers lost channels: their input moments no longer fit
        for name in (*(c.node for c in unit.consumers), *(m.node for m in unit.members)):
            inputs.pop(name, None)
    return up


def _regression_identifiable(up: UnitPlan, arrays: dict, layers: dict[str, Layer]) -> bool:
    """Whether the pruning regression has a unique solution: fewer kept filters than filter entries.

    Spec 2.5: the loss is strictly convex only when the kept filters V (d x t) have full column
    rank, which needs t < d. A 1x1 conv or a Gemm whose inputs were pruned by the group before it
    (DenseNet bottlenecks, VGG's classifier) can have t >= d: then every pruned filter is an exact
    combination of the kept ones with arbitrary, typically huge coefficients, which through a ReLU
    measured far worse than plain pruning (builder DenseNet: 1.17 vs 0.78 relative logit error).
    """
    if not up.drop:
        return True
    prod = layers[up.unit.producer]
    w = prod.out_major(arrays[prod.weight])
    return len(up.keep) < int(np.prod(w.shape[1:]))


def _member_positions(index: ChannelIndex, member, array: str, axis: int, value: np.ndarray,
                      channels: int) -> np.ndarray:
    return index.positions(array, axis, value.shape[axis], member.offset * member.block, channels * member.block)


def _member_channels(index: ChannelIndex, member, arrays: dict, array: str, axis: int, channels: int) -> np.ndarray:
    """The member array's values for the group's channels, shape (C, block) flattened per channel."""
    value = arrays[array]
    pos = _member_positions(index, member, array, axis, value, channels)
    return np.take(value, pos, axis=axis)


def _per_channel(values: np.ndarray, axis: int, channels: int) -> np.ndarray:
    """One value per channel: (C * block, ...) entries along ``axis`` averaged over each channel's block."""
    return np.moveaxis(values.astype(np.float64), axis, 0).reshape(channels, -1).mean(axis=1)


def _path_scale(unit: PruneUnit, cs: ConsumerSlice, arrays: dict, index: ChannelIndex) -> np.ndarray | None:
    """Product of the per-channel scales of the affine members on a consumer's path, shape (C,)."""
    if not cs.scale_by:
        return None
    members = {m.node: m for m in unit.members}
    scale = np.ones(unit.channels)
    for name in cs.scale_by:
        m = members[name]
        if m.op == "BatchNormalization":
            gamma, _, _, var = (_per_channel(_member_channels(index, m, arrays, a, ax, unit.channels), ax,
                                             unit.channels) for a, ax in zip(m.arrays, m.axes))
            factor = gamma / np.sqrt(var + m.eps)
        else:
            values = _per_channel(_member_channels(index, m, arrays, m.arrays[0], m.axes[0], unit.channels),
                                  m.axes[0], unit.channels)
            factor = 1.0 / values if m.op == "Div" else values
        scale = scale * factor
    return scale


def _consumer_statistics(unit: PruneUnit, cs: ConsumerSlice, arrays: dict, index: ChannelIndex,
                         stats: dict[str, BNStats]) -> tuple[np.ndarray, np.ndarray] | None:
    """(beta, gamma) of the channel's pre-activation on this consumer's path, group order, or None."""
    if not cs.stats_from:
        return None
    members = {m.node: m for m in unit.members}
    m = members.get(cs.stats_from)
    if m is not None and m.op == "BatchNormalization":
        gamma, beta = (_per_channel(_member_channels(index, m, arrays, a, ax, unit.channels), ax, unit.channels)
                       for a, ax in zip(m.arrays[:2], m.axes[:2]))
        return beta, gamma
    st = stats.get(cs.stats_from)
    # a BN keyed by this layer but still in the graph (a member of some path) was not folded into it
    if st is None or st.bn_node in members or len(st.beta) != unit.channels:
        return None
    return st.beta, st.gamma


def _expected_activation(unit: PruneUnit, cs: ConsumerSlice, moments: tuple[np.ndarray, np.ndarray], arrays: dict,
                         index: ChannelIndex) -> np.ndarray:
    """E[f(P)] per channel of the group for this consumer's activation (a PRelu reads its slopes)."""
    if cs.activation == "prelu":
        prelu = next(m for m in unit.members if m.op == "PRelu" and m.node in cs.path)
        slope = _per_channel(_member_channels(index, prelu, arrays, prelu.arrays[0], prelu.axes[0], unit.channels),
                             prelu.axes[0], unit.channels)
        return activation_mean(moments[0], moments[1], "leakyrelu", (-np.inf, np.inf, slope))
    return activation_mean(moments[0], moments[1], cs.activation, cs.activation_args)


def _slice_members(unit: PruneUnit, keep: np.ndarray, arrays: dict, layers: dict[str, Layer],
                   index: ChannelIndex, drop: np.ndarray) -> None:
    for m in unit.members:
        if m.op == "Reshape":
            shape = arrays[m.arrays[0]].copy()
            if shape[1] != -1:
                shape[1] -= len(drop) * m.block
            arrays[m.arrays[0]] = shape
            continue
        names = list(zip(m.arrays, m.axes))
        layer = layers.get(m.node)
        if m.op == "Conv" and layer is not None and layer.bias in arrays and layer.bias not in m.arrays:
            names.append((layer.bias, 0))  # the zero bias the pipeline made for a bias-free depthwise conv
        for array, axis in names:
            value = arrays[array]
            pos = _member_positions(index, m, array, axis, value, unit.channels)
            pos_block = pos.reshape(unit.channels, m.block)
            gone = pos_block[drop].ravel()
            arrays[array] = np.delete(value, gone, axis=axis)
            index.remove(array, axis, value.shape[axis], gone)


def _solve_group(up: UnitPlan, arrays: dict, layers: dict[str, Layer], stats: dict[str, BNStats],
                 raw_filters: dict[str, np.ndarray], config: CompressConfig, solution: Solution,
                 index: ChannelIndex, *, identifiable: bool = True, overrides: Mapping | None = None) -> None:
    """Solve a channel group: compensate each consumer as its path allows, slice every member.

    One producer: its pruned filters are regressed on the kept ones (spec 2.5) once; consumer k
    gets the coefficients c_ij * d_j / d_i, where d is the product of the per-channel scales of the
    affine members on its path (an unfolded pre-activation BN: spec 5, DenseNet), and the
    mean-residual transfer uses the statistics of the last BN on its path. Several producers
    (a residual stream) get no filter compensation.
    """
    unit = up.unit
    keep = np.asarray(up.keep, np.int64)
    drop = np.asarray(up.drop, np.int64)
    C = unit.channels
    udfc = config.method == "udfc"
    single = len(unit.all_producers) == 1
    members = {m.node for m in unit.members}

    coef = next_scale = None
    for name in unit.all_producers:
        prod = layers[name]
        W = prod.out_major(arrays[prod.weight]).astype(np.float64)
        b = arrays[prod.bias].astype(np.float64)
        kept_filters = W[keep]
        # Several producers sit at different depths; a later group may still slice their inputs,
        # so they are quantized with the remaining layers at the end (nothing here needs Q(W)).
        bits = layer_bits_for(name, config, overrides)
        if bits is not None and single:
            qt = _quantize(kept_filters, config, bits)
            if udfc and config.quant_compensation == "next":
                next_scale = solve_quant_scales(kept_filters, qt.dequantize(), b[keep], alpha=config.alpha2)
            solution.quantized[prod.weight] = qt
            if config.regress_on_quantized:
                kept_filters = qt.dequantize()
        wants_filters = any(c.compensation == "full" for c in unit.consumers)
        if single and len(drop) and wants_filters and udfc and identifiable:
            coef = solve_prune_coefficients(kept_filters.reshape(len(keep), -1).T, W[drop].reshape(len(drop), -1).T,
                                            b[keep], b[drop], alpha=config.alpha1, ridge=config.ridge)
        elif single and len(drop) and wants_filters and config.method == "nm":
            st = stats.get(name)
            raw = raw_filters[name]
            if st is not None and st.bn_node not in members:
                coef = neuron_merging_coefficients(raw, st.gamma, st.beta, st.mean, st.var, keep, ratio=config.nm_ratio)
            else:
                ones = np.ones(C)
                coef = neuron_merging_coefficients(raw, ones, b, np.zeros(C), ones, keep, ratio=config.nm_ratio)
        arrays[prod.weight] = prod.stored(W[keep]).astype(arrays[prod.weight].dtype)
        arrays[prod.bias] = b[keep].astype(arrays[prod.bias].dtype)

    transferred = False
    max_coef = 0.0
    for cs in unit.consumers:
        cons = layers[cs.node]
        w2 = arrays[cons.weight]
        offset, cols = _consumer_offset(index, cons, w2, cs, C)
        full = _consumer_view(cons, w2, cs, C)
        sub = full[:, offset:offset + C]
        consumer_coef = None
        if coef is not None and cs.compensation == "full":
            consumer_coef = coef
            scale = _path_scale(unit, cs, arrays, index)
            if scale is not None:
                # c_ij d_j / d_i; a kept channel that is dead in this consumer's BN cannot carry signal
                live = np.abs(scale[keep]) > 1e-3 * median(np.abs(scale))
                ratio = np.where(live[:, None], scale[drop][None, :] / np.where(live, scale[keep], 1.0)[:, None], 0.0)
                consumer_coef = coef * ratio
            if consumer_coef.size:
                max_coef = max(max_coef, float(np.abs(consumer_coef).max()))
        quant_scale = next_scale if cs.compensation == "full" and not cs.scale_by else None
        new_sub = apply_compensation(sub, keep, consumer_coef, quant_scale)
        if config.use_bias_transfer and len(drop) and cs.compensation in ("full", "mean"):
            moments = _consumer_statistics(unit, cs, arrays, index, stats)
            if moments is not None:
                act_mean = _expected_activation(unit, cs, moments, arrays, index)
                taps = np.asarray(cs.taps, np.float64) if cs.taps else None
                delta = mean_residual_bias(sub, keep, consumer_coef, act_mean, taps)
                _shift_bias(arrays, cons.bias, delta)
                transferred = True
        new_full = np.concatenate([full[:, :offset], new_sub, full[:, offset + C:]], axis=1)
        arrays[cons.weight] = _from_consumer_view(cons, new_full, w2).astype(w2.dtype)
        block = cs.block if cons.kind == "gemm" else 1
        index.remove(cons.weight, 1, _input_entries(cons, w2), _drop_columns(cols, drop, block))

    _slice_members(unit, keep, arrays, layers, index, drop)
    compensation, note = unit.compensation, "; ".join(unit.notes)
    if udfc and not identifiable and unit.compensation in ("full", "mixed"):
        compensation = "mean" if transferred else "none"
        note = (f"{len(keep)} kept filters of {unit.producer} span its whole input space (t >= d): the regression "
                "has no unique solution, so only the pruned channels' mean is compensated")
    solution.units.append(UnitRecord(
        unit.producer, tuple(c.node for c in unit.consumers), C, len(keep), config.method,
        coef is not None and len(drop) > 0, transferred, max_coef, unit.kind, compensation, note))
