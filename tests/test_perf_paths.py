"""The compressor's fast and memory-saving paths give what the plain ones give (issue 5: speed and peak memory)."""
import dataclasses
import platform
import threading

import numpy as np
import onnx
import pytest

from tests.graphs import conv_chain
from udfc_onnx import moments, solve
from udfc_onnx.fold import fold_batchnorm
from udfc_onnx.graph import GraphView, without_initializer_data
from udfc_onnx.resources import blas_thread_controls, limit_blas_threads, release_memory
from udfc_onnx.units import RawFilterReader, raw_filters_of


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _eigh_reference(gram, rhs, rcond=1e-6):
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    usable = values > rcond * values.max()
    return (vectors[:, usable] / values[usable]) @ (vectors[:, usable].T @ rhs)


def test_spd_fast_path_equals_the_eigendecomposition(rng):
    kept = rng.standard_normal((200, 40))
    gram, rhs = kept.T @ kept, kept.T @ rng.standard_normal((200, 7))
    sym = (gram + gram.T) / 2
    assert solve._solve_well_conditioned(sym, rhs, 1e-6) is not None  # took the Cholesky path
    np.testing.assert_allclose(solve._solve_spd(gram, rhs), _eigh_reference(gram, rhs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("smallest, fast", [(1.2e-6, True), (0.8e-6, False)])
def test_spd_fast_path_is_taken_exactly_when_no_eigenvalue_is_below_its_threshold(rng, smallest, fast):
    # Eigenvalues from 1 down to ``smallest`` in a random basis. The certificate is that
    # sym - rcond ||sym||_inf I is positive definite: with rcond = 1e-6 / ||sym||_inf it holds
    # exactly when the smallest eigenvalue is above 1e-6.
    basis, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    sym = (basis * np.geomspace(1.0, smallest, 30)) @ basis.T
    sym = (sym + sym.T) / 2
    rcond = 1e-6 / np.abs(sym).sum(axis=1).max()
    rhs = rng.standard_normal((30, 3))
    out = solve._solve_well_conditioned(sym, rhs, rcond)
    assert (out is not None) == fast
    if fast:
        np.testing.assert_allclose(out, _eigh_reference(sym, rhs, rcond), rtol=1e-8)


@pytest.mark.parametrize("dead_scale", [0.0, 1e-5])
def test_spd_dead_channels_fall_back_to_the_pseudo_inverse(rng, dead_scale):
    kept = rng.standard_normal((200, 40))
    kept[:, [3, 17]] *= dead_scale  # two dead channels (BN gamma ~ 0): near-zero columns
    gram, rhs = kept.T @ kept, kept.T @ rng.standard_normal((200, 5))
    assert solve._solve_well_conditioned((gram + gram.T) / 2, rhs, 1e-6) is None
    out = solve._solve_spd(gram, rhs)
    ref = _eigh_reference(gram, rhs)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    assert np.abs(out[[3, 17]]).max() < 1e-3 * np.abs(out).max()  # no blown-up coefficients on them


def test_spd_indefinite_and_empty_systems(rng):
    a = rng.standard_normal((6, 6))
    indefinite = a + a.T
    rhs = rng.standard_normal(6)
    np.testing.assert_allclose(solve._solve_spd(indefinite, rhs), _eigh_reference(indefinite, rhs), rtol=1e-9, atol=1e-12)
    assert solve._solve_spd(np.zeros((0, 0)), np.zeros((0, 3))).shape == (0, 3)


def test_relu_moments_triangle_quadrature_matches_the_full_matrix(rng):
    a = rng.standard_normal((30, 60))
    cov = a @ a.T / 60
    mean = 0.5 * rng.standard_normal(30)
    m, out = moments.relu_moments(mean, cov)
    # the same formula with the bivariate CDF evaluated on every (i, j) pair
    sd = np.sqrt(np.diag(cov))
    z = mean / sd
    rho = np.clip(cov / np.outer(sd, sd), -moments._RHO_MAX, moments._RHO_MAX)
    zi, zj = z[:, None], z[None, :]
    root = np.sqrt(1 - rho**2)
    phi2 = moments.bivariate_normal_cdf(zi, zj, rho)
    second = np.outer(sd, sd) * ((zi * zj + rho) * phi2 + zi * moments.normal_pdf(zj) * moments.normal_cdf((zi - rho * zj) / root)
                                 + zj * moments.normal_pdf(zi) * moments.normal_cdf((zj - rho * zi) / root)
                                 + root * moments.normal_pdf(np.sqrt(np.maximum(zi**2 - 2 * rho * zi * zj + zj**2, 0)) / root)
                                 / np.sqrt(2 * np.pi))
    full = second - np.outer(m, m)
    off = ~np.eye(30, dtype=bool)
    np.testing.assert_allclose(out[off], full[off], rtol=1e-9, atol=1e-12)


def test_bivariate_cdf_known_values():
    # independence and the orthant probability 1/4 + asin(rho) / (2 pi) at the origin
    np.testing.assert_allclose(moments.bivariate_normal_cdf(0.3, -0.7, 0.0),
                               moments.normal_cdf(0.3) * moments.normal_cdf(-0.7), atol=1e-12)
    for rho in (-0.8, 0.2, 0.9):
        np.testing.assert_allclose(moments.bivariate_normal_cdf(0.0, 0.0, rho), 0.25 + np.arcsin(rho) / (2 * np.pi),
                                   atol=1e-8)


def test_fold_into_a_dict_gives_the_written_values_and_leaves_the_weights():
    model = conv_chain(seed=3, spatial=8)
    written, _ = fold_batchnorm(model)
    aside: dict = {}
    kept, record = fold_batchnorm(model, weights_out=aside)
    assert aside and record.folded
    view_w, view_k, view_m = GraphView(written), GraphView(kept), GraphView(model)
    for name, value in aside.items():
        np.testing.assert_array_equal(value, view_w.array(name))
        np.testing.assert_array_equal(view_k.array(name), view_m.array(name))  # still unfolded
    assert [n.op_type for n in kept.graph.node] == [n.op_type for n in written.graph.node]


def test_raw_filter_reader_equals_raw_filters_of():
    model = conv_chain(seed=1, spatial=8)
    eager = raw_filters_of(model)
    lazy = RawFilterReader(model)
    assert set(lazy) == set(eager) and len(lazy) == len(eager)
    for name, value in eager.items():
        np.testing.assert_array_equal(lazy[name], value)


def test_without_initializer_data_keeps_everything_but_the_named_values():
    model = conv_chain(seed=2, spatial=8)
    big = {t.name for t in model.graph.initializer if len(t.dims) == 4}
    slim = without_initializer_data(model, big)
    assert [t.name for t in slim.graph.initializer] == [t.name for t in model.graph.initializer]
    for a, b in zip(model.graph.initializer, slim.graph.initializer):
        assert list(a.dims) == list(b.dims) and a.data_type == b.data_type
        assert (b.ByteSize() < a.ByteSize()) == (a.name in big)
    assert slim.graph.node == model.graph.node and slim.opset_import == model.opset_import
    assert slim.ir_version == model.ir_version and slim.graph.input == model.graph.input


def test_blas_threads_are_limited_and_restored():
    release_memory()  # a no-op where there is no glibc; must not raise
    controls = blas_thread_controls()
    if controls is None:
        pytest.skip("no OpenBLAS loaded by numpy here: nothing to control")
    get, set_ = controls
    before = get()
    set_(2)
    try:
        with limit_blas_threads(1):
            assert get() == 1
        assert get() == 2
        with limit_blas_threads(0):  # 0 leaves it alone
            assert get() == 2
    finally:
        set_(before)


def test_output_shape_inference_in_place_equals_onnx_infer_shapes():
    from udfc_onnx.pipeline import _infer_shapes_in_place

    model = conv_chain(seed=4, spatial=8)
    expected = onnx.shape_inference.infer_shapes(model)
    _infer_shapes_in_place(model)
    assert list(model.graph.value_info) == list(expected.graph.value_info) and len(model.graph.value_info) > 0
    assert list(model.graph.output) == list(expected.graph.output)


@pytest.mark.parametrize("settings", [dict(prune_ratio=0.3, weight_bits=8), dict(prune_ratio=0.3, weight_bits=None),
                                      dict(prune_ratio=0.3, weight_bits=8, method="nm"),
                                      dict(prune_ratio=0.3, weight_bits=4, method="prune", activations="uint8")])
def test_compress_model_leaves_the_callers_model_and_matches_an_inplace_run(settings):
    from udfc_onnx import CompressConfig, compress_model

    model = conv_chain(seed=6, spatial=8)
    before = model.SerializeToString()
    copy_run = compress_model(model, CompressConfig(**settings)).model
    assert model.SerializeToString() == before  # the weights moved out of a private copy, not the caller's
    inplace_run = compress_model(onnx.load_from_string(before), CompressConfig(**settings), inplace=True).model
    assert copy_run.SerializeToString() == inplace_run.SerializeToString()
    assert all(t.ByteSize() > 0 and (t.raw_data or t.float_data or t.int32_data or not t.dims)
               for t in copy_run.graph.initializer)  # no weightless placeholder left in the output


def test_report_records_peak_memory_per_pass(tmp_path):
    from udfc_onnx import CompressConfig, compress_file

    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(seed=7, spatial=8), src)
    report = compress_file(src, tmp_path / "out.onnx", CompressConfig(prune_ratio=0.3, weight_bits=8))
    peaks = report.to_dict()["peak_rss_mb"]
    if not peaks:
        pytest.skip("no /proc/self/status here")
    assert list(peaks) == list(report.timings)
    values = list(peaks.values())
    assert all(v > 0 for v in values) and values[-1] >= values[0] - 1.0  # a peak so far only grows (+- counter lag)


@pytest.mark.parametrize("settings", [dict(prune_ratio=0.3, weight_bits=8), dict(prune_ratio=0.5, weight_bits=None),
                                      dict(prune_ratio=0.3, weight_bits=4, method="nm")])
def test_solve_in_the_callers_dict_equals_a_solve_on_a_copy(settings):
    """solve_plan(consume=True) frees old weights as it goes and ends with the same current values."""
    from udfc_onnx import CompressConfig
    from udfc_onnx.compensate import solve_plan
    from udfc_onnx.pipeline import analyze, collect_layers

    config = CompressConfig(regression="moments", **settings)
    folded, stats, raw, plan, _ = analyze(conv_chain(seed=8, spatial=8), config)
    layers = collect_layers(folded)
    view = GraphView(folded)
    arrays = {}
    for layer in layers.values():
        arrays[layer.weight] = view.array(layer.weight)
        if layer.bias in view.initializers:
            arrays[layer.bias] = view.array(layer.bias)
    plain = solve_plan(plan, dict(arrays), layers, stats, raw, config)
    original = {k: v.copy() for k, v in arrays.items()}
    _, _, _, plan2, _ = analyze(conv_chain(seed=8, spatial=8), config)
    owned = dict(arrays)
    consumed = solve_plan(plan2, owned, layers, stats, raw, config, consume=True)
    assert set(plain.arrays) <= set(consumed.arrays)  # every change is recorded (an unchanged rewrite may be too)
    for name, value in owned.items():
        expected = plain.arrays.get(name, original[name])
        np.testing.assert_array_equal(value, expected)
    assert set(consumed.quantized) == set(plain.quantized)
    for name, qt in consumed.quantized.items():
        np.testing.assert_array_equal(qt.q, plain.quantized[name].q)


# --- units solved on two threads (compensate._run_in_order)

def _arch(name):
    from models.builders import build_densenet, build_mobilenetv2, build_resnet50

    if name == "resnet50":  # bottleneck chains, residual groups, a Gemm head
        return build_resnet50(width=0.25, input_size=32, calib_images=2, seed=3)
    if name == "densenet":  # Concat groups: they run alone, between the plain units
        return build_densenet(blocks=(3, 3), growth=8, input_size=16, calib_images=2, seed=3)
    return build_mobilenetv2(width=0.35, input_size=32, calib_images=2, seed=3)  # depthwise groups


@pytest.mark.parametrize("arch", ["resnet50", "densenet", "mobilenetv2"])
@pytest.mark.parametrize("settings", [dict(prune_ratio=0.4, weight_bits=8, regression="moments"),
                                      dict(prune_ratio=0.3, weight_bits=4, regression="euclidean", activations="uint8"),
                                      dict(prune_ratio=0.3, weight_bits=None, method="nm")])
def test_units_solved_on_two_threads_give_the_sequential_result(arch, settings, monkeypatch):
    from udfc_onnx import CompressConfig, compress_model

    model = _arch(arch)
    runs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("UDFC_THREADS", threads)
        result = compress_model(model, CompressConfig(**settings))
        runs.append((result.model.SerializeToString(), [dataclasses.asdict(u) for u in result.solution.units],
                     list(result.solution.quantized)))
    assert runs[0][1], "nothing was pruned: the test would show nothing"
    assert runs[0] == runs[1]  # bit for bit, records and quantization order included


def test_tasks_wait_for_earlier_tasks_that_share_a_name_and_no_others():
    from udfc_onnx.compensate import Solution, _run_in_order

    first_may_finish = threading.Event()
    log = []

    def task(label, wait_for=None, set_after=None):
        def fn(part):
            if wait_for is not None:
                assert wait_for.wait(timeout=10), f"{label} was made to wait for a task it does not share a name with"
            log.append(label)
            if set_after is not None:
                set_after.set()
            return label
        return fn

    tasks = [(frozenset({"a"}), task("A", wait_for=first_may_finish)),  # blocks until C runs
             (frozenset({"a", "b"}), task("B")),  # after A (shares "a"), without holding a thread meanwhile
             (frozenset({"c"}), task("C", set_after=first_may_finish)),  # free to run beside A
             (None, task("G")),  # a group: after all of the above
             (frozenset({"c"}), task("D"))]  # after the group
    parts: list = []
    assert _run_in_order(tasks, Solution(), 2, parts, 2) == ["A", "B", "C", "G", "D"]
    assert len(parts) == 2
    assert log.index("C") < log.index("A") < log.index("B") < log.index("G") < log.index("D")


@pytest.mark.parametrize("costs, expected", [(None, ["A", "B", "C", "D"]), ([1, 1, 10, 10], ["C", "D", "A", "B"]),
                                             ([1, 5, 2, 2], ["B", "C", "D", "A"])])
def test_a_free_thread_takes_the_ready_task_with_the_longest_chain_behind_it(costs, expected):
    # one thread, so the order is the scheduler's alone: C and D form a chain (they share "c")
    from udfc_onnx.compensate import Solution, _run_in_order

    log = []

    def task(label):
        def fn(part):
            log.append(label)
            return label
        return fn

    tasks = [(frozenset({"a"}), task("A")), (frozenset({"b"}), task("B")),
             (frozenset({"c"}), task("C")), (frozenset({"c"}), task("D"))]
    assert _run_in_order(tasks, Solution(), 1, [], 0, costs) == ["A", "B", "C", "D"]  # results in task order
    assert log == expected


def test_a_failed_task_stops_the_tasks_after_it_and_is_the_error_raised():
    from udfc_onnx.compensate import Solution, _run_in_order
    from udfc_onnx.errors import SolverError

    ran = []

    def fail(part):
        raise SolverError("unit 0 failed")

    def later(label):
        def fn(part):
            ran.append(label)
        return fn

    tasks = [(frozenset({"a"}), fail), (frozenset({"a"}), later("depends")), (frozenset({"z"}), later("independent"))]
    with pytest.raises(SolverError, match="unit 0 failed"):
        _run_in_order(tasks, Solution(), 2, [], 0)
    assert "depends" not in ran


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("0", 1), ("", None)])
def test_worker_threads_from_the_environment(value, expected, monkeypatch):
    from udfc_onnx.resources import worker_threads

    monkeypatch.setenv("UDFC_THREADS", value)
    got = worker_threads()
    assert got == expected if expected is not None else 1 <= got <= 2


