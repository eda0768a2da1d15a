"""tools/benchmark.py and tools/int8_kernels.py helpers (no timings asserted: only that they measure something)."""
import sys

import numpy as np
import onnx
import onnxruntime as ort

from tests.graphs import conv_chain
from tools import benchmark


def test_measured_reports_exit_code_wall_time_and_peak_rss():
    run = benchmark.measured([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert run["rc"] == 3 and run["wall_s"] > 0 and run["peak_mb"] > 1


def test_latency_interleaves_models(tmp_path):
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"m{seed}.onnx"
        onnx.save(conv_chain(seed=seed, spatial=32), path)
        paths.append(str(path))
    measured = benchmark.latency(paths, batch=2, reps=3, provider="CPUExecutionProvider", block=2)
    assert len(measured.median) == 2 and all(t > 0 for t in measured.median)
    # 3 runs in blocks of 2: two turns per model, a ratio per turn
    assert [len(t) for t in measured.turns] == [2, 2] and len(measured.ratios()) == 2
    assert all(r > 0 for r in measured.ratios())


def test_unavailable_provider_is_refused(capsys):
    assert benchmark.main(["--provider", "NoSuchExecutionProvider", "--models", "resnet56_nm"]) == 2
    assert "not available" in capsys.readouterr().err


def test_runs_take_turns_and_the_median_run_is_reported(tmp_path):
    log = tmp_path / "log"
    log.write_text("")

    def command(name, elapsed):
        # appends its name to the log, prints the next ELAPSED of its list, holds 40 MB per run so far
        code = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(p.read_text() + sys.argv[2]); "
                f"n = p.read_text().count(sys.argv[2]); block = bytearray(n * 40_000_000); "
                f"print('ELAPSED', {elapsed}[n - 1])")
        return [sys.executable, "-c", code, str(log), name], None, None

    runs = benchmark.interleaved_runs({"a": command("a", [1, 1, 1]), "b": command("b", [3, 2, 1])}, 3)
    assert log.read_text() == "ababab"
    b = benchmark.median_of(runs["b"])
    assert b["elapsed_s"] == 2 and b["peak_mb"] > 115  # the second run's time, the third run's peak
    assert benchmark.median_ratio(runs["b"], runs["a"]) == 2
    assert benchmark.ratio_cell(runs["b"], runs["a"]) == "2.00 (1.00-3.00)"
    assert benchmark.ratio_cell(runs["b"][:1], runs["a"][:1]) == "3.00"  # one turn: no range
    # each run finds its output of the turn before gone
    out = tmp_path / "out.bin"
    writes = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); existed = p.exists(); p.write_bytes(b'x'); "
              "print('ELAPSED', 1); sys.exit(5 if existed else 0)")
    fresh = benchmark.interleaved_runs({"w": ([sys.executable, "-c", writes, str(out)], None, out)}, 3)
    assert [r["rc"] for r in fresh["w"]] == [0, 0, 0]
    failing = benchmark.interleaved_runs({"x": ([sys.executable, "-c", "import sys; sys.exit(4)"], None, None)}, 3)
    assert len(failing["x"]) == 1 and benchmark.median_of(failing["x"])["rc"] == 4


# ---------------------------------------------------------------------------- tools/int8_kernels.py
def test_int8_kernels_cases_and_padded_model():
    from tools.int8_kernels import conv_model, parse_case

    assert parse_case("3-16") == (3, 3, 16, 1) and parse_case("3p4-16") == (3, 4, 16, 1)
    assert parse_case("dw24") == (24, 24, 24, 24)
    x = np.abs(np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32))
    plain = ort.InferenceSession(conv_model(3, 16, 2, 8, int8=True)).run(None, {"x": x})[0]
    padded = ort.InferenceSession(conv_model(3, 16, 2, 8, int8=True, padded=4)).run(None, {"x": x})[0]
    ref = ort.InferenceSession(conv_model(3, 16, 2, 8, int8=False)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(padded, plain)
    assert np.abs(plain - ref).max() < 0.1 * np.abs(ref).max()  # the int8 model computes the float conv


def test_int8_kernels_prints_one_row_per_case(capsys):
    from tools.int8_kernels import main as kernels_main

    assert kernels_main(["--cases", "3-16,3p4-16,dw24", "--batch", "1", "--size", "8", "--reps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln for ln in out if ln.startswith("| 3->16")]
    assert [r.split("|")[2].strip() for r in rows] == ["3", "4"]
    assert any(ln.startswith("| depthwise 24 | 24 |") for ln in out)


# ---------------------------------------------------------------------------- tools/ab_time.py
def test_ab_time_run_once_reports_in_process_and_cpu_seconds(tmp_path):
    from tools import ab_time
    from tools.common import REPO

    model = tmp_path / "m.onnx"
    onnx.save(conv_chain(seed=0, spatial=8), model)
    elapsed, cpu = ab_time.run_once(REPO, str(model), tmp_path, "head", ["--weight-bits", "8"])
    assert 0 < elapsed < cpu  # CPU includes the imports the in-process time leaves out
    assert (tmp_path / "head.onnx").is_file()


# ---------------------------------------------------------------------------- tools/ort_profile.py
def test_ort_profile_counts_kernels_by_op_and_conv_shape(tmp_path):
    from tools.ort_profile import CONV_OPS, profile

    model = conv_chain(seed=0, spatial=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = profile(str(path), batch=2, runs=3)
    assert result["ms_per_run"] > 0
    convs = sum(n for op, (_, n) in result["by_op"].items() if op in CONV_OPS)
    assert convs == sum(node.op_type == "Conv" for node in model.graph.node)  # each conv counted once
    # shapes as ORT's optimised graph holds them (its NCHWc float convs pad channels to blocks)
    assert all(len(shape) == 4 and shape[2:] == (3, 3) for shape in result["by_conv"])
    assert sum(n for _, n in result["by_conv"].values()) == convs
