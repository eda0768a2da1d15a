"""The solver's closed forms (NumPy only)."""
import numpy as np
import pytest

from udfc_onnx.solve import (apply_compensation, channel_scores, keep_count, mean_residual_bias,
                             neuron_merging_coefficients, relu_mean, select_keep, solve_prune_coefficients,
                             solve_quant_scales)


def _loss(V, wj, bK, bj, s, alpha):
    return np.sum((wj - V @ s) ** 2) + alpha * (bj - bK @ s) ** 2


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.3, 5.0])
def test_prune_solution_has_zero_gradient_and_matches_stacked_lstsq(rng, alpha):
    d, t, p = 27, 6, 3
    V, W = rng.standard_normal((d, t)), rng.standard_normal((d, p))
    bK, bP = rng.standard_normal(t), rng.standard_normal(p)
    S = solve_prune_coefficients(V, W, bK, bP, alpha=alpha)
    assert S.shape == (t, p)
    for j in range(p):
        s = S[:, j]
        grad = -2 * V.T @ (W[:, j] - V @ s) - 2 * alpha * (bP[j] - bK @ s) * bK
        assert np.abs(grad).max() < 1e-9
        stacked = np.vstack([V, np.sqrt(alpha) * bK[None]])
        target = np.concatenate([W[:, j], [np.sqrt(alpha) * bP[j]]])
        np.testing.assert_allclose(s, np.linalg.lstsq(stacked, target, rcond=None)[0], rtol=1e-9, atol=1e-11)
        base = _loss(V, W[:, j], bK, bP[j], s, alpha)
        for _ in range(20):  # no perturbation lowers the convex loss
            assert _loss(V, W[:, j], bK, bP[j], s + 1e-3 * rng.standard_normal(t), alpha) >= base


def test_prune_recovers_exact_combination(rng):
    V = rng.standard_normal((18, 4))
    true = rng.standard_normal((4, 2))
    S = solve_prune_coefficients(V, V @ true, np.zeros(4), np.zeros(2), alpha=0.01)
    np.testing.assert_allclose(S, true, rtol=1e-9, atol=1e-12)


def test_prune_ridge_shrinks_and_weighting_changes_solution(rng):
    V, w = rng.standard_normal((10, 4)), rng.standard_normal((10, 1))
    plain = solve_prune_coefficients(V, w, np.zeros(4), np.zeros(1), alpha=0)
    ridged = solve_prune_coefficients(V, w, np.zeros(4), np.zeros(1), alpha=0, ridge=1.0)
    assert np.linalg.norm(ridged) < np.linalg.norm(plain)
    M = np.diag(rng.uniform(0.1, 3, 10))
    weighted = solve_prune_coefficients(V, w, np.zeros(4), np.zeros(1), alpha=0, gram_weight=M)
    np.testing.assert_allclose(weighted, np.linalg.solve(V.T @ M @ V, V.T @ M @ w), rtol=1e-9)


def test_prune_rejects_bad_shapes(rng):
    with pytest.raises(ValueError, match="share d"):
        solve_prune_coefficients(rng.standard_normal((5, 2)), rng.standard_normal((6, 1)), np.zeros(2), np.zeros(1))


@pytest.mark.parametrize("alpha", [0.0, 0.008, 1.0])
def test_quant_scale_is_the_1d_minimum(rng, alpha):
    w = rng.standard_normal((3, 20))
    q = np.round(w * 3) / 3
    b = rng.standard_normal(3)
    s = solve_quant_scales(w, q, b, alpha=alpha)
    grid = np.linspace(0.5, 1.5, 20001)
    for c in range(3):
        losses = ((w[c][None] - grid[:, None] * q[c][None]) ** 2).sum(1) + alpha * (1 - grid) ** 2 * b[c] ** 2
        assert abs(grid[np.argmin(losses)] - s[c]) < 1e-4


def test_keep_count_matches_paper_rounding():
    assert [keep_count(16, r) for r in (0.3, 0.4, 0.5)] == [11, 9, 8]
    assert [keep_count(64, r) for r in (0.3, 0.4, 0.5)] == [44, 38, 32]
    assert keep_count(3, 0.99) == 1


def test_select_keep_sorted_top_scores():
    scores = np.array([0.1, 5, 3, 3, 0.2])
    assert select_keep(scores, 3).tolist() == [1, 2, 3]
    assert channel_scores(np.array([[1.0, -2], [3, 4]]), "l1").tolist() == [3, 7]
    np.testing.assert_allclose(channel_scores(np.array([[3.0, 4]]), "l2"), [5.0])


def test_relu_mean_matches_monte_carlo(rng):
    beta, gamma = np.array([0.5, -1.0, 0.0, 2.0]), np.array([1.0, 0.5, 2.0, -0.3])
    samples = np.maximum(beta + np.abs(gamma) * rng.standard_normal((400000, 4)), 0).mean(0)
    np.testing.assert_allclose(relu_mean(beta, gamma), samples, atol=5e-3)
    np.testing.assert_allclose(relu_mean(beta, np.zeros(4)), np.maximum(beta, 0))
    np.testing.assert_allclose(relu_mean(beta, gamma, relu=False), beta)


def test_compensation_is_exact_for_linear_combinations(rng):
    # Consumer output sum_c W2[:, c] * A_c with A_j = sum_i c_ij A_i must be unchanged.
    C, O, B = 6, 4, 9
    keep = np.array([0, 2, 3, 5])
    coef = rng.standard_normal((4, 2))
    A = rng.standard_normal((C, 50))
    A[[1, 4]] = coef.T @ A[keep]
    W2 = rng.standard_normal((O, C, B))
    full = np.einsum("ocb,cn->obn", W2, A)
    new = apply_compensation(W2, keep, coef)
    np.testing.assert_allclose(np.einsum("ocb,cn->obn", new, A[keep]), full, rtol=1e-10, atol=1e-10)


def test_mean_residual_bias_restores_constant_channels(rng):
    C, O = 5, 3
    keep = np.array([0, 1, 3])
    act_mean = rng.uniform(0, 1, C)
    W2 = rng.standard_normal((O, C, 4))
    delta = mean_residual_bias(W2, keep, None, act_mean)
    full = W2.sum(2) @ act_mean
    np.testing.assert_allclose(W2[:, keep].sum(2) @ act_mean[keep] + delta, full, rtol=1e-12)


def test_neuron_merging_picks_the_scaled_twin():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 2, 3, 3))
    W[3] = 1.8 * W[1]
    ones = np.ones(4)
    coef = neuron_merging_coefficients(W, ones, np.zeros(4), np.zeros(4), ones, np.array([0, 1, 2]))
    assert coef.shape == (3, 1)
    np.testing.assert_allclose(coef[:, 0], [0, 1.8, 0], atol=1e-12)