def test_worker_threads_refuse_a_non_number(monkeypatch, tmp_path, capsys):
    from udfc_onnx.cli import main
    from udfc_onnx.errors import InvalidConfigError
    from udfc_onnx.resources import worker_threads

    monkeypatch.setenv("UDFC_THREADS", "two")
    with pytest.raises(InvalidConfigError, match="UDFC_THREADS must be a whole number"):
        worker_threads()
    src = tmp_path / "m.onnx"
    onnx.save(conv_chain(seed=2, spatial=8), src)
    assert main([str(src), str(tmp_path / "o.onnx"), "--prune-ratio", "0.3", "--regression", "moments"]) == 2
    assert capsys.readouterr().err.strip().endswith("UDFC_THREADS must be a whole number, got 'two'")


@pytest.mark.parametrize("n", [0, 5, (1 << 15) - 1, 3 * (1 << 15) + 7])
def test_elementwise_in_threads_gives_the_one_call_result(n, monkeypatch):
    from udfc_onnx.moments import _phi2_integral
    from udfc_onnx.resources import elementwise_in_threads

    monkeypatch.setenv("UDFC_THREADS", "2")
    rng = np.random.default_rng(n)
    a, b, rho = rng.standard_normal(n), rng.standard_normal(n), rng.uniform(-0.95, 0.95, n)
    np.testing.assert_array_equal(elementwise_in_threads(_phi2_integral, a, b, rho), _phi2_integral(a, b, rho))


