"""Every builder architecture through the compressor: groups, reasons, MACs, and UDFC vs plain pruning.

    python tools/architectures.py [--models vgg16_bn_cifar resnet18 ...] [--ratio 0.3] [--bits 8]
        [--samples 32] [--bn default|on|off|both] [--prune-residual] [--set key=value ...] [--extra-set key=value ...]

For each model of ``models.builders.BUILDERS`` (random weights, BN calibrated on N(0, 1) inputs) the
tool writes the model to a temporary folder and runs, through ``compress_file`` (the code path of
``python -m udfc_onnx IN OUT``, validation included):

* ``--prune-ratio R --weight-bits B --method udfc`` and ``--method prune``;
* ``--prune-ratio 0 --no-quant`` (must reproduce the model to 1e-4 of the output scale);

then measures the relative L2 error ``||y' - y|| / ||y||`` of the logits against the original on
``--samples`` N(0, 1) inputs (seeded), and prints one markdown row per architecture. ``--extra-set``
adds a column: UDFC with those CompressConfig overrides (e.g. ``--extra-set ridge=0.1``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import onnx  # noqa: E402

from models.builders import BUILDERS, input_size_of  # noqa: E402
from udfc_onnx import CompressConfig  # noqa: E402
from udfc_onnx.pipeline import compress_file  # noqa: E402
from udfc_onnx.plan import reason_label  # noqa: E402
from udfc_onnx.validate import session  # noqa: E402


@dataclass
class ArchRow:
    """One architecture's numbers (see the module docstring)."""

    name: str
    with_bn: bool
    groups: int = 0
    pruned: int = 0
    full: int = 0
    mean_only: int = 0
    uncompensated: int = 0
    left_alone: int = 0
    reasons: dict = field(default_factory=dict)
    macs_before: int = 0
    macs_after: int = 0
    err_udfc: float = float("nan")
    err_prune: float = float("nan")
    err_extra: float = float("nan")
    lossless_dev: float = float("nan")

    @property
    def compensation_applies(self) -> bool:
        """Some pruned group gets filter or mean compensation."""
        return self.full + self.mean_only > 0


