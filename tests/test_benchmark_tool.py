"""tools/benchmark.py helpers (no timings asserted: only that they measure something)."""
import sys

import onnx

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
    medians = benchmark.latency(paths, batch=2, reps=3, provider="CPUExecutionProvider")
    assert len(medians) == 2 and all(t > 0 for t in medians)


def test_unavailable_provider_is_refused(capsys):
    assert benchmark.main(["--provider", "NoSuchExecutionProvider", "--models", "resnet56_nm"]) == 2
    assert "not available" in capsys.readouterr().err


def test_median_run_reports_the_median_run_and_the_highest_peak(tmp_path):
    counter = tmp_path / "n"
    counter.write_text("0")
    # run n prints ELAPSED 3, 2, 1 and holds n * 40 MB: the median run is the second (80 MB), the
    # highest peak the third's (120 MB)
    code = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) + 1; p.write_text(str(n)); "
            "block = bytearray(n * 40_000_000); print('ELAPSED', [3, 2, 1][n - 1])")
    run = benchmark.median_run([sys.executable, "-c", code, str(counter)], 3)
    assert run["elapsed_s"] == 2 and run["rc"] == 0
    assert run["peak_mb"] > 115
    failing = benchmark.median_run([sys.executable, "-c", "import sys; sys.exit(4)"], 3)
    assert failing["rc"] == 4