@pytest.mark.parametrize("rows, per_row", [(1, 10), (5, 1 << 20), (1000, 300), (7, 0)])
def test_row_blocks_cover_every_row_once(rows, per_row):
    blocks = solve.row_blocks(rows, per_row)
    assert np.concatenate([np.arange(rows)[b] for b in blocks]).tolist() == list(range(rows))


def test_float32_compensation_is_within_its_bound_of_the_float64_result(rng):
    consumer = rng.standard_normal((700, 48, 9)).astype(np.float32)  # several row blocks
    keep = np.sort(rng.choice(48, 30, replace=False))
    drop = solve.dropped_channels(48, keep)
    coef = rng.standard_normal((30, 18)) * 50  # large coefficients: terms far above the result
    wide = solve.apply_compensation(consumer, keep, coef)
    narrow = solve.apply_compensation(consumer, keep, coef, dtype=np.float32)
    assert wide.dtype == np.float64 and narrow.dtype == np.float32
    # the documented bound: (p + 1) eps32 of the sum of the terms' magnitudes, per entry
    magnitude = np.abs(consumer[:, keep]).astype(np.float64) + np.einsum(
        "ip,opb->oib", np.abs(coef), np.abs(consumer[:, drop]).astype(np.float64))
    error = np.abs(narrow - wide)
    assert np.all(error <= (len(drop) + 1) * np.finfo(np.float32).eps * magnitude)
    assert error.max() > 0  # float32 products, not the float64 ones rounded (else this test is moot)
    np.testing.assert_array_equal(solve.apply_compensation(consumer, keep, None, dtype=np.float32),
                                  consumer[:, keep])


