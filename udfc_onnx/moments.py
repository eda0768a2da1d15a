"""Data-free first and second moments of activations (pure NumPy, no ONNX).

The only statistics a data-free compressor has are the BatchNorm parameters: after a folded
Conv-BN the pre-activation of channel c has mean ``beta_c`` and standard deviation ``|gamma_c|``.
This module turns them, plus the weights, into the moments the solver needs:

* Rectified Gaussian moments. For ``P ~ N(mu, Sigma)`` and ``A = ReLU(P)``, ``E[A]`` and the full
  ``E[A A^T]`` have closed forms (the off-diagonal through the bivariate normal CDF):

      E[A_i]      = s_i phi(a_i) + mu_i Phi(a_i),                      a_i = mu_i / s_i
      E[A_i A_j]  = s_i s_j [ (a_i a_j + rho) Phi2 + a_i phi(a_j) Phi(u_i) + a_j phi(a_i) Phi(u_j)
                              + sqrt(1 - rho^2) phi(q) / sqrt(2 pi) ]                     (i != j)

  with ``u_i = (a_i - rho a_j)/sqrt(1-rho^2)``, ``q^2 = (a_i^2 - 2 rho a_i a_j + a_j^2)/(1-rho^2)``
  and ``Phi2 = Phi2(a_i, a_j; rho)`` (Rosenbaum 1961; checked against Monte Carlo in the tests).
* Patch covariance of a k x k conv input, separable: ``Cov(x_c(p+t), x_d(p+u)) = K_cd R(t, u)``
  with the channel covariance K at one position and ``R(t, u) = r^(|dy| + |dx|)``.
* The conv output covariance ``sum_{t,u} W_t K W_u^T R(t, u)``; r is fitted per layer so that the
  predicted output variances match the BN running variances best (a data-free calibration).
* BN-consistent second moments of pre-activations: the model supplies only correlations, the BN
  supplies means and variances: ``E[P P^T] = D R D + beta beta^T`` with ``D = diag(|gamma|)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .resources import elementwise_in_threads

__all__ = [
    "LayerInput",
    "normal_pdf",
    "normal_cdf",
    "bivariate_normal_cdf",
    "relu_mean_var",
    "relu_moments",
    "relu_diagonal",
    "correlation",
    "spatial_correlation",
    "patch_covariance",
    "conv_output_covariance",
    "conv_output_variance",
    "fit_spatial_correlation",
    "tap_fractions",
]

_SQRT2PI = math.sqrt(2 * math.pi)


@dataclass(frozen=True)
class LayerInput:
    """Data-free moments of the input of one Conv or Gemm (estimated by ``udfc_onnx.moment_graph``).

    Attributes
    ----------
    mean : ndarray of shape (C,)
        Mean of each input channel (Conv) or input feature (Gemm).
    cov : ndarray of shape (C, C) or None
        Covariance of the input channels at one position (features for a Gemm); None when not tracked.
    spatial_r : float
        Correlation of neighbouring input positions (fitted to the layer's BN when it has one).
    tap_fraction : ndarray of shape (kh*kw,)
        Share of output positions where each tap reads real input rather than padding (1 for a Gemm).
    """

    mean: np.ndarray
    cov: np.ndarray | None
    spatial_r: float
    tap_fraction: np.ndarray


# Gauss-Legendre rules of the Phi2 quadrature by |rho| (upper bound, nodes, weights): Genz's 6, 12
# and 20 points below 0.3, 0.75 and 0.925 (Genz 2004, after Drezner and Wesolowsky 1990) are at
# double precision there (within 3e-16 of a 200-point rule on |a|, |b| <= 8, as the 48 points
# were), at 1/8 to 1/2 of the cost; nearer +-1 the integrand is peaked and 48 points are kept.
_GL_RULES = [(bound, *np.polynomial.legendre.leggauss(n)) for bound, n in ((0.3, 6), (0.75, 12), (0.925, 20),
                                                                           (math.inf, 48))]
_RHO_MAX = 1 - 1e-9


def normal_pdf(x: np.ndarray) -> np.ndarray:
    """Standard normal density."""
    x = np.asarray(x, np.float64)
    return np.exp(-0.5 * x * x) / _SQRT2PI


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (math.erf elementwise; scipy is not a dependency).

    ``map`` over a list: the same values as ``np.frompyfunc``, in 2/3 of its time (no object array).
    """
    x = np.asarray(x, np.float64)
    scaled = x / math.sqrt(2)
    erf = np.fromiter(map(math.erf, scaled.ravel().tolist()), np.float64, scaled.size).reshape(scaled.shape)
    return 0.5 * (1.0 + erf)


def bivariate_normal_cdf(a: np.ndarray, b: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``P(U < a, V < b)`` for standard normals U, V with correlation rho (broadcast).

    Uses ``Phi2 = Phi(a) Phi(b) + 1/(2 pi) int_0^{asin rho} exp(-(a^2 + b^2 - 2ab sin t)/(2 cos^2 t)) dt``
    with Gauss-Legendre quadrature of 6 to 48 points by |rho| (absolute error below 1e-15 for
    |rho| < 0.925, below 1e-7 for |rho| <= 0.99).
    """
    a, b, rho = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                    np.clip(np.asarray(rho, np.float64), -_RHO_MAX, _RHO_MAX))
    return normal_cdf(a) * normal_cdf(b) + _phi2_integral(a, b, rho)


def _phi2_integral(a: np.ndarray, b: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``Phi2(a, b; rho) - Phi(a) Phi(b)`` (the quadrature of :func:`bivariate_normal_cdf`), same shapes."""
    size = np.abs(rho)
    out = np.empty(np.shape(rho))
    lower = 0.0
    for bound, nodes, weights in _GL_RULES:
        pick = (size >= lower) & (size < bound)
        lower = bound
        if pick.all():
            return _phi2_quadrature(a, b, rho, nodes, weights)
        if pick.any():
            out[pick] = _phi2_quadrature(a[pick], b[pick], rho[pick], nodes, weights)
    return out


def _phi2_quadrature(a: np.ndarray, b: np.ndarray, rho: np.ndarray, nodes: np.ndarray,
                     weights: np.ndarray) -> np.ndarray:
    top = np.arcsin(rho)
    squares, cross = a * a + b * b, 2 * a * b
    # One quadrature node at a time: a (..., n) array per temporary cost 25 MB per 256x256
    # covariance and most of the time of relu_moments.
    integral = np.zeros(top.shape)
    for node, weight in zip(nodes, weights):
        sin = np.sin(top * (0.5 * (node + 1)))  # cos^2 as 1 - sin^2: np.cos would cost as much again
        integral += (0.5 * weight) * np.exp(-(squares - cross * sin) / (2 * (1 - sin * sin)))
    return integral * top / (2 * math.pi)


def relu_mean_var(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``ReLU(P)`` for independent ``P_c ~ N(mean_c, var_c)``.

    Returns
    -------
    mean, var : ndarray of shape (C,)
        A channel with zero variance is the constant ``max(mean, 0)``.
    """
    mean = np.asarray(mean, np.float64)
    var = np.maximum(np.asarray(var, np.float64), 0.0)
    sd = np.sqrt(var)
    live = sd > 1e-12
    a = mean / np.where(live, sd, 1.0)
    cdf, pdf = normal_cdf(a), normal_pdf(a)
    m = np.where(live, sd * pdf + mean * cdf, np.maximum(mean, 0.0))
    second = np.where(live, (mean**2 + var) * cdf + mean * sd * pdf, np.maximum(mean, 0.0) ** 2)
    return m, np.maximum(second - m * m, 0.0)


def _relu_marginals(mean: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input sd, output mean, output variance) of each channel of ``ReLU(P)``, as relu_moments takes them."""
    sd = np.sqrt(np.maximum(variances, 0.0))
    m, var = relu_mean_var(mean, sd**2)
    return sd, m, var


def relu_diagonal(mean: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`relu_moments`' mean and the diagonal of its covariance, from the input variances alone.

    The same values, bit for bit, without the O(C^2) pairwise terms: for a tensor whose
    correlations nothing reads (udfc_onnx.moment_graph).

    Returns
    -------
    mean, var : ndarray of shape (C,)
    """
    _, m, var = _relu_marginals(np.asarray(mean, np.float64), np.asarray(variances, np.float64))
    return m, var


def relu_moments(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``A = ReLU(P)`` for ``P ~ N(mean, cov)`` (module docstring).

    Parameters
    ----------
    mean : ndarray of shape (C,)
    cov : ndarray of shape (C, C)
        Symmetric positive semi-definite.

    Returns
    -------
    mean : ndarray of shape (C,)
    cov : ndarray of shape (C, C)
    """
    mean = np.asarray(mean, np.float64)
    cov = np.asarray(cov, np.float64)
    sd, m, var = _relu_marginals(mean, np.diag(cov))
    live = sd > 1e-12
    s = np.where(live, sd, 1.0)
    a = mean / s
    rho = np.clip(cov / np.outer(s, s), -_RHO_MAX, _RHO_MAX)
    rho = 0.5 * (rho + rho.T)  # exactly symmetric, so the (j, i) terms are transposes of the (i, j) ones
    ai, aj = a[:, None], a[None, :]
    root = np.sqrt(1 - rho * rho)
    cdf_u_i = normal_cdf((ai - rho * aj) / root)  # Phi(u_j) is its transpose
    q = np.sqrt(np.maximum(ai * ai - 2 * rho * ai * aj + aj * aj, 0.0)) / root
    # Phi2 is symmetric in (i, j): the quadrature (the cost) runs on the upper triangle only, in
    # slices on two threads (elementwise: the same values).
    upper = np.triu_indices(len(a))
    integral = np.empty_like(rho)
    integral[upper] = elementwise_in_threads(_phi2_integral, a[upper[0]], a[upper[1]], rho[upper])
    integral.T[upper] = integral[upper]
    cdf_a = normal_cdf(a)
    phi2 = np.outer(cdf_a, cdf_a) + integral
    second = np.outer(s, s) * ((ai * aj + rho) * phi2 + ai * normal_pdf(aj) * cdf_u_i
                               + aj * normal_pdf(ai) * cdf_u_i.T + root * normal_pdf(q) / _SQRT2PI)
    out = second - np.outer(m, m)
    # A constant channel (dead or zero-variance) is uncorrelated with everything.
    both = np.outer(live, live)
    out = np.where(both, out, 0.0)
    np.fill_diagonal(out, var)
    return m, 0.5 * (out + out.T)


def correlation(cov: np.ndarray) -> np.ndarray:
    """Correlation matrix of a covariance; zero-variance rows get zero correlation (and 1 on the diagonal)."""
    cov = np.asarray(cov, np.float64)
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    live = sd > 1e-12 * max(float(sd.max(initial=0.0)), 1e-300)
    s = np.where(live, sd, 1.0)
    out = np.where(np.outer(live, live), cov / np.outer(s, s), 0.0)
    np.fill_diagonal(out, 1.0)
    return np.clip(out, -1.0, 1.0)


def spatial_correlation(r: float, kernel: tuple[int, int]) -> np.ndarray:
    """``R[t, u] = r^(|dy| + |dx|)`` between the taps t, u of a kh x kw kernel (row-major taps).

    Returns
    -------
    ndarray of shape (kh*kw, kh*kw)
    """
    kh, kw = kernel
    ys, xs = np.divmod(np.arange(kh * kw), kw)
    dist = np.abs(ys[:, None] - ys[None, :]) + np.abs(xs[:, None] - xs[None, :])
    return np.power(float(r), dist, dtype=np.float64) if r > 0 else (dist == 0).astype(np.float64)


def patch_covariance(channel_cov: np.ndarray, r: float, kernel: tuple[int, int]) -> np.ndarray:
    """Covariance of a flattened (C, kh, kw) input patch: ``kron(K, R)``.

    Returns
    -------
    ndarray of shape (C*kh*kw, C*kh*kw)
        Ordered like ``weight[o].reshape(-1)`` of a Conv weight (C, kh, kw).
    """
    return np.kron(np.asarray(channel_cov, np.float64), spatial_correlation(r, kernel))


def _tap_view(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight, np.float64)
    return w.reshape(w.shape[0], w.shape[1], -1).transpose(2, 0, 1)  # (T, O, C)


def conv_output_covariance(weight: np.ndarray, channel_cov: np.ndarray, r: float) -> np.ndarray:
    """Covariance of a conv's output channels at one position (before its bias).

    Parameters
    ----------
    weight : ndarray of shape (O, C, kh, kw)
    channel_cov : ndarray of shape (C, C)
        Input channel covariance at one position.
    r : float
        Spatial correlation of neighbouring input positions.

    Returns
    -------
    ndarray of shape (O, O)
    """
    taps = _tap_view(weight)
    t, o, c = taps.shape
    R = spatial_correlation(r, tuple(np.shape(weight)[2:]))
    left = taps @ np.asarray(channel_cov, np.float64)  # (T, O, C)
    mixed = (R @ taps.reshape(t, o * c)).reshape(t, o, c)  # sum_u R[t,u] W_u
    # sum over taps and channels as one GEMM (O, T*C) @ (T*C, O): einsum's loop took 18 of the
    # 120 ms of ResNet-50's input moments (a 7x7 stem)
    return left.transpose(1, 0, 2).reshape(o, t * c) @ mixed.transpose(1, 0, 2).reshape(o, t * c).T


def conv_output_variance(weight: np.ndarray, channel_cov: np.ndarray, r: float) -> np.ndarray:
    """Diagonal of :func:`conv_output_covariance`, shape (O,)."""
    taps = _tap_view(weight)
    R = spatial_correlation(r, tuple(np.shape(weight)[2:]))
    left = taps @ np.asarray(channel_cov, np.float64)
    return np.einsum("tu,toc,uoc->o", R, left, taps)


def fit_spatial_correlation(weight: np.ndarray, channel_cov: np.ndarray, target_var: np.ndarray,
                            grid: np.ndarray | None = None) -> float:
    """The r whose predicted output variances best match ``target_var`` up to one common scale.

    The misfit is the variance of ``log(target) - log(predicted)`` over channels with both
    positive (a scale error cancels: only the shape of the variance profile fits r).

    Parameters
    ----------
    weight : ndarray of shape (O, C, kh, kw)
        Raw (unfolded) weights, whose outputs the BN statistics describe.
    channel_cov : ndarray of shape (C, C)
    target_var : ndarray of shape (O,)
        BN running variances.
    grid : ndarray, optional
        Candidate values; default 0, 0.05, ..., 0.95.

    Returns
    -------
    float
        0.0 for a 1x1 kernel or when no channel can be compared.
    """
    if int(np.prod(np.shape(weight)[2:])) <= 1:
        return 0.0
    grid = np.arange(0.0, 0.951, 0.05) if grid is None else np.asarray(grid, np.float64)
    target = np.asarray(target_var, np.float64)
    taps = _tap_view(weight)
    left = taps @ np.asarray(channel_cov, np.float64)
    blocks = np.einsum("toc,uoc->tuo", left, taps)  # diag of W_t K W_u^T per tap pair
    best, best_r = math.inf, 0.0
    for r in grid:
        pred = np.einsum("tu,tuo->o", spatial_correlation(r, tuple(np.shape(weight)[2:])), blocks)
        ok = (target > 1e-12) & (pred > 1e-12)
        if ok.sum() < 2:
            continue
        resid = np.log(target[ok]) - np.log(pred[ok])
        misfit = float(((resid - resid.mean()) ** 2).mean())
        if misfit < best - 1e-12:
            best, best_r = misfit, float(r)
    return best_r


def tap_fractions(in_size: tuple[int, int] | None, kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0),
                  dilations=(1, 1)) -> np.ndarray:
    """Fraction of output positions at which each kernel tap reads inside the input (not padding).

    A bias correction ``sum_t W_t E[x]`` must weight tap t by this fraction so that the output
    mean matches over the whole map, borders included.

    Parameters
    ----------
    in_size : (H, W) or None
        Input spatial size; None (unknown) gives all ones.
    kernel, strides, dilations : (kh, kw)
    pads : (top, left, bottom, right)

    Returns
    -------
    ndarray of shape (kh*kw,)
    """
    kh, kw = kernel
    if in_size is None:
        return np.ones(kh * kw)

    def axis(n, k, s, p0, p1, d):
        out = (n + p0 + p1 - d * (k - 1) - 1) // s + 1
        pos = np.arange(max(out, 0)) * s - p0
        return np.array([np.mean((pos + d * t >= 0) & (pos + d * t < n)) if out > 0 else 1.0 for t in range(k)])

    fy = axis(in_size[0], kh, strides[0], pads[0], pads[2], dilations[0])
    fx = axis(in_size[1], kw, strides[1], pads[1], pads[3], dilations[1])
    return np.outer(fy, fx).ravel()
