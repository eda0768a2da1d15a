"""ZeroQ-style distilled inputs (udfc_onnx.distill): reverse graph, optimisation, option plumbing, fallback."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import conv_chain
from udfc_onnx import CompressConfig, compress_model
from udfc_onnx.distill import (GRAD, LOSS, TARGETS, TOTAL, Priors, UnsupportedGraphError, augment_images,
                               balanced_targets, distill_inputs, distillation_model, l2_prior, noise_inputs, tv_prior)
from udfc_onnx.errors import InvalidConfigError
from udfc_onnx.fold import fold_batchnorm
from udfc_onnx.stats import read_bn_stats
from udfc_onnx.synthetic import _session


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def shortcut_block(spatial=8, seed=0) -> onnx.ModelProto:
    """Conv-BN, then an option-A shortcut (strided Slice, channel Pad) added to a stride-2 Conv-BN, then Conv-BN.

    No ReLU, so the loss is smooth and finite differences are exact to float32 noise.
    Input ``input`` (N, 3, spatial, spatial).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv_bn(i, x, cin, cout, stride):
        inits.append(_const(f"w{i}", rng.standard_normal((cout, cin, 3, 3)) * 0.3))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1],
                                      strides=[stride, stride]))
        for p, v in (("g", rng.uniform(.5, 1.5, cout)), ("b", rng.normal(0, .3, cout)), ("m", rng.normal(0, .3, cout)),
                     ("v", rng.uniform(.5, 2, cout))):
            inits.append(_const(f"bn{i}.{p}", v))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{p}" for p in "gbmv"], [f"b{i}"],
                                      name=f"bn{i}"))
        return f"b{i}"

    a = conv_bn(0, "input", 3, 4, 1)
    for name, value in (("starts", [0, 0]), ("ends", [100, 100]), ("axes", [2, 3]), ("steps", [2, 2]),
                        ("pads", [0, 2, 0, 0, 0, 2, 0, 0])):
        inits.append(_const(name, value, np.int64))
    nodes.append(helper.make_node("Slice", [a, "starts", "ends", "axes", "steps"], ["sliced"], name="slice"))
    nodes.append(helper.make_node("Pad", ["sliced", "pads"], ["padded"], name="pad"))
    b = conv_bn(1, a, 4, 8, 2)
    nodes.append(helper.make_node("Add", [b, "padded"], ["sum"], name="add"))
    c = conv_bn(2, "sum", 8, 8, 1)
    half = (spatial + 1) // 2
    graph = helper.make_graph(nodes, "shortcut", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, spatial, spatial])],
                              [helper.make_tensor_value_info(c, TensorProto.FLOAT, ["N", 8, half, half])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def folded_with_stats(model):
    stats = read_bn_stats(model)
    folded, _ = fold_batchnorm(model)
    return folded, stats


def directional_check(model, batch, rng, eps=1e-2):
    """(finite-difference, analytic) directional derivatives of the loss along three random directions."""
    folded, stats = folded_with_stats(model)
    session = _session(distillation_model(folded, stats, batch))
    shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = rng.standard_normal(shape).astype(np.float32)
    _, grad = session.run([LOSS, GRAD], {"input": x})
    pairs = []
    for _ in range(3):
        d = rng.standard_normal(shape).astype(np.float32)
        plus = session.run([LOSS], {"input": x + eps * d})[0]
        minus = session.run([LOSS], {"input": x - eps * d})[0]
        pairs.append(((float(plus) - float(minus)) / (2 * eps), float((grad.astype(np.float64) * d).sum())))
    return pairs


@pytest.mark.parametrize("spatial", [8, 9])  # 8: the stride-2 ConvTranspose needs output_padding
def test_gradient_matches_finite_differences_through_slice_pad_and_strided_conv(rng, spatial):
    for numeric, analytic in directional_check(shortcut_block(spatial), 4, rng):
        assert numeric == pytest.approx(analytic, rel=2e-3, abs=1e-3)


def numpy_chain_loss(folded, stats, x):
    """The ZeroQ loss of ``conv_chain``'s folded Conv-Relu layers, in float64 NumPy (an independent reference)."""
    from udfc_onnx.graph import GraphView

    view = GraphView(folded)
    total, h = 0.0, x.astype(np.float64)
    for node in folded.graph.node:
        if node.op_type != "Conv":
            continue
        w, bias = view.array(node.input[1]).astype(np.float64), view.array(node.input[2]).astype(np.float64)
        padded = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N, C, H, W, 3, 3
        y = np.einsum("nchwij,ocij->nohw", windows, w) + bias[None, :, None, None]
        st = stats[node.name]
        u = (y.mean(axis=(0, 2, 3)) - st.beta) / st.a
        v = y.std(axis=(0, 2, 3)) / np.abs(st.a) - st.sigma
        total += np.linalg.norm(u) + np.linalg.norm(v)
        h = np.maximum(y, 0.0)
    return total


def test_gradient_matches_float64_finite_differences_through_relu(rng):
    # conv_chain: Conv-BN-Relu x 3 then GAP-Flatten-Gemm; the head after the last BN is skipped
    model = conv_chain((3, 8, 12, 10), spatial=6)
    folded, stats = folded_with_stats(model)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    loss, grad = _session(distillation_model(folded, stats, 4)).run([LOSS, GRAD], {"input": x})
    assert float(loss) == pytest.approx(numpy_chain_loss(folded, stats, x), rel=1e-4)
    eps = 1e-6  # float64: far below the distance to any ReLU kink
    for _ in range(3):
        d = rng.standard_normal(x.shape)
        numeric = (numpy_chain_loss(folded, stats, x + eps * d) - numpy_chain_loss(folded, stats, x - eps * d)) / (2 * eps)
        assert float((grad.astype(np.float64) * d).sum()) == pytest.approx(numeric, rel=1e-3, abs=1e-4)


def test_loss_decreases_and_moves_batch_statistics_towards_bn():
    model = conv_chain((3, 8, 12, 10))
    folded, stats = folded_with_stats(model)
    result = distill_inputs(folded, stats, 16, iterations=100, lr=0.1, seed=3)
    assert result.loss_end < 0.5 * result.loss_start
    assert result.inputs["input"].shape == (16, 3, 8, 8) and result.inputs["input"].dtype == np.float32
    # zero steps give exactly the noise the "noise" inputs use
    same = distill_inputs(folded, stats, 16, iterations=0, seed=3)
    np.testing.assert_array_equal(same.inputs["input"], noise_inputs(folded, 16, 3)["input"])


def test_chunks_cover_every_sample_with_equal_batches():
    folded, stats = folded_with_stats(conv_chain((3, 8, 6)))
    result = distill_inputs(folded, stats, 10, iterations=2, batch=4, seed=0)
    assert result.chunks == 3
    noise = noise_inputs(folded, 10, 0)["input"]
    moved = np.abs(result.inputs["input"] - noise).reshape(10, -1).max(axis=1)
    assert (moved > 0).all()  # chunks of 4 at 0, 3, 6: the overlap is optimised twice, none is left out


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_gradient_matches_finite_differences_through_a_tiling_pool(rng, op):
    model = conv_chain((3, 4, 6), pool=True, relu=False)  # Conv-BN, MaxPool 2x2 / 2, Conv-BN
    next(n for n in model.graph.node if n.op_type == "MaxPool").op_type = op
    for numeric, analytic in directional_check(model, 4, rng, eps=1e-3):
        assert numeric == pytest.approx(analytic, rel=1e-2, abs=1e-3)


def test_unsupported_op_raises_and_compression_falls_back_to_noise():
    model = conv_chain((3, 8, 6), pool=True)
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    del pool.attribute[:]  # overlapping 3x3 / 2 windows, as in an ImageNet stem: no reverse rule
    pool.attribute.extend([helper.make_attribute("kernel_shape", [3, 3]), helper.make_attribute("strides", [2, 2]),
                           helper.make_attribute("pads", [1, 1, 1, 1])])
    folded, stats = folded_with_stats(model)
    with pytest.raises(UnsupportedGraphError, match="MaxPool"):
        distillation_model(folded, stats, 4)
    cfg = CompressConfig(prune_ratio=0.25, weight_bits=None, synthetic_samples=32, synthetic_inputs="distilled",
                         distill_iterations=2)
    result = compress_model(model, cfg)
    assert any("distilled inputs unavailable" in n and "Gaussian noise used" in n for n in result.notes)
    assert {u.regression for u in result.solution.units} <= {"synthetic-patch", "synthetic-sequential"}


@pytest.mark.parametrize("renorm", [True, False])
def test_distilled_option_runs_the_synthetic_fit(renorm):
    model = conv_chain((3, 8, 12, 10))
    cfg = CompressConfig(prune_ratio=0.25, weight_bits=4, synthetic_samples=32, synthetic_inputs="distilled",
                         distill_iterations=3, synthetic_renorm=renorm)
    result = compress_model(model, cfg)
    assert any(n.startswith("distilled inputs: 32 images, 3 Adam steps") for n in result.notes)
    # (the Gemm's unit: moments)
    assert {"synthetic-patch", "synthetic-sequential"} & {u.regression for u in result.solution.units}
    # the inputs change the fit: not the noise defaults' weights
    noise = compress_model(model, cfg.replace(synthetic_inputs="noise"))
    changed = [name for name, value in result.solution.arrays.items()
               if not np.array_equal(value, noise.solution.arrays[name])]
    assert changed


@pytest.mark.parametrize("field, value", [("synthetic_inputs", "data"), ("synthetic_renorm", None),
                                          ("distill_iterations", -1), ("distill_batch", 0), ("distill_lr", 0.0),
                                          ("distill_images", 0), ("distill_images", True), ("distill_fill", "mixup"),
                                          ("distill_ce", -1.0), ("distill_tv", float("nan")), ("distill_l2", "1")])
def test_config_validates_distill_fields(field, value):
    with pytest.raises(InvalidConfigError, match=field):
        CompressConfig(**{field: value})


def test_cli_flags_set_the_distill_fields():
    from udfc_onnx.cli import _single_parser, config_from_args

    args = _single_parser().parse_args(["in.onnx", "out.onnx", "--synthetic-inputs", "distilled", "--no-synthetic-renorm",
                                        "--distill-iterations", "7", "--distill-batch", "64", "--distill-lr", "0.3"])
    cfg = config_from_args(args)
    assert (cfg.synthetic_inputs, cfg.synthetic_renorm, cfg.distill_iterations, cfg.distill_batch, cfg.distill_lr) == (
        "distilled", False, 7, 64, 0.3)
    defaults = config_from_args(_single_parser().parse_args(["in.onnx", "out.onnx"]))
    assert (defaults.synthetic_inputs, defaults.synthetic_renorm) == ("distilled", True)
    args = _single_parser().parse_args(["in.onnx", "out.onnx", "--distill-images", "32", "--distill-fill", "noise",
                                        "--distill-ce", "0.5", "--distill-tv", "2", "--distill-l2", "0.1"])
    cfg = config_from_args(args)
    assert (cfg.distill_images, cfg.distill_fill, cfg.distill_ce, cfg.distill_tv, cfg.distill_l2) == (
        32, "noise", 0.5, 2.0, 0.1)
    assert (defaults.distill_images, defaults.distill_fill, defaults.distill_ce, defaults.distill_tv,
            defaults.distill_l2) == (32, "flip-shift", 1.0, 10.0, 0.0)


# ------------------------------------------------------------------------------------- DeepInversion terms

def gemm_head_variant(model, trans_b: bool, alpha: float) -> onnx.ModelProto:
    """``conv_chain``'s model with its Gemm head stored as transB=0 (weight transposed) and ``alpha``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fc = next(n for n in out.graph.node if n.op_type == "Gemm")
    weight = next(t for t in out.graph.initializer if t.name == fc.input[1])
    w = numpy_helper.to_array(weight) / alpha
    weight.CopyFrom(numpy_helper.from_array((w if trans_b else w.T).astype(np.float32), weight.name))
    del fc.attribute[:]
    fc.attribute.extend([helper.make_attribute("transB", int(trans_b)), helper.make_attribute("alpha", alpha)])
    return out


@pytest.mark.parametrize("trans_b, alpha", [(True, 1.0), (False, 0.5)])
def test_cross_entropy_gradient_matches_finite_differences_through_the_head(rng, trans_b, alpha):
    # no ReLU: the loss is smooth, float32 central differences are accurate
    model = gemm_head_variant(conv_chain((3, 8, 12, 10), relu=False), trans_b, alpha)
    folded, stats = folded_with_stats(model)
    batch, weight = 4, 3.0
    session = _session(distillation_model(folded, stats, batch, ce_weight=weight))
    x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
    targets = balanced_targets(batch, 5, 0)
    bn_loss, total, grad = session.run([LOSS, TOTAL, GRAD], {"input": x, TARGETS: targets})
    # the cross-entropy part equals one computed from the model's own logits
    logits = _session(model).run(["logits"], {"input": x})[0].astype(np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    assert float(total) - float(bn_loss) == pytest.approx(-weight * (targets * log_p).sum() / batch, rel=1e-4)
    eps = 1e-2
    for _ in range(3):
        d = rng.standard_normal(x.shape).astype(np.float32)
        plus = session.run([TOTAL], {"input": x + eps * d, TARGETS: targets})[0]
        minus = session.run([TOTAL], {"input": x - eps * d, TARGETS: targets})[0]
        numeric = (float(plus) - float(minus)) / (2 * eps)
        assert float((grad.astype(np.float64) * d).sum()) == pytest.approx(numeric, rel=2e-3, abs=1e-3)


@pytest.mark.parametrize("prior", [tv_prior, l2_prior])
def test_image_prior_gradients_match_finite_differences(rng, prior):
    x = rng.standard_normal((2, 3, 5, 4))
    loss, grad = prior(x)
    assert grad.shape == x.shape
    eps = 1e-6
    for _ in range(3):
        d = rng.standard_normal(x.shape)
        numeric = (prior(x + eps * d)[0] - prior(x - eps * d)[0]) / (2 * eps)
        assert float((grad * d).sum()) == pytest.approx(numeric, rel=1e-6)
    assert tv_prior(np.ones((1, 1, 4, 4)))[0] == 0.0  # a constant image has no variation


def test_balanced_targets_cover_the_classes_evenly():
    targets = balanced_targets(23, 5, seed=1)
    assert targets.shape == (23, 5) and targets.dtype == np.float32
    assert (targets.sum(axis=1) == 1).all()
    assert sorted(targets.sum(axis=0).tolist()) == [4, 4, 5, 5, 5]
    np.testing.assert_array_equal(targets, balanced_targets(23, 5, seed=1))


def test_augment_images_keeps_the_originals_then_flips_and_shifts_them(rng):
    images = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    out = augment_images(images, 10, seed=4, shift=2)
    assert out.shape == (10, 2, 6, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:3], images)
    np.testing.assert_array_equal(out, augment_images(images, 10, seed=4, shift=2))
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(3, 10):  # every later sample is a flipped or plain crop of its source's padded image
        crops = [padded[i % 3, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(out[i], c) or np.array_equal(out[i], c[..., ::-1]) for c in crops)
    assert not np.array_equal(out[3:6], images)  # some augmentation happened
    np.testing.assert_array_equal(augment_images(images, 2, seed=0), images[:2])


@pytest.mark.parametrize("fill", ["flip-shift", "noise"])
def test_distilling_fewer_images_fills_the_other_samples(fill):
    folded, stats = folded_with_stats(conv_chain((3, 8, 6)))
    result = distill_inputs(folded, stats, 10, iterations=3, seed=2, images=4, fill=fill)
    out, noise = result.inputs["input"], noise_inputs(folded, 10, 2)["input"]
    assert out.shape == noise.shape and result.chunks == 1
    assert (np.abs(out[:4] - noise[:4]).reshape(4, -1).max(axis=1) > 0).all()
    if fill == "noise":
        np.testing.assert_array_equal(out[4:], noise[4:])
    else:
        np.testing.assert_array_equal(out, augment_images(out[:4], 10, seed=2))


def test_priors_smooth_the_images_and_cross_entropy_moves_logits_to_targets():
    model = conv_chain((3, 8, 12, 10))
    folded, stats = folded_with_stats(model)
    plain = distill_inputs(folded, stats, 10, iterations=30, lr=0.1, seed=1).inputs["input"]
    smooth = distill_inputs(folded, stats, 10, iterations=30, lr=0.1, seed=1, priors=Priors(tv=10.0, l2=1.0)).inputs["input"]
    assert tv_prior(smooth)[0] < 0.5 * tv_prior(plain)[0] and l2_prior(smooth)[0] < l2_prior(plain)[0]
    guided = distill_inputs(folded, stats, 10, iterations=30, lr=0.1, seed=1, priors=Priors(ce=10.0)).inputs["input"]
    targets = balanced_targets(10, 5, 1).argmax(axis=1)
    hits = [(_session(model).run(["logits"], {"input": x})[0].argmax(axis=1) == targets).mean() for x in (plain, guided)]
    assert hits[1] >= 0.8 > hits[0]


def test_distilled_option_with_priors_and_fewer_images_runs_the_fit():
    model = conv_chain((3, 8, 12, 10))
    cfg = CompressConfig(prune_ratio=0.25, weight_bits=4, synthetic_samples=32, synthetic_inputs="distilled",
                         distill_iterations=3, distill_images=8, distill_ce=1.0, distill_tv=1.0)
    result = compress_model(model, cfg)
    assert any(n.startswith("distilled inputs: 32 images (8 distilled, the rest flip-shift), 3 Adam steps")
               for n in result.notes)


def test_cross_entropy_is_left_out_when_the_head_has_no_reverse_rule():
    model = conv_chain((3, 8, 6), head="identity")  # 4-D output: no (batch, classes) logits
    folded, stats = folded_with_stats(model)
    with pytest.raises(UnsupportedGraphError, match="logits"):
        distillation_model(folded, stats, 4, ce_weight=1.0)
    result = distill_inputs(folded, stats, 8, iterations=2, seed=0, priors=Priors(ce=1.0, tv=1.0))
    assert result.iterations == 2 and any("cross-entropy left out" in n for n in result.notes)


def test_cross_entropy_reaches_through_a_shape_gather_reshape_head(rng):
    """A head that flattens with Shape/Gather/Concat/Reshape (as torch exports x.view(x.size(0), -1)) keeps the CE term."""
    model = conv_chain((3, 8, 6), relu=False)  # smooth: finite differences are exact to float32 noise
    flat = next(n for n in model.graph.node if n.op_type == "Flatten")
    src, dst = flat.input[0], flat.output[0]
    model.graph.node.remove(flat)
    model.graph.initializer.extend([_const("zero_idx", 0, np.int64), _const("axes0", [0], np.int64),
                                    _const("minus_one", [-1], np.int64)])
    at = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Gemm")
    for k, node in enumerate([helper.make_node("Shape", [src], ["shp"], name="shape"),
                              helper.make_node("Gather", ["shp", "zero_idx"], ["n"], name="gather", axis=0),
                              helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
                              helper.make_node("Concat", ["n1", "minus_one"], ["newshape"], name="cat", axis=0),
                              helper.make_node("Reshape", [src, "newshape"], [dst], name="reshape")]):
        model.graph.node.insert(at + k, node)
    onnx.checker.check_model(model, full_check=True)
    folded, stats = folded_with_stats(model)
    result = distill_inputs(folded, stats, 8, iterations=2, seed=0, priors=Priors(ce=1.0))
    assert not any("cross-entropy left out" in n for n in result.notes)
    targets = balanced_targets(4, 5, 0)  # conv_chain's head: 5 classes
    session = _session(distillation_model(folded, stats, 4, ce_weight=1.0))
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    total, grad = session.run([TOTAL, GRAD], {"input": x, TARGETS: targets})
    d = rng.standard_normal(x.shape).astype(np.float32)
    eps = 1e-2
    plus = session.run([TOTAL], {"input": x + eps * d, TARGETS: targets})[0]
    minus = session.run([TOTAL], {"input": x - eps * d, TARGETS: targets})[0]
    assert (float(plus) - float(minus)) / (2 * eps) == pytest.approx(float((grad.astype(np.float64) * d).sum()),
                                                                     rel=2e-2, abs=2e-3)