def test_float32_filters_give_float32_products_and_the_same_loss(rng):
    kept = rng.standard_normal((300, 40)).astype(np.float32)
    pruned = (kept[:, :12] @ rng.standard_normal((12, 9)) + 0.3 * rng.standard_normal((300, 9))).astype(np.float32)
    bk, bp = rng.standard_normal(40), rng.standard_normal(9)

    def loss(c):
        k, p = kept.astype(np.float64), pruned.astype(np.float64)
        return float(((p - k @ c) ** 2).sum() + 0.01 * ((bp - bk @ c) ** 2).sum())

    single = solve.solve_prune_coefficients(kept, pruned, bk, bp, alpha=0.01)
    double = solve.solve_prune_coefficients(kept.astype(np.float64), pruned.astype(np.float64), bk, bp, alpha=0.01)
    assert single.dtype == np.float64 and not np.array_equal(single, double)
    assert loss(single) <= loss(double) * (1 + 1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizing_float32_weights_equals_quantizing_them_as_float64(rng, symmetric):
    from udfc_onnx.quant import quantize_per_channel

    w = (rng.standard_normal((64, 32, 3, 3)) * rng.uniform(0.01, 3, (64, 1, 1, 1))).astype(np.float32)
    for bits in (2, 4, 8):
        a = quantize_per_channel(w, bits, symmetric=symmetric)
        b = quantize_per_channel(w.astype(np.float64), bits, symmetric=symmetric)
        assert a.scale.dtype == b.scale.dtype and a.zero_point.dtype == b.zero_point.dtype
        np.testing.assert_array_equal(a.q, b.q)
        np.testing.assert_array_equal(a.scale, b.scale)
        np.testing.assert_array_equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("shape", [(1200, 300, 3, 3), (3, 1 << 19), (9, 4)])
def test_quantizing_in_row_blocks_equals_one_pass(rng, shape):
    from udfc_onnx import quant

    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    for bits, symmetric in ((8, True), (4, False)):
        scale, zp, qmin, qmax = quant._grid(w.reshape(w.shape[0], -1), bits, symmetric)
        whole = w / scale.reshape((-1,) + (1,) * (w.ndim - 1))
        expected = np.clip(np.rint(whole) + zp.reshape((-1,) + (1,) * (w.ndim - 1)), qmin, qmax).astype(np.int8)
        np.testing.assert_array_equal(quant.quantize_per_channel(w, bits, symmetric=symmetric).q, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetric_shortcuts_equal_the_general_grid(rng, dtype):
    # The symmetric quantizer rounds straight into int8 without the zero point and the clip, and
    # dequantizes in one pass: the same integers and values as the general formulas, at the
    # extremes of each row (|w| = amax), on all-zero rows and on rows of one sign.
    from udfc_onnx import quant

    w = (rng.standard_normal((50, 7, 3)) * rng.uniform(1e-4, 30, (50, 1, 1))).astype(dtype)
    w[3] = 0.0
    w[4] = np.abs(w[4])
    w[5, 0, 0] = -np.abs(w[5]).max() * 1.0000001
    for bits in range(2, 9):
        scale, zp, qmin, qmax = quant._grid(w.reshape(50, -1), bits, True)
        shape = (-1, 1, 1)
        expected = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape), qmin, qmax).astype(np.int8)
        qt = quant.quantize_per_channel(w, bits, symmetric=True)
        np.testing.assert_array_equal(qt.q, expected)
        assert np.abs(qt.q).max() == qmax
        general = (qt.q.astype(np.float64) - qt.zero_point.reshape(shape)) * qt.scale.astype(np.float64).reshape(shape)
        np.testing.assert_array_equal(qt.dequantize(), general)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_median_equals_numpy_median(rng, n):
    values = rng.standard_normal(n) ** 3
    assert solve.median(values) == np.median(values)
    assert solve.median(values.reshape(-1, 1)) == np.median(values)
    with pytest.raises(ValueError):
        solve.median(np.zeros(0))


