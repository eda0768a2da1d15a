"""Full int8 QDQ output: data-free ranges, placement that ORT fuses, calibration, INT4 storage."""
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.builders import build_concat_block, build_conv_chain, build_residual_block
from tests.graphs import conv_chain
from udfc_onnx import CompressConfig, InvalidConfigError, compress_model
from udfc_onnx.activations import ADD_CORRELATION, Dist, rectified_moments, uint8_params
from udfc_onnx.cli import main
from udfc_onnx.graph import GraphView, set_initializer
from udfc_onnx.int8 import calibrate_ranges, check_fusion, estimate_dists, load_calibration
from udfc_onnx.pipeline import analyze

W8A8 = dict(weight_bits=8, activations="uint8")


def run(model_or_path, x):
    src = str(model_or_path) if not hasattr(model_or_path, "SerializeToString") else model_or_path.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def cosine(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def fused(model, tmp_path):
    path = tmp_path / "int8.onnx"
    onnx.save(model, path)
    return check_fusion(path), path


# ---------------------------------------------------------------------------- activations (NumPy)
def test_rectified_moments_match_monte_carlo(rng):
    mu, sigma = np.array([-1.0, 0.0, 0.7, 2.0]), np.array([0.5, 1.0, 2.0, 0.0])
    samples = np.maximum(mu[:, None] + sigma[:, None] * rng.standard_normal((4, 400_000)), 0)
    mean, var = rectified_moments(mu, sigma)
    np.testing.assert_allclose(mean, samples.mean(1), atol=0.01)
    np.testing.assert_allclose(var, samples.var(1), atol=0.02)


def test_range_relu_starts_at_zero_and_contains_zero():
    d = Dist(np.array([1.0, -0.5]), np.array([0.5, 2.0]))
    assert d.range(3.0) == pytest.approx((-6.5, 5.5))
    assert d.with_relu().range(3.0) == pytest.approx((0.0, 5.5))
    assert Dist(np.array([5.0]), np.array([0.1])).range(3.0)[0] == 0.0  # zero stays representable
    assert d.clipped(0.0, 6.0).range(10.0) == pytest.approx((0.0, 6.0))


def test_uint8_params_zero_point():
    scale, zp = uint8_params(0.0, 2.55)
    assert zp == 0 and scale == pytest.approx(0.01, rel=1e-6)
    scale, zp = uint8_params(-1.0, 1.55)
    assert zp == 100 and scale == pytest.approx(0.01, rel=1e-6)


def test_add_of_different_channel_counts_broadcasts_a_summary():
    a = Dist(np.zeros(4), np.ones(4))
    b = Dist(np.array([1.0, 3.0]), np.zeros(2))
    out = a.added(b)
    mean, var = out.moments()
    assert out.channels == 4
    np.testing.assert_allclose(mean, 2.0, atol=1e-12)
    # 1 (a) + 1 (spread of b's channels) + the assumed correlation between the two inputs
    np.testing.assert_allclose(var, 2.0 + 2 * ADD_CORRELATION, atol=1e-12)


# ---------------------------------------------------------------------------- ranges from BN statistics
def test_bn_ranges_cover_the_measured_activations(rng):
    model = build_conv_chain()  # BN statistics calibrated on N(0, 1) inputs, like the test inputs below
    folded, stats, _, _, _ = analyze(model, CompressConfig(weight_bits=None))
    dists = estimate_dists(folded, stats)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    bn_tensors = [n for n, d in dists.items() if d.source == "bn"]
    assert bn_tensors
    observed = calibrate_ranges(folded, x, bn_tensors)
    for name in bn_tensors:
        lo, hi = dists[name].range(6.0)
        assert lo <= observed[name][0] + 1e-6 and observed[name][1] <= hi + 1e-6, name


# ---------------------------------------------------------------------------- emission and fusion
@pytest.mark.parametrize("builder, qlinear, slow", [
    (lambda: build_conv_chain(with_pool=True), {"QLinearConv": 3, "QGemm": 1}, ["conv1: 4->8"]),
    (build_residual_block, {"QLinearConv": 6, "QLinearAdd": 2, "QLinearGlobalAveragePool": 1, "QGemm": 1}, []),
    (build_concat_block, {"QLinearConv": 4, "QLinearConcat": 1}, ["branch1x1: 16->8"]),
])
def test_every_layer_is_fused_and_outputs_stay_close(builder, qlinear, slow, tmp_path, rng):
    model = builder()
    result = compress_model(model, CompressConfig(**W8A8, activation_sigmas=6))
    assert not result.int8.weight_only
    assert not any(n.op_type == "Relu" for n in result.model.graph.node)  # absorbed by zero-point-0 Q
    report, path = fused(result.model, tmp_path)
    for op, count in qlinear.items():
        assert report.qlinear_ops.get(op, 0) == count, (op, report.qlinear_ops)
    assert report.fused_convs == report.convs
    # 8 output channels: fused, but off ORT's fast int8 conv kernel, and said so
    assert report.slow_convs == slow and len(report.warnings) == len(slow) == sum("slower int8 path" in w for w in report.warnings)
    assert report.leftover_q == 1 and report.leftover_dq == 0  # only the model input is quantized at run time
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert cosine(run(path, x), run(model, x)) > 0.99


def test_pruned_densenet_is_int8_throughout(tmp_path, rng):
    # Its transition BN stays in the graph after a Concat of pruned layers: the conv reading it
    # gets a range from the BN's sliced parameters (its statistics count every channel).
    from models.builders import BUILDERS

    model = BUILDERS["densenet"]()
    result = compress_model(model, CompressConfig(prune_ratio=0.3, **W8A8))
    assert any(u.kept < u.channels for u in result.solution.units)
    assert not result.int8.weight_only
    report, path = fused(result.model, tmp_path)
    assert report.fused_convs == report.convs
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert cosine(run(path, x), run(model, x)) > 0.99


@pytest.mark.parametrize("channels, expansion, slow", [(16, 4, []), (8, 3, ["depthwise 24"])])
def test_depthwise_channel_counts_off_the_fast_kernel_are_listed(channels, expansion, slow, tmp_path):
    # ORT's int8 depthwise kernel takes multiples of 16 channels (64 is one, 24 is not)
    from models.builders import build_depthwise_block

    model = build_depthwise_block(channels=channels, expansion=expansion)
    report, _ = fused(compress_model(model, CompressConfig(**W8A8)).model, tmp_path)
    assert report.fused_convs == report.convs
    assert [c.split(": ", 1)[1] for c in report.slow_convs if "depthwise" in c] == slow


def test_bias_is_int32_with_input_times_weight_scale(tmp_path):
    result = compress_model(conv_chain(), CompressConfig(**W8A8))
    model = result.model
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        x_dq, w_dq, b_dq = (producers[i] for i in conv.input)
        assert inits[b_dq.input[0]].dtype == np.int32 and inits[w_dq.input[0]].dtype == np.int8
        expected = inits[x_dq.input[1]].astype(np.float64) * inits[w_dq.input[1]].astype(np.float64)
        np.testing.assert_allclose(inits[b_dq.input[1]], expected, rtol=1e-6)
        assert not np.any(inits[w_dq.input[2]])  # symmetric weights


def test_narrow_range_4bit_weights_keep_the_fused_kernel(tmp_path):
    result = compress_model(conv_chain(), CompressConfig(weight_bits=4, activations="uint8"))
    report, _ = fused(result.model, tmp_path)
    assert report.fused_convs == report.convs == 3
    weights = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name.endswith("weight_quantized")]
    assert weights and all(np.abs(w).max() <= 7 for w in weights)


