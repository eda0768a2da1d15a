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
