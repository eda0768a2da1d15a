"""Data-free expected activations E[f(P)] for P ~ N(beta, gamma^2) per channel (pure NumPy).

The mean-residual bias transfer (spec 2.7) needs the expected value of a pruned channel as its
consumer sees it. Right after a BatchNormalization the pre-activation of channel c is assumed
Gaussian with the BN's own beta_c and |gamma_c| (the DFQ assumption), so each supported
activation has a closed form:

    none        E = beta
    relu        E = s phi(beta/s) + beta Phi(beta/s)                         (s = |gamma|)
    clip[l, h]  E = l Phi(a) + h (1 - Phi(b)) + beta (Phi(b) - Phi(a)) + s (phi(a) - phi(b)),
                a = (l - beta)/s, b = (h - beta)/s                            (ReLU6: l=0, h=6)
    leakyrelu   E = (1 - alpha) E[relu] + alpha beta
    sigmoid     E ~= sigmoid(beta / sqrt(1 + pi s^2 / 8))                     (probit approximation)
"""
from __future__ import annotations

import math

import numpy as np

from .solve import relu_mean

__all__ = ["SUPPORTED", "activation_mean"]

SUPPORTED = ("none", "relu", "clip", "leakyrelu", "sigmoid")


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x, np.float64) / math.sqrt(2)))


def _norm_pdf(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def activation_mean(beta: np.ndarray, gamma: np.ndarray, activation: str = "none",
                    args: tuple[float, ...] = ()) -> np.ndarray:
    """Expected activation of each channel.

    Parameters
    ----------
    beta, gamma : ndarray of shape (C,)
        BN shift and scale: the pre-activation of channel c is N(beta_c, gamma_c**2).
    activation : {"none", "relu", "clip", "leakyrelu", "sigmoid"}
    args : tuple
        (low, high, slope): Clip bounds and LeakyRelu slope (a scalar, or one per channel for a PRelu).

    Returns
    -------
    ndarray of shape (C,)

    Raises
    ------
    ValueError
        For an activation without a closed form here.
    """
    beta = np.asarray(beta, np.float64)
    sd = np.abs(np.asarray(gamma, np.float64))
    low, high, slope = (tuple(args) + (-np.inf, np.inf, 0.0)[len(args):])[:3]
    if activation == "none":
        return beta
    if activation == "relu":
        return relu_mean(beta, sd, True)
    if activation == "leakyrelu":
        return (1 - slope) * relu_mean(beta, sd, True) + slope * beta
    if activation == "clip":
        safe = np.where(sd > 1e-12, sd, 1.0)
        a = np.where(np.isfinite(low), (low - beta) / safe, -np.inf)
        b = np.where(np.isfinite(high), (high - beta) / safe, np.inf)
        cdf_a, cdf_b = _norm_cdf(a), _norm_cdf(b)
        low_term = np.where(np.isfinite(low), low * cdf_a, 0.0)
        high_term = np.where(np.isfinite(high), high * (1 - cdf_b), 0.0)
        pdf_a = np.where(np.isfinite(a), _norm_pdf(np.where(np.isfinite(a), a, 0.0)), 0.0)
        pdf_b = np.where(np.isfinite(b), _norm_pdf(np.where(np.isfinite(b), b, 0.0)), 0.0)
        mean = low_term + high_term + beta * (cdf_b - cdf_a) + sd * (pdf_a - pdf_b)
        return np.where(sd > 1e-12, mean, np.clip(beta, low, high))
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-beta / np.sqrt(1 + math.pi * sd**2 / 8)))
    raise ValueError(f"no closed-form mean for activation {activation!r}; supported: {SUPPORTED}")
