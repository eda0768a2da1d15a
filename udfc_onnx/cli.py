"""Command line.

    python -m udfc_onnx IN OUT [options]                      compress one model
    python -m udfc_onnx inspect IN                            prunable units, and why others are left alone
    python -m udfc_onnx batch INPUTS... --out-dir DIR [opts]  a model zoo: processes, timeout, --shard K/N
    python -m udfc_onnx merge-reports SUMMARY.json...         join the summaries of a sharded batch

Exit codes: 0 success; 1 a compressed model failed its check (nothing written), or for batch and
merge-reports some model failed; 2 bad input, options or output path, or a model the tool cannot
process (nothing written); 3 an internal error (a bug; -v prints the traceback); 130 interrupted.

Options come in groups, one function per group. To add options, write ``_add_<group>(group, defaults)``
and append an :class:`OptionGroup` to ``METHOD_GROUPS`` (method settings, shared by the single run and
``batch``): every option whose ``dest`` is a CompressConfig field and whose value is not None is
copied into the config, so most groups need no ``apply`` function.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from . import __version__
from .config import PRESETS, CompressConfig
from .errors import InvalidConfigError, UdfcError, ValidationError, first_line
from .resources import no_numpy_hugepages, reuse_freed_memory, share_one_malloc_arena

__all__ = ["main", "config_from_args", "file_options_from_args", "OptionGroup", "METHOD_GROUPS"]

PROG = "python -m udfc_onnx"
CONFIG_FIELDS = tuple(f.name for f in fields(CompressConfig))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        print(f"udfc_onnx: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _default(value) -> str:
    return "off" if value is None or value is False else "on" if value is True else str(value)


# ----------------------------------------------------------------------------------------------
# Option groups

@dataclass(frozen=True)
class OptionGroup:
    """A block of options.

    Attributes
    ----------
    title : str
        Heading in ``--help``.
    add : callable
        ``add(group, defaults)`` adds the options; ``defaults`` is ``CompressConfig()``. Options that
        set a config field default to None ("not given") and state the real default in their help.
    apply : callable, optional
        ``apply(args, values)`` for options that do not map one-to-one onto a field.
    """

    title: str
    add: Callable[[argparse._ArgumentGroup, CompressConfig], None]
    apply: Callable[[argparse.Namespace, dict], None] | None = None


def _add_pruning(g, d: CompressConfig) -> None:
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings, applied before the other options; 'paper' is the method as published, "
                        "without this project's extensions (default: none)")
    g.add_argument("--prune-ratio", dest="prune_ratio", type=float, default=None, metavar="R",
                   help=f"fraction of channels removed from each prunable unit, 0 <= R < 1; keeps int(C*(1-R)) "
                        f"(default: {d.prune_ratio})")
    g.add_argument("--criterion", choices=["l1", "l2"], default=None,
                   help=f"filter norm that ranks channels (default: {d.criterion})")
    g.add_argument("--method", choices=["udfc", "nm", "prune"], default=None,
                   help=f"compensation: UDFC closed form, Neuron Merging, or none (default: {d.method})")
    g.add_argument("--channel-multiple", dest="channel_multiple", type=int, default=None, metavar="M",
                   help="round each kept channel count up to a multiple of M (default: 16 with --activations uint8, "
                        "whose int8 kernels run narrower convs slower; else 1, the paper's int(C*(1-R)))")
    g.add_argument("--prune-residual", dest="prune_residual", action="store_const", const=True, default=None,
                   help="also prune residual streams, each as one channel group over all its producers and consumers "
                        "(no filter compensation) (default: off: only convs inside residual blocks are pruned)")


def _add_quantization(g, d: CompressConfig) -> None:
    bits = g.add_mutually_exclusive_group()
    bits.add_argument("--weight-bits", dest="weight_bits", type=int, default=None, metavar="B",
                      help=f"weight bits per output channel, 2..8 (default: {d.weight_bits})")
    bits.add_argument("--no-quant", action="store_true", help="keep float weights, no quantization (default: off)")
    g.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False, default=None,
                   help="min/max asymmetric weight grid (default: symmetric from 5 bits up, asymmetric below)")


def _apply_quantization(args: argparse.Namespace, values: dict) -> None:
    if args.no_quant:
        values["weight_bits"] = None


def _add_compensation(g, d: CompressConfig) -> None:
    g.add_argument("--alpha1", type=float, default=None, help=f"pruning bias-term weight (default: {d.alpha1})")
    g.add_argument("--alpha2", type=float, default=None, help=f"quantization bias-term weight (default: {d.alpha2})")
    g.add_argument("--quant-compensation", dest="quant_compensation", choices=["own", "next", "none"], default=None,
                   help=f"where UDFC's quantization scale goes (default: {d.quant_compensation})")
    bt = g.add_mutually_exclusive_group()
    bt.add_argument("--bias-transfer", dest="bias_transfer", action="store_const", const=True, default=None,
                    help="move pruned channels' expected output into the consumer bias (default: on for udfc, "
                         "off for nm/prune)")
    bt.add_argument("--no-bias-transfer", dest="bias_transfer", action="store_const", const=False,
                    help="disable the bias transfer (default: off)")
    g.add_argument("--ridge", type=float, default=None,
                   help=f"relative ridge of the pruning regression (default: {d.ridge})")


def _add_int8_output(g, d: CompressConfig) -> None:
    # Full int8 deployment output (udfc_onnx/int8.py).
    g.add_argument("--activations", choices=["float", "uint8"], default=None,
                   help="uint8: full int8 QDQ that ORT fuses into QLinearConv (faster); float: weight-only QDQ "
                        f"(smaller file, runs slower than float on ORT CPU) (default: {d.activations})")
    g.add_argument("--activation-sigmas", dest="activation_sigmas", type=float, default=None,
                   help=f"data-free activation range: BN mean +- this many standard deviations (default: {d.activation_sigmas})")
    g.add_argument("--calibration", metavar="FILE.npz", default=None,
                   help="optional samples for activation ranges (min/max): an array named like the model input "
                        "(preprocessed floats), or 'x' (uint8 images, with --calibration-norm) (default: none, data-free)")
    g.add_argument("--calibration-norm", dest="calibration_norm", choices=["cifar", "imagenet"], default=None,
                   help="normalisation of uint8 calibration images: x/255, then per-channel mean/std (default: none)")
    g.add_argument("--int4-storage", dest="int4_storage", action="store_const", const=True, default=None,
                   help="store 2..4-bit weights as INT4 (opset 21): smaller file, but ORT does not fuse INT4, "
                        "so it runs slower (default: off)")


def _add_accuracy(g, d: CompressConfig) -> None:
    # Choices settled by tools/reproduce_table2.py --ablation (issue 3).
    g.add_argument("--regression", choices=["synthetic", "moments", "euclidean"], default=None,
                   help="UDFC pruning regression: on BN-matched synthetic activations (no data; big models fall back "
                        "to moments), under analytic input moments, or the paper's plain least squares "
                        f"(default: {d.regression})")
    g.add_argument("--synthetic-fit", dest="synthetic_fit", choices=["sequential", "layer"], default=None,
                   help="synthetic regression: refit each unit on the network compressed so far, or each unit "
                        f"alone on the original network (default: {d.synthetic_fit})")
    g.add_argument("--synthetic-samples", dest="synthetic_samples", type=int, default=None,
                   help="synthetic images (default: from a MAC budget, 256 for a CIFAR ResNet-56)")
    g.add_argument("--seed", type=int, default=None, help=f"seed of the synthetic noise (default: {d.seed})")
    g.add_argument("--synthetic-inputs", dest="synthetic_inputs", choices=["noise", "distilled"], default=None,
                   help="images of the synthetic activations: Gaussian noise, or noise optimised (ZeroQ) until each "
                        f"BN's batch statistics match its running ones (slower) (default: {d.synthetic_inputs})")
    g.add_argument("--no-synthetic-renorm", dest="synthetic_renorm", action="store_const", const=False, default=None,
                   help="run the synthetic inputs through the folded graph as it is, without renormalising each BN "
                        "over the batch (default: renormalise)")
    g.add_argument("--distill-iterations", dest="distill_iterations", type=int, default=None, metavar="N",
                   help=f"Adam steps of the distilled inputs (default: {d.distill_iterations})")
    g.add_argument("--distill-batch", dest="distill_batch", type=int, default=None, metavar="N",
                   help="images whose BN statistics are matched together (default: all synthetic samples)")
    g.add_argument("--distill-lr", dest="distill_lr", type=float, default=None,
                   help=f"Adam step size of the distilled inputs (default: {d.distill_lr})")
    g.add_argument("--distill-images", dest="distill_images", type=int, default=None, metavar="N",
                   help="images distilled, the other synthetic samples made by --distill-fill "
                        f"(default: {d.distill_images})")
    g.add_argument("--distill-fill", dest="distill_fill", choices=["flip-shift", "noise"], default=None,
                   help="samples beyond --distill-images: flipped and shifted distilled images, or the starting noise "
                        f"(default: {d.distill_fill})")
    g.add_argument("--distill-ce", dest="distill_ce", type=float, default=None, metavar="W",
                   help="weight of the cross-entropy toward random target classes in the distillation loss "
                        f"(DeepInversion) (default: {d.distill_ce})")
    g.add_argument("--distill-tv", dest="distill_tv", type=float, default=None, metavar="W",
                   help=f"weight of the total-variation image prior of the distillation (default: {d.distill_tv})")
    g.add_argument("--distill-l2", dest="distill_l2", type=float, default=None, metavar="W",
                   help=f"weight of the mean-square image prior of the distillation (default: {d.distill_l2})")
    g.add_argument("--consumer-refit", dest="consumer_refit", choices=["patch", "channel"], default=None,
                   help="sequential synthetic fit: refit each consumer over whole input patches to the original "
                        "consumer's output, or one coefficient per channel pair (default: "
                        f"{d.consumer_refit})")
    g.add_argument("--weight-rounding", dest="weight_rounding", choices=["gptq", "nearest"], default=None,
                   help="round weights with GPTQ error feedback under each layer's synthetic input moments (where a "
                        f"synthetic pass runs), or each to its nearest level (default: {d.weight_rounding})")
    g.add_argument("--selection", choices=["greedy", "norm"], default=None,
                   help="UDFC kept channels: least compensated error, or top --criterion norms as in the paper "
                        "(default: norm for the sequential synthetic fit, greedy for the others)")
    g.add_argument("--mean-weight", dest="mean_weight", type=float, default=None,
                   help=f"weight of the means in the moment regression (default: {d.mean_weight})")
    g.add_argument("--bias-units", dest="bias_units", choices=["e", "b"], default=None,
                   help=f"units of the paper's alpha1 bias term, Euclidean regression only (default: {d.bias_units})")
    bc = g.add_mutually_exclusive_group()
    bc.add_argument("--bias-correction", dest="bias_correction", action="store_const", const=True, default=None,
                    help="data-free DFQ bias correction of quantized layers (default: on for udfc, off for nm/prune)")
    bc.add_argument("--no-bias-correction", dest="bias_correction", action="store_const", const=False,
                    help="disable the bias correction (default: off)")
    g.add_argument("--symmetric", dest="symmetric", action="store_const", const=True, default=None,
                   help="symmetric weight grid at every width, as ORT's int8 kernels need (default: by width)")
    g.add_argument("--granularity", choices=["channel", "tensor"], default=None,
                   help=f"one weight scale per output channel or per tensor (default: {d.granularity})")
    g.add_argument("--cross-layer-equalization", dest="cross_layer_equalization", action="store_const", const=True,
                   default=None, help="DFQ cross-layer equalization before quantizing (default: off)")
    g.add_argument("--regress-float", dest="regress_on_quantized", action="store_const", const=False, default=None,
                   help="regress pruned filters on the float kept filters, not the quantized ones (default: off)")


#: Method settings shared by the single run and ``batch``. Append new groups here.
METHOD_GROUPS: list[OptionGroup] = [
    OptionGroup("pruning", _add_pruning),
    OptionGroup("quantization", _add_quantization, _apply_quantization),
    OptionGroup("compensation", _add_compensation),
    OptionGroup("accuracy (see tools/reproduce_table2.py)", _add_accuracy),
    OptionGroup("int8 output", _add_int8_output),
]


def _add_config_file(g) -> None:
    g.add_argument("--config", metavar="FILE", default=None,
                   help="JSON (or YAML, if PyYAML is installed) with optional 'settings' (any option, by its "
                        "config name) and 'layers': {node name or glob: {ratio, bits, skip}}; explicit options "
                        "win over 'settings'; a key that matches no Conv/Gemm is an error (default: none)")


def _add_check(g) -> None:
    g.add_argument("--check-n", dest="check_n", type=int, default=8, metavar="N",
                   help="random samples compared with the original; 0 skips the comparison (default: 8)")
    g.add_argument("--rtol", type=float, default=1e-4,
                   help="relative tolerance when nothing is pruned or quantized (default: 1e-4)")
    g.add_argument("--atol", type=float, default=1e-4,
                   help="absolute tolerance when nothing is pruned or quantized (default: 1e-4)")
    g.add_argument("--overwrite-input-shape", dest="input_shape", action="append", default=None,
                   metavar="NAME:DIMS",
                   help="shape of an input for the check and the MAC count, e.g. input:1,3,224,224 (DIMS alone "
                        "for a one-input model); repeat for several inputs; the model is not changed "
                        "(default: declared shape, symbolic batch = check-n, other symbols = 32)")
    g.add_argument("--save-as-external-data", dest="external_data", action="store_true",
                   help="weights in OUT.data beside OUT (always above 2 GB and for inputs with external data) "
                        "(default: off)")


def _add_verbosity(g) -> None:
    g.add_argument("--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal (default: only on a terminal)")
    quiet = g.add_mutually_exclusive_group()
    quiet.add_argument("-q", "--quiet", action="store_true", help="print nothing on success (default: off)")
    quiet.add_argument("-v", "--verbose", action="store_true",
                       help="also print per-unit decisions, layers left alone and notes; tracebacks of "
                            "internal errors (default: off)")


def _add_method_groups(p: argparse.ArgumentParser) -> None:
    d = CompressConfig()
    for group in METHOD_GROUPS:
        group.add(p.add_argument_group(group.title), d)
    _add_config_file(p.add_argument_group("per-layer settings"))
    _add_check(p.add_argument_group("checking and writing"))


def _single_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Data-free pruning + quantization of an ONNX CNN (UDFC).\n\n"
                            "other commands:\n"
                            f"  {PROG} inspect IN                        prunable units and why others are left alone\n"
                            f"  {PROG} batch INPUTS... --out-dir DIR     a model zoo (see batch --help)\n"
                            f"  {PROG} merge-reports SUMMARY.json...     join the summaries of a sharded batch",
                epilog="exit codes: 0 ok; 1 the output failed its check (nothing written); 2 bad input, options or "
                       "output path (nothing written); 3 internal error; 130 interrupted\n\n"
                       "environment:\n"
                       "  UDFC_THREADS=N       threads for independent units and large elementwise passes\n"
                       "                       (default: min(2, CPUs); the output is the same for any N)\n"
                       "  UDFC_BLAS_THREADS=N  NumPy's BLAS threads during the passes (default 1; 0: as configured)")
    p.add_argument("input", metavar="IN", help="input .onnx model (never modified)")
    p.add_argument("output", metavar="OUT", nargs="?", default=None,
                   help="output .onnx path, written atomically after validation (optional with --dry-run)")
    p.add_argument("--version", action="version", version=f"udfc-onnx {__version__}",
                   help="print the version and exit")
    _add_method_groups(p)
    run = p.add_argument_group("run")
    run.add_argument("--report", metavar="FILE.json", default=None,
                     help="also write the report as JSON: the table's numbers, settings and per-unit decisions "
                          "(default: none)")
    run.add_argument("--dry-run", dest="dry_run", action="store_true",
                     help="load, analyse and plan, print what would happen, write no model (default: off)")
    _add_verbosity(run)
    return p


def _batch_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} batch", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Compress many models, each in its own process; the batch goes on past failures.\n"
                            "Every model gets a row in the summary (status, sizes, MACs, time); the exit code is 1 "
                            "if any model failed.",
                epilog="sharding: give every machine the same INPUTS and --shard K/N (K = 0..N-1); model i of the "
                       f"sorted list goes to shard i mod N. Join the summaries with `{PROG} merge-reports`.")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="model file, folder (every *.onnx below it), glob ('zoo/**/*.onnx') or @list.txt")
    p.add_argument("--out-dir", dest="out_dir", required=True, metavar="DIR",
                   help="output folder (created); a folder input keeps its relative paths (required)")
    p.add_argument("--version", action="version", version=f"udfc-onnx {__version__}",
                   help="print the version and exit")
    _add_method_groups(p)
    b = p.add_argument_group("batch")
    b.add_argument("--jobs", "-j", type=int, default=1, metavar="N", help="models converted at once (default: 1)")
    b.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="time limit per model; past it the model is stopped and marked timeout (default: none)")
    b.add_argument("--shard", default=None, metavar="K/N",
                   help="convert only shard K of N (0-based, e.g. $JOB_COMPLETION_INDEX/4) (default: all)")
    b.add_argument("--summary-json", dest="summary_json", default=None, metavar="FILE",
                   help="summary JSON path (default: DIR/udfc-summary[.shard-K-of-N].json)")
    b.add_argument("--summary-csv", dest="summary_csv", default=None, metavar="FILE",
                   help="summary CSV path (default: DIR/udfc-summary[.shard-K-of-N].csv)")
    b.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="list the models of this shard and their outputs, convert nothing (default: off)")
    _add_verbosity(b)
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} merge-reports",
                description="Join the summary JSON files of a sharded batch into one, check that every shard "
                            "is there once, print the table. Exit code 1 if a model failed or a shard is missing.")
    p.add_argument("summaries", metavar="SUMMARY", nargs="+", help="summary .json files, folders or globs")
    p.add_argument("-o", "--output", default=None, metavar="FILE.json", help="merged JSON (default: none)")
    p.add_argument("--csv", default=None, metavar="FILE.csv", help="merged CSV (default: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but problems (default: off)")
    return p


# ----------------------------------------------------------------------------------------------
# Settings from arguments

def _read_config_file(args: argparse.Namespace) -> None:
    """Read ``--config`` once into ``args.config_settings`` / ``args.config_rules``."""
    from .overrides import load_config_file

    args.config_settings, args.config_rules = ({}, None) if not args.config else load_config_file(args.config, CONFIG_FIELDS)


def config_from_args(args: argparse.Namespace) -> CompressConfig:
    """The validated config: defaults < preset < ``--config`` settings < explicit options."""
    values = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    values.update(getattr(args, "config_settings", None) or {})
    for name in CONFIG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    for group in METHOD_GROUPS:
        if group.apply:
            group.apply(args, values)
    try:
        return CompressConfig(**values)
    except TypeError as exc:  # a wrong type from a config file, e.g. a list
        raise InvalidConfigError(f"bad setting: {first_line(exc)}") from None


def file_options_from_args(args: argparse.Namespace):
    """FileOptions from the checking/writing options and the ``--config`` layer rules."""
    from .pipeline import FileOptions
    from .validate import parse_input_shapes

    return FileOptions(check_n=args.check_n, rtol=args.rtol, atol=args.atol,
                       input_shapes=parse_input_shapes(args.input_shape) or None,
                       overrides=getattr(args, "config_rules", None), external_data=args.external_data)


def _progress(args, total: int, label: str):
    from .report import Progress

    return Progress(total, label, enabled=True if args.progress else (False if args.quiet else None))


def _write_json(path: str, data: dict) -> None:
    """Write JSON atomically (temporary file beside it, then rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_side_file(path: str | None, *, option: str, avoid: Sequence[str | None]) -> None:
    """Refuse a report/summary path that is a model path or in a missing folder, before any work."""
    if path is None:
        return
    p = Path(path)
    for other in avoid:
        if other is not None and p.resolve() == Path(other).resolve():
            raise InvalidConfigError(f"{option} {path} is also a model path")
    if p.is_dir():
        raise InvalidConfigError(f"{option} {path} is a directory")
    if not p.parent.is_dir():
        raise InvalidConfigError(f"{option}: directory {p.parent} does not exist")


def _error(message: str) -> None:
    print(f"udfc_onnx: error: {message}", file=sys.stderr)


def _internal_error(exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    _error(f"internal error: {type(exc).__name__}: {first_line(exc)} (a bug; rerun with -v for the traceback "
           "and please report it)")
    return 3


def _configure_logging(args) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="udfc_onnx: %(levelname)s: %(message)s")


# ----------------------------------------------------------------------------------------------
# Commands

def _single(argv: Sequence[str]) -> int:
    args = _single_parser().parse_args(argv)
    _configure_logging(args)
    from .pipeline import compress_file, plan_file
    from .report import render_dry_run, render_table, render_units

    progress = None
    try:
        if args.output is None and not args.dry_run:
            raise InvalidConfigError("OUT is required (only --dry-run may leave it out)")
        _check_side_file(args.report, option="--report", avoid=(args.input, args.output))
        _read_config_file(args)
        config = config_from_args(args)
        options = file_options_from_args(args)
        if args.dry_run:
            plan = plan_file(args.input, args.output, config, options=options)
            if args.report:
                _write_json(args.report, plan.to_dict())
            if not args.quiet:
                print(render_dry_run(plan))
            return 0
        progress = _progress(args, 6, "udfc_onnx")
        report = compress_file(args.input, args.output, config, options=options, progress=progress.step)
        if args.report:
            _write_json(args.report, report.to_dict())
    except ValidationError as exc:
        _error(first_line(exc))
        return 1
    except UdfcError as exc:
        _error(first_line(exc))
        return 2
    except MemoryError:
        _error("out of memory")
        return 2
    except Exception as exc:
        return _internal_error(exc, args.verbose)
    finally:
        if progress is not None:
            progress.close()
    if not args.quiet:
        print(render_table(report))
        if args.verbose:
            print(render_units(report.units, report.skipped, report.layers, report.notes))
        print(f"wrote {args.output}" + (f" (+ {Path(args.output).name}.data)" if report.external_data else ""))
    return 0


def _batch(argv: Sequence[str]) -> int:
    args = _batch_parser().parse_args(argv)
    _configure_logging(args)
    from .batch import collect_inputs, make_summary, parse_shard, run_batch, select_shard, summary_csv
    from .report import render_batch_table

    start = time.perf_counter()
    try:
        _read_config_file(args)
        config = config_from_args(args)
        options = file_options_from_args(args)
        shard = parse_shard(args.shard)
        if args.jobs < 1:
            raise InvalidConfigError(f"--jobs must be >= 1, got {args.jobs}")
        if args.timeout is not None and not args.timeout > 0:
            raise InvalidConfigError(f"--timeout must be > 0 seconds, got {args.timeout}")
        out_dir = Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise InvalidConfigError(f"--out-dir {out_dir} is a file")
        all_jobs = collect_inputs(args.inputs, out_dir)
        jobs = select_shard(all_jobs, shard)
        suffix = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
        json_path = args.summary_json or str(out_dir / f"udfc-summary{suffix}.json")
        csv_path = args.summary_csv or str(out_dir / f"udfc-summary{suffix}.csv")
        if args.dry_run:
            print(f"dry run: {len(jobs)} of {len(all_jobs)} models" + (f" in shard {shard[0]}/{shard[1]}" if shard else ""))
            for job in jobs:
                print(f"  {job.input} -> {job.output}")
            return 0
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidConfigError(f"--out-dir {out_dir}: cannot create ({exc.strerror})") from None
        models = [j.input for j in all_jobs]
        _check_side_file(json_path, option="--summary-json", avoid=models)
        _check_side_file(csv_path, option="--summary-csv", avoid=models)
    except UdfcError as exc:
        _error(first_line(exc))
        return 2
    progress = _progress(args, len(jobs), "batch")
    failed = 0

    def on_result(row) -> None:
        nonlocal failed
        progress.step(f"{row.name} {row.status}")
        if row.status != "ok":
            failed += 1
            progress.close()
            print(f"udfc_onnx: {row.name}: {row.status}: {row.message}", file=sys.stderr)
        elif args.verbose:
            print(f"{row.name}: ok in {row.seconds:.1f} s", file=sys.stderr)

    try:
        rows = run_batch(jobs, config, options, n_jobs=args.jobs, timeout=args.timeout, on_result=on_result)
    except KeyboardInterrupt:
        progress.close()
        print("udfc_onnx: batch interrupted; finished models are kept, no summary written", file=sys.stderr)
        return 130
    except Exception as exc:
        return _internal_error(exc, args.verbose)
    finally:
        progress.close()
    summary = make_summary(rows, shard=shard, total_inputs=len(all_jobs), config=config.to_dict(),
                           options={k: v for k, v in options.to_dict().items()}, elapsed_s=time.perf_counter() - start)
    _write_json(json_path, summary)
    Path(csv_path).write_text(summary_csv(summary["models"]))
    if not args.quiet:
        print(render_batch_table(summary["models"]))
        print(f"summary: {json_path}, {csv_path}")
    return 1 if failed else 0


def _merge(argv: Sequence[str]) -> int:
    args = _merge_parser().parse_args(argv)
    from .batch import merge_summaries, summary_csv
    from .report import render_batch_table

    paths: list[str] = []
    for spec in args.summaries:
        p = Path(spec)
        if p.is_dir():
            paths += sorted(str(f) for f in p.rglob("udfc-summary*.json"))
        elif not p.exists() and glob.has_magic(spec):
            paths += sorted(glob.glob(spec, recursive=True))
        else:
            paths.append(spec)
    try:
        _check_side_file(args.output, option="--output", avoid=paths)
        _check_side_file(args.csv, option="--csv", avoid=paths)
        merged, problems = merge_summaries(paths)
    except UdfcError as exc:
        _error(first_line(exc))
        return 2
    if args.output:
        _write_json(args.output, merged)
    if args.csv:
        Path(args.csv).write_text(summary_csv(merged["models"]))
    for problem in problems:
        print(f"udfc_onnx: merge-reports: {problem}", file=sys.stderr)
    if not args.quiet:
        print(render_batch_table(merged["models"]))
    failed = sum(1 for m in merged["models"] if m.get("status") != "ok")
    return 1 if failed or problems else 0


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


def _quiet_onnxruntime() -> None:
    """ORT's default logger prints failures (in colour, to stderr) that the CLI reports in its own line."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    except Exception:  # an old or odd onnxruntime: its log lines are only noise
        pass


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"inspect": _inspect, "batch": _batch, "merge-reports": _merge}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (``--help`` and ``--version`` return 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_onnxruntime()
    share_one_malloc_arena()  # the solve's threads reuse what the main thread frees (see its docstring)
    reuse_freed_memory()  # weight-sized blocks reuse freed heap memory, not new pages (see its docstring)
    no_numpy_hugepages()  # no memory compaction on page faults (see its docstring)
    command = COMMANDS.get(argv[0]) if argv and not os.path.exists(argv[0]) else None
    try:
        return command(argv[1:]) if command else _single(argv)
    except SystemExit as exc:  # argparse: --help/--version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except KeyboardInterrupt:
        print("udfc_onnx: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
