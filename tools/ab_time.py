"""Is this checkout's compressor faster than an earlier commit's? Both take turns on the same input.

    python tools/ab_time.py BASE_REV MODEL.onnx [--runs 10] [-- FLAGS...]
    python tools/ab_time.py d1136a2 /tmp/resnet50.onnx -- --prune-ratio 0.3 --weight-bits 8 --activations uint8

BASE_REV is checked out into a temporary git worktree (removed afterwards). Each turn runs
``python -m udfc_onnx MODEL OUT FLAGS --report R -q`` once from the worktree and once from this
checkout, each in a fresh process; a turn's two runs are seconds apart, so they share the machine's
load. Printed: the median and minimum in-process time (``elapsed_s`` of the report), the median of
the per-turn ratios (this checkout over BASE_REV), and the median CPU seconds of each process
(user + system, imports and ORT's threads included). Outputs go to a temporary folder.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.benchmark import timed  # noqa: E402
from tools.common import REPO  # noqa: E402


def run_once(tree: Path, model: str, out_dir: Path, tag: str, flags: list[str]) -> tuple[float, float]:
    """In-process seconds (the report's ``elapsed_s``) and CPU seconds of one compressor run from ``tree``."""
    report = out_dir / f"{tag}.json"
    cmd = [sys.executable, "-m", "udfc_onnx", model, str(out_dir / f"{tag}.onnx"), *flags, "--report", str(report), "-q"]
    # run in the tree: `python -m` puts the working directory first on sys.path
    run = timed(cmd, env={"PYTHONPATH": str(tree)}, report=report, cwd=tree)
    if run["rc"] != 0:
        raise SystemExit(f"{tag}: the compressor failed: {run['stderr'].strip().splitlines()[-1:] or run['stdout']}")
    return run["elapsed_s"], run["cpu_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the commit to compare with (any git revision)")
    p.add_argument("model", help="input .onnx")
    p.add_argument("--runs", type=int, default=10, help="turns (one run of each per turn)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    flags = argv[split + 1:]  # the compressor's flags, after --
    with tempfile.TemporaryDirectory(prefix="udfc_ab_") as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.base], cwd=REPO, check=True)
        try:
            times: dict[str, list[float]] = {"base": [], "head": []}
            cpu: dict[str, list[float]] = {"base": [], "head": []}
            for _ in range(max(1, args.runs)):
                for tag, tree in (("base", base_tree), ("head", REPO)):
                    elapsed, seconds = run_once(tree, str(Path(args.model).resolve()), tmp, tag, flags)
                    times[tag].append(elapsed)
                    cpu[tag].append(seconds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    for tag, name in (("base", args.base), ("head", "this checkout")):
        print(f"{name}: in-process median {statistics.median(times[tag]):.3f} s (min {min(times[tag]):.3f}), "
              f"CPU median {statistics.median(cpu[tag]):.2f} s")
    ratios = [h / b for h, b in zip(times["head"], times["base"])]
    print(f"this checkout / {args.base}, per turn: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} turns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
