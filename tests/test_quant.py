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
