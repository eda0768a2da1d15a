"""Solve a plan: new weight arrays for every pruned unit, then quantize every layer.

This step sees arrays and names only (no ONNX): the pipeline hands it the BN-folded
initializers, a description of each Conv/Gemm, the BN statistics and the plan, and gets back
the arrays to write plus the quantized form of each weight. Order (spec 4, per network):

    for each unit in topological order:
        quantize the producer's kept filters (if quantizing) and find s^q
        solve the pruned->kept coefficients (UDFC / NM / none)
        fold them into the consumer's input slices, add the bias transfer
        slice the producer's output channels
    quantize every remaining weight, after its compensation was multiplied in
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .config import CompressConfig
from .plan import Plan, UnitPlan
from .quant import QuantizedTensor, quantize_per_channel
from .solve import (apply_compensation, mean_residual_bias, neuron_merging_coefficients, relu_mean,
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
    qt = quantize_per_channel(w_out_major, bits, symmetric=config.symmetric)
    if config.quant_compensation == "own" and config.method == "udfc":
        # s^q inside the layer's own dequant step: exact in the pre-activation (spec 3.5).
        qt = qt.rescaled(solve_quant_scales(w_out_major, qt.dequantize(), None, alpha=0.0))
    return qt


def _solve_unit(up: UnitPlan, arrays: dict, layers: dict[str, Layer], stats: dict[str, BNStats],
                raw_filters: dict[str, np.ndarray], config: CompressConfig, solution: Solution,
                overrides: Mapping | None = None) -> None:
    unit = up.unit
    prod = layers[unit.producer]
    keep = np.asarray(up.keep, np.int64)
    drop = np.asarray(up.drop, np.int64)
    W = prod.out_major(arrays[prod.weight]).astype(np.float64)
    b = arrays[prod.bias].astype(np.float64)
    C = W.shape[0]
    udfc = config.method == "udfc"

    kept_filters = W[keep]
    next_scale = None
    bits = layer_bits_for(prod.name, config, overrides)
    if bits is not None:
        qt = _quantize(kept_filters, config, bits)
        if udfc and config.quant_compensation == "next":
            next_scale = solve_quant_scales(kept_filters, qt.dequantize(), b[keep], alpha=config.alpha2)
        solution.quantized[prod.weight] = qt
        if config.regress_on_quantized:
            kept_filters = qt.dequantize()

    coef = None
    if len(drop) and config.method == "udfc":
        coef = solve_prune_coefficients(kept_filters.reshape(len(keep), -1).T, W[drop].reshape(len(drop), -1).T,
                                        b[keep], b[drop], alpha=config.alpha1, ridge=config.ridge)
    elif len(drop) and config.method == "nm":
        st = stats.get(unit.producer)
        raw = raw_filters[unit.producer]
        if st is not None:
            coef = neuron_merging_coefficients(raw, st.gamma, st.beta, st.mean, st.var, keep, ratio=config.nm_ratio)
        else:  # no BN: identity statistics, bias as beta
            ones = np.ones(C)
            coef = neuron_merging_coefficients(raw, ones, b, np.zeros(C), ones, keep, ratio=config.nm_ratio)

    st = stats.get(unit.producer)
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

    arrays[prod.weight] = prod.stored(W[keep]).astype(arrays[prod.weight].dtype)
    arrays[prod.bias] = b[keep].astype(arrays[prod.bias].dtype)
    solution.units.append(UnitRecord(
        unit.producer, tuple(c.node for c in unit.consumers), C, len(keep), config.method,
        coef is not None, transfer, float(np.abs(coef).max()) if coef is not None and coef.size else 0.0))


def solve_plan(plan: Plan, arrays: dict[str, np.ndarray], layers: dict[str, Layer], stats: dict[str, BNStats],
               raw_filters: dict[str, np.ndarray], config: CompressConfig, *,
               overrides: Mapping | None = None) -> Solution:
    """Apply the plan's compensation and quantization to the arrays.

    Parameters
    ----------
    plan : Plan
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

    Returns
    -------
    Solution
        ``arrays`` holds every changed initializer; ``quantized`` every weight to store as integers.
    """
    work = dict(arrays)  # passes replace entries, never write into them: no copy of every weight needed
    solution = Solution()
    for up in plan.units:
        _solve_unit(up, work, layers, stats, raw_filters, config, solution, overrides)
    for layer in layers.values():
        bits = layer_bits_for(layer.name, config, overrides)
        if bits is not None and layer.weight not in solution.quantized:
            solution.quantized[layer.weight] = _quantize(layer.out_major(work[layer.weight]).astype(np.float64), config, bits)
    solution.arrays = {k: v for k, v in work.items()
                       if v is not arrays[k] and (v.shape != arrays[k].shape or not np.array_equal(v, arrays[k]))}
    return solution
