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


def test_keep_count_rounds_up_to_a_multiple_but_not_past_all_channels():
    assert [keep_count(64, r, 16) for r in (0.3, 0.4, 0.5)] == [48, 48, 32]
    assert keep_count(16, 0.5, 16) == 16 and keep_count(12, 0.9, 16) == 12
    assert keep_count(40, 0.5, 8) == 24 and keep_count(40, 0.5, 1) == 20


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


def test_mean_residual_bias_weights_the_taps(rng):
    C, O = 6, 4
    keep = np.array([1, 2, 5])
    act_mean = rng.uniform(0, 1, C)
    coef = rng.standard_normal((3, 3))
    W2 = rng.standard_normal((O, C, 9)).astype(np.float32)
    taps = rng.uniform(0.3, 1, 9)
    weighted = W2 * taps[None, None, :]  # float64: the tap-weighted weights, summed over b inside
    np.testing.assert_array_equal(mean_residual_bias(W2, keep, coef, act_mean, taps),
                                  mean_residual_bias(weighted, keep, coef, act_mean))
    np.testing.assert_array_equal(mean_residual_bias(W2, np.arange(C), coef[:, :0], act_mean, taps), np.zeros(O))


def test_neuron_merging_picks_the_scaled_twin():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 2, 3, 3))
    W[3] = 1.8 * W[1]
    ones = np.ones(4)
    coef = neuron_merging_coefficients(W, ones, np.zeros(4), np.zeros(4), ones, np.array([0, 1, 2]))
    assert coef.shape == (3, 1)
    np.testing.assert_allclose(coef[:, 0], [0, 1.8, 0], atol=1e-12)


# ---------------------------------------------------------------------------- moment regression [EXT]

from udfc_onnx.solve import (bn_row_scales, consumer_gram, equalization_scales, filter_second_moments,  # noqa: E402
                             select_keep_greedy, solve_moment_coefficients)


def _second_moment(rng, C, rank=None):
    L = rng.standard_normal((C, rank or C))
    mean = rng.standard_normal(C)
    return L @ L.T + np.outer(mean, mean), L, mean


def test_moment_coefficients_are_the_population_regression(rng):
    S, L, mean = _second_moment(rng, 7)
    keep, drop = [0, 2, 3, 5], [1, 4, 6]
    coef = solve_moment_coefficients(S[np.ix_(keep, keep)], S[np.ix_(keep, drop)])
    # samples with exactly that second moment: P = L z + mean, z ~ N(0, I)
    z = rng.standard_normal((200_000, 7))
    P = z @ L.T + mean
    sample = np.linalg.lstsq(P[:, keep], P[:, drop], rcond=None)[0]
    np.testing.assert_allclose(coef, sample, atol=0.05 * np.abs(coef).max())
    resid = S[np.ix_(drop, drop)] - coef.T @ S[np.ix_(keep, drop)]
    assert np.all(np.diag(resid) >= -1e-9)  # conditional second moment stays PSD


def test_moment_coefficients_recover_exact_dependence(rng):
    S, L, mean = _second_moment(rng, 5, rank=5)
    T = np.eye(6, 5)
    T[5] = [2.0, 0, -1.0, 0, 0.5]  # P_5 = 2 P_0 - P_2 + 0.5 P_4
    S6 = T @ S @ T.T
    coef = solve_moment_coefficients(S6[:5, :5], S6[:5, 5:])
    np.testing.assert_allclose(coef[:, 0], T[5], atol=1e-6)


def test_moment_ridge_shrinks_and_rejects_bad_input(rng):
    S, _, _ = _second_moment(rng, 6)
    plain = solve_moment_coefficients(S[:4, :4], S[:4, 4:])
    ridged = solve_moment_coefficients(S[:4, :4], S[:4, 4:], ridge=1.0)
    assert np.linalg.norm(ridged) < np.linalg.norm(plain)
    with pytest.raises(ValueError, match="must agree"):
        solve_moment_coefficients(S[:4, :3], S[:4, 4:])
    with pytest.raises(ValueError, match="ridge"):
        solve_moment_coefficients(S[:4, :4], S[:4, 4:], ridge=-1)


