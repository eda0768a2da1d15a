"""Graph passes: BN fold, unit discovery, rewrite and QDQ emission, checked in ORT."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from tests.graphs import conv_chain
from udfc_onnx import CompressConfig, compress_model
from udfc_onnx.fold import fold_batchnorm
from udfc_onnx.graph import set_initializer
from udfc_onnx.stats import read_bn_stats
from udfc_onnx.units import find_units


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_fold_matches_unfolded_model(rng):
    model = conv_chain()
    folded, record = fold_batchnorm(model)
    assert len(record.folded) == 3 and not record.skipped
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(folded, x), run(model, x), rtol=1e-5, atol=1e-5)
    assert len(model.graph.node) == 12  # input untouched


def test_fold_skips_shared_bn_input():
    model = conv_chain()
    # A second reader of conv0's output makes the fold unsafe: that reader needs the unnormalised map.
    model.graph.node.append(onnx.helper.make_node("Identity", ["c0"], ["extra"], name="tap"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))
    _, record = fold_batchnorm(model)
    assert ("bn0", "output of conv0 is also read by other nodes") in record.skipped


def test_read_bn_stats_keyed_by_conv():
    stats = read_bn_stats(conv_chain())
    assert set(stats) == {"conv0", "conv1", "conv2"}
    st = stats["conv1"]
    np.testing.assert_allclose(st.a, st.gamma / np.sqrt(st.var + 1e-5))


def test_find_units_chain_and_reasons():
    folded, _ = fold_batchnorm(conv_chain(pool=True))
    units, skipped = find_units(folded)
    assert [(u.producer, u.consumers[0].node) for u in units] == [("conv0", "conv1"), ("conv1", "conv2"), ("conv2", "fc")]
    assert units[0].path == ("relu0", "pool0") and not units[0].linear_path
    assert units[2].consumers[0].kind == "gemm" and units[2].consumers[0].block == 1
    assert [(s.node, s.reason) for s in skipped] == [("fc", "channels reach the graph output 'logits'")]


def test_units_skip_residual_fanout():
    model = conv_chain()
    model.graph.node.append(onnx.helper.make_node("Identity", ["r1"], ["tap"], name="tap"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("tap", onnx.TensorProto.FLOAT, None))
    folded, _ = fold_batchnorm(model)
    _, skipped = find_units(folded)
    assert any(s.node == "conv1" and "graph output 'tap'" in s.reason for s in skipped)


def test_lossless_settings_reproduce_the_model(rng):
    model = conv_chain()
    out = compress_model(model, CompressConfig(prune_ratio=0.0, weight_bits=None)).model
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(model, x), rtol=1e-4, atol=1e-5)


def _linear_chain_with_redundant_channels(rng):
    """conv0 (8 ch) -> conv1, no activation; channels 5..7 are small exact combinations of 0..4."""
    model = conv_chain((3, 8, 6), bn=False, relu=False, head=None)
    w = numpy_helper.to_array([t for t in model.graph.initializer if t.name == "conv0.weight"][0]).astype(np.float64)
    b = numpy_helper.to_array([t for t in model.graph.initializer if t.name == "conv0.bias"][0]).astype(np.float64)
    coef = rng.uniform(-0.2, 0.2, (5, 3))
    w[5:] = np.einsum("ij,icuv->jcuv", coef, w[:5])
    b[5:] = coef.T @ b[:5]
    set_initializer(model, "conv0.weight", w.astype(np.float32))
    set_initializer(model, "conv0.bias", b.astype(np.float32))
    return model


def test_udfc_compensation_is_exact_when_pruned_channels_are_combinations(rng):
    model = _linear_chain_with_redundant_channels(rng)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = run(model, x)
    result = compress_model(model, CompressConfig(prune_ratio=0.375, weight_bits=None, method="udfc"))
    assert result.plan.units[0].drop == (5, 6, 7)
    conv0 = [t for t in result.model.graph.initializer if t.name == "conv0.weight"][0]
    assert list(conv0.dims) == [5, 3, 3, 3]
    np.testing.assert_allclose(run(result.model, x), ref, rtol=1e-4, atol=1e-4)
    plain = compress_model(model, CompressConfig(prune_ratio=0.375, weight_bits=None, method="prune")).model
    assert np.abs(run(plain, x) - ref).max() > 100 * np.abs(run(result.model, x) - ref).max()


def test_quantized_output_is_qdq_and_runs(rng):
    model = conv_chain()
    out = compress_model(model, CompressConfig(prune_ratio=0.25, weight_bits=4, symmetric=True)).model
    onnx.checker.check_model(out, full_check=True)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 4  # three convs and the Gemm
    ints = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    q = ints["conv1.weight_quantized"]
    assert q.shape[0] == 9 and -8 <= q.min() and q.max() <= 7  # 12 -> int(12*0.75) channels; 16 levels of int8
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref, got = run(model, x), run(out, x)
    assert got.shape == ref.shape and np.all(np.isfinite(got))
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.5


def test_gemm_consumer_after_flatten_of_a_map(rng):
    # conv -> relu -> flatten (C*H*W) -> gemm: each channel owns a column block of H*W.
    model = conv_chain((3, 4), head=None)
    from onnx import TensorProto, helper
    g = model.graph
    g.node.remove([n for n in g.node if n.name == "out"][0])
    g.node.append(helper.make_node("Flatten", ["r0"], ["flat"], name="flatten", axis=1))
    g.initializer.append(numpy_helper.from_array(rng.standard_normal((4 * 64, 7)).astype(np.float32), "fc.weight"))
    g.node.append(helper.make_node("Gemm", ["flat", "fc.weight"], ["logits"], name="fc"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 7]))
    result = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=None))
    cons = result.plan.units[0].unit.consumers[0]
    assert (cons.kind, cons.block) == ("gemm", 64)
    fc = [t for t in result.model.graph.initializer if t.name == "fc.weight"][0]
    assert list(fc.dims) == [2 * 64, 7]
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run(result.model, x).shape == (2, 7)
