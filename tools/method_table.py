"""Accuracy of prune / NM / UDFC at several ratios and bit widths, as a markdown table.

    python tools/method_table.py ../shared/models/cifar10/resnet56_nm.onnx \
        --ratios 0.3 0.4 0.5 --methods prune nm udfc --bits float 4 --criteria l1 [--limit N] [--set key=value ...]

Every cell compresses the model in memory with udfc_onnx and evaluates it with ORT on the data set.
``--set`` overrides any CompressConfig field for all cells (e.g. --set alpha1=0.02 --set ridge=0.1).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx  # noqa: E402

from tools.common import load_dataset, normalization_for, shared_dir  # noqa: E402
from tools.evaluate import accuracy  # noqa: E402
from udfc_onnx import CompressConfig, PRESETS, compress_model  # noqa: E402


def parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def cell_config(method: str, ratio: float, bits, criterion: str, overrides: dict, preset: str | None) -> CompressConfig:
    values = dict(PRESETS[preset]) if preset else {}
    values.update(method=method, prune_ratio=ratio, weight_bits=None if bits == "float" else int(bits), criterion=criterion)
    values.update(overrides)
    return CompressConfig(**values)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", default=str(shared_dir() / "data" / "cifar10_test.npz"))
    p.add_argument("--norm", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.4, 0.5])
    p.add_argument("--methods", nargs="+", default=["prune", "nm", "udfc"])
    p.add_argument("--bits", nargs="+", default=["float", "4"])
    p.add_argument("--criteria", nargs="+", default=["l1"])
    p.add_argument("--preset", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    x, y = load_dataset(args.data, args.limit)
    mean, std = normalization_for(args.model, args.norm)
    model = onnx.load(args.model)
    base = accuracy(model, x, y, mean, std)
    print(f"model {args.model}: baseline {base:.2f} % on {len(y)} images; overrides {overrides or 'none'}"
          f"{'; preset ' + args.preset if args.preset else ''}\n")
    cols = [(m, b) for b in args.bits for m in args.methods]
    print("| criterion | ratio | " + " | ".join(f"{m} {'fp32' if b == 'float' else b + '-bit'}" for m, b in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for crit in args.criteria:
        for ratio in args.ratios:
            cells = []
            for method, bits in cols:
                t = time.perf_counter()
                cfg = cell_config(method, ratio, bits, crit, overrides, args.preset)
                acc = accuracy(compress_model(model, cfg).model, x, y, mean, std)
                cells.append(f"{acc:.2f} ({acc - base:+.2f})")
                print(f"  {crit} {ratio} {method} {bits}: {acc:.2f} [{time.perf_counter() - t:.0f}s]", file=sys.stderr)
            print(f"| {crit} | {ratio:.0%} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
