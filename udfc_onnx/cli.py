"""Command line: ``python -m udfc_onnx IN OUT [options]`` and ``python -m udfc_onnx inspect IN``.

Exit codes: 0 success; 1 the compressed model failed its check (nothing written);
2 bad input, bad options or a model the tool cannot process (nothing written).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .config import PRESETS, CompressConfig
from .errors import UdfcError, ValidationError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        print(f"udfc_onnx: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _compress_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m udfc_onnx", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Data-free pruning + quantization of an ONNX CNN (UDFC). "
                            "Subcommand: `inspect IN` lists prunable units and why others are left alone.")
    p.add_argument("input", metavar="IN", help="input .onnx model (never modified)")
    p.add_argument("output", metavar="OUT", help="output .onnx path (written atomically, after validation)")
    p.add_argument("--version", action="version", version=f"udfc-onnx {__version__}")
    d = CompressConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings; 'paper' is the method as published, without this project's extensions")
    p.add_argument("--prune-ratio", type=float, default=d.prune_ratio,
                   help="fraction of channels removed from each prunable unit, 0 <= R < 1 (keeps int(C*(1-R)))")
    p.add_argument("--criterion", choices=["l1", "l2"], default=d.criterion, help="filter norm ranking channels")
    p.add_argument("--method", choices=["udfc", "nm", "prune"], default=d.method,
                   help="compensation: UDFC closed form, Neuron Merging, or none")
    p.add_argument("--weight-bits", type=int, default=d.weight_bits, help="weight bits per output channel, 2..8")
    p.add_argument("--no-quant", action="store_true", help="keep float weights (no quantization)")
    p.add_argument("--asymmetric", action="store_true", help="min/max asymmetric weight grid instead of symmetric")
    p.add_argument("--alpha1", type=float, default=None, help=f"pruning bias-term weight (default {d.alpha1})")
    p.add_argument("--alpha2", type=float, default=None, help=f"quantization bias-term weight (default {d.alpha2})")
    p.add_argument("--quant-compensation", choices=["own", "next", "none"], default=None,
                   help=f"where UDFC's quantization scale goes (default {d.quant_compensation})")
    bt = p.add_mutually_exclusive_group()
    bt.add_argument("--bias-transfer", dest="bias_transfer", action="store_const", const=True, default=None,
                    help="move pruned channels' expected output into the consumer bias (default: on for udfc)")
    bt.add_argument("--no-bias-transfer", dest="bias_transfer", action="store_const", const=False,
                    help="disable the bias transfer")
    p.add_argument("--ridge", type=float, default=None, help=f"relative ridge of the pruning regression (default {d.ridge})")
    p.add_argument("--prune-residual", action="store_true",
                   help="also prune residual streams, each as one channel group over all its producers and consumers "
                        "(no filter compensation); by default only convs inside residual blocks are pruned")
    p.add_argument("--report", metavar="FILE.json", default=None, help="also write the full report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def config_from_args(args: argparse.Namespace) -> CompressConfig:
    """Build the validated config: defaults, then the preset, then explicit options."""
    values = dict(PRESETS[args.preset]) if args.preset else {}
    values.update(prune_ratio=args.prune_ratio, criterion=args.criterion, method=args.method,
                  weight_bits=None if args.no_quant else args.weight_bits)
    if args.asymmetric:
        values["symmetric"] = False
    if getattr(args, "prune_residual", False):
        values["prune_residual"] = True
    for name in ("alpha1", "alpha2", "quant_compensation", "bias_transfer", "ridge"):
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    return CompressConfig(**values)


def _inspect(argv: Sequence[str]) -> int:
    p = _Parser(prog="python -m udfc_onnx inspect",
                description="List every channel group (what would be pruned, how it is compensated) and the reason "
                            "for each layer left alone.")
    p.add_argument("input", metavar="IN")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--prune-ratio", type=float, default=CompressConfig().prune_ratio,
                   help="show how many channels each group would keep at this ratio")
    p.add_argument("--prune-residual", action="store_true", help="analyse as `--prune-residual` would prune")
    args = p.parse_args(argv)
    from .plan import inspect_model

    try:
        config = CompressConfig(weight_bits=None, prune_ratio=args.prune_ratio, prune_residual=args.prune_residual)
        records, text = inspect_model(args.input, config)
    except UdfcError as exc:
        print(f"udfc_onnx: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(records, indent=1) if args.json else text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        return _inspect(argv[1:])
    args = _compress_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        from .pipeline import compress_file
        from .report import render_table

        report = compress_file(args.input, args.output, config)
    except ValidationError as exc:
        print(f"udfc_onnx: error: {exc}", file=sys.stderr)
        return 1
    except UdfcError as exc:
        print(f"udfc_onnx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("udfc_onnx: interrupted; nothing written", file=sys.stderr)
        return 130
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report.to_dict(), f, indent=1, default=str)
    if not args.quiet:
        print(render_table(report))
        print(f"wrote {args.output}")
    return 0
