"""Where does ONNX Runtime spend a model's time? Kernel time per op type and per conv shape.

    python tools/ort_profile.py MODEL.onnx [--batch 32] [--runs 25] [--provider CPUExecutionProvider]

Runs the model with ORT's default session options and its profiler on (after 5 untimed runs), then
prints the kernel time per run of each op type and, for Conv / QLinearConv / FusedConv, of each
weight shape (output channels, input channels per group, kernel) in ORT's optimised graph, with
how many nodes have it (QLinearConv keeps the model's shapes; ORT's NCHWc float convs pad channels
to its block size). The profiler's JSON and the optimised graph go to a temporary folder.
Kernel times leave out ORT's scheduling between kernels, so they add up to less than a run.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from udfc_onnx.int8 import save_optimized_graph  # noqa: E402

CONV_OPS = ("Conv", "QLinearConv", "FusedConv", "NhwcFusedConv")


def profile(path: str, batch: int = 32, runs: int = 25, provider: str = "CPUExecutionProvider") -> dict:
    """Kernel microseconds per run by op type and by conv weight shape, and the wall ms per run.

    Returns ``{"ms_per_run": float, "by_op": {op: (us, nodes)}, "by_conv": {(o, c, kh, kw): (us, nodes)}}``.
    """
    with tempfile.TemporaryDirectory(prefix="udfc_prof_") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        save_optimized_graph(opts, Path(tmp) / "optimized.onnx")  # weights beside it: models over 2 GB too
        sess = ort.InferenceSession(path, opts, providers=[provider])
        inp = sess.get_inputs()[0]
        shape = [batch] + [d if isinstance(d, int) else 32 for d in inp.shape[1:]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(5):
            sess.run(None, {inp.name: x})
        start = time.perf_counter()
        for _ in range(runs):
            sess.run(None, {inp.name: x})
        ms_per_run = (time.perf_counter() - start) / runs * 1e3
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    dims = {t.name: tuple(t.dims) for t in optimized.graph.initializer}
    weight_of = {n.name: dims.get(n.input[3 if n.op_type == "QLinearConv" else 1]) for n in optimized.graph.node
                 if n.op_type in CONV_OPS and len(n.input) > (3 if n.op_type == "QLinearConv" else 1)}
    # the profiler records the untimed runs too: only kernels from the first timed run's start on count
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first_timed = run_starts[-runs] if len(run_starts) >= runs else 0
    node_us: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first_timed:
            node_us[(e["args"]["op_name"], e["name"][:-len("_kernel_time")])] += e["dur"]
    by_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    by_conv: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
    for (op, node), us in node_us.items():
        by_op[op][0] += us / runs
        by_op[op][1] += 1
        if op in CONV_OPS:
            key = weight_of.get(node) or ("?",)
            by_conv[key][0] += us / runs
            by_conv[key][1] += 1
    return {"ms_per_run": ms_per_run, "by_op": {k: tuple(v) for k, v in by_op.items()},
            "by_conv": {k: tuple(v) for k, v in by_conv.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=25)
    p.add_argument("--provider", default="CPUExecutionProvider")
    args = p.parse_args(argv)
    result = profile(args.model, args.batch, args.runs, args.provider)
    kernel_ms = sum(us for us, _ in result["by_op"].values()) / 1e3
    print(f"{args.model}: batch {args.batch}, {result['ms_per_run']:.2f} ms per run, "
          f"{kernel_ms:.2f} ms of it in kernels (onnxruntime {ort.__version__}, {args.provider})")
    print("\n| op | ms per run | share of kernel time | nodes |\n|---|---|---|---|")
    for op, (us, n) in sorted(result["by_op"].items(), key=lambda kv: -kv[1][0]):
        print(f"| {op} | {us / 1e3:.3f} | {100 * us / 1e3 / max(kernel_ms, 1e-12):.1f} % | {n} |")
    print("\n| conv weight (out, in/group, kh, kw) | ms per run | nodes |\n|---|---|---|")
    for shape, (us, n) in sorted(result["by_conv"].items(), key=lambda kv: -kv[1][0]):
        print(f"| {shape} | {us / 1e3:.3f} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