@pytest.mark.parametrize("shape", [(1200, 300, 3, 3), (40, 2048, 1, 1), (3, 64, 7, 7)])
def test_bias_correction_in_row_blocks_equals_one_pass(rng, shape):
    from udfc_onnx.compensate import Layer, _mean_shift, _rounding_mean_shift
    from udfc_onnx.moments import LayerInput
    from udfc_onnx.quant import quantize_per_channel

    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    taps = shape[2] * shape[3]
    li = LayerInput(rng.standard_normal(shape[1]), None, 0.0, rng.uniform(0.5, 1, taps))
    layer = Layer("conv", "conv", "w", "b", False)
    qt = quantize_per_channel(w, 4)
    delta = qt.dequantize() - w
    np.testing.assert_array_equal(_rounding_mean_shift(layer, qt, w, li), _mean_shift(layer, delta, li))
    assert _rounding_mean_shift(layer, qt, w, None) is None


def test_numpy_hugepages_can_be_turned_off():
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray

    from udfc_onnx.resources import no_numpy_hugepages

    before = multiarray._get_madvise_hugepage()
    try:
        assert no_numpy_hugepages() is True
        assert multiarray._get_madvise_hugepage() is False
    finally:
        multiarray._set_madvise_hugepage(before)


def test_one_malloc_arena_is_set_where_there_is_glibc():
    import ctypes.util

    from udfc_onnx.resources import share_one_malloc_arena

    assert share_one_malloc_arena() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
                                        and ctypes.util.find_library("c") is not None)


