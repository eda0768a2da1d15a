"""Uniform per-channel weight quantizer (pure NumPy, no ONNX).

Values are stored as int8 whatever the bit width: a b-bit grid is the int8 range narrowed to
2**b levels, which is what ORT's fused int8 kernels accept (shared/ort-qdq-notes.md).
Dequantization is ``(q - zero_point) * scale`` per output channel, as ONNX DequantizeLinear.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QuantizedTensor", "quantize_per_channel"]


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
        out = self.q.astype(np.float64)  # in place from here: one weight-sized temporary, not three
        out -= self.zero_point.reshape(shape)
        out *= self.scale.astype(np.float64).reshape(shape)
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
    w = np.asarray(weights, np.float64)
    flat = w.reshape(w.shape[0], -1)
    shape = (-1,) + (1,) * (w.ndim - 1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(flat).max(axis=1)
        scale = np.where(amax > 0, amax / qmax, 1.0)
        q = w / scale.reshape(shape)
        np.clip(np.rint(q, out=q), -qmax, qmax, out=q)  # in place: fewer passes over the largest weights
        zp = np.zeros(w.shape[0])
    else:
        levels = 2**bits - 1
        lo = np.minimum(flat.min(axis=1), 0.0)
        hi = np.maximum(flat.max(axis=1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        qmin = -(2 ** (bits - 1))
        zp = np.rint(-lo / scale) + qmin
        q = w / scale.reshape(shape)
        np.rint(q, out=q)
        q += zp.reshape(shape)
        np.clip(q, qmin, qmin + levels, out=q)
    return QuantizedTensor(q.astype(np.int8), scale.astype(np.float32), zp.astype(np.int8), bits)
