"""Moments of the input patches a convolution reads (pure NumPy, no ONNX).

The synthetic fit (udfc_onnx.synthetic) feeds these to the solver: the second moment of a layer's
input patches for GPTQ rounding (udfc_onnx.quant.gptq_quantize), and the joint moments of the
patches a consumer reads in the compressed and in the original network for its patch refit
(udfc_onnx.compensate). Every vector is in the order of a flattened filter ``w[c, i, j]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConvGeometry", "PatchMoments", "conv_patches", "filter_order", "output_positions", "patch_moments", "row_second_moment", "MAX_ROWS"]

# Rows (samples x output positions) a moment is estimated from: 256 CIFAR images at 32x32 give
# 262 144; evenly spaced whole samples are used above this (the 8x8 stage of a ResNet-56 keeps all).
MAX_ROWS = 65536


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's window: ``kernel``, ``strides``, ``dilations`` (h, w); ``pads`` (top, left, bottom, right)."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)


@dataclass
class PatchMoments:
    """Moments of a consumer's input patches, compressed vs original network.

    Attributes
    ----------
    mean : ndarray of shape (Dk,)
        Mean patch of the compressed network (Dk = its channels x taps).
    cov : ndarray of shape (Dk, Dk)
    target_mean : ndarray of shape (Do,) or None
        Mean patch of the original network (Do = its channels x taps).
    cross : ndarray of shape (Dk, Do) or None
        ``E[(p_k - mean)(p_o - target_mean)^T]``.
    rows : int
        Patches the moments were estimated from.
    """

    mean: np.ndarray
    cov: np.ndarray
    target_mean: np.ndarray | None
    cross: np.ndarray | None
    rows: int

    @property
    def second(self) -> np.ndarray:
        """Uncentred ``E[p_k p_k^T]``."""
        return self.cov + np.outer(self.mean, self.mean)


def conv_patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The input patches a 2-D convolution multiplies with its filters (im2col), tap-major.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    geometry : ConvGeometry

    Returns
    -------
    ndarray of shape (N * Ho * Wo, kh * kw * C)
        One row per output position, entries ordered ``(i, j, c)`` (tap-major: every copy moves
        whole channel vectors); :func:`filter_order` maps them to a filter's ``(c, i, j)``.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), pads, (dh, dw) = geometry.kernel, geometry.strides, geometry.pads, geometry.dilations
    nhwc = np.pad(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    ho, wo = _output_size(h, w, geometry)
    cols = np.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = nhwc[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw, :]
    return cols.reshape(n * ho * wo, kh * kw * c)


def filter_order(channels: int, taps: int) -> np.ndarray:
    """Index into a tap-major vector of each entry of a flattened filter (``c * taps + t`` -> ``t * channels + c``)."""
    return np.arange(taps * channels).reshape(taps, channels).T.ravel()


def _sample_subset(n: int, rows_per_sample: int, max_rows: int | None) -> np.ndarray | None:
    if max_rows is None or n * rows_per_sample <= max_rows:
        return None
    keep = max(1, max_rows // max(rows_per_sample, 1))
    return np.unique(np.linspace(0, n - 1, keep).round().astype(np.int64))


def _output_size(height: int, width: int, geometry: ConvGeometry) -> tuple[int, int]:
    """Output height and width of the convolution on a ``height`` x ``width`` input."""
    (kh, kw), (sh, sw), pads, (dh, dw) = geometry.kernel, geometry.strides, geometry.pads, geometry.dilations
    return ((height + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1,
            (width + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1)


def output_positions(height: int, width: int, geometry: ConvGeometry) -> int:
    """Output positions of the convolution on a ``height`` x ``width`` input: the patches per sample."""
    ho, wo = _output_size(height, width, geometry)
    return max(ho, 0) * max(wo, 0)


def patch_moments(x: np.ndarray, geometry: ConvGeometry | None = None, target: np.ndarray | None = None,
                  max_rows: int | None = MAX_ROWS) -> PatchMoments:
    """Mean and covariance of the patches of ``x``, and their cross-covariance with those of ``target``.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W), or (N, C) for a Gemm's rows (``geometry`` None)
    geometry : ConvGeometry or None
    target : ndarray of shape (N, Co, H, W) or (N, Co), optional
        The same samples in another network (the original): adds ``target_mean`` and ``cross``.
    max_rows : int or None, default=MAX_ROWS
        Above this many rows, evenly spaced whole samples only.

    Returns
    -------
    PatchMoments
        In filter order, float64.
    """
    if geometry is None:
        rows_per_sample = 1
    else:
        rows_per_sample = output_positions(x.shape[2], x.shape[3], geometry)
    subset = _sample_subset(len(x), rows_per_sample, max_rows)
    if subset is not None:
        x = x[subset]
        target = target[subset] if target is not None else None

    def rows(a):
        if geometry is None:
            return np.array(a.reshape(len(a), -1), np.float32), None
        taps = geometry.kernel[0] * geometry.kernel[1]
        return conv_patches(a.astype(np.float32, copy=False), geometry), filter_order(a.shape[1], taps)

    pk, order_k = rows(x)
    n = len(pk)
    mean_k = pk.mean(axis=0, dtype=np.float64)
    pk -= mean_k.astype(np.float32)
    cov = (pk.T @ pk).astype(np.float64) / n
    mean_o = cross = None
    if target is not None:
        po, order_o = rows(target)
        mean_o = po.mean(axis=0, dtype=np.float64)
        po -= mean_o.astype(np.float32)
        cross = (pk.T @ po).astype(np.float64) / n
        del po
        if order_o is not None:
            mean_o, cross = mean_o[order_o], cross[:, order_o]
    if order_k is not None:
        mean_k, cov = mean_k[order_k], cov[np.ix_(order_k, order_k)]
        cross = cross[order_k] if cross is not None else None
    return PatchMoments(mean_k, cov, mean_o, cross, n)


def row_second_moment(x: np.ndarray, geometry: ConvGeometry | None = None, max_rows: int | None = MAX_ROWS) -> np.ndarray:
    """Uncentred ``E[p p^T]`` of the patches of ``x`` (:func:`patch_moments` without a target)."""
    return patch_moments(x, geometry, max_rows=max_rows).second