def relative_error(reference: np.ndarray, output: np.ndarray) -> float:
    """``||output - reference|| / ||reference||`` over every sample and logit."""
    ref = reference.astype(np.float64)
    return float(np.linalg.norm(output.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def random_batch(model: onnx.ModelProto, samples: int, seed: int) -> np.ndarray:
    """N(0, 1) inputs of the builder's calibration size (the BN statistics' distribution)."""
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    size = input_size_of(model)
    return np.random.default_rng(seed).standard_normal((samples, channels, size, size)).astype(np.float32)


def evaluate(name: str, *, with_bn: bool | None = None, ratio: float = 0.3, bits: int | None = 8, samples: int = 32,
             seed: int = 0, overrides: dict | None = None, extra: dict | None = None,
             workdir: str | Path | None = None) -> ArchRow:
    """Compress builder ``name`` with udfc and prune, check the lossless setting, measure errors.

    Parameters
    ----------
    name : str
        Key of ``BUILDERS``.
    with_bn : bool, optional
        Builder's ``with_bn``; None keeps the builder's default (False only for "mlp").
    overrides : dict, optional
        CompressConfig fields for every run (e.g. ``prune_residual=True``).
    extra : dict, optional
        CompressConfig fields of an additional UDFC run (``err_extra``).
    """
    kwargs = {} if with_bn is None else {"with_bn": with_bn}
    model = BUILDERS[name](**kwargs)
    bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    overrides = dict(overrides or {})
    x = random_batch(model, samples, seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src = Path(tmp) / f"{name}.onnx"
        onnx.save(model, src)
        reference = session(str(src)).run(None, {"input": x})[0]
        row = ArchRow(name, bn)
        runs = {"udfc": dict(method="udfc"), "prune": dict(method="prune")}
        if extra:
            runs["extra"] = dict(method="udfc", **extra)
        for key, settings in runs.items():
            config = CompressConfig(**{**overrides, **settings, "prune_ratio": ratio, "weight_bits": bits})
            out = Path(tmp) / f"{name}.{key}.onnx"
            report = compress_file(src, out, config)
            err = relative_error(reference, session(str(out)).run(None, {"input": x})[0])
            setattr(row, f"err_{key}", err)
            if key == "udfc":
                row.macs_before, row.macs_after = report.before.macs, report.after.macs
                row.groups = len(report.units)
                pruned = [u for u in report.units if u["kept"] < u["channels"]]
                row.pruned = len(pruned)
                modes = Counter(u.get("compensation", "full") for u in pruned)
                row.full, row.mean_only = modes["full"], modes["mean"]
                row.uncompensated = modes["none"] + modes["mixed"]
                row.left_alone = len(report.skipped)
                row.reasons = dict(Counter(reason_label(s["reason"]) for s in report.skipped))
        lossless = Path(tmp) / f"{name}.lossless.onnx"
        compress_file(src, lossless, CompressConfig(**{**overrides, "prune_ratio": 0.0, "weight_bits": None}))
        out = session(str(lossless)).run(None, {"input": x})[0]
        row.lossless_dev = float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-30))
    return row


def _human(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def render(rows: list[ArchRow], extra_label: str = "") -> str:
    """Markdown table of the rows."""
    head = ["architecture", "BN", "groups (pruned)", "full / mean-only / none", "left alone (why)",
            "MACs before -> after", "rel. L2 err udfc", "prune"]
    if extra_label:
        head.append(f"udfc {extra_label}")
    head += ["udfc < prune", "ratio 0, float: max dev"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        why = ", ".join(f"{n} {k}" for k, n in sorted(r.reasons.items(), key=lambda kv: -kv[1])) or "-"
        cells = [r.name, "yes" if r.with_bn else "no", f"{r.groups} ({r.pruned})",
                 f"{r.full} / {r.mean_only} / {r.uncompensated}", f"{r.left_alone} ({why})",
                 f"{_human(r.macs_before)} -> {_human(r.macs_after)}", f"{r.err_udfc:.3f}", f"{r.err_prune:.3f}"]
        if extra_label:
            cells.append(f"{r.err_extra:.3f}")
        verdict = ("yes" if r.err_udfc < r.err_prune else "**no**") if r.compensation_applies else "n/a (none applies)"
        cells += [verdict, f"{r.lossless_dev:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        value: object = text
        for conv in (int, float):
            try:
                value = conv(text)
                break
            except ValueError:
                pass
        out[key] = {"true": True, "false": False}.get(str(value).lower(), value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--bits", default="8", help="weight bits, or 'float'")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn", choices=["default", "on", "off", "both"], default="default",
                   help="builders' with_bn: their default (off only for mlp), forced on/off, or both rows")
    p.add_argument("--prune-residual", action="store_true")
    p.add_argument("--set", action="append", default=[], help="CompressConfig override for every run")
    p.add_argument("--extra-set", action="append", default=[], help="an extra UDFC column with these overrides")
    args = p.parse_args(argv)
    bits = None if args.bits == "float" else int(args.bits)
    overrides = _parse_sets(args.set)
    if args.prune_residual:
        overrides["prune_residual"] = True
    extra = _parse_sets(args.extra_set) or None
    variants = {"default": [None], "on": [True], "off": [False], "both": [True, False]}[args.bn]
    rows = []
    for with_bn in variants:
        for name in args.models:
            rows.append(evaluate(name, with_bn=with_bn, ratio=args.ratio, bits=bits, samples=args.samples,
                                 seed=args.seed, overrides=overrides, extra=extra))
            print(f"  done {name} (with_bn={rows[-1].with_bn})", file=sys.stderr, flush=True)
    quant = "--no-quant" if bits is None else f"--weight-bits {bits}"
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
    print(f"python -m udfc_onnx IN OUT --prune-ratio {args.ratio} {quant} --method udfc|prune {flags}".rstrip())
    print(f"relative L2 error of the logits on {args.samples} N(0,1) inputs (seed {args.seed}); "
          "lossless column: --prune-ratio 0 --no-quant, max |diff| / max |y|\n")
    label = ",".join(args.extra_set) if extra else ""
    print(render(rows, label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