@pytest.mark.parametrize("in_channels, padded", [(3, 4), (5, 8), (4, None)])
def test_int8_conv_input_channels_are_padded_to_a_multiple_of_4(in_channels, padded, tmp_path, rng, monkeypatch):
    # ORT's fast int8 conv kernel takes input channel counts that are multiples of 4 only (an RGB
    # stem is not): zero channels, in the uint8 input and the weight, change no output value.
    import udfc_onnx.int8 as int8

    model = build_conv_chain(channels=(in_channels, 16, 16))
    config = CompressConfig(**W8A8)
    result = compress_model(model, config)
    stem = result.model.graph.node[[n.op_type for n in result.model.graph.node].index("Conv")].name
    assert result.int8.padded_inputs == ({stem: (in_channels, padded)} if padded else {})
    pads = [n for n in result.model.graph.node if n.op_type == "Pad"]
    assert len(pads) == (1 if padded else 0)
    report, path = fused(result.model, tmp_path)
    assert report.fused_convs == report.convs == 2 and not report.warnings
    monkeypatch.setattr(int8, "CONV_INPUT_CHANNEL_MULTIPLE", 1)
    plain = compress_model(model, config)
    assert not plain.int8.padded_inputs
    x = rng.standard_normal((4, in_channels, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(run(path, x), run(plain.model, x))  # the same values, bit for bit


@pytest.mark.parametrize("activations, multiple, kept", [
    ("uint8", None, [16, 32, 48, 48]),  # int8 default: multiples of 16 (9 -> 16 leaves a unit whole)
    ("uint8", 1, [9, 19, 38, 38]),      # the paper's int(C*(1-r))
    ("float", None, [9, 19, 38, 38]),
    ("float", 8, [16, 24, 40, 40]),
])
def test_int8_output_keeps_channel_counts_in_multiples_of_16(activations, multiple, kept):
    model = build_conv_chain(channels=(3, 16, 32, 64, 64))
    config = CompressConfig(prune_ratio=0.4, weight_bits=8, activations=activations, channel_multiple=multiple)
    _, _, _, plan, _ = analyze(model, config)
    assert sorted(len(up.keep) for up in plan.units) == kept
    result = compress_model(model, config)
    assert any("multiples of 16" in n for n in result.notes) == (activations == "uint8" and multiple is None)


def test_pruning_below_16_channels_in_int8_is_flagged(tmp_path, capsys):
    src, out = tmp_path / "chain.onnx", tmp_path / "out.onnx"
    onnx.save(build_conv_chain(channels=(3, 16, 32, 32)), src)
    assert main([str(src), str(out), "--activations", "uint8", "--prune-ratio", "0.5", "--channel-multiple", "1"]) == 0
    printed = capsys.readouterr().out
    assert "warning: 1 pruned unit(s) keep fewer than 16 channels" in printed and ": 8/16)" in printed
    out.unlink()
    assert main([str(src), str(out), "--activations", "uint8", "--prune-ratio", "0.5"]) == 0
    assert "fewer than 16" not in capsys.readouterr().out


def test_pruned_counts_off_the_fast_kernels_multiple_of_8_are_flagged(tmp_path, capsys):
    src, out = tmp_path / "chain.onnx", tmp_path / "out.onnx"
    onnx.save(build_conv_chain(channels=(3, 32, 32, 32)), src)
    args = [str(src), str(out), "--activations", "uint8", "--prune-ratio", "0.4", "--channel-multiple"]
    assert main(args + ["1"]) == 0  # int(32 * 0.6) = 19
    printed = capsys.readouterr().out
    assert "warning: 3 pruned unit(s) keep a channel count that is not a multiple of 8" in printed and ": 19/32)" in printed
    assert main(args + ["8"]) == 0  # 24
    assert "not a multiple of 8" not in capsys.readouterr().out


def test_asymmetric_request_is_made_symmetric():
    result = compress_model(conv_chain(), CompressConfig(**W8A8, symmetric=False))
    assert any("symmetric" in note for note in result.notes) and not result.int8.weight_only


def test_weight_only_output_warns_it_is_slower(tmp_path):
    result = compress_model(conv_chain(), CompressConfig(weight_bits=8))
    report, _ = fused(result.model, tmp_path)
    assert report.fused_convs == 0 and report.float_weight_dq == 4
    assert any("slower than the float model" in w for w in report.warnings)


def test_int4_storage_is_opset21_int4_and_warns(tmp_path, rng):
    model = conv_chain()
    result = compress_model(model, CompressConfig(weight_bits=4, activations="uint8", int4_storage=True))
    assert max(i.version for i in result.model.opset_import if i.domain in ("", "ai.onnx")) >= 21
    int4 = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= 8  # weights and their zero points
    report, path = fused(result.model, tmp_path)
    assert any("INT4" in w and "slower" in w for w in report.warnings)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert cosine(run(path, x), run(model, x)) > 0.95


# ---------------------------------------------------------------------------- calibration
def test_calibration_file_forms(tmp_path, rng):
    images = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", x=images, y=np.zeros(6))
    np.savez(tmp_path / "named.npz", input=np.ones((2, 3, 8, 8), np.float32))
    x = load_calibration(tmp_path / "u8.npz", "input", "cifar")
    expected = (images[0, 0, 0, 0] / 255 - 0.4914) / 0.2023
    assert x.dtype == np.float32 and x[0, 0, 0, 0] == pytest.approx(expected, rel=1e-5)
    assert load_calibration(tmp_path / "named.npz", "input").shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="calibration_norm"):
        load_calibration(tmp_path / "u8.npz", "input")


def test_calibrated_ranges_are_the_observed_min_max(tmp_path, rng):
    model = conv_chain()
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    result = compress_model(model, CompressConfig(**W8A8, calibration=str(tmp_path / "calib.npz")))
    assert "calibration (8 samples" in result.int8.range_source
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    # The input's grid is the observed [min, max] of the samples.
    q_in = next(n for n in result.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    scale, zp = float(inits[q_in.input[1]]), int(inits[q_in.input[2]])
    assert scale == pytest.approx((x.max() - x.min()) / 255, rel=1e-5)
    assert zp == round(-x.min() / scale)
    assert cosine(run(result.model, x), run(model, x)) > 0.99


# ---------------------------------------------------------------------------- options and CLI
@pytest.mark.parametrize("changes, match", [
    (dict(activations="int8"), "activations"),
    (dict(activations="uint8", weight_bits=None), "weight_bits"),
    (dict(activation_sigmas=0), "activation_sigmas"),
    (dict(activation_sigmas=math.inf), "activation_sigmas"),
    (dict(calibration="x.npz"), "calibration"),
    (dict(int4_storage=True, weight_bits=8), "int4_storage"),
    (dict(calibration_norm="mnist"), "calibration_norm"),
    (dict(channel_multiple=0), "channel_multiple"),
    (dict(channel_multiple=True), "channel_multiple"),
])
def test_config_rejects(changes, match):
    with pytest.raises(InvalidConfigError, match=match):
        CompressConfig(**changes)


def test_cli_reports_fusion(tmp_path, capsys):
    src, out = tmp_path / "chain.onnx", tmp_path / "out.onnx"
    onnx.save(conv_chain(channels=(3, 16, 16, 16)), src)
    assert main([str(src), str(out), "--activations", "uint8"]) == 0
    printed = capsys.readouterr().out
    assert "3/3 Conv -> QLinearConv" in printed and "warning" not in printed
    assert main([str(src), str(out), "--weight-bits", "8"]) == 0
    assert "warning" in capsys.readouterr().out
    onnx.save(conv_chain(channels=(3, 8, 12, 16)), src)  # 8 and 12 output channels: the slower int8 path
    assert main([str(src), str(out), "--activations", "uint8"]) == 0
    printed = capsys.readouterr().out
    assert "3/3 Conv -> QLinearConv" in printed and "warning: 2 QLinearConv(s) have channel counts" in printed


def test_resnet56_int8_data_free(shared_models, cifar_test, tmp_path):
    x, y = cifar_test
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2023, 0.1994, 0.2010], np.float32).reshape(1, 3, 1, 1)
    images = ((x[:500].astype(np.float32) / 255 - mean) / std).astype(np.float32)
    model = onnx.load(shared_models / "resnet56_nm.onnx")
    result = compress_model(model, CompressConfig(**W8A8))
    report, path = fused(result.model, tmp_path)
    assert report.fused_convs == report.convs == 57 and report.qlinear_ops["QLinearAdd"] == 27
    acc_float = (run(model, images).argmax(1) == y[:500]).mean()
    acc_int8 = (run(path, images).argmax(1) == y[:500]).mean()
    assert acc_int8 >= acc_float - 0.015  # 500 images: 1.5 points of slack over the 0.5-point target on 10k


