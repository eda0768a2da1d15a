"""Data-free activation ranges from BatchNorm statistics (pure NumPy, no ONNX).

Without data, each activation tensor is described per channel by a Gaussian (DFQ, Nagel et al.
2019; SQuant): after a Conv with a folded BN, channel c of the pre-activation is ~ N(beta_c,
gamma_c^2), because BN normalised it to exactly that on the training data. Other tensors get
their moments propagated through the graph:

    ReLU      rectified Gaussian, range [0, max_c(mu_c + n sigma_c)]
    Add       means add, variances add (inputs treated as independent)
    AvgPool   mean kept, variance times ``pool_variance`` (spatial averaging of correlated
              values removes less than 1/k of the variance; 1.0 is the no-reduction bound)
    Conv/Gemm without a BN: mean W*mu + b, variance sum W^2 sigma^2 (independent inputs)
    input     mean and scale read back from the BN after the first Conv (int8.py), bounded at
              mean +- 3 scale (images are bounded); without such a BN, N(0, 1) within +-3, the
              usual standard normalisation of an image input

A tensor's uint8 range is [lo, hi] = [min_c(mu_c - n sigma_c), max_c(mu_c + n sigma_c)], clipped
to [0, .] after a ReLU and to the Clip bounds after a Clip, and widened to include 0 so that
zero is exactly representable (needed for zero padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .solve import row_blocks

__all__ = ["Dist", "uint8_params", "rectified_moments", "INPUT_DIST"]

# Correlation assumed between the two inputs of an Add (a residual branch is computed from the
# shortcut it is added to, so they are not independent); measured, see README.
ADD_CORRELATION = 0.5
# Bound of a normalised image input: (0 - mean)/std and (1 - mean)/std of the usual ImageNet and
# CIFAR statistics lie within [-2.5, 2.8], so +-3 loses nothing and keeps the input grid fine.
INPUT_BOUND = 3.0
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_erf = np.vectorize(math.erf, otypes=[np.float64])  # scipy is not a runtime dependency


def rectified_moments(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ReLU(X) for X ~ N(mu, sigma^2), elementwise.

    Parameters
    ----------
    mu, sigma : ndarray of shape (C,)

    Returns
    -------
    mean, var : ndarray of shape (C,)
        ``E = sigma phi(z) + mu Phi(z)``, ``E2 = (mu^2 + sigma^2) Phi(z) + mu sigma phi(z)``,
        ``z = mu / sigma``; a zero sigma gives the point mass ReLU(mu).
    """
    mu = np.asarray(mu, np.float64)
    sigma = np.abs(np.asarray(sigma, np.float64))
    live = sigma > 1e-12
    safe = np.where(live, sigma, 1.0)
    z = mu / safe
    phi = np.exp(-0.5 * z**2) / _SQRT2PI
    cdf = 0.5 * (1.0 + _erf(z / _SQRT2))
    mean = safe * phi + mu * cdf
    second = (mu**2 + safe**2) * cdf + mu * safe * phi
    var = np.maximum(second - mean**2, 0.0)
    point = np.maximum(mu, 0.0)
    return np.where(live, mean, point), np.where(live, var, 0.0)


