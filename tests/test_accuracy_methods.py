"""Issue 3's additions end to end: moment model, greedy selection, bias correction, CLE, grids, presets."""
import numpy as np
import onnxruntime as ort
import pytest

from tests.graphs import conv_chain, initializer_array, make_twin_channel
from udfc_onnx import PRESETS, CompressConfig, InvalidConfigError, compress_model
from udfc_onnx.fold import fold_batchnorm
from udfc_onnx.moment_graph import estimate_layer_inputs
from udfc_onnx.moments import relu_mean_var
from udfc_onnx.stats import read_bn_stats


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture
def twins():
    """conv(3->8)-BN-ReLU-conv(8->6)-BN-ReLU-GAP-Gemm where each conv has a scaled twin of its largest filter."""
    model = conv_chain((3, 8, 6))
    for layer, channels in ((0, 8), (1, 6)):
        norms = np.abs(initializer_array(model, f"conv{layer}.weight")).reshape(channels, -1).sum(1)
        src = int(np.argmax(norms))
        make_twin_channel(model, layer, src, (src + 1) % channels, 1.5)  # the twin outranks every other filter by norm
    return model


def test_greedy_selection_finds_redundant_channels_and_compensates_exactly(twins, rng):
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    ref = run(twins, x)
    cfg = CompressConfig(prune_ratio=0.125, weight_bits=None, selection="greedy")  # one channel of each conv goes
    greedy = compress_model(twins, cfg)
    assert [u.selection for u in greedy.solution.units] == ["greedy", "greedy"]
    np.testing.assert_allclose(run(greedy.model, x), ref, rtol=1e-4, atol=1e-4)
    by_norm = compress_model(twins, cfg.replace(selection="norm"))
    assert np.abs(run(by_norm.model, x) - ref).max() > 1e-2  # norms keep both twins and drop a useful channel


def test_paper_preset_is_the_euclidean_reading():
    cfg = CompressConfig(**PRESETS["paper"])
    assert (cfg.regression, cfg.selection, cfg.quant_compensation, cfg.symmetric) == ("euclidean", "norm", "next", False)
    assert not cfg.use_bias_correction and not cfg.use_bias_transfer and not cfg.cross_layer_equalization


def test_moment_graph_means_follow_bn_and_relu():
    model = conv_chain(pool=True)
    stats = read_bn_stats(model)
    raw = {n.name: initializer_array(model, n.input[1]) for n in model.graph.node if n.op_type == "Conv"}
    folded, _ = fold_batchnorm(model)
    inputs = estimate_layer_inputs(folded, stats, raw)
    assert set(inputs) == {"conv0", "conv1", "conv2", "fc"}
    np.testing.assert_array_equal(inputs["conv0"].mean, np.zeros(3))
    np.testing.assert_allclose(inputs["conv1"].mean, relu_mean_var(stats["conv0"].beta, stats["conv0"].gamma**2)[0])
    np.testing.assert_allclose(np.diag(inputs["conv1"].cov), relu_mean_var(stats["conv0"].beta, stats["conv0"].gamma**2)[1])
    np.testing.assert_allclose(inputs["fc"].mean, relu_mean_var(stats["conv2"].beta, stats["conv2"].gamma**2)[0])
    assert all(0.0 <= li.spatial_r <= 0.95 for li in inputs.values())
    assert inputs["conv1"].tap_fraction.shape == (9,) and inputs["conv1"].tap_fraction.min() < 1  # 4x4 after the pool


def test_bias_correction_restores_each_layers_expected_output(rng):
    model = conv_chain()
    stats = read_bn_stats(model)
    raw = {n.name: initializer_array(model, n.input[1]) for n in model.graph.node if n.op_type == "Conv"}
    folded, _ = fold_batchnorm(model)
    inputs = estimate_layer_inputs(folded, stats, raw)
    result = compress_model(model, CompressConfig(weight_bits=3))
    for node in folded.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w = initializer_array(folded, node.input[1])
        dq = result.solution.quantized[node.input[1]].dequantize()
        if node.op_type == "Gemm":
            shift = (dq - w) @ inputs[node.name].mean
        else:
            eps = (dq - w).reshape(w.shape[0], w.shape[1], -1)
            shift = np.einsum("oct,t,c->o", eps, inputs[node.name].tap_fraction, inputs[node.name].mean)
        bias_name = node.input[2]
        new_bias = result.solution.arrays.get(bias_name, initializer_array(folded, bias_name))
        np.testing.assert_allclose(new_bias.astype(np.float64) - initializer_array(folded, bias_name), -shift, atol=1e-5)
        if node.name != "conv0":  # the image input has mean 0: nothing to correct there
            assert np.abs(shift).max() > 1e-4


def test_cross_layer_equalization_keeps_the_function_and_equalizes_ranges(rng):
    model = conv_chain()
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    result = compress_model(model, CompressConfig(weight_bits=None, cross_layer_equalization=True))
    np.testing.assert_allclose(run(result.model, x), run(model, x), rtol=1e-4, atol=1e-4)
    w0 = initializer_array(result.model, "conv0.weight")
    w1 = initializer_array(result.model, "conv1.weight")
    np.testing.assert_allclose(np.abs(w0).reshape(8, -1).max(1), np.abs(w1).max(axis=(0, 2, 3)), rtol=1e-4)


def test_grids_auto_symmetric_per_tensor():
    model = conv_chain()
    q4 = compress_model(model, CompressConfig(weight_bits=4)).solution.quantized
    q5 = compress_model(model, CompressConfig(weight_bits=5)).solution.quantized
    assert any(np.any(t.zero_point != 0) for t in q4.values())  # auto: asymmetric below 5 bits
    assert all(np.all(t.zero_point == 0) for t in q5.values())  # symmetric from 5 bits (ORT int8 kernels)
    forced = compress_model(model, CompressConfig(weight_bits=4, symmetric=True)).solution.quantized
    assert all(np.all(t.zero_point == 0) for t in forced.values())
    per_tensor = compress_model(model, CompressConfig(weight_bits=4, granularity="tensor")).solution.quantized
    assert all(np.all(t.scale == t.scale[0]) for t in per_tensor.values())


@pytest.mark.parametrize("field, value", [("regression", "ols"), ("selection", "random"), ("bias_units", "x"),
                                          ("granularity", "row"), ("mean_weight", -1.0), ("symmetric", "yes"),
                                          ("cross_layer_equalization", None), ("weight_rounding", "round"),
                                          ("consumer_refit", "block")])
def test_new_fields_are_validated(field, value):
    with pytest.raises(InvalidConfigError, match=field):
        CompressConfig(**{field: value})


def test_udfc_defaults_beat_baselines_on_resnet56_nm(shared_models, cifar_test):
    import onnx

    x, y = cifar_test
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2023, 0.1994, 0.2010], np.float32).reshape(1, 3, 1, 1)
    xs = ((x[:500].astype(np.float32) / 255 - mean) / std).astype(np.float32)
    model = onnx.load(shared_models / "resnet56_nm.onnx")

    def acc(**kw):
        return float((run(compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=None, **kw)).model, xs)
                      .argmax(1) == y[:500]).mean() * 100)

    udfc, nm, prune = acc(), acc(method="nm"), acc(method="prune")
    assert udfc > nm + 5 and udfc > prune + 20, (udfc, nm, prune)