@pytest.mark.parametrize("gram_weight", [False, True])
def test_dead_kept_channels_are_solved_as_one_constant_without_the_eigendecomposition(rng, monkeypatch, gram_weight):
    d, t, p = 120, 30, 6
    kept = rng.standard_normal((d, t))
    dead = [2, 9, 21]
    kept[:, dead] *= 1e-6  # BN gamma ~0: these channels output their bias, a constant
    pruned = rng.standard_normal((d, p))
    kept_bias, pruned_bias = rng.standard_normal(t), rng.standard_normal(p)
    M = None
    if gram_weight:
        a = rng.standard_normal((d, d))
        M = a @ a.T / d
    args = dict(alpha=0.5, gram_weight=M)
    # the pseudo-inverse answer, as the solver gave it before
    weighted = kept if M is None else M @ kept
    gram = kept.T @ weighted + 0.5 * np.outer(kept_bias, kept_bias)
    rhs = weighted.T @ pruned + 0.5 * np.outer(kept_bias, pruned_bias)
    ref = _eigh_reference(gram, rhs)

    def no_eigh(*a):
        raise AssertionError("took the eigendecomposition")

    monkeypatch.setattr(solve, "_solve_eigh", no_eigh)
    out = solve.solve_prune_coefficients(kept, pruned, kept_bias, pruned_bias, **args)

    def loss(c):
        err = kept @ c - pruned
        return float(np.einsum("dp,dp->", err, err if M is None else M @ err) + 0.5 * np.sum((kept_bias @ c - pruned_bias) ** 2))

    assert loss(out) <= loss(ref) * (1 + 1e-9)
    assert loss(out) < 0.99 * loss(np.zeros_like(out))
    # the dead channels carry the constant in proportion to their biases, no blown-up coefficients
    np.testing.assert_allclose(out[dead] / kept_bias[dead][:, None], np.broadcast_to(out[dead[0]] / kept_bias[dead[0]], (3, p)))
    assert np.abs(out).max() < 10 * np.abs(ref).max()
    live = np.setdiff1d(np.arange(t), dead)
    np.testing.assert_allclose(out[live], ref[live], rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_dead_kept_channels_with_zero_bias_add_nothing(rng):
    kept = rng.standard_normal((80, 12))
    kept[:, [4, 5]] = 0.0
    bias = rng.standard_normal(12)
    bias[[4, 5]] = 0.0
    out = solve.solve_prune_coefficients(kept, rng.standard_normal((80, 3)), bias, rng.standard_normal(3), alpha=0.1)
    assert np.all(out[[4, 5]] == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("builder", ["build_conv_chain", "build_residual_block", "build_concat_block", "build_densenet",
                                     "build_depthwise_block", "build_conv_flatten_gemm", "build_mobilenetv2"])
@pytest.mark.parametrize("with_bn", [True, False])
def test_layer_inputs_without_unread_covariances_are_the_same(builder, with_bn):
    from models import builders
    from udfc_onnx.moment_graph import estimate_layer_inputs
    from udfc_onnx.stats import read_bn_stats
    from udfc_onnx.units import raw_filters_of

    model = getattr(builders, builder)(with_bn=with_bn)
    stats, raw = read_bn_stats(model), raw_filters_of(model)
    folded, _ = fold_batchnorm(model)
    full = estimate_layer_inputs(folded, stats, raw)
    layers = sorted(full)
    for wanted in (set(), set(layers[1:3]), set(layers[::3])):
        part = estimate_layer_inputs(folded, stats, raw, covariance_for=wanted)
        assert set(part) == set(full)  # the same layers get moments
        for name, li in full.items():
            np.testing.assert_array_equal(part[name].mean, li.mean)  # bit for bit
            np.testing.assert_array_equal(part[name].tap_fraction, li.tap_fraction)
            if name in wanted:
                assert (part[name].cov is None) == (li.cov is None) and part[name].spatial_r == li.spatial_r
                if li.cov is not None:
                    np.testing.assert_array_equal(part[name].cov, li.cov)
        if with_bn and not wanted:
            kept = sum(li.cov is not None for li in part.values())
            if all(n.name in stats for n in folded.graph.node if n.op_type == "Conv"):
                assert kept <= 1  # BN statistics everywhere: no covariance needed but the graph input's
            else:  # DenseNet's convs after a pre-activation BN have none: their inputs are kept whole
                assert kept < sum(li.cov is not None for li in full.values())


def test_the_threaded_solve_leaves_no_reference_cycle_behind(monkeypatch):
    # A cycle through the solve's tasks kept every part and the weights they hold (ResNet-50:
    # 80-100 MB) alive until the cyclic collector happened to run, which raised the peak of the
    # checks after the solve by that much.
    import gc

    from models.builders import build_resnet50
    from udfc_onnx.config import CompressConfig
    from udfc_onnx.pipeline import compress_model

    monkeypatch.setenv("UDFC_THREADS", "2")
    model = build_resnet50(width=0.25, input_size=32, calib_images=2, seed=3)
    gc.collect()
    gc.disable()
    try:
        # (the moment regression: the synthetic one solves the units in turn, without the task pool)
        result = compress_model(model, CompressConfig(prune_ratio=0.3, weight_bits=8, regression="moments"))
        del result
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # (the standard library leaves a few cycles of its own: inspect, ast)
        ours = {type(o).__name__ if type(o).__name__ != "function" else o.__qualname__ for o in gc.garbage
                if type(o).__name__ in ("Solution", "Future", "QuantizedTensor", "ndarray")
                or getattr(o, "__module__", "").startswith("udfc_onnx")}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not ours, ours


def test_the_size_bound_that_skips_encoding_is_never_below_the_size(tmp_path):
    # The write decides "external data or not" from this bound when it is below the threshold:
    # it must hold for raw data, typed fields (negative int64 varints take 10 bytes), floats in
    # float_data and lazy tensors read from a file.
    from onnx import TensorProto, helper, numpy_helper

    from udfc_onnx import pipeline
    from udfc_onnx.load import read_lazy

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32, 3, 3)).astype(np.float32), "raw"),
             helper.make_tensor("ints", TensorProto.INT64, [300], (-rng.integers(1, 2**40, 300)).tolist()),
             helper.make_tensor("floats", TensorProto.FLOAT, [50], rng.standard_normal(50).tolist()),
             numpy_helper.from_array(rng.integers(-127, 127, (500,)).astype(np.int8), "int8")]
    inits[0].doc_string = "x" * 1000
    node = helper.make_node("Identity", ["raw"], ["y"], name="n")
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph)
    exact = pipeline._serialized_size(model)
    assert exact <= pipeline._serialized_size_bound(model) <= 2 * exact
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    lazy = read_lazy(path)
    assert any(pipeline.is_lazy(t) for t in lazy.graph.initializer)
    assert pipeline._serialized_size(lazy) <= pipeline._serialized_size_bound(lazy)
    strings = helper.make_model(helper.make_graph([], "s", [], [], [helper.make_tensor("s", TensorProto.STRING, [1], [b"a"])]))
    assert pipeline._serialized_size_bound(strings) is None


