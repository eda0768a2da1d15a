"""Data-free moments (NumPy only): rectified Gaussians, patch covariances, spatial fits, tap fractions."""
import math

import numpy as np
import pytest

from udfc_onnx.moments import (bivariate_normal_cdf, conv_output_covariance, conv_output_variance, correlation,
                               fit_spatial_correlation, normal_cdf, patch_covariance, relu_mean_var, relu_moments,
                               spatial_correlation, tap_fractions)


@pytest.mark.parametrize("rho", [-0.9, -0.3, 0.0, 0.5, 0.95])
def test_bivariate_cdf_at_origin_has_its_closed_form(rho):
    assert bivariate_normal_cdf(0.0, 0.0, rho) == pytest.approx(0.25 + math.asin(rho) / (2 * math.pi), abs=1e-9)


def test_bivariate_cdf_limits_and_monte_carlo(rng):
    a, b = np.array([0.3, -1.2, 1.5]), np.array([-0.4, 0.7, 2.0])
    np.testing.assert_allclose(bivariate_normal_cdf(a, b, 0.0), normal_cdf(a) * normal_cdf(b), atol=1e-12)
    np.testing.assert_allclose(bivariate_normal_cdf(a, b, 0.6), bivariate_normal_cdf(b, a, 0.6), atol=1e-12)
    u = rng.standard_normal(1_000_000)
    v = 0.6 * u + math.sqrt(1 - 0.36) * rng.standard_normal(1_000_000)
    for ai, bi in zip(a, b):
        assert bivariate_normal_cdf(ai, bi, 0.6) == pytest.approx(np.mean((u < ai) & (v < bi)), abs=2e-3)


def test_bivariate_cdf_quadrature_is_at_double_precision_below_0_925():
    """Fewer nodes at small |rho| (Genz's rules): each pair still within 1e-15 of a 200-point rule."""
    from udfc_onnx.moments import _phi2_integral

    rng = np.random.default_rng(3)
    n = 60_000
    a, b = rng.uniform(-8, 8, n), rng.uniform(-8, 8, n)
    # every rule, and both sides of each switch
    edges = [0.3 - 1e-12, 0.3, -0.75, 0.75 - 1e-12, 0.925 - 1e-12, 0.0]
    rho = np.concatenate([rng.uniform(-0.925, 0.925, n - len(edges)), edges])
    rho = rng.permutation(rho)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    top = np.arcsin(rho)
    ref = sum((0.5 * w) * np.exp(-(a * a + b * b - 2 * a * b * np.sin(top * 0.5 * (x + 1)))
                                 / (2 * np.cos(top * 0.5 * (x + 1)) ** 2)) for x, w in zip(nodes, weights))
    ref = ref * top / (2 * math.pi)
    np.testing.assert_allclose(_phi2_integral(a, b, rho), ref, rtol=0, atol=1e-15)
    # one element, and a 0-d input, take the same rule as in a batch
    assert _phi2_integral(a[:1], b[:1], rho[:1])[0] == _phi2_integral(a, b, rho)[0]
    assert float(_phi2_integral(np.float64(a[0]), np.float64(b[0]), np.float64(rho[0]))) == _phi2_integral(a, b, rho)[0]


def test_relu_mean_var_matches_monte_carlo(rng):
    mean, var = np.array([0.5, -1.0, 0.0, 2.0]), np.array([1.0, 0.25, 4.0, 0.09])
    samples = np.maximum(mean + np.sqrt(var) * rng.standard_normal((400_000, 4)), 0)
    m, v = relu_mean_var(mean, var)
    np.testing.assert_allclose(m, samples.mean(0), atol=5e-3)
    np.testing.assert_allclose(v, samples.var(0), atol=1e-2)
    m0, v0 = relu_mean_var(np.array([-1.0, 2.0]), np.zeros(2))  # constants
    np.testing.assert_allclose(m0, [0.0, 2.0])
    np.testing.assert_allclose(v0, [0.0, 0.0])


def test_relu_moments_match_monte_carlo(rng):
    C = 4
    L = rng.standard_normal((C, C))
    cov = L @ L.T + 0.2 * np.eye(C)
    mean = rng.standard_normal(C)
    samples = np.maximum(rng.multivariate_normal(mean, cov, size=1_000_000), 0)
    m, c = relu_moments(mean, cov)
    np.testing.assert_allclose(m, samples.mean(0), atol=6e-3)
    np.testing.assert_allclose(c, np.cov(samples.T), atol=0.02 * np.abs(c).max())
    assert np.allclose(c, c.T) and np.linalg.eigvalsh(c).min() > -1e-9


def test_relu_moments_constant_channel_is_uncorrelated():
    cov = np.array([[1.0, 0.0], [0.0, 0.0]])
    m, c = relu_moments(np.array([0.2, 1.5]), cov)
    assert m[1] == pytest.approx(1.5)
    assert c[0, 1] == 0.0 and c[1, 1] == 0.0


def test_correlation_handles_zero_variance():
    R = correlation(np.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(R, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_spatial_correlation_and_patch_covariance_agree_with_conv_covariance(rng):
    R = spatial_correlation(0.5, (3, 3))
    assert R[4, 4] == 1 and R[4, 1] == 0.5 and R[0, 8] == pytest.approx(0.5**4)
    np.testing.assert_array_equal(spatial_correlation(0.0, (3, 3)), np.eye(9))
    W = rng.standard_normal((5, 3, 3, 3))
    K = np.cov(rng.standard_normal((3, 20)))
    flat = W.reshape(5, -1)
    full = flat @ patch_covariance(K, 0.4, (3, 3)) @ flat.T
    np.testing.assert_allclose(conv_output_covariance(W, K, 0.4), full, rtol=1e-10)
    np.testing.assert_allclose(conv_output_variance(W, K, 0.4), np.diag(full), rtol=1e-10)


def test_fit_spatial_correlation_recovers_r(rng):
    W = rng.standard_normal((32, 8, 3, 3))
    K = np.diag(rng.uniform(0.5, 2.0, 8))
    target = 3.7 * conv_output_variance(W, K, 0.35)  # an unknown common scale must not matter
    assert fit_spatial_correlation(W, K, target) == pytest.approx(0.35, abs=1e-9)
    assert fit_spatial_correlation(W[:, :, :1, :1], K, target) == 0.0  # 1x1 kernels have no spatial part


def test_tap_fractions_count_padding():
    f = tap_fractions((32, 32), (3, 3), (1, 1), (1, 1, 1, 1)).reshape(3, 3)
    assert f[1, 1] == 1 and f[0, 1] == pytest.approx(31 / 32) and f[0, 0] == pytest.approx((31 / 32) ** 2)
    s2 = tap_fractions((32, 32), (3, 3), (2, 2), (1, 1, 1, 1)).reshape(3, 3)
    assert s2[0, 0] == pytest.approx((15 / 16) ** 2) and s2[2, 2] == 1
    np.testing.assert_array_equal(tap_fractions(None, (3, 3)), np.ones(9))
    np.testing.assert_array_equal(tap_fractions((8, 8), (1, 1)), np.ones(1))
