"""Closed-form compensation for pruned and quantized channels (pure NumPy, no ONNX).

Notation follows the method spec (shared/udfc-method.md). Everything here works in the
BN-folded domain: the filter of channel c is ``w_c = a_c * W_c`` flattened to length d and
its bias is ``b_c = beta_c - a_c * mu_c`` (a_c = gamma_c / sqrt(var_c + eps)).

Why the folded domain: regressing folded filters with a b-unit bias term gives exactly the
coefficients c_ij = s_ij * a_j / a_i of the spec's raw-filter, e-unit loss (the loss is the
same up to the factor a_j**2 per pruned channel), so one solver serves both readings.

Pruning (spec 2.5, 4):
    minimise_c  ||w_j - V c||^2 + alpha1 * (b_j - b_K^T c)^2          for every pruned j
    c* = (V^T V + alpha1 b_K b_K^T + ridge I)^-1 (V^T w_j + alpha1 b_j b_K)
and the consumer absorbs it: W2[:, i] += sum_j c_ij W2[:, j] for kept i.

Pruning with data-free input moments [EXT] (``regression="moments"``):
    S = E[P P^T] of the pre-activations, correlations from a model of the layer input
    (udfc_onnx.moments), means and variances from the BN:  S = D corr(W Sigma_x W^T) D + beta beta^T
    c* = S_KK^-1 S_KP  (the least-squares prediction of P_j from P_K, no intercept)
and kept channels chosen greedily so that the consumer's expected error after that
compensation, tr(G_PP (S_PP - S_PK S_KK^-1 S_KP)) with G the consumer's input Gram, is smallest.

Quantization (spec 3.3):
    minimise_s  ||w - s q||^2 + alpha2 * (1 - s)^2 b^2
    s* = (q.w + alpha2 b^2) / (q.q + alpha2 b^2)
"""
from __future__ import annotations

import math

import numpy as np

from .errors import SolverError

__all__ = [
    "keep_count",
    "channel_scores",
    "select_keep",
    "dropped_channels",
    "solve_prune_coefficients",
    "solve_moment_coefficients",
    "filter_second_moments",
    "bn_row_scales",
    "select_keep_greedy",
    "consumer_gram",
    "row_blocks",
    "median",
    "equalization_scales",
    "solve_quant_scales",
    "neuron_merging_coefficients",
    "apply_compensation",
    "relu_mean",
    "mean_residual_bias",
]


