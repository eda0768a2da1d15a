"""Channel groups on the ONNX graph: concat offsets, pre-activation BN, depthwise, flatten->Gemm,
Gemm producers, residual streams, activations, unknown ops; each checked in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.builders import BUILDERS
from udfc_onnx import CompressConfig, compress_model
from udfc_onnx.fold import fold_batchnorm
from udfc_onnx.pipeline import compress_file
from udfc_onnx.plan import Plan, inspect_model
from udfc_onnx.units import find_units


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rel_err(ref, out):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


class G:
    """Tiny graph writer: ``g.conv('x', 8, name='c0')`` appends a node and returns its output name."""

    def __init__(self, in_channels=3, spatial=8, opset=13, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.opset, self.in_channels, self.spatial = opset, in_channels, spatial
        self.channels = {"input": in_channels}

    def init(self, name, value, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op, inputs, name, channels=None, domain="", **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, domain=domain, **attrs))
        self.channels[name] = channels if channels is not None else self.channels.get(inputs[0])
        return name

    def conv(self, x, cout, name, k=3, group=1, bias=True, weight=None):
        cin = self.channels[x]
        w = weight if weight is not None else self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k))
        ins = [x, self.init(f"{name}.w", w)]
        if bias:
            ins.append(self.init(f"{name}.b", self.rng.normal(0, 0.1, cout)))
        return self.node("Conv", ins, name, cout, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x, name, gamma=None, beta=None, mean=None, var=None):
        c = self.channels[x]
        vals = [gamma if gamma is not None else self.rng.uniform(0.5, 1.5, c),
                beta if beta is not None else self.rng.normal(0, 0.3, c),
                mean if mean is not None else self.rng.normal(0, 0.3, c),
                var if var is not None else self.rng.uniform(0.5, 2.0, c)]
        ins = [x] + [self.init(f"{name}.{p}", v) for p, v in zip(("g", "b", "m", "v"), vals)]
        return self.node("BatchNormalization", ins, name, epsilon=1e-5)

    def head(self, x, classes=5):
        gap = self.node("GlobalAveragePool", [x], "gap")
        flat = self.node("Flatten", [gap], "flatten", axis=1)
        w = self.init("fc.w", self.rng.standard_normal((classes, self.channels[x])) * 0.3)
        b = self.init("fc.b", self.rng.normal(0, 0.1, classes))
        self.nodes.append(helper.make_node("Gemm", [flat, w, b], ["logits"], name="fc", transB=1))
        self.channels["logits"] = classes
        return "logits"

    def model(self, out, out_shape=None, extra_opsets=()):
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", self.in_channels, self.spatial, self.spatial])
        shape = out_shape or ["N", self.channels[out]]
        graph = helper.make_graph(self.nodes, "g", [inp], [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
                                  self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        m = helper.make_model(graph, opset_imports=opsets)
        m.ir_version = 8
        return m

    def x(self, n=4, seed=1):
        return np.random.default_rng(seed).standard_normal((n, self.in_channels, self.spatial, self.spatial)).astype(np.float32)


def _units(model, **kw):
    return find_units(fold_batchnorm(model)[0], **kw)


def _unit(units, producer):
    return next(u for u in units if u.producer == producer)


# ---------------------------------------------------------------------------------------------
# concat + pre-activation BN: exact compensation in the linear regime, offsets for every consumer
# ---------------------------------------------------------------------------------------------
def _redundant_filters(rng, n_keep, n_extra, cin, k=3, scale=0.2):
    base = rng.standard_normal((n_keep, cin, k, k)) * np.sqrt(2 / (cin * k * k))
    coef = rng.uniform(-scale, scale, (n_keep, n_extra))
    extra = np.einsum("ij,icuv->jcuv", coef, base)
    return np.concatenate([base, extra]), coef


def test_concat_with_preactivation_bn_is_exact_in_the_linear_regime(rng):
    """Two producers concatenated, a BN on the concat (DenseNet style), linear consumers.

    Pruned filters are exact combinations of kept ones and the BN statistics are consistent
    with that, so UDFC (coefficients c_ij * a_j / a_i per consumer BN, offsets through the
    concat, BN sliced at both offsets) must reproduce the output; plain pruning must not.
    """
    g = G(spatial=6)
    wa, ca = _redundant_filters(rng, 5, 3, 3)
    wb, cb = _redundant_filters(rng, 2, 2, 3)
    a = g.conv("input", 8, "convA", bias=False, weight=wa)
    b = g.conv("input", 4, "convB", bias=False, weight=wb)
    cat = g.node("Concat", [a, b], "cat", 12, axis=1)
    # running means consistent with the linear dependence (y_j = sum_i c_ij y_i)
    mean = np.zeros(12)
    mean[:5] = rng.normal(0, 0.3, 5)
    mean[5:8] = ca.T @ mean[:5]
    mean[8:10] = rng.normal(0, 0.3, 2)
    mean[10:12] = cb.T @ mean[8:10]
    n1 = g.bn(cat, "norm1", mean=mean)
    c1 = g.conv(n1, 6, "consumer1", k=1)
    n2 = g.bn(cat, "norm2", mean=mean)
    c2 = g.conv(n2, 6, "consumer2", k=1)
    out = g.node("Add", [c1, c2], "sum", 6)
    model = g.model(out, ["N", 6, 6, 6])
    units, _ = _units(model)
    ua, ub = _unit(units, "convA"), _unit(units, "convB")
    assert [(c.node, c.offset) for c in ub.consumers] == [("consumer1", 8), ("consumer2", 8)]
    assert {m.node for m in ua.members} == {"norm1", "norm2"} and all(m.offset == 8 for m in ub.members)
    assert all(c.scale_by for c in ua.consumers)  # the consumer's BN ratio enters the coefficients
    x = g.x()
    ref = run(model, x)
    udfc = compress_model(model, CompressConfig(prune_ratio=0.375, weight_bits=None))
    assert [p.drop for p in udfc.plan.units] == [(5, 6, 7), (2, 3)]
    got = run(udfc.model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    bn = {t.name: t for t in udfc.model.graph.initializer}
    assert list(bn["norm1.g"].dims) == [7] and list(bn["consumer2.w"].dims) == [6, 7, 1, 1]
    plain = run(compress_model(model, CompressConfig(prune_ratio=0.375, weight_bits=None, method="prune")).model, x)
    assert rel_err(ref, plain) > 100 * rel_err(ref, got)


def test_densenet_groups_slice_every_preactivation_bn_and_run(rng):
    model = BUILDERS["densenet"](blocks=(3,), growth=8)
    units, skipped = _units(model)
    first = _unit(units, "denseblock1.denselayer1.conv2")  # growth 8 at offset 16 (stem has 2*growth)
    assert {c.node: c.offset for c in first.consumers} == {"denseblock1.denselayer2.conv1": 16,
                                                          "denseblock1.denselayer3.conv1": 16, "fc": 16}
    assert {m.node for m in first.members} == {"denseblock1.denselayer2.norm1", "denseblock1.denselayer3.norm1", "norm5"}
    assert [s.node for s in skipped] == ["fc"]
    out = compress_model(model, CompressConfig(prune_ratio=0.25, weight_bits=8))
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert run(out.model, x).shape == (4, 10)
    inits = {t.name: list(t.dims) for t in out.model.graph.initializer}
    # norm5 sees stem 16 + 3 x 8 channels, each group keeps int(0.75 C)
    assert inits["norm5.weight"] == [12 + 3 * 6]


# ---------------------------------------------------------------------------------------------
# depthwise, flatten -> Gemm, Gemm producers, residual streams
# ---------------------------------------------------------------------------------------------
def test_depthwise_channel_goes_with_its_expansion_channel():
    model = BUILDERS["depthwise_block"](channels=8, expansion=4)
    units, skipped = _units(model)
    expand = _unit(units, "block.expand")
    assert expand.kind == "depthwise" and expand.compensation == "mean"
    assert [m.node for m in expand.members] == ["block.dw"]
    assert "depthwise block.dw" in expand.consumers[0].note
    assert {s.node for s in skipped} == {"stem", "block.project", "fc"}
    result = compress_model(model, CompressConfig(prune_ratio=0.25, weight_bits=None))
    dw = next(n for n in result.model.graph.node if n.name == "block.dw")
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == 24  # 32 -> int(32 * 0.75)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = run(model, x)
    plain = compress_model(model, CompressConfig(prune_ratio=0.25, weight_bits=None, method="prune")).model
    assert rel_err(ref, run(result.model, x)) < rel_err(ref, run(plain, x))


def test_flatten_gemm_column_blocks_and_gemm_producers():
    model = BUILDERS["vgg16_bn_imagenet"](width=0.0625, input_size=64)
    units, _ = _units(model)
    last = _unit(units, "features.40")
    assert (last.consumers[0].node, last.consumers[0].block) == ("classifier.0", 4)  # 2x2 map per channel
    assert _unit(units, "classifier.0").consumers[0].node == "classifier.3"  # Gemm -> Relu -> Gemm
    result = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=8))
    inits = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert inits["classifier.0.weight_quantized"] == [128, 16 * 4]  # 256 -> 128 rows; 32 -> 16 channels x 4 columns
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert run(result.model, x).shape == (2, 1000)


def test_mlp_without_bn_statistics_is_pruned_without_filter_compensation():
    units, _ = _units(BUILDERS["mlp"]())
    assert [(u.producer, u.consumers[0].node) for u in units] == [("fc1", "fc2"), ("fc2", "fc")]
    from udfc_onnx.pipeline import analyze
    _, _, _, plan, _ = analyze(BUILDERS["mlp"](), CompressConfig(prune_ratio=0.3))
    assert all(u.unit.compensation == "none" and "no BN statistics" in u.unit.consumers[0].note for u in plan.units)
    _, _, _, plan_bn, _ = analyze(BUILDERS["mlp"](with_bn=True), CompressConfig(prune_ratio=0.3))
    assert all(u.unit.compensation == "full" for u in plan_bn.units)


def test_residual_stream_left_alone_by_default_and_one_group_on_request():
    model = BUILDERS["residual_block"](channels=8)
    units, skipped = _units(model)
    reasons = {s.node: s.reason for s in skipped}
    assert "residual stream" in reasons["conv1"] and "--prune-residual" in reasons["conv1"]
    assert [u.producer for u in units] == ["block1.conv1", "block2.conv1"]
    units, skipped = _units(model, prune_residual=True)
    stream = next(u for u in units if len(u.all_producers) > 1)
    assert stream.all_producers == ("conv1", "block1.conv2")
    assert {c.node for c in stream.consumers} == {"block1.conv1", "block2.conv1", "block2.downsample.0"}
    assert stream.compensation == "none" and stream.kind.startswith("residual")
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = run(model, x)
    same = compress_model(model, CompressConfig(prune_ratio=0.0, weight_bits=None, prune_residual=True)).model
    np.testing.assert_allclose(run(same, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    pruned = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=8, prune_residual=True)).model
    inits = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert inits["conv1.weight_quantized"][0] == inits["block1.conv2.weight_quantized"][0] == 4
    assert run(pruned, x).shape == (3, 10)


def test_plan_json_round_trips_groups():
    model = BUILDERS["densenet"](blocks=(2,), growth=4)
    from udfc_onnx.pipeline import analyze
    _, _, _, plan, _ = analyze(model, CompressConfig(prune_ratio=0.3))
    again = Plan.from_json(plan.to_json())
    assert again.units == plan.units and again.skipped == plan.skipped


# ---------------------------------------------------------------------------------------------
# activations, per-channel ops, reshape patterns, unknown ops
# ---------------------------------------------------------------------------------------------
def _chain_with(op_builder, opset=13):
    g = G(opset=opset)
    c0 = g.conv("input", 8, "conv0", bias=False)
    b0 = g.bn(c0, "bn0")
    mid = op_builder(g, b0)
    c1 = g.conv(mid, 6, "conv1")
    return g, g.model(g.head(c1))


@pytest.mark.parametrize("name, make, activation, compensation", [
    ("sigmoid", lambda g, x: g.node("Sigmoid", [x], "act"), "sigmoid", "full"),
    ("leaky", lambda g, x: g.node("LeakyRelu", [x], "act", alpha=0.1), "leakyrelu", "full"),
    ("relu6", lambda g, x: g.node("Clip", [x, g.init("lo", 0.0), g.init("hi", 6.0)], "act"), "clip", "full"),
    ("prelu", lambda g, x: g.node("PRelu", [x, g.init("slope", np.full((8, 1, 1), 0.2))], "act"), "prelu", "full"),
    ("silu", lambda g, x: g.node("Mul", [x, g.node("Sigmoid", [x], "sig")], "act"), "gate", "none"),
    ("tanh", lambda g, x: g.node("Tanh", [x], "act"), "tanh", "none"),
    ("two", lambda g, x: g.node("Sigmoid", [g.node("Relu", [x], "r")], "act"), "relu", "none"),
])
def test_activation_paths_say_what_compensation_assumes(name, make, activation, compensation):
    g, model = _chain_with(make)
    units, _ = _units(model)
    unit = _unit(units, "conv0")
    assert unit.activation == activation and unit.compensation == compensation
    assert unit.consumers[0].note
    x = g.x()
    out = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=8)).model
    assert run(out, x).shape == run(model, x).shape
    if name == "prelu":
        assert [m.node for m in unit.members] == ["act"]
        slope = next(t for t in out.graph.initializer if t.name == "slope")
        assert list(slope.dims) == [4, 1, 1]


def test_per_channel_mul_is_a_member_and_scales_the_coefficients(rng):
    g = G()
    w, _ = _redundant_filters(rng, 5, 3, 3)
    c0 = g.conv("input", 8, "conv0", weight=w, bias=False)
    m = g.node("Mul", [c0, g.init("scale", rng.uniform(0.5, 2.0, (1, 8, 1, 1)))], "mul")
    c1 = g.conv(m, 4, "conv1")
    model = g.model(c1, ["N", 4, 8, 8])
    unit = _unit(_units(model)[0], "conv0")
    assert unit.consumers[0].scale_by == ("mul",) and unit.members[0].op == "Mul"
    x = g.x()
    result = compress_model(model, CompressConfig(prune_ratio=0.375, weight_bits=None))
    np.testing.assert_allclose(run(result.model, x), run(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [11, 13])
def test_computed_flatten_and_squeeze_heads(opset):
    """Shape -> Gather(0) -> Unsqueeze -> Concat(-1) -> Reshape, and GAP -> Squeeze, both reach the Gemm."""
    for head in ("reshape", "squeeze"):
        g = G(opset=opset)
        c0 = g.conv("input", 8, "conv0", bias=False)
        r0 = g.node("Relu", [g.bn(c0, "bn0")], "r0")
        gap = g.node("GlobalAveragePool", [r0], "gap")
        if head == "reshape":
            shape = g.node("Shape", [gap], "shape", 1)
            batch = g.node("Gather", [shape, g.init("zero", 0, np.int64)], "batch", 1, axis=0)
            if opset >= 13:
                batch = g.node("Unsqueeze", [batch, g.init("ax0", [0], np.int64)], "batch1", 1)
            else:
                batch = g.node("Unsqueeze", [batch], "batch1", 1, axes=[0])
            target = g.node("Concat", [batch, g.init("minus1", [-1], np.int64)], "target", 1, axis=0)
            flat = g.node("Reshape", [gap, target], "flat")
        elif opset >= 13:
            flat = g.node("Squeeze", [gap, g.init("axes", [2, 3], np.int64)], "flat")
        else:
            flat = g.node("Squeeze", [gap], "flat", axes=[2, 3])
        g.nodes.append(helper.make_node("Gemm", [flat, g.init("fc.w", np.ones((5, 8))), g.init("fc.b", np.zeros(5))],
                                        ["logits"], name="fc", transB=1))
        g.channels["logits"] = 5
        model = g.model("logits")
        unit = _unit(_units(model)[0], "conv0")
        assert (unit.consumers[0].node, unit.consumers[0].block) == ("fc", 1), head
        out = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=None)).model
        assert run(out, g.x()).shape == (4, 5)


def test_hard_coded_reshape_target_is_rewritten():
    g = G(spatial=4)
    c0 = g.conv("input", 8, "conv0", bias=False)
    r0 = g.node("Relu", [g.bn(c0, "bn0")], "r0")
    flat = g.node("Reshape", [r0, g.init("target", [0, 8 * 16], np.int64)], "flat")
    g.nodes.append(helper.make_node("Gemm", [flat, g.init("fc.w", np.ones((5, 128)) * 0.01)], ["logits"], name="fc",
                                    transB=1))
    g.channels["logits"] = 5
    model = g.model("logits")
    unit = _unit(_units(model)[0], "conv0")
    assert unit.consumers[0].block == 16 and unit.members[0].op == "Reshape"
    out = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=None)).model
    target = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "target"))
    assert target.tolist() == [0, 4 * 16]
    assert run(out, g.x()).shape == (4, 5)


def test_grouped_conv_consumer_and_channel_mixing_ops_leave_the_unit_alone():
    g = G()
    c0 = g.conv("input", 8, "conv0", bias=False)
    r0 = g.node("Relu", [g.bn(c0, "bn0")], "r0")
    c1 = g.conv(r0, 8, "grouped", group=2)
    t = g.node("Transpose", [c1], "t", perm=[0, 1, 3, 2])
    c2 = g.conv(t, 4, "conv2")
    model = g.model(g.head(c2))
    units, skipped = _units(model)
    reasons = {s.node: s.reason for s in skipped}
    assert "grouped conv (group=2" in reasons["conv0"] and "grouped conv" in reasons["grouped"]
    assert [u.producer for u in units] == ["conv2"]


def test_unknown_op_in_the_middle_makes_its_neighbours_ineligible(tmp_path):
    g = G()
    c0 = g.conv("input", 8, "conv0", bias=False)
    r0 = g.node("Relu", [g.bn(c0, "bn0")], "r0")
    odd = g.node("Frobnicate", [r0], "odd", domain="example.custom")
    c1 = g.conv(odd, 8, "conv1", bias=False)
    r1 = g.node("Relu", [g.bn(c1, "bn1")], "r1")
    c2 = g.conv(r1, 6, "conv2")
    model = g.model(g.head(c2), extra_opsets=[("example.custom", 1)])
    units, skipped = _units(model)
    assert {s.node: s.reason for s in skipped}["conv0"] == \
        "channels reach op example.custom::Frobnicate (odd) is not a standard ONNX op"
    assert [u.producer for u in units] == ["conv1", "conv2"]
    result = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=8))  # solved and rewritten, no crash
    assert any(n.op_type == "Frobnicate" for n in result.model.graph.node)
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    records, text = inspect_model(path, CompressConfig(weight_bits=None))
    assert "leave  conv0: channels reach op example.custom::Frobnicate" in text
    assert records["summary"]["left_alone_reasons"]["unknown op"] == 1


def test_onnxruntime_contrib_op_runs_end_to_end(tmp_path):
    """An op ORT implements but the analysis does not know (com.microsoft::Gelu): written, validated."""
    g = G()
    c0 = g.conv("input", 8, "conv0", bias=False)
    gelu = g.node("Gelu", [g.bn(c0, "bn0")], "gelu", domain="com.microsoft")
    c1 = g.conv(gelu, 8, "conv1", bias=False)
    r1 = g.node("Relu", [g.bn(c1, "bn1")], "r1")
    model = g.model(g.head(g.conv(r1, 6, "conv2")), extra_opsets=[("com.microsoft", 1)])
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    report = compress_file(src, dst, CompressConfig(prune_ratio=0.5, weight_bits=8))
    assert report.validation["passed"] and dst.exists()
    assert [u["producer"] for u in report.units] == ["conv1", "conv2"]
    assert report.after.channels == {"conv0": 8, "conv1": 4, "conv2": 3}


def test_gemm_producer_with_transposed_weight_layout(rng):
    """Gemm(transB=0) -> Relu -> Gemm(transB=0): rows of the (K, O) weight are the output channels."""
    g = G(spatial=2)
    flat = g.node("Flatten", ["input"], "flat", 12, axis=1)
    w1 = rng.standard_normal((12, 16)) * 0.4
    h = g.node("Gemm", [flat, g.init("fc1.w", w1), g.init("fc1.b", rng.normal(0, 0.1, 16))], "fc1", 16)
    h = g.node("BatchNormalization", [h] + [g.init(f"bn.{p}", v) for p, v in
               (("g", rng.uniform(0.5, 1.5, 16)), ("b", rng.normal(0, 0.2, 16)), ("m", np.zeros(16)),
                ("v", np.ones(16)))], "bn", epsilon=1e-5)
    h = g.node("Relu", [h], "relu")
    g.nodes.append(helper.make_node("Gemm", [h, g.init("fc2.w", rng.standard_normal((16, 5)) * 0.3)], ["logits"],
                                    name="fc2"))
    g.channels["logits"] = 5
    model = g.model("logits")
    unit = _unit(_units(model)[0], "fc1")
    assert unit.consumers[0].node == "fc2" and unit.compensation == "full"
    result = compress_model(model, CompressConfig(prune_ratio=0.25, weight_bits=8))
    dims = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert dims["fc1.w_quantized"] == [12, 12] and dims["fc2.w_quantized"] == [12, 5]
    x = g.x(8)
    ref = run(model, x)
    plain = compress_model(model, CompressConfig(prune_ratio=0.25, weight_bits=8, method="prune")).model
    assert rel_err(ref, run(result.model, x)) < rel_err(ref, run(plain, x))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_layer_is_pruned_sliced_or_left_alone_with_a_reason(name):
    model = fold_batchnorm(BUILDERS[name]())[0]
    for prune_residual in (False, True):
        units, skipped = find_units(model, prune_residual=prune_residual)
        layers = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
        producers = {p for u in units for p in u.all_producers}
        sliced = {m.node for u in units for m in u.members if m.op == "Conv"}
        left = {s.node for s in skipped}
        assert producers | sliced | left == layers
        assert not producers & left and not sliced & left
        assert all(s.reason for s in skipped)


def test_tensor_concatenated_twice_is_sliced_at_both_offsets(rng):
    g = G()
    c0 = g.conv("input", 8, "conv0", bias=False)
    r0 = g.node("Relu", [g.bn(c0, "bn0")], "r0")
    cat = g.node("Concat", [r0, r0], "cat", 16, axis=1)
    model = g.model(g.head(g.conv(cat, 4, "conv1")))
    unit = _unit(_units(model)[0], "conv0")
    assert [(c.node, c.offset) for c in unit.consumers] == [("conv1", 0), ("conv1", 8)]
    result = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=None))
    w = next(t for t in result.model.graph.initializer if t.name == "conv1.w")
    assert list(w.dims) == [2, 8, 3, 3]  # conv1 keeps 2 of 4 outputs and 2 x 4 of its 16 inputs
    assert run(result.model, g.x()).shape == (4, 5)


@pytest.mark.parametrize("name", ["densenet", "mobilenetv2", "vgg16_bn_cifar"])
def test_inspect_predicts_the_compensation_the_solver_applies(name, tmp_path):
    model = BUILDERS[name]()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    config = CompressConfig(prune_ratio=0.3, weight_bits=8)
    records, _ = inspect_model(path, config)
    solved = compress_model(model, config).solution.units
    assert sorted((g["producers"][0], g["compensation"]) for g in records["groups"]) == \
        sorted((u.producer, u.compensation) for u in solved)
    assert any(g["compensation"] == "mean" and "t >= d" in g["notes"][0] for g in records["groups"])