@dataclass(frozen=True)
class Dist:
    """Per-channel Gaussian description of one activation tensor.

    Channel c is ``f(N(mu_c, sigma_c^2))`` with f = ReLU when ``relu`` else the identity, and
    is known to lie in ``[floor, cap]``.

    Attributes
    ----------
    mu, sigma : ndarray of shape (C,)
    relu : bool
    floor, cap : float
        Hard bounds (-inf/inf when none): 0 after pooling a non-negative tensor, the Clip bounds.
    source : str
        Where the numbers come from: "bn", "input", "propagated".
    """

    mu: np.ndarray
    sigma: np.ndarray
    relu: bool = False
    floor: float = -math.inf
    cap: float = math.inf
    source: str = "bn"

    @property
    def channels(self) -> int:
        return int(self.mu.shape[0])

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance per channel, shape (C,) each."""
        if self.relu:
            return rectified_moments(self.mu, self.sigma)
        return np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64) ** 2

    def range(self, sigmas: float) -> tuple[float, float]:
        """[lo, hi] covering ``sigmas`` standard deviations of every channel, with 0 inside."""
        hi = float(np.max(self.mu + sigmas * np.abs(self.sigma))) if self.channels else 0.0
        lo = 0.0 if self.relu else (float(np.min(self.mu - sigmas * np.abs(self.sigma))) if self.channels else 0.0)
        lo, hi = max(lo, self.floor), min(hi, self.cap)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi - lo < 1e-8:  # a dead tensor: any positive scale will do
            hi = lo + 1e-8
        return lo, hi

    def with_relu(self) -> "Dist":
        return replace(self, relu=True, floor=max(self.floor, 0.0))

    def clipped(self, lo: float, hi: float) -> "Dist":
        """Clip(lo, hi); Clip(0, m) is a ReLU capped at m (ReLU6)."""
        out = self.with_relu() if lo == 0.0 else self
        return replace(out, floor=max(out.floor, lo), cap=min(out.cap, hi))

    def pooled(self, variance_factor: float) -> "Dist":
        """Average over a window: mean kept, variance multiplied by ``variance_factor``."""
        mean, var = self.moments()
        nonneg = self.relu or self.floor >= 0
        return Dist(mean, np.sqrt(var * variance_factor), False, 0.0 if nonneg else self.floor, self.cap, "propagated")

    def added(self, other: "Dist") -> "Dist":
        """Sum of two independent tensors (channels broadcast when one side has one)."""
        m1, v1 = self.moments()
        m2, v2 = other.moments()
        if m1.shape != m2.shape:
            # Channel counts differ (e.g. a zero-padded shortcut): the side with fewer channels
            # is summarised by its mixture moments and broadcast.
            if m1.size < m2.size:
                m1, v1 = _mixture(m1, v1)
            else:
                m2, v2 = _mixture(m2, v2)
        floor = self.floor + other.floor
        var = v1 + v2 + 2 * ADD_CORRELATION * np.sqrt(v1 * v2)
        return Dist(m1 + m2, np.sqrt(var), False, floor, self.cap + other.cap, "propagated")

    def repeated(self, block: int) -> "Dist":
        """Each channel repeated ``block`` times (a channel-major Flatten of C x block)."""
        return replace(self, mu=np.repeat(self.mu, block), sigma=np.repeat(self.sigma, block))

    @staticmethod
    def concatenated(parts: list["Dist"]) -> "Dist":
        """Channel concatenation; ReLU flags must agree, else moments are used."""
        if all(p.relu == parts[0].relu for p in parts):
            return Dist(np.concatenate([p.mu for p in parts]), np.concatenate([p.sigma for p in parts]),
                        parts[0].relu, min(p.floor for p in parts), max(p.cap for p in parts), "propagated")
        moments = [p.moments() for p in parts]
        return Dist(np.concatenate([m for m, _ in moments]), np.sqrt(np.concatenate([v for _, v in moments])),
                    False, min(p.floor for p in parts), max(p.cap for p in parts), "propagated")

    @staticmethod
    def linear(weight: np.ndarray, bias: np.ndarray | None, inputs: "Dist", groups: int = 1) -> "Dist":
        """Output of a Conv/Gemm without BN statistics, inputs treated as independent.

        Parameters
        ----------
        weight : ndarray of shape (O, I/groups, ...)
            Output-channel-major weight.
        bias : ndarray of shape (O,), optional
        inputs : Dist with I channels (or I * block for a Gemm after a Flatten)
        groups : int
        """
        mean, var = inputs.moments()
        o = weight.shape[0]
        per_group_in, per_group_out = weight.shape[1], o // groups
        if mean.size != per_group_in * groups:
            raise ValueError(f"weight expects {per_group_in * groups} input channels, tensor has {mean.size}")
        # (O, I/groups * taps), input channel major: one GEMV per moment on float64 blocks of rows,
        # squared in place (a float64 copy of ResNet-50's 2048x1000 Gemm weight and a sum over its
        # trailing axis of length 1 took 0.04 s, most of it page faults)
        flat = weight.reshape(o, -1)
        taps = flat.shape[1] // max(per_group_in, 1)
        out_mean = np.empty(o)
        out_var = np.empty(o)
        for g in range(groups):
            cols = slice(g * per_group_in, (g + 1) * per_group_in)
            mean_taps, var_taps = np.repeat(mean[cols], taps), np.repeat(var[cols], taps)
            for block in row_blocks(per_group_out, flat.shape[1]):
                rows = slice(g * per_group_out + block.start, g * per_group_out + block.stop)
                part = flat[rows].astype(np.float64)
                out_mean[rows] = part @ mean_taps
                np.square(part, out=part)
                out_var[rows] = part @ var_taps
        if bias is not None:
            out_mean = out_mean + bias
        return Dist(out_mean, np.sqrt(out_var), False, source="propagated")


def _mixture(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of a value drawn from a random channel, shape (1,) each."""
    m = float(np.mean(mean)) if mean.size else 0.0
    v = float(np.mean(var + (mean - m) ** 2)) if mean.size else 0.0
    return np.array([m]), np.array([v])


def INPUT_DIST(channels: int) -> Dist:  # noqa: N802 (a constructor for the standard input assumption)
    """N(0, 1) per channel, within +-INPUT_BOUND: a model input after the usual mean/std normalisation."""
    return Dist(np.zeros(channels), np.ones(channels), floor=-INPUT_BOUND, cap=INPUT_BOUND, source="input")


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of the uint8 grid covering [lo, hi] (lo <= 0 <= hi).

    ``lo == 0`` gives zero point 0 (the grid of a ReLU output, which makes the ReLU redundant).

    Returns
    -------
    scale : float
    zero_point : int in [0, 255]
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if scale <= 0 or not math.isfinite(scale):
        scale = 1e-8 / 255.0
    zero_point = int(min(255, max(0, round(-lo / scale))))
    return float(scale), zero_point
