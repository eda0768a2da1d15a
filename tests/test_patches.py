"""Input-patch moments (udfc_onnx.patches) against ONNX Runtime's own convolution."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from udfc_onnx.patches import ConvGeometry, conv_patches, filter_order, patch_moments


def _ort_conv(x, w, g: ConvGeometry):
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(g.kernel), pads=list(g.pads),
                            strides=list(g.strides), dilations=list(g.dilations))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, None)],
                              [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("geometry", [
    ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1)),
    ConvGeometry((3, 2), (2, 1), (1, 0, 1, 1), (1, 2)),
    ConvGeometry((1, 1), (2, 2)),
])
def test_patches_times_filters_is_the_convolution(rng, geometry):
    x = rng.standard_normal((3, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 4) + geometry.kernel).astype(np.float32)
    y = _ort_conv(x, w, geometry)
    taps = geometry.kernel[0] * geometry.kernel[1]
    rows = conv_patches(x, geometry)[:, filter_order(4, taps)] @ w.reshape(5, -1).T
    n, o, ho, wo = y.shape
    np.testing.assert_allclose(rows.reshape(n, ho, wo, o).transpose(0, 3, 1, 2), y, atol=1e-4)


def test_moments_match_their_definition(rng):
    g = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1))
    x = rng.standard_normal((6, 2, 5, 5)).astype(np.float32) + 1.0
    target = np.concatenate([x, 2 * x[:, :1]], axis=1)
    m = patch_moments(x, g, target=target)
    px = conv_patches(x, g)[:, filter_order(2, 9)].astype(np.float64)
    pt = conv_patches(target, g)[:, filter_order(3, 9)].astype(np.float64)
    cx, ct = px - px.mean(0), pt - pt.mean(0)
    np.testing.assert_allclose(m.mean, px.mean(0), atol=1e-5)
    np.testing.assert_allclose(m.cov, cx.T @ cx / len(px), atol=1e-5)
    np.testing.assert_allclose(m.target_mean, pt.mean(0), atol=1e-5)
    np.testing.assert_allclose(m.cross, cx.T @ ct / len(px), atol=1e-5)
    np.testing.assert_allclose(m.second, px.T @ px / len(px), atol=1e-4)
    assert m.rows == 6 * 25


def test_rows_above_the_cap_use_evenly_spaced_whole_samples(rng):
    g = ConvGeometry((1, 1))
    x = rng.standard_normal((10, 2, 4, 4)).astype(np.float32)
    m = patch_moments(x, g, max_rows=16 * 5)
    assert m.rows == 16 * 5
    sub = x[np.unique(np.linspace(0, 9, 5).round().astype(int))]
    np.testing.assert_allclose(m.mean, sub.mean(axis=(0, 2, 3)), atol=1e-6)


def test_gemm_rows_without_geometry(rng):
    x = rng.standard_normal((50, 7)).astype(np.float32)
    m = patch_moments(x)
    np.testing.assert_allclose(m.second, x.T.astype(np.float64) @ x / 50, atol=1e-5)
