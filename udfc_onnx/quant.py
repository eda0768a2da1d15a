"""Uniform per-channel weight quantizer (pure NumPy, no ONNX).

Values are stored as int8 whatever the bit width: a b-bit grid is the int8 range narrowed to
2**b levels, which is what ORT's fused int8 kernels accept (shared/ort-qdq-notes.md).
Dequantization is ``(q - zero_point) * scale`` per output channel, as ONNX DequantizeLinear.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .solve import row_blocks

__all__ = ["QuantizedTensor", "gptq_quantize", "quantize_per_channel"]


@dataclass
class QuantizedTensor:
    """A per-channel quantized weight.

    Attributes
    ----------
    q : ndarray of int8, shape (C, ...)
        Integer values along the channel axis 0 (callers transpose for other axes).
    scale : ndarray of float32, shape (C,)
    zero_point : ndarray of int8, shape (C,)
    bits : int
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int

    def dequantize(self) -> np.ndarray:
        """Float values ``(q - zp) * scale`` with the shape of ``q`` (float64)."""
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        scale = self.scale.astype(np.float64).reshape(shape)
        if not self.zero_point.any():  # symmetric: one pass (the int8 -> float64 cast is exact either way)
            return np.multiply(self.q, scale, dtype=np.float64)
        out = self.q.astype(np.float64)  # in place from here: one weight-sized temporary, not three
        out -= self.zero_point.reshape(shape)
        out *= scale
        return out

    def rescaled(self, factor: np.ndarray) -> "QuantizedTensor":
        """Same integers with each channel's step multiplied by ``factor`` (UDFC's s^q in the scale)."""
        return QuantizedTensor(self.q, (self.scale * factor).astype(np.float32), self.zero_point, self.bits)


def quantize_per_channel(weights: np.ndarray, bits: int, *, symmetric: bool = True) -> QuantizedTensor:
    """Quantize each output channel of ``weights`` (axis 0) to ``bits`` bits with min/max ranges.

    Parameters
    ----------
    weights : ndarray of shape (C, ...)
    bits : int in [2, 8]
    symmetric : bool, default=True
        True: zero point 0, levels in [-(2**(b-1)-1), 2**(b-1)-1] (narrow range, what ORT
        fuses). False: min/max affine grid with 2**b levels (ZeroQ/DoReFa style), the range
        widened to include 0 so that the zero point is an integer.

    Returns
    -------
    QuantizedTensor
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    w = np.asarray(weights)
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float64)
    shape = (-1,) + (1,) * (w.ndim - 1)
    scale, zp, qmin, qmax = _grid(w.reshape(w.shape[0], -1), bits, symmetric)
    q = np.empty(w.shape, np.int8)
    # In blocks of rows: the float64 temporary is a few MB, reused, instead of a fresh array
    # of the layer's size (ResNet-50: 200 MB of page faults). Same values row by row.
    for rows in row_blocks(w.shape[0], w[0].size):
        block = w[rows] / scale[rows].reshape(shape)  # float64 (the scale is), from float32 weights
        if symmetric:
            # |w| <= amax = qmax * scale, so the quotient rounds into [-qmax, qmax]: no zero point
            # to add and nothing to clip; rounded straight into the int8 rows (exact integers)
            np.rint(block, out=q[rows], casting="unsafe")
            continue
        np.rint(block, out=block)  # in place from here: fewer passes
        block += zp[rows].reshape(shape)
        np.clip(block, qmin, qmax, out=block)
        q[rows] = block
    return QuantizedTensor(q, scale.astype(np.float32), zp.astype(np.int8), bits)


def _grid(flat: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per-row ``(scale, zero_point, qmin, qmax)`` of the min/max grid of (C, D) rows, in float64.

    Symmetric: zero point 0, levels in [-(2**(b-1)-1), 2**(b-1)-1]. Asymmetric: 2**b levels over
    [min, max] widened to include 0, so that the zero point is an integer.
    """
    # Extremes of float32 rows are exact in float64: the grid is the same for either input.
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(flat).max(axis=1).astype(np.float64)
        return np.where(amax > 0, amax / qmax, 1.0), np.zeros(flat.shape[0]), -qmax, qmax
    levels = 2**bits - 1
    lo = np.minimum(flat.min(axis=1).astype(np.float64), 0.0)
    hi = np.maximum(flat.max(axis=1).astype(np.float64), 0.0)
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
    qmin = -(2 ** (bits - 1))
    return scale, np.rint(-lo / scale) + qmin, qmin, qmin + levels


def gptq_quantize(weights: np.ndarray, second: np.ndarray, bits: int, *, symmetric: bool = True,
                  damp: float = 0.01) -> QuantizedTensor:
    """Round ``weights`` onto :func:`quantize_per_channel`'s grid minimising the output error [EXT].

    GPTQ (Frantar et al., 2023) with the activation order: the input entries are quantized one
    at a time, largest ``second[d, d]`` first, and the rounding error of each is spread over the
    entries not yet quantized so that ``E[((W - Q) x)^2]`` under ``E[x x^T] = second`` stays
    small, instead of rounding every weight to its nearest level independently. The grid (scale
    and zero point per row) is the min/max grid of nearest rounding, so only the integers change.

    Parameters
    ----------
    weights : ndarray of shape (C, ...)
        Output channels on axis 0; the other axes flatten to the D input entries.
    second : ndarray of shape (D, D)
        Second moment of the layer input (uncentred), in the flattened order of one filter.
    bits : int in [2, 8]
    symmetric : bool, default=True
    damp : float, default=0.01
        Added to the diagonal, relative to its mean (keeps the Cholesky factor defined).

    Returns
    -------
    QuantizedTensor
        Same grid as ``quantize_per_channel(weights, bits, symmetric=symmetric)``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    w0 = np.asarray(weights, np.float64)
    rows = w0.reshape(w0.shape[0], -1)
    d = rows.shape[1]
    h = np.array(second, np.float64, copy=True)
    if h.shape != (d, d):
        raise ValueError(f"second moment of shape {h.shape} for filters of {d} entries")
    scale, zp, qmin, qmax = _grid(rows, bits, symmetric)
    scale = scale.astype(np.float32).astype(np.float64)  # the stored step: rounding matches dequantization
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    diag_mean = float(np.mean(np.diag(h)))
    h[np.diag_indices(d)] += damp * (diag_mean if diag_mean > 0 else 1.0)
    order = np.argsort(-np.diag(h), kind="stable")
    w = rows[:, order]  # the working copy, in activation order
    w[:, dead[order]] = 0.0
    h = h[np.ix_(order, order)]
    # upper Cholesky factor of H^-1: row j holds the update of the entries after j (GPTQ's Hinv)
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return quantize_per_channel(weights, bits, symmetric=symmetric)
    q = np.empty_like(w)
    for j in range(d):
        col = w[:, j]
        level = np.clip(np.rint(col / scale) + zp, qmin, qmax)
        q[:, j] = level
        err = (col - (level - zp) * scale) / hinv[j, j]
        w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
    levels = np.empty_like(q)
    levels[:, order] = q
    return QuantizedTensor(levels.reshape(w0.shape).astype(np.int8), scale.astype(np.float32),
                           zp.astype(np.int8), bits)