def test_filter_second_moments_and_bn_scales(rng):
    d = 12
    A = rng.standard_normal((d, d))
    sigma = A @ A.T / d
    rows = rng.standard_normal((3, d))
    sd = np.array([0.5, 2.0, 1.0])
    scale = bn_row_scales(rows, sigma, sd)
    mean = np.array([0.1, -0.3, 1.0])
    S = filter_second_moments(rows, rows, sigma, scale, scale, mean, mean)
    np.testing.assert_allclose(np.diag(S), sd**2 + mean**2, rtol=1e-10)  # BN variance and mean reproduced
    x = rng.multivariate_normal(np.zeros(d), sigma, size=400_000)
    P = (x @ rows.T) * scale + mean
    np.testing.assert_allclose(S, P.T @ P / len(P), atol=0.03 * np.abs(S).max())
    heavy = filter_second_moments(rows, rows, sigma, scale, scale, mean, mean, mean_weight=4.0)
    np.testing.assert_allclose(heavy - S, 3.0 * np.outer(mean, mean), atol=1e-12)
    assert bn_row_scales(np.zeros((1, d)), sigma, np.ones(1))[0] == 0.0


def test_greedy_selection_drops_a_redundant_channel_first(rng):
    S, _, _ = _second_moment(rng, 5)
    T = np.vstack([np.eye(5), 3.0 * np.eye(5)[2]])  # channel 5 = 3 x channel 2
    S6 = T @ S @ T.T
    gram = np.eye(6)
    keep = select_keep_greedy(S6, gram, 5)
    assert set(keep.tolist()) in ({0, 1, 2, 3, 4}, {0, 1, 3, 4, 5})  # one of the twins goes, at zero error
    assert select_keep_greedy(S6, gram, 5).tolist() == keep.tolist()  # deterministic


def test_greedy_selection_drops_channels_the_consumer_ignores(rng):
    S, _, _ = _second_moment(rng, 6)
    gram = np.eye(6)
    gram[3, 3] = 0.0  # the consumer never reads channel 3
    assert 3 not in select_keep_greedy(S, gram, 5)
    with pytest.raises(ValueError, match="n_keep"):
        select_keep_greedy(S, gram, 0)


def test_consumer_gram_and_equalization_scales(rng):
    W2 = rng.standard_normal((4, 3, 9))
    G = consumer_gram(W2)
    np.testing.assert_allclose(G, W2.transpose(1, 0, 2).reshape(3, -1) @ W2.transpose(1, 0, 2).reshape(3, -1).T)
    r1, r2 = np.array([2.0, 0.5, 0.0]), np.array([0.5, 2.0, 1.0])
    f = equalization_scales(r1, r2)
    np.testing.assert_allclose(r1[:2] * f[:2], r2[:2] / f[:2])
    assert f[2] == 1.0


def test_e_units_on_raw_filters_equal_b_units_on_folded_filters(rng):
    # spec 2.4: ||w_j - V s||^2 + alpha (e_j - e_K^T s)^2 on raw filters (e = b / a) is a_j^2 times the folded
    # loss ||a_j w_j - sum_i c_i a_i w_i||^2 + alpha (b_j - b_K^T c)^2 with c_i = s_i a_j / a_i: same optimum.
    d, t, p = 18, 5, 3
    raw_k, raw_p = rng.standard_normal((d, t)), rng.standard_normal((d, p))
    a_k, a_p = rng.uniform(0.3, 3, t), rng.uniform(0.3, 3, p)
    b_k, b_p = rng.standard_normal(t), rng.standard_normal(p)
    s = solve_prune_coefficients(raw_k, raw_p, b_k / a_k, b_p / a_p, alpha=0.05)
    c = solve_prune_coefficients(raw_k * a_k, raw_p * a_p, b_k, b_p, alpha=0.05)
    np.testing.assert_allclose(c, s * a_p[None, :] / a_k[:, None], rtol=1e-9, atol=1e-12)


def test_neuron_merging_leaves_dead_channels_unmerged(rng):
    # Channel 3 is a scaled copy of channel 0 (a perfect NM match) but its gamma is ~0: merging it
    # would scale the consumer by gamma_0/gamma_3 ~ 1e5. It is pruned plainly instead.
    w = rng.standard_normal((4, 3, 3, 3))
    w[3] = 2 * w[0]
    gamma = np.array([1.0, 0.8, 1.2, 1e-5])
    beta, mean, var = np.zeros(4), np.zeros(4), np.ones(4)
    coef = neuron_merging_coefficients(w, gamma, beta, mean, var, np.array([0, 1, 2]))
    assert np.all(coef == 0)
    gamma[3] = 0.5  # alive again: merged into channel 0 with NM's published ratio
    coef = neuron_merging_coefficients(w, gamma, beta, mean, var, np.array([0, 1, 2]))
    assert coef[0, 0] == pytest.approx(2 * 1.0 / 0.5) and np.count_nonzero(coef) == 1
