"""Tests of the synthetic ONNX model builders in ``models/builders``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.builders import (  # noqa: E402
    BUILDERS,
    build_conv_chain,
    build_conv_flatten_gemm,
    build_densenet,
    build_depthwise_block,
    build_mlp,
    build_resnet50,
    build_vgg16_bn,
    calibration_batch,
    count_params,
    input_size_of,
)
from models.builders.__main__ import main as cli_main  # noqa: E402

OPSETS = (11, 13, 17, 21)
NAMES = sorted(BUILDERS)
# Graphs whose head is GlobalAveragePool (so H, W may be symbolic).
GAP_HEADS = ("resnet18", "resnet50", "mobilenetv2", "densenet", "conv_chain", "residual_block",
             "concat_block", "depthwise_block")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # tiny graphs: threads only add overhead on a busy box
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _session(model).run(["logits"], {"input": x})[0]


def _batch(model: onnx.ModelProto, n: int = 2, size: int | None = None) -> np.ndarray:
    c = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    s = size or input_size_of(model)
    return np.random.default_rng(123).standard_normal((n, c, s, s)).astype(np.float32)


def _meta(model: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def _inits(model: onnx.ModelProto) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _close(a: np.ndarray, b: np.ndarray, rel: float = 1e-4) -> bool:
    return float(np.abs(a - b).max()) <= rel * float(np.abs(a).max())


# --------------------------------------------------------------------------
# Every registry entry at every tested opset
# --------------------------------------------------------------------------
def test_registry_names():
    assert set(BUILDERS) == {
        "vgg16_bn_cifar", "vgg16_bn_imagenet", "resnet18", "resnet50", "mobilenetv2", "densenet",
        "mlp", "conv_chain", "conv_flatten_gemm", "residual_block", "concat_block",
        "depthwise_block",
    }


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", NAMES)
def test_registry_model(name, opset):
    m_bn = BUILDERS[name](opset=opset, with_bn=True)
    m_fold = BUILDERS[name](opset=opset, with_bn=False)
    outs = []
    for m in (m_bn, m_fold):
        onnx.checker.check_model(m, full_check=True)
        assert m.opset_import[0].version == opset and m.opset_import[0].domain == ""
        (inp,), (out,) = m.graph.input, m.graph.output
        assert inp.name == "input" and out.name == "logits"
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert inp.type.tensor_type.shape.dim[0].dim_param == "N"
        classes = out.type.tensor_type.shape.dim[1].dim_value
        y = _run(m, _batch(m))
        assert y.shape == (2, classes) and np.isfinite(y).all()
        assert 1e-2 < y.std() < 1e2, f"badly scaled logits: std={y.std()}"
        outs.append(y)
    assert _close(outs[0], outs[1]), np.abs(outs[0] - outs[1]).max()

    ops_bn = [n.op_type for n in m_bn.graph.node]
    ops_fold = [n.op_type for n in m_fold.graph.node]
    if name == "mlp":  # with_bn=True adds 1-D BNs (default is the plain MLP)
        assert "BatchNormalization" in ops_bn
    if name == "densenet":  # pre-activation BNs cannot be folded: they stay
        assert 0 < ops_fold.count("BatchNormalization") < ops_bn.count("BatchNormalization")
    else:
        assert "BatchNormalization" not in ops_fold
        assert all(len(n.input) == 3 for n in m_fold.graph.node if n.op_type in ("Conv", "Gemm"))
    for n in m_bn.graph.node:
        if n.op_type == "BatchNormalization":
            assert len(n.input) == 5 and len(n.output) == 1
            assert onnx.helper.get_attribute_value(n.attribute[0]) == pytest.approx(1e-5)


def test_registry_defaults_fast():
    import time

    for name in NAMES:
        t0 = time.perf_counter()
        m = BUILDERS[name]()
        t1 = time.perf_counter()
        sess = _session(m)
        x = _batch(m, n=1)
        sess.run(None, {"input": x})
        t2 = time.perf_counter()
        sess.run(None, {"input": x})
        t3 = time.perf_counter()
        # Generous bounds (shared CI boxes); typical numbers are 10x lower.
        assert t1 - t0 < 4.0, (name, t1 - t0)
        assert t3 - t2 < 0.5, (name, t3 - t2)
        assert t2 - t1 < 10.0


# --------------------------------------------------------------------------
# BN statistics, dead channels, determinism
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "densenet", "vgg16_bn_cifar"])
def test_bn_running_stats_match_calibration_batch(name):
    m = BUILDERS[name](calib_images=8)
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    # Expose every BN input as an extra graph output and run the calibration batch.
    for n in bns:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.input[0]))
    x = calibration_batch(3, input_size_of(m), 8, seed=0)
    sess = _session(m)
    vals = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    inits = _inits(m)
    dead = total = 0
    for n in bns:
        a = vals[n.input[0]].astype(np.float64)
        axes = (0,) if a.ndim == 2 else (0, 2, 3)
        mean, var = inits[n.input[3]], inits[n.input[4]]
        assert (var > 0).all()
        # Means agree to a small fraction of each channel's std.
        assert (np.abs(a.mean(axis=axes) - mean) <= 1e-3 * np.sqrt(var) + 1e-5).all(), n.name
        np.testing.assert_allclose(np.maximum(a.var(axis=axes), 1e-6), var, rtol=2e-3, atol=1e-5)
        gamma = inits[n.input[1]]
        dead += int((np.abs(gamma) < 1e-3).sum())
        total += gamma.size
    assert 0.03 < dead / total < 0.08


def test_dead_channels_and_bn_ranges():
    inits = _inits(BUILDERS["resnet18"]())
    gammas = np.concatenate([v for k, v in inits.items() if k.endswith("bn1.weight") or
                             k.endswith("bn2.weight")])
    live = gammas[np.abs(gammas) >= 1e-3]
    assert (np.abs(gammas) < 1e-3).any()
    assert live.min() >= 0.5 and live.max() <= 1.5


def test_deterministic_from_seed():
    a = BUILDERS["residual_block"](seed=3).SerializeToString()
    b = BUILDERS["residual_block"](seed=3).SerializeToString()
    c = BUILDERS["residual_block"](seed=4).SerializeToString()
    assert a == b and a != c


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
@pytest.mark.parametrize("opset", range(11, 22))
def test_every_opset_small_graphs(opset):
    for m in (build_conv_chain(opset=opset, activation="relu6", with_pool=True),
              build_depthwise_block(opset=opset, with_bn=False)):
        onnx.checker.check_model(m, full_check=True)
        assert np.isfinite(_run(m, _batch(m))).all()


@pytest.mark.parametrize("activation", ["relu", "relu6", "leakyrelu", "none"])
def test_conv_chain_activations(activation):
    m_bn = build_conv_chain(activation=activation, with_pool=True)
    m_fold = build_conv_chain(activation=activation, with_pool=True, with_bn=False)
    x = _batch(m_bn)
    assert _close(_run(m_bn, x), _run(m_fold, x))
    ops = {n.op_type for n in m_bn.graph.node}
    expect = {"relu": "Relu", "relu6": "Clip", "leakyrelu": "LeakyRelu", "none": None}[activation]
    assert expect is None or expect in ops
    assert "MaxPool" in ops
    with pytest.raises(ValueError):
        build_conv_chain(activation="gelu")


@pytest.mark.parametrize("name", GAP_HEADS)
def test_dynamic_spatial(name):
    m = BUILDERS[name](dynamic_spatial=True)
    onnx.checker.check_model(m, full_check=True)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]
    assert input_size_of(m) == 32
    sess = _session(m)
    for s in (32, 48):
        y = sess.run(None, {"input": _batch(m, size=s)})[0]
        assert y.shape[0] == 2 and np.isfinite(y).all()


@pytest.mark.parametrize("name", ["vgg16_bn_cifar", "vgg16_bn_imagenet", "mlp", "conv_flatten_gemm"])
def test_dynamic_spatial_rejected_for_flatten_heads(name):
    with pytest.raises(ValueError):
        BUILDERS[name](dynamic_spatial=True)


def test_invalid_options():
    for kw in (dict(opset=10), dict(width=0), dict(calib_images=1)):
        with pytest.raises(ValueError):
            build_conv_chain(**kw)
    with pytest.raises(ValueError):
        build_vgg16_bn(head="tiny")
    with pytest.raises(ValueError):
        build_vgg16_bn(input_size=40)
    with pytest.raises(ValueError):
        build_mlp(sizes=(100, 10))


def test_conv_flatten_gemm_layout():
    m = build_conv_flatten_gemm()
    inits = _inits(m)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    (gemm,) = [n for n in m.graph.node if n.op_type == "Gemm"]
    c_last = inits[convs[-1].input[1]].shape[0]
    assert inits[gemm.input[1]].shape == (10, c_last * 16)  # channel c owns columns 16c..16c+15
    nxt = {i: n.op_type for n in m.graph.node for i in n.input}
    relu_out = [n for n in m.graph.node if n.op_type == "Relu"][-1].output[0]
    assert nxt[relu_out] == "Flatten"


def test_width_and_heads():
    small = count_params(BUILDERS["resnet18"](width=0.125))
    assert small < count_params(BUILDERS["resnet18"]()) / 3
    m = BUILDERS["vgg16_bn_imagenet"]()
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3 and _meta(m)["input_size"] == "64"
    m = BUILDERS["vgg16_bn_cifar"]()
    assert [n.op_type for n in m.graph.node][-4:] == ["Gemm", "BatchNormalization", "Relu", "Gemm"]
    m = build_densenet(blocks=(2, 2, 2), growth=4, num_classes=7)
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 7
    assert sum(n.op_type == "Concat" for n in m.graph.node) == 6


def test_resnet50_imagenet_param_count():
    # Build only (calibrate on 2 images to keep it quick); real size ~25.6M.
    m = build_resnet50(width=1.0, input_size=224, calib_images=2)
    n = count_params(m)
    assert 25_000_000 <= n <= 26_000_000, n
    conv1 = next(i for i in m.graph.initializer if i.name == "conv1.weight")
    assert list(conv1.dims) == [64, 3, 7, 7]
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 1000


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def test_cli(tmp_path, capsys):
    out = tmp_path / "chain.onnx"
    assert cli_main(["conv_chain", str(out), "--opset", "17", "--no-bn", "--width", "2",
                     "--seed", "5"]) == 0
    m = onnx.load(str(out))
    assert m.opset_import[0].version == 17
    assert "BatchNormalization" not in {n.op_type for n in m.graph.node}
    assert _meta(m)["seed"] == "5" and _meta(m)["width"] == "2.0"
    assert "conv_chain" in capsys.readouterr().out


def test_cli_module_entry_point(tmp_path):
    out = tmp_path / "dw.onnx"
    r = subprocess.run([sys.executable, "-m", "models.builders", "depthwise_block", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