def keep_count(channels: int, ratio: float, multiple: int = 1) -> int:
    """Channels kept when pruning ``ratio`` of ``channels``: ``int(C * (1 - r))``, at least 1.

    This is the rounding of the paper and of Neuron Merging's ``cfg``. ``multiple > 1`` rounds
    the count up to a multiple of it (never above ``channels``): int8 kernels run narrow
    layers slower than wide ones (README, int8 section).
    """
    n = max(1, int(channels * (1 - ratio)))
    if multiple > 1:
        n = min(channels, -(-n // multiple) * multiple)
    return n


def channel_scores(filters: np.ndarray, criterion: str = "l1") -> np.ndarray:
    """Importance of each output channel.

    Parameters
    ----------
    filters : ndarray of shape (C, ...)
        One filter per output channel (raw, not BN-folded, as Neuron Merging ranks them).
    criterion : {"l1", "l2"}

    Returns
    -------
    ndarray of shape (C,)
    """
    if criterion not in ("l1", "l2"):
        raise ValueError(f"criterion must be 'l1' or 'l2', got {criterion!r}")
    flat = filters.reshape(filters.shape[0], -1)
    out = np.empty(flat.shape[0])
    # float64 blocks of rows, made positive in place: each row's sum is the one of a whole-array
    # pass, and the temporary is reused instead of a weight-sized float64 copy (page faults)
    for rows in row_blocks(flat.shape[0], flat.shape[1]):
        block = flat[rows].astype(np.float64)
        out[rows] = (np.abs(block, out=block) if criterion == "l1" else np.square(block, out=block)).sum(axis=1)
    return out if criterion == "l1" else np.sqrt(out)


def dropped_channels(n: int, keep: np.ndarray) -> np.ndarray:
    """Sorted indices of ``range(n)`` not in ``keep`` (valid indices); ``np.setdiff1d`` at 1/20 of its cost."""
    mask = np.ones(n, bool)
    mask[keep] = False
    return np.flatnonzero(mask)


def select_keep(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Sorted indices of the ``n_keep`` highest scores (ties broken by lower index).

    Returns
    -------
    ndarray of shape (n_keep,), int64
    """
    if not 1 <= n_keep <= len(scores):
        raise ValueError(f"n_keep must be in [1, {len(scores)}], got {n_keep}")
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n_keep]).astype(np.int64)


def _solve_spd(gram: np.ndarray, rhs: np.ndarray, rcond: float = 1e-6) -> np.ndarray:
    """Minimum-norm solution of a symmetric PSD system, ignoring directions below ``rcond * max eigenvalue``.

    Why not ``np.linalg.solve``: two or more kept channels whose BN gamma is ~0 ("dead") give
    near-zero columns, the Gram matrix is singular to rounding, and solve() returns coefficients
    of 1e3..1e9 on them that amplify any upstream error (seen on every builder model with BN).

    Fast path: when the matrix is provably far from that threshold (every eigenvalue above
    ``rcond * ||A||_inf``, shown by a Cholesky factorisation), no direction would be ignored and
    the answer is ``A^-1 rhs``; only the other (near-singular) systems pay for the
    eigendecomposition, 10-20x the cost.

    Parameters
    ----------
    gram : ndarray of shape (t, t)
    rhs : ndarray of shape (t,) or (t, p)
    rcond : float, default=1e-6

    Returns
    -------
    ndarray of the shape of ``rhs``
    """
    if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(rhs))):
        raise SolverError("compensation system has non-finite entries")
    sym = (gram + gram.T) / 2
    out = _solve_well_conditioned(sym, rhs, rcond)
    if out is None:
        out = _solve_eigh(sym, rhs, rcond)
    if not np.all(np.isfinite(out)):
        raise SolverError("compensation system has no finite solution")
    return out


def _solve_well_conditioned(sym: np.ndarray, rhs: np.ndarray, rcond: float) -> np.ndarray | None:
    """``sym^-1 rhs`` when ``sym`` is positive definite with condition number provably below ``1/rcond``, else None.

    The proof is a Cholesky factorisation of ``sym - sigma I`` with ``sigma = rcond ||sym||_inf``:
    for a symmetric matrix the inf-norm bounds the largest eigenvalue from above, so when the
    shifted matrix is positive definite the smallest eigenvalue exceeds ``rcond`` times the
    largest. (It accepts every system the bound ``||A||_inf ||A^-1||_inf < 1/rcond`` accepts,
    without the inverse: 2.7 n^3 of the 3 n^3 flops of that test.) The solution is then the
    LU solve of ``sym`` itself.
    """
    if sym.size == 0:
        return None
    sigma = rcond * float(np.abs(sym).sum(axis=1).max())
    if not math.isfinite(sigma) or sigma <= 0:
        return None
    shifted = sym.copy()
    shifted[np.diag_indices_from(shifted)] -= sigma
    try:
        np.linalg.cholesky(shifted)  # raises unless positive definite
        return np.linalg.solve(sym, rhs)
    except np.linalg.LinAlgError:
        return None


def _solve_eigh(sym: np.ndarray, rhs: np.ndarray, rcond: float) -> np.ndarray:
    """Pseudo-inverse solution through the eigendecomposition, dropping eigenvalues below ``rcond * max``."""
    try:
        values, vectors = np.linalg.eigh(sym)
    except np.linalg.LinAlgError as exc:
        raise SolverError(f"compensation system could not be factorised: {exc}") from exc
    top = float(values.max()) if values.size else 0.0
    usable = values > rcond * top if top > 0 else np.zeros_like(values, dtype=bool)
    return (vectors[:, usable] / values[usable]) @ (vectors[:, usable].T @ rhs)


def solve_prune_coefficients(
    kept: np.ndarray,
    pruned: np.ndarray,
    kept_bias: np.ndarray,
    pruned_bias: np.ndarray,
    *,
    alpha: float = 0.01,
    ridge: float = 0.0,
    gram_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Express each pruned filter as a combination of the kept ones (UDFC, spec 2.5).

    Parameters
    ----------
    kept : ndarray of shape (d, t)
        Flattened folded filters of the t kept channels (possibly already quantized).
    pruned : ndarray of shape (d, p)
        Flattened folded filters of the p pruned channels. When both are float32 (the model's
        own precision) and there is no ``gram_weight``, the Gram matrix and right-hand side are
        float32 products (half the time of float64 on ResNet-50's systems, and no float64 copies
        of the filters); the system is solved in float64 either way. On the 25 systems of the
        ResNet-50-sized model the loss moved by at most 2e-11 of itself.
    kept_bias, pruned_bias : ndarray of shape (t,), (p,)
        Folded biases ``b`` of the same channels.
    alpha : float, default=0.01
        alpha1: weight of the bias mismatch against the filter mismatch.
    ridge : float, default=0.0
        Extra Tikhonov term ``ridge * tr(V^T V)/t * I`` [EXT]; 0 is the paper.
    gram_weight : ndarray of shape (d, d), optional
        Second-moment matrix M of the layer input patch [EXT]: the filter term becomes
        ``(w_j - V c)^T M (w_j - V c)``, the expected squared pre-activation error. None is
        the paper's plain Euclidean norm.

    Returns
    -------
    coef : ndarray of shape (t, p)
        ``pruned[:, j] ~= kept @ coef[:, j]``.
    """
    kept, pruned = np.asarray(kept), np.asarray(pruned)
    single = gram_weight is None and kept.dtype == pruned.dtype == np.float32
    kept = kept.astype(np.float32 if single else np.float64, copy=False)
    pruned = pruned.astype(np.float32 if single else np.float64, copy=False)
    kept_bias = np.asarray(kept_bias, np.float64)
    pruned_bias = np.asarray(pruned_bias, np.float64)
    if kept.ndim != 2 or pruned.ndim != 2 or kept.shape[0] != pruned.shape[0]:
        raise ValueError(f"kept (d,t) and pruned (d,p) must share d; got {kept.shape}, {pruned.shape}")
    if kept_bias.shape != (kept.shape[1],) or pruned_bias.shape != (pruned.shape[1],):
        raise ValueError("bias vectors must match the filters' channel counts")
    if alpha < 0 or ridge < 0:
        raise ValueError("alpha and ridge must be >= 0")
    weighted = kept if gram_weight is None else gram_weight @ kept
    filter_gram = (kept.T @ weighted).astype(np.float64, copy=False)  # kept.T @ kept: one syrk
    gram = filter_gram + alpha * np.outer(kept_bias, kept_bias)
    rhs = (weighted.T @ pruned).astype(np.float64, copy=False) + alpha * np.outer(kept_bias, pruned_bias)
    if ridge > 0:
        t = kept.shape[1]
        gram = gram + ridge * (np.trace(gram) / t) * np.eye(t)
        return _solve_spd(gram, rhs)
    return _solve_with_constant_channels(gram, rhs, np.diag(filter_gram), kept_bias)


def _solve_with_constant_channels(gram: np.ndarray, rhs: np.ndarray, filter_norms: np.ndarray,
                                  kept_bias: np.ndarray, rcond: float = 1e-6) -> np.ndarray:
    """:func:`_solve_spd` of the pruning regression, with its dead kept channels taken as one constant.

    A kept channel whose folded filter is ~0 (BN gamma ~0: ``filter_norms`` below ``rcond`` times
    the largest) outputs its bias, a constant. Several such channels differ only in that constant,
    so their columns span one direction (the bias term's) and the rest of them are a near-null
    space: the system is singular to rounding, which sent every such layer through the
    eigendecomposition (ResNet-50-sized model: 24 of 25 systems, 5-12 ms each). Here the dead
    channels share one coefficient in proportion to their biases (``c_D = u b_D / |b_D|^2``, the
    least-norm way for them to add a constant ``u``), which leaves a well-conditioned system in
    the live channels and ``u`` for the Cholesky path. It is the least-squares solution over that
    subspace (the dead filters' small remainders included); on that model the loss equals the
    pseudo-inverse's to 6 digits. Systems still near-singular go through the pseudo-inverse as before.

    Parameters
    ----------
    gram : ndarray of shape (t, t)
    rhs : ndarray of shape (t, p)
    filter_norms : ndarray of shape (t,)
        Squared (weighted) norm of each kept filter: the filter part of ``gram``'s diagonal.
    kept_bias : ndarray of shape (t,)

    Returns
    -------
    ndarray of shape (t, p)
    """
    top = float(filter_norms.max()) if filter_norms.size else 0.0
    dead = filter_norms <= rcond * top
    if not dead.any() or dead.all():
        return _solve_spd(gram, rhs)
    live = np.flatnonzero(~dead)
    dead = np.flatnonzero(dead)
    bias_dead = kept_bias[dead]
    norm = float(bias_dead @ bias_dead)
    share = bias_dead / norm if norm > 0 else np.zeros(len(dead))  # all-zero dead channels add nothing
    cross = gram[np.ix_(live, dead)] @ share
    reduced = np.empty((len(live) + 1, len(live) + 1))
    reduced[:-1, :-1] = gram[np.ix_(live, live)]
    reduced[:-1, -1] = reduced[-1, :-1] = cross
    reduced[-1, -1] = share @ gram[np.ix_(dead, dead)] @ share
    rhs_reduced = np.concatenate([rhs[live], (share @ rhs[dead])[None]])
    if norm == 0:  # no constant to add: the live channels alone
        reduced, rhs_reduced = reduced[:-1, :-1], rhs_reduced[:-1]
    solved = _solve_spd(reduced, rhs_reduced, rcond)
    out = np.zeros_like(rhs, dtype=np.float64)
    out[live] = solved[:len(live)]
    if norm > 0:
        out[dead] = share[:, None] * solved[-1][None, :]
    return out


def solve_moment_coefficients(second_kk: np.ndarray, second_kp: np.ndarray, *, ridge: float = 0.0) -> np.ndarray:
    """Coefficients predicting pruned pre-activations from kept ones under known second moments [EXT].

    Parameters
    ----------
    second_kk : ndarray of shape (t, t)
        ``E[P_K P_K^T]`` of the kept channels (as the layer computes them, e.g. quantized).
    second_kp : ndarray of shape (t, p)
        ``E[P_K P_P^T]`` between kept and pruned channels.
    ridge : float, default=0.0
        Relative Tikhonov term ``ridge * tr(S_KK)/t * I``.

    Returns
    -------
    coef : ndarray of shape (t, p)
        ``P_j ~= sum_i coef[i, j] P_i`` in the mean-square sense.
    """
    gram = np.asarray(second_kk, np.float64)
    rhs = np.asarray(second_kp, np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or rhs.shape[0] != gram.shape[0]:
        raise ValueError(f"second_kk (t,t) and second_kp (t,p) must agree; got {gram.shape}, {rhs.shape}")
    if ridge < 0:
        raise ValueError("ridge must be >= 0")
    t = gram.shape[0]
    scale = max(float(np.trace(gram)) / t, 1e-300)
    # A tiny floor keeps dead (constant) channels, whose rows are collinear, solvable.
    gram = gram + (ridge + 1e-10) * scale * np.eye(t)
    return _solve_spd(gram, rhs)


def bn_row_scales(filters: np.ndarray, patch_cov: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Per-filter factors that make the modelled output variance equal the BN's.

    Parameters
    ----------
    filters : ndarray of shape (C, d)
    patch_cov : ndarray of shape (d, d)
        Modelled covariance of the input patch.
    sd : ndarray of shape (C,)
        Standard deviation the BN recorded for each output (|gamma| in the folded domain).

    Returns
    -------
    ndarray of shape (C,)
        ``sd / sqrt(w^T Sigma w)``; 0 where the model predicts no variance.
    """
    f = np.asarray(filters, np.float64)
    var = ((f @ np.asarray(patch_cov, np.float64)) * f).sum(axis=1)  # diag(F Sigma F^T) through BLAS
    live = var > 1e-30
    return np.where(live, np.abs(sd) / np.sqrt(np.where(live, var, 1.0)), 0.0)


def filter_second_moments(rows_a: np.ndarray, rows_b: np.ndarray, patch_cov: np.ndarray, scale_a: np.ndarray,
                          scale_b: np.ndarray, mean_a: np.ndarray, mean_b: np.ndarray, *,
                          mean_weight: float = 1.0) -> np.ndarray:
    """``E[P_a P_b^T]`` for ``P = w^T x + bias`` with the modelled covariance rescaled per row.

    ``scale_a[i] scale_b[j] a_i^T Sigma b_j + mean_weight * mean_a[i] mean_b[j]`` (mean_weight 1
    is the exact second moment; more weights the means' agreement up in a regression).

    Parameters
    ----------
    rows_a : ndarray of shape (n, d)
    rows_b : ndarray of shape (m, d)
    patch_cov : ndarray of shape (d, d)
    scale_a, mean_a : ndarray of shape (n,)
    scale_b, mean_b : ndarray of shape (m,)

    Returns
    -------
    ndarray of shape (n, m)
    """
    cov = np.asarray(rows_a, np.float64) @ np.asarray(patch_cov, np.float64) @ np.asarray(rows_b, np.float64).T
    return np.outer(scale_a, scale_b) * cov + mean_weight * np.outer(mean_a, mean_b)


def select_keep_greedy(second: np.ndarray, gram: np.ndarray, n_keep: int) -> np.ndarray:
    """Kept channels by backward elimination of the compensated reconstruction error [EXT].

    Removes, one at a time, the channel whose removal (with the other removed ones, each
    predicted from the remaining channels by :func:`solve_moment_coefficients`) adds the least
    expected squared error at the consumer: ``tr(G_PP (S_PP - S_PK S_KK^-1 S_KP))``.

    Parameters
    ----------
    second : ndarray of shape (C, C)
        Second moments ``E[P P^T]`` of the producer's channels.
    gram : ndarray of shape (C, C)
        Consumer input Gram ``G[i, j] = sum_{o, tap} W2[o, i, tap] W2[o, j, tap]``.
    n_keep : int

    Returns
    -------
    ndarray of shape (n_keep,), int64, sorted
    """
    C = second.shape[0]
    if not 1 <= n_keep <= C:
        raise ValueError(f"n_keep must be in [1, {C}], got {n_keep}")
    # With D the dropped and K the kept channels (K + D = all), S_DD - S_DK S_KK^-1 S_KD equals
    # (Lam_DD)^-1 for Lam = S^-1, so each step only borders a |D| x |D| inverse: one vectorised
    # O(|D|^2 C) update per step instead of C solves of size |K| (which took minutes at C = 512).
    S = np.asarray(second, np.float64)
    S = S + 1e-10 * max(float(np.trace(S)) / C, 1e-300) * np.eye(C)
    lam = np.linalg.inv(S)
    G = np.asarray(gram, np.float64)
    remaining = list(range(C))
    drop: list[int] = []
    inv_dd = np.zeros((0, 0))  # (Lam_DD)^-1, the conditional covariance of the dropped channels
    error = 0.0  # tr(G_DD inv_dd)
    while len(remaining) > n_keep:
        cand = np.asarray(remaining)
        diag = lam[cand, cand]
        if drop:
            d = np.asarray(drop)
            u = inv_dd @ lam[np.ix_(d, cand)]                        # (|D|, m)
            schur = diag - np.sum(lam[np.ix_(d, cand)] * u, axis=0)
            quad = np.sum(u * (G[np.ix_(d, d)] @ u), axis=0)
            cross = np.sum(G[np.ix_(d, cand)] * u, axis=0)
        else:
            u, schur, quad, cross = np.zeros((0, len(cand))), diag, 0.0, 0.0
        schur = np.maximum(schur, 1e-300)
        errors = error + (quad - 2 * cross + G[cand, cand]) / schur
        best = int(np.argmin(errors))  # first minimum: deterministic
        s, ub = schur[best], u[:, best]
        inv_dd = np.block([[inv_dd + np.outer(ub, ub) / s, -ub[:, None] / s], [-ub[None, :] / s, np.full((1, 1), 1 / s)]])
        error = float(errors[best])
        drop.append(remaining.pop(best))
    return np.asarray(sorted(remaining), np.int64)


def consumer_gram(consumer: np.ndarray) -> np.ndarray:
    """``G[i, j] = sum_{o, b} W2[o, i, b] W2[o, j, b]`` of a consumer viewed as (O, C, B); shape (C, C)."""
    w = np.asarray(consumer, np.float64)
    flat = w.transpose(1, 0, 2).reshape(w.shape[1], -1)  # (C, O*B): one GEMM instead of a BLAS-less einsum
    return flat @ flat.T


def equalization_scales(producer_range: np.ndarray, consumer_range: np.ndarray) -> np.ndarray:
    """DFQ cross-layer equalization factors (Nagel et al. 2019).

    Scaling producer channel i by ``f_i`` and the consumer's input slice i by ``1/f_i`` leaves a
    ReLU network unchanged (ReLU(f x) = f ReLU(x) for f > 0); ``f = sqrt(r2 / r1)`` makes both
    ranges ``sqrt(r1 r2)``.

    Parameters
    ----------
    producer_range, consumer_range : ndarray of shape (C,)
        max |w| of each producer output channel and of each consumer input slice.

    Returns
    -------
    ndarray of shape (C,)
        1 where either range is zero.
    """
    r1 = np.asarray(producer_range, np.float64)
    r2 = np.asarray(consumer_range, np.float64)
    ok = (r1 > 0) & (r2 > 0)
    return np.where(ok, np.sqrt(np.where(ok, r2, 1.0) / np.where(ok, r1, 1.0)), 1.0)


def solve_quant_scales(
    weights: np.ndarray, quantized: np.ndarray, bias: np.ndarray | None = None, *, alpha: float = 0.008
) -> np.ndarray:
    """Per-channel scale s minimising ``||w - s q||^2 + alpha (1 - s)^2 b^2`` (spec 3.3).

    Parameters
    ----------
    weights, quantized : ndarray of shape (C, ...)
        Float filters and their dequantized (rounded) version.
    bias : ndarray of shape (C,), optional
        Folded bias of each channel; None (or alpha=0) gives the least-squares scale.
    alpha : float, default=0.008
        alpha2 of the paper.

    Returns
    -------
    ndarray of shape (C,); 1 where the quantized filter is all zero.
    """
    w = weights.reshape(weights.shape[0], -1).astype(np.float64)
    q = quantized.reshape(quantized.shape[0], -1).astype(np.float64)
    b2 = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64) ** 2
    num = (q * w).sum(axis=1) + alpha * b2
    den = (q * q).sum(axis=1) + alpha * b2
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


# Relative |gamma| below which a BN channel counts as dead for Neuron Merging (see its Notes).
NM_DEAD_GAMMA = 1e-3


def neuron_merging_coefficients(
    raw_filters: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    keep: np.ndarray,
    *,
    lam: float = 0.85,
    threshold: float = 0.1,
    ratio: str = "published",
) -> np.ndarray:
    """Neuron Merging (Kim et al. 2020) one-to-one merge coefficients, as its code does.

    Parameters
    ----------
    raw_filters : ndarray of shape (C, ...)
        Raw (not BN-folded) conv filters.
    gamma, beta, mean, var : ndarray of shape (C,)
        BN parameters; ``var`` is running_var (NM's code uses it where sqrt would be right).
    keep : ndarray of shape (t,)
        Sorted kept channel indices.
    lam : float, default=0.85
        Weight of the cosine distance against the normalised bias distance.
    threshold : float, default=0.1
        Minimum cosine similarity to merge at all.
    ratio : {"published", "derived"}
        "published" is NM's ``(gamma_i/gamma_j)(var_j/var_i)``; "derived" the exact
        ``a_j/a_i`` of the spec (2.3), for comparison.

    Returns
    -------
    coef : ndarray of shape (t, p)
        One nonzero per column at most; apply with :func:`apply_compensation`.

    Notes
    -----
    A channel whose |gamma| is below ``NM_DEAD_GAMMA`` of the layer's largest carries only its
    constant beta; NM's ratio divides by its gamma, so merging it (or into it) would multiply the
    consumer weights by up to 1e5 (inf logits on models with dead channels). Such channels are
    not merged; they are pruned plainly.
    """
    C = raw_filters.shape[0]
    flat = raw_filters.reshape(C, -1).astype(np.float64)
    drop = dropped_channels(C, keep)
    kept_f = flat[keep]
    norms = np.linalg.norm(flat, axis=1)
    coef = np.zeros((len(keep), len(drop)))
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    alive = np.abs(gamma) > NM_DEAD_GAMMA * max(float(np.abs(gamma).max()), 1e-30)
    for col, j in enumerate(drop):
        if not alive[j]:
            continue
        wj = flat[j]
        denom = np.maximum(norms[keep] * norms[j], 1e-12)
        cos = kept_f @ wj / denom
        dist = 1.0 - cos
        s = norms[j] / np.maximum(norms[keep], 1e-12)
        gi, gj = gamma[keep], gamma[j]
        if ratio == "published":
            scale = s * (gi / gj) * (var[j] / var[keep])
            bias = np.abs((gi / var[keep]) * (s * (mean[j] - var[j] * beta[j] / gj) - mean[keep]) + beta[keep])
        elif ratio == "derived":
            sj, si = np.sqrt(var[j]), np.sqrt(var[keep])
            scale = s * (gj / sj) / (gi / si)
            bias = np.abs((gi / si) * (s * (mean[j] - sj * beta[j] / gj) - mean[keep]) + beta[keep])
        else:
            raise ValueError(f"ratio must be 'published' or 'derived', got {ratio!r}")
        bias = bias / np.where(scale != 0, np.abs(scale), 1.0)
        span = bias.max() - bias.min()
        bias_norm = (bias - bias.min()) / span if span > 0 else np.zeros_like(bias)
        score = np.where(alive[keep], lam * dist + (1 - lam) * bias_norm, np.inf)
        best = int(np.argmin(score))
        if cos[best] >= threshold and np.isfinite(scale[best]):
            coef[best, col] = scale[best]
    return coef


def apply_compensation(
    consumer: np.ndarray, keep: np.ndarray, coef: np.ndarray | None, kept_scale: np.ndarray | None = None,
    *, dtype: np.dtype | type = np.float64,
) -> np.ndarray:
    """Fold pruned input channels into kept ones and drop them.

    Parameters
    ----------
    consumer : ndarray of shape (O, C, B)
        Consumer weights viewed per input channel: B = kh*kw for a conv, the column block
        (H*W of the flattened map) for a Gemm.
    keep : ndarray of shape (t,)
        Sorted kept channel indices.
    coef : ndarray of shape (t, p), optional
        Compensation coefficients; None is plain pruning.
    kept_scale : ndarray of shape (t,), optional
        Quantization scale s^q of each kept channel placed in the consumer (spec 4).
    dtype : dtype, default=float64
        Of the result. float64: float64 arithmetic. float32 (and no ``kept_scale``): float32
        products summed into the float32 kept weights, without float64 copies of the consumer
        (half the time of float64 on ResNet-50's largest consumers). Each entry then differs from
        the float64 result by at most ``(p + 1) * eps32`` times the sum of its terms' magnitudes
        (rounding to float32 alone moves it by ``eps32 / 2`` of itself). With ``kept_scale`` the
        result is float64.

    Returns
    -------
    ndarray of shape (O, t, B)
    """
    C = consumer.shape[1]
    drop = dropped_channels(C, keep)
    # the gather is a new array already (np.take: 3-6x faster than [:, keep] on the middle axis)
    out = np.take(consumer, keep, axis=1).astype(dtype, copy=False)
    if kept_scale is not None:
        out = out * np.asarray(kept_scale, np.float64)[None, :, None]
    if coef is not None and len(drop):
        coef = np.asarray(coef, np.float32 if out.dtype == np.float32 else np.float64)
        # Blocks of output rows: the temporaries stay a few MB on the largest layers.
        for rows in row_blocks(consumer.shape[0], len(drop) * consumer.shape[2]):
            dropped = np.take(consumer[rows], drop, axis=1).astype(coef.dtype, copy=False)  # (o, p, B)
            o, p, b = dropped.shape
            # One GEMM (t, p) @ (p, o*B); einsum without BLAS was the slowest step on ResNet-50.
            merged = (coef @ dropped.transpose(1, 0, 2).reshape(p, o * b)).reshape(-1, o, b).transpose(1, 0, 2)
            np.add(out[rows], merged, out=out[rows], casting="same_kind")  # in place: no copy of the result
    return out


#: Float64 entries per block of :func:`row_blocks` (2 MB).
ROW_BLOCK_ENTRIES = 1 << 18


def row_blocks(n_rows: int, entries_per_row: int) -> list[slice]:
    """Slices that cover ``range(n_rows)`` in blocks of about :data:`ROW_BLOCK_ENTRIES` entries.

    For row-wise work on weight-sized float64 temporaries: each row's result is the same as in
    one pass, and the temporary is a block, not the layer.
    """
    step = max(1, ROW_BLOCK_ENTRIES // max(entries_per_row, 1))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def median(values: np.ndarray) -> float:
    """``np.median`` of a NaN-free array, without the 10 ms import of ``numpy.ma`` that its NaN check costs.

    The mean of the two middle values of the sorted array (one for an odd size), as NumPy takes it.
    """
    flat = np.sort(np.asarray(values).reshape(-1))
    if not flat.size:
        raise ValueError("median of an empty array")
    mid = flat.size // 2
    return float(flat[mid]) if flat.size % 2 else float((flat[mid - 1] + flat[mid]) / 2)


def relu_mean(beta: np.ndarray, gamma: np.ndarray, relu: bool = True) -> np.ndarray:
    """E[f(P)] for P ~ N(beta, gamma^2) per channel: the data-free activation mean (DFQ).

    ``E[ReLU(P)] = |gamma| phi(beta/|gamma|) + beta Phi(beta/|gamma|)``; without ReLU, beta.
    """
    beta = np.asarray(beta, np.float64)
    if not relu:
        return beta
    sd = np.abs(np.asarray(gamma, np.float64))
    safe = np.where(sd > 1e-12, sd, 1.0)
    z = beta / safe
    phi = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + _erf(z / math.sqrt(2)))
    moment = sd * phi + beta * Phi
    return np.where(sd > 1e-12, moment, np.maximum(beta, 0.0))


def _erf(x: np.ndarray) -> np.ndarray:
    # math.erf vectorised; scipy is not a runtime dependency.
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def mean_residual_bias(
    consumer: np.ndarray, keep: np.ndarray, coef: np.ndarray | None, act_mean: np.ndarray,
    tap_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Consumer bias change that restores the expected contribution of pruned channels [EXT].

    ``delta_o = sum_{j in P} (sum_b W2[o, j, b]) (E[A_j] - sum_i c_ij E[A_i])`` (spec 2.7).

    Parameters
    ----------
    consumer : ndarray of shape (O, C, B)
        Consumer weights before compensation.
    keep : ndarray of shape (t,)
    coef : ndarray of shape (t, p), optional
    act_mean : ndarray of shape (C,)
        E[A_c] of every input channel of the consumer.
    tap_weights : ndarray of shape (B,), optional
        Weight of each tap in the sum over b (the share of positions where it reads real input,
        ``ConsumerSlice.taps``); None counts every tap fully.

    Returns
    -------
    ndarray of shape (O,)
    """
    C = consumer.shape[1]
    drop = dropped_channels(C, keep)
    if not len(drop):
        return np.zeros(consumer.shape[0])
    residual = act_mean[drop].astype(np.float64)
    if coef is not None:
        residual = residual - coef.T @ act_mean[keep]
    dropped = np.take(consumer, drop, axis=1)  # the pruned channels' taps only
    if tap_weights is not None:
        dropped = dropped * np.asarray(tap_weights, np.float64)[None, None, :]
    return dropped.sum(axis=2).astype(np.float64) @ residual
