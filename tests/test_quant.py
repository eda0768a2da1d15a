import numpy as np
import pytest

from udfc_onnx.quant import quantize_per_channel


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_grid_error_and_range(rng, bits, symmetric):
    w = rng.standard_normal((5, 3, 3, 3)) * rng.uniform(0.1, 3, (5, 1, 1, 1))
    qt = quantize_per_channel(w, bits, symmetric=symmetric)
    assert qt.q.dtype == np.int8 and qt.scale.shape == (5,) and qt.zero_point.shape == (5,)
    levels = len(np.unique(qt.q))
    assert levels <= 2 ** bits
    err = np.abs(qt.dequantize() - w).reshape(5, -1).max(1)
    assert np.all(err <= qt.scale * 0.5 + 1e-6 + (qt.scale if not symmetric else 0))
    if symmetric:
        assert np.all(qt.zero_point == 0) and np.abs(qt.q).max() <= 2 ** (bits - 1) - 1


def test_rescaled_keeps_integers():
    qt = quantize_per_channel(np.array([[1.0, -0.5], [2.0, 0.25]]), 4)
    r = qt.rescaled(np.array([0.5, 2.0]))
    np.testing.assert_array_equal(r.q, qt.q)
    np.testing.assert_allclose(r.dequantize(), qt.dequantize() * np.array([[0.5], [2.0]]), rtol=1e-6)


def test_rejects_bits_out_of_range():
    with pytest.raises(ValueError, match="bits"):
        quantize_per_channel(np.ones((2, 2)), 9)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_keeps_the_grid_and_lowers_the_output_error(rng, bits, symmetric):
    from udfc_onnx.quant import gptq_quantize

    # correlated inputs: where nearest rounding is worst and error feedback helps most
    mix = rng.standard_normal((27, 27))
    x = rng.standard_normal((4000, 27)) @ mix + 0.5
    second = x.T @ x / len(x)
    w = rng.standard_normal((6, 3, 3, 3))
    near = quantize_per_channel(w, bits, symmetric=symmetric)
    gptq = gptq_quantize(w, second, bits, symmetric=symmetric)
    np.testing.assert_array_equal(gptq.scale, near.scale)
    np.testing.assert_array_equal(gptq.zero_point, near.zero_point)
    assert gptq.q.shape == w.shape and gptq.q.dtype == np.int8
    lo, hi = (-(2 ** (bits - 1)) + (1 if symmetric else 0), 2 ** (bits - 1) - 1)
    assert gptq.q.min() >= lo and gptq.q.max() <= hi

    def output_error(qt):
        d = (qt.dequantize() - w).reshape(6, -1)
        return float(np.einsum("od,de,oe->", d, second, d))

    assert output_error(gptq) < 0.8 * output_error(near)


def test_gptq_with_identity_second_moment_is_nearest_rounding(rng):
    from udfc_onnx.quant import gptq_quantize

    w = rng.standard_normal((4, 10))
    np.testing.assert_array_equal(gptq_quantize(w, np.eye(10), 4).q, quantize_per_channel(w, 4).q)


def test_gptq_rejects_a_second_moment_of_the_wrong_size(rng):
    from udfc_onnx.quant import gptq_quantize

    with pytest.raises(ValueError, match="second moment"):
        gptq_quantize(rng.standard_normal((4, 10)), np.eye(9), 4)