@pytest.mark.parametrize("values", [np.float32(0.25), np.arange(24, dtype=np.int8).reshape(2, 3, 4) - 12,
                                    np.arange(24, dtype=np.int8).reshape(4, 6).T, np.array([7], np.uint8),
                                    np.arange(5, dtype=np.int32) - 2, np.zeros((0, 3), np.float32),
                                    np.arange(6, dtype=np.int64)])
def test_initializers_made_in_place_equal_numpy_helpers(values):
    from onnx import helper, numpy_helper

    from udfc_onnx.int8 import _add_initializer

    graph = helper.make_graph([], "g", [], [])
    _add_initializer(graph, "t", np.asarray(values))
    assert graph.initializer[0].SerializeToString() == numpy_helper.from_array(np.asarray(values), "t").SerializeToString()


def test_freed_memory_is_kept_for_reuse_until_the_sampler_narrows_it():
    # A process setting (the command line's): checked in a process of its own.
    import ctypes.util
    import subprocess
    import sys

    code = ("from udfc_onnx.resources import narrow_heap_blocks, reuse_freed_memory as r; "
            "before = narrow_heap_blocks(); print(before, r(), narrow_heap_blocks(), narrow_heap_blocks())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c") is not None
    # nothing to narrow before the setting; then set, narrowed once, and not again
    assert out == ["False", str(glibc), str(glibc), "False"]


def test_freed_memory_is_trimmed_except_while_it_is_kept_for_reuse(monkeypatch):
    from udfc_onnx import resources

    trims = []
    monkeypatch.setattr(resources, "_libc_function", lambda name, *a: (lambda *args: trims.append(name)))
    monkeypatch.setattr(resources, "_heap_blocks", [])
    resources.release_memory()  # glibc's defaults: trimmed
    monkeypatch.setattr(resources, "_heap_blocks", [resources.HEAP_BLOCK_BYTES])
    resources.release_memory()  # the command line's reuse: kept
    monkeypatch.setattr(resources, "_heap_blocks", [resources.SAMPLER_HEAP_BLOCK_BYTES])
    resources.release_memory()  # narrowed for the sampler: trimmed again
    assert trims == ["malloc_trim", "malloc_trim"]