def test_calibration_sees_the_pruned_weights(tmp_path, rng):
    # The pipeline does not write float weights that become integers; calibration must use the solved ones.
    model = conv_chain()
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    pruned = dict(prune_ratio=0.5, **W8A8)
    calibrated = compress_model(model, CompressConfig(**pruned, calibration=str(tmp_path / "calib.npz")))
    data_free = compress_model(model, CompressConfig(**pruned))
    assert cosine(run(calibrated.model, x), run(data_free.model, x)) > 0.99


def test_input_scale_is_read_from_the_first_bn(tmp_path, rng):
    # A model that expects raw-scale inputs (x100): its first Conv is 100x smaller, the BN statistics
    # are unchanged. The N(0, 1) assumption would clip such inputs at +-3; the first BN tells the scale.
    model = build_conv_chain()
    view = GraphView(model)
    first = view.consumers["input"][0]
    set_initializer(model, first.input[1], view.array(first.input[1]) / 100)
    folded, stats, _, _, _ = analyze(model, CompressConfig(weight_bits=None))
    lo, hi = estimate_dists(folded, stats)["input"].range(6.0)
    assert 200 < hi < 600 and -600 < lo < -200  # mean 0, s ~ 100, bounded at 3 s (loose: BN of 16 images)
    result = compress_model(model, CompressConfig(**W8A8))
    x = (100 * rng.standard_normal((4, 3, 32, 32))).astype(np.float32)
    assert cosine(run(result.model, x), run(model, x)) > 0.99


@pytest.mark.parametrize("options", [["--activations", "uint8"], []])  # full int8, and weight-only (warned)
def test_the_reported_fusion_is_what_a_separate_session_finds(tmp_path, options):
    # compress_file counts from the graph its validation session saved (ORT's default level);
    # check_fusion builds its own session at the extended level: the counts must agree.
    import json

    src = tmp_path / "res.onnx"
    onnx.save(build_residual_block(), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, report = out_dir / "m.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--weight-bits", "8", "--report", str(report), "-q", *options]) == 0
    fusion = json.loads(report.read_text())["fusion"]
    separate = check_fusion(out)
    assert (fusion["convs"], fusion["fused_convs"], fusion["float_weight_dq"]) == \
        (separate.convs, separate.fused_convs, separate.float_weight_dq)
    assert fusion["fused_convs"] == (separate.convs if options else 0)
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx"]  # ORT's optimised copy is not left behind
