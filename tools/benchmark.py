"""Is the compressed model faster, and what does compressing cost? ORT latency, compressor time, peak memory.

    python tools/benchmark.py [--models resnet56_nm,resnet50] [--reps 20] [--limit 10000]
        [--provider CPUExecutionProvider] [--resnet50 PATH] [--out-dir DIR]

For each model and setting it runs the CLI (``python -m udfc_onnx``) in a subprocess and prints:

* latency: ORT median at batch 1 and 32, with ORT's default session options, and the ratio
  compressed / original; each model runs in a process of its own, the models taking turns (a
  process of a few timed runs each, after 50 ms of untimed runs), so machine load hits both alike;
  the range of the ratios within each turn shows how much the machine's load moved it;
* the compressor's own time (``elapsed`` of the run: load, compress, write, validate, fusion check)
  against ``onnx.load`` + ``onnx.save`` of the same file, each in its own subprocess: ``--time-reps``
  turns of load+save and every setting one after the other (the input read once before, so that
  none pays for the disk); the run of median time is shown, and the ratio is the median of the
  ratios within a turn;
* peak memory: the highest peak RSS over those runs of each subprocess (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper
  whose only child is the measured command), interpreter and imports included, and the same less
  the peak of a process that only imports what the command imports (``onnx`` for load+save;
  ``udfc_onnx``, hence numpy, onnx and onnxruntime, for the compressor): the memory the work itself takes;
* top-1 on the CIFAR-10 test set (shared/data) for the CIFAR model;
* how many Convs ORT fused into QLinearConv.

Models: the shared ResNet-56 (Neuron Merging checkpoint) and a synthetic ResNet-50 (25.6M
parameters, ImageNet stem, 224x224) built from ``models.builders`` into the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.common import REPO, load_dataset, normalization_for, shared_dir  # noqa: E402

SETTINGS = {
    "w8a8": ["--weight-bits", "8", "--activations", "uint8"],
    "p50-w4a8": ["--prune-ratio", "0.5", "--weight-bits", "4", "--activations", "uint8"],
    # The paper's kept counts (int(C*(1-r))) instead of int8's default multiples of 16.
    "p50-w4a8-m1": ["--prune-ratio", "0.5", "--weight-bits", "4", "--activations", "uint8", "--channel-multiple", "1"],
    "w8-weight-only": ["--weight-bits", "8"],
    "p30-w8a8": ["--prune-ratio", "0.3", "--weight-bits", "8", "--activations", "uint8"],
}
MODEL_SETTINGS = {"resnet56_nm": ["w8a8", "p50-w4a8", "p50-w4a8-m1", "w8-weight-only"],
                  "resnet50": ["p30-w8a8", "w8a8", "p50-w4a8", "w8-weight-only"]}
# A wrapper whose only child is the measured command: RUSAGE_CHILDREN then is that command's peak
# and CPU time.
_WRAP = ("import resource, subprocess, sys, time\n"
         "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); wall = time.perf_counter() - t\n"
         "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
         "print('WRAP', rc, wall, u.ru_maxrss, u.ru_utime + u.ru_stime)")
# Processes that only import what the measured commands import: their peak is the baseline the
# "above imports" column subtracts.
_IMPORTS = {"load+save": [sys.executable, "-c", "import onnx"],
            "compressor": [sys.executable, "-c", "import udfc_onnx.cli"]}
_LOAD_SAVE = ("import sys, time, onnx\n"
              "t = time.perf_counter(); m = onnx.load(sys.argv[1]); onnx.save(m, sys.argv[2])\n"
              "print('ELAPSED', time.perf_counter() - t)")


def measured(cmd: list[str], env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run ``cmd`` in a fresh wrapper in ``cwd``: exit code, wall seconds, peak RSS (MB), CPU seconds
    (user + system), stdout."""
    proc = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WRAP ")][-1].split()
    return {"rc": int(line[1]), "wall_s": float(line[2]), "peak_mb": int(line[3]) / 1024, "cpu_s": float(line[4]),
            "stdout": proc.stdout, "stderr": proc.stderr}


def timed(cmd: list[str], env: dict | None = None, report: Path | None = None, cwd: Path = REPO) -> dict:
    """:func:`measured` plus ``elapsed_s``, the in-process time: ``elapsed_s`` of the JSON ``report``
    the command writes (kept as the run's ``report``), or else the ``ELAPSED`` line it prints."""
    run = measured(cmd, env, cwd)
    if run["rc"] == 0:
        if report is not None:
            run["report"] = json.loads(report.read_text())
            run["elapsed_s"] = run["report"]["elapsed_s"]
        else:
            run["elapsed_s"] = float([ln for ln in run["stdout"].splitlines() if ln.startswith("ELAPSED")][0].split()[1])
    return run


def interleaved_runs(commands: dict, reps: int, env: dict | None = None) -> dict[str, list[dict]]:
    """Each of ``commands`` (key -> (argv, report path or None, output path or None)) :func:`timed`
    ``reps`` times, in turns (first, second, ..., first, second, ...) so that the machine's load
    hits all alike. Before each run its output from the turn before is deleted and the page cache
    written out, so that no run pays for writing back or freeing another's file (load+save's
    100 MB copy, written back during the next run, had slowed that by 30-40 %). A command that
    fails is not run again: its list ends with the failed run."""
    runs: dict[str, list[dict]] = {key: [] for key in commands}
    for _ in range(max(1, reps)):
        for key, (cmd, report, output) in commands.items():
            if runs[key] and runs[key][-1]["rc"] != 0:
                continue
            if output is not None:
                Path(output).unlink(missing_ok=True)
            os.sync()
            runs[key].append(timed(cmd, env if report is not None else None, report))
    return runs


def median_of(runs: list[dict]) -> dict:
    """The run of median in-process time, with the highest peak of all (a failed run if any)."""
    failed = [r for r in runs if r["rc"] != 0]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["elapsed_s"])
    return dict(ordered[len(ordered) // 2], peak_mb=max(r["peak_mb"] for r in runs))


def turn_ratios(runs: list[dict], base: list[dict]) -> list[float]:
    """``elapsed / base elapsed`` of each turn (each ratio from runs made one after the other)."""
    return [r["elapsed_s"] / b["elapsed_s"] for r, b in zip(runs, base)]


def median_ratio(runs: list[dict], base: list[dict]) -> float:
    """Median over the turns of ``elapsed / base elapsed``."""
    return statistics.median(turn_ratios(runs, base))


def ratio_cell(runs: list[dict], base: list[dict]) -> str:
    """The median ratio and, over two or more turns, the range of the per-turn ratios: on a shared
    machine the range shows how far the load moved the ratio within one run of the benchmark."""
    ratios = turn_ratios(runs, base)
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}{spread}"


def warm(path: Path) -> None:
    """Read ``path`` once, so that the timed runs find it in the page cache (none pays for the disk)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


#: What :func:`latency` runs in a process of its own for one model: a session with ORT's defaults,
#: as a deployment gets it (thread spinning included: turning it off made the int8 ResNet-56 30 %
#: slower at batch 32, its many small kernels each waiting for threads to wake), untimed runs for
#: at least ``WARM_S`` seconds, then the timed runs; it prints their seconds as JSON.
_LATENCY = ("import json, sys, time, numpy as np, onnxruntime as ort\n"
            "path, provider, batch, runs, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])\n"
            "warm_s = float(sys.argv[6])\n"
            "opts = ort.SessionOptions(); opts.log_severity_level = 3\n"
            "s = ort.InferenceSession(path, opts, providers=[provider])\n"
            "inp = s.get_inputs()[0]\n"
            "shape = [batch] + [d if isinstance(d, int) else 32 for d in inp.shape[1:]]\n"
            "x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)\n"
            "t0 = time.perf_counter(); s.run(None, {inp.name: x}); s.run(None, {inp.name: x})\n"
            "while time.perf_counter() - t0 < warm_s: s.run(None, {inp.name: x})\n"
            "times = []\n"
            "for _ in range(runs):\n"
            "    t = time.perf_counter(); s.run(None, {inp.name: x}); times.append(time.perf_counter() - t)\n"
            "print(json.dumps(times))\n")
#: Timed runs of one model per process in :func:`latency`.
LATENCY_BLOCK = 10
WARM_S = 0.05


@dataclass
class Latency:
    """Seconds per run of each model: ``median`` over all timed runs, ``turns`` the median of each
    turn (one process of up to ``block`` runs per model per turn, the models one after the other)."""

    median: list[float]
    turns: list[list[float]]

    def ratios(self, of: int = 1, to: int = 0) -> list[float]:
        """Model ``of`` over model ``to`` within each turn: runs made seconds apart share the
        machine's load, so their spread shows how much that load moved the ratio of medians."""
        return [a / b for a, b in zip(self.turns[of], self.turns[to])]


def latency(paths: list[str], batch: int, reps: int, provider: str, seed: int = 0,
            block: int = LATENCY_BLOCK) -> Latency:
    """Median seconds per run of each model over ``reps`` timed runs, and of each turn.

    Each model runs in a process of its own, as it would be deployed: models compared within one
    process disturbed each other on 2 cores, one session's threads spinning on while the other ran
    (resnet56_nm p50-w4a8 int8 at batch 32: 14-17 ms per run taking turns with the float model in
    one process, 11.4-12.5 ms when each turn began after a pause, 11.6-14.4 ms alone). The models
    take turns, a process of up to ``block`` timed runs each, so that the machine's load hits
    all alike.
    """
    times: list[list[float]] = [[] for _ in paths]
    turns: list[list[float]] = [[] for _ in paths]
    while min(len(t) for t in times) < reps:
        for i, path in enumerate(paths):
            runs = min(block, reps - len(times[i]))
            if runs <= 0:
                continue
            proc = subprocess.run([sys.executable, "-c", _LATENCY, path, provider, str(batch), str(runs), str(seed), str(WARM_S)],
                                  capture_output=True, text=True, check=True)
            turn = json.loads(proc.stdout.strip().splitlines()[-1])
            times[i].extend(turn)
            turns[i].append(statistics.median(turn))
    return Latency([statistics.median(t) for t in times], turns)


def build_resnet50(path: Path) -> None:
    code = ("import sys, onnx; sys.path.insert(0, '.'); from models.builders import build_resnet50; "
            "onnx.save(build_resnet50(width=1.0, input_size=224), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet56_nm,resnet50", help="comma-separated: resnet56_nm, resnet50")
    p.add_argument("--settings", default=None, help=f"comma-separated subset of {', '.join(SETTINGS)}")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per model (ResNet-56)")
    p.add_argument("--reps-large", type=int, default=5, help="timed repetitions per model (ResNet-50)")
    p.add_argument("--time-reps", type=int, default=1,
                   help="turns of load+save and every compressor setting, run in turn; medians are reported")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--limit", type=int, default=None, help="images for top-1 (default: all 10k)")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--provider", default="CPUExecutionProvider",
                   help="ORT execution provider for the latency runs, e.g. CUDAExecutionProvider")
    p.add_argument("--resnet50", default=None, help="existing synthetic ResNet-50 .onnx (default: build one)")
    p.add_argument("--out-dir", default=None, help="where compressed models go (default: a temporary folder)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="BLAS threads of the compressor runs: OPENBLAS_NUM_THREADS and UDFC_BLAS_THREADS "
                        "(default: unset, so the compressor's own default of 1 thread during its passes)")
    args = p.parse_args(argv)
    if args.provider not in ort.get_available_providers():
        print(f"benchmark: {args.provider} is not available in this onnxruntime "
              f"(available: {', '.join(ort.get_available_providers())})", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="udfc_bench_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in args.models.split(","):
        if name == "resnet56_nm":
            models[name] = shared_dir() / "models" / "cifar10" / "resnet56_nm.onnx"
        elif name == "resnet50":
            path = Path(args.resnet50) if args.resnet50 else out_dir / "resnet50_synthetic.onnx"
            if not path.exists():
                build_resnet50(path)
            models[name] = path
        else:
            p.error(f"unknown model {name}")
    wanted = set(args.settings.split(",")) if args.settings else None

    rows, cost_rows, time_rows = [], [], []
    imports_mb = {what: measured(cmd)["peak_mb"] for what, cmd in _IMPORTS.items()}
    # The compressor limits its BLAS to UDFC_BLAS_THREADS (default 1) while it runs: set both.
    env = ({"OPENBLAS_NUM_THREADS": str(args.blas_threads), "UDFC_BLAS_THREADS": str(args.blas_threads)}
           if args.blas_threads else {})
    print(f"onnxruntime {ort.__version__}, provider {args.provider}, batches {batches}; ratios are compressed/original")
    for name, src in models.items():
        size_mb = src.stat().st_size / 1e6
        warm(src)
        settings = [s for s in MODEL_SETTINGS[name] if wanted is None or s in wanted]
        copy = out_dir / f"{name}_copy.onnx"
        commands = {"load+save": ([sys.executable, "-c", _LOAD_SAVE, str(src), str(copy)], None, copy)}
        for setting in settings:
            dst = out_dir / f"{name}_{setting}.onnx"
            commands[setting] = ([sys.executable, "-m", "udfc_onnx", str(src), str(dst), *SETTINGS[setting],
                                  "--report", str(out_dir / f"{name}_{setting}.json"), "-q"],
                                 out_dir / f"{name}_{setting}.json", dst)
        runs = interleaved_runs(commands, args.time_reps, env)
        base = median_of(runs["load+save"])
        base_s = base["elapsed_s"]
        cost_rows.append((name, "onnx.load+onnx.save", f"{base_s:.2f}", "1.00", f"{base['wall_s']:.2f}",
                          f"{base['peak_mb']:.0f}", f"{base['peak_mb'] / size_mb:.2f}",
                          f"{base['peak_mb'] - imports_mb['load+save']:.0f}",
                          f"{(base['peak_mb'] - imports_mb['load+save']) / size_mb:.2f}"))
        acc_data = None
        if name == "resnet56_nm" and not args.no_accuracy:
            x, y = load_dataset(shared_dir() / "data" / "cifar10_test.npz", args.limit)
            mean, std = normalization_for(src)
            from tools.evaluate import accuracy
            acc_data = (x, y, mean, std, accuracy)
            rows.append((name, "original (float)", "", "", "", f"{accuracy(str(src), x, y, mean, std):.2f}", ""))
        reps = args.reps if name == "resnet56_nm" else args.reps_large
        for setting in settings:
            dst = out_dir / f"{name}_{setting}.onnx"
            run = median_of(runs[setting])
            if run["rc"] != 0:
                print(f"{name} {setting}: compressor failed (exit {run['rc']}): {run['stderr'].strip()}", file=sys.stderr)
                continue
            report = run["report"]
            fusion = report.get("fusion") or {}
            fused = f"{fusion.get('fused_convs', 0)}/{fusion.get('convs', 0)}" if fusion else "n/a"
            above = run["peak_mb"] - imports_mb["compressor"]
            cost_rows.append((name, setting, f"{report['elapsed_s']:.2f}", ratio_cell(runs[setting], runs["load+save"]),
                              f"{run['wall_s']:.2f}", f"{run['peak_mb']:.0f}", f"{run['peak_mb'] / size_mb:.2f}",
                              f"{above:.0f}", f"{above / size_mb:.2f}"))
            peaks = report.get("peak_rss_mb") or {}
            # Peak RSS so far after each pass: the first pass within 1 MB of the final value reached it.
            peak_pass = next((k for k, v in peaks.items() if v >= max(peaks.values()) - 1), "") if peaks else ""
            time_rows.append((name, setting, "; ".join(f"{k} {v:.2f}" for k, v in report.get("timings", {}).items()),
                              f"{peak_pass} ({max(peaks.values()):.0f} MB)" if peaks else "n/a"))
            lat = []
            for b in batches:
                measured_latency = latency([str(src), str(dst)], b, reps, args.provider)
                t_orig, t_comp = measured_latency.median
                per_turn = measured_latency.ratios()
                spread = f"; turns {min(per_turn):.3f}-{max(per_turn):.3f}x" if len(per_turn) > 1 else ""
                lat.append(f"b{b}: {t_orig * 1e3:.1f} -> {t_comp * 1e3:.1f} ms ({t_comp / t_orig:.3f}x{spread})")
            acc = ""
            if acc_data is not None:
                x, y, mean, std, accuracy = acc_data
                acc = f"{accuracy(str(dst), x, y, mean, std):.2f}"
            rows.append((name, setting, fused, "; ".join(lat), f"{dst.stat().st_size / 1e6:.2f} MB", acc,
                         " ".join(SETTINGS[setting])))
            print(f"  done {name} {setting}", file=sys.stderr, flush=True)

    n_img = "" if args.no_accuracy else f" ({args.limit or 10000} images)"
    print(f"\n| model | setting | Conv fused | ORT {args.provider} latency original -> compressed (median; range of the per-turn ratios) | file | top-1 %{n_img} | flags |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\n| model | run | in-process s | x load+save (median; range of the per-turn ratios) | subprocess wall s "
          "| peak RSS MB | peak / file size "
          "| peak above imports MB | above imports / file size |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in cost_rows:
        print("| " + " | ".join(r) + " |")
    print("\n| model | setting | where the compressor's time goes (s) | peak RSS reached in |\n|---|---|---|---|")
    for r in time_rows:
        print("| " + " | ".join(r) + " |")
    print("\nfile sizes: " + ", ".join(f"{n} {p.stat().st_size / 1e6:.1f} MB" for n, p in models.items())
          + "; import baselines (peak RSS of a process that only imports): "
          + ", ".join(f"{what} {mb:.0f} MB" for what, mb in imports_mb.items()))
    print(f"outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
