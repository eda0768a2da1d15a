"""The fixed pass order of a run.

    load -> name nodes -> (opset >= 13 if quantizing) -> read BN stats -> fold BN
    -> find units -> plan -> solve -> rewrite initializers -> emit QDQ -> write -> validate

Each pass takes a model and returns a model plus a record; only this module sequences them.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from .compensate import Layer, Solution, solve_plan
from .config import CompressConfig
from .errors import InvalidConfigError, ValidationError
from .fold import FoldRecord, fold_batchnorm
from .graph import GraphView, attribute, ensure_node_names
from .load import default_opset, load_model
from .plan import Plan, make_plan, restrict_to_layers
from .qdq import MIN_QDQ_OPSET, emit_weight_qdq
from .report import ModelInfo, Report
from .rewrite import apply_arrays
from .stats import read_bn_stats
from .units import find_units, limit_to_statistics, member_arrays, raw_filters_of
from .validate import validate_file

__all__ = ["CompressResult", "analyze", "compress_model", "compress_file"]


@dataclass
class CompressResult:
    """A compressed model and the records of every pass."""

    model: onnx.ModelProto
    plan: Plan
    fold: FoldRecord
    solution: Solution
    notes: list[str] = field(default_factory=list)


def collect_layers(model: onnx.ModelProto) -> dict[str, Layer]:
    """Every Conv/Gemm whose weight is a constant used only by it (the ones we may rewrite)."""
    view = GraphView(model)
    layers = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        w = node.input[1]
        if not view.is_constant(w) or view.uses(w) != 1 or len(view.initializers[w].dims) < 2:
            continue
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                                       or attribute(node, "beta", 1.0) != 1.0):
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if bias and (not view.is_constant(bias) or view.uses(bias) != 1):
            continue
        layers[node.name] = Layer(node.name, "conv" if node.op_type == "Conv" else "gemm", w,
                                  bias or f"{node.name}.bias", bool(attribute(node, "transB", 0)))
    return layers


def _prepare(model: onnx.ModelProto, config: CompressConfig, notes: list[str]) -> onnx.ModelProto:
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    renamed = ensure_node_names(model_copy)
    if renamed:
        notes.append(f"named {renamed} unnamed or duplicate nodes")
    opset = default_opset(model_copy)
    if config.weight_bits is not None and opset < MIN_QDQ_OPSET:
        model_copy = onnx.version_converter.convert_version(model_copy, MIN_QDQ_OPSET)
        notes.append(f"converted opset {opset} -> {MIN_QDQ_OPSET} for per-channel DequantizeLinear")
    return model_copy


def analyze(model: onnx.ModelProto, config: CompressConfig):
    """Read stats, fold BN and plan, without solving: (folded model, stats, raw filters, plan, fold record)."""
    stats = read_bn_stats(model)
    raw_filters = raw_filters_of(model)
    folded, fold_record = fold_batchnorm(model)
    units, skipped = find_units(folded, prune_residual=config.prune_residual)
    units = limit_to_statistics(units, stats)
    plan = make_plan(units, skipped, raw_filters, prune_ratio=config.prune_ratio, criterion=config.criterion,
                     weight_bits=config.weight_bits)
    return folded, stats, raw_filters, plan, fold_record


def compress_model(model: onnx.ModelProto, config: CompressConfig) -> CompressResult:
    """Compress a loaded model in memory (the input is not modified)."""
    notes: list[str] = []
    model = _prepare(model, config, notes)
    folded, stats, raw_filters, plan, fold_record = analyze(model, config)
    layers = collect_layers(folded)
    view = GraphView(folded)
    arrays: dict[str, np.ndarray] = {}
    for layer in layers.values():
        arrays[layer.weight] = view.array(layer.weight)
        if layer.bias in view.initializers:
            arrays[layer.bias] = view.array(layer.bias)
        else:
            out_ch = layer.out_major(arrays[layer.weight]).shape[0]
            arrays[layer.bias] = np.zeros(out_ch, arrays[layer.weight].dtype)
    plan = restrict_to_layers(plan, layers)
    arrays.update(member_arrays(folded, [u.unit for u in plan.units]))
    solution = solve_plan(plan, arrays, layers, stats, raw_filters, config)
    rewritten, _ = apply_arrays(folded, solution.arrays, layers)
    if solution.quantized:
        rewritten, _ = emit_weight_qdq(rewritten, solution.quantized, layers)
    rewritten.metadata_props.add(key="udfc_onnx.version", value=__version__)
    rewritten.metadata_props.add(key="udfc_onnx.config", value=str(config.to_dict()))
    try:
        rewritten = onnx.shape_inference.infer_shapes(rewritten)
    except Exception as exc:  # shapes are a convenience for viewers; ORT does not need them
        notes.append(f"shape inference failed on the output: {exc}")
    return CompressResult(rewritten, plan, fold_record, solution, notes)


def _write_atomic(model: onnx.ModelProto, out_path: Path) -> Path:
    """Save to a temporary file beside ``out_path``; the caller renames it after validation."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output should get normal permissions
    try:
        onnx.save(model, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def compress_file(in_path: str | os.PathLike, out_path: str | os.PathLike, config: CompressConfig, *,
                  check_samples: int = 8) -> Report:
    """Load, compress, write atomically and validate; return the report.

    The output appears only after it passed validation; the input is never written.

    Raises
    ------
    InvalidModelError, UnsupportedModelError, InvalidConfigError
        Bad input or options (nothing written).
    ValidationError
        The compressed model failed its checks (nothing written).
    """
    start = time.perf_counter()
    src, dst = Path(in_path), Path(out_path)
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise InvalidConfigError(f"output path {dst} is the input path; the input is never overwritten")
    if dst.is_dir():
        raise InvalidConfigError(f"output path {dst} is a directory")
    if not dst.parent.exists() or not os.access(dst.parent if str(dst.parent) else ".", os.W_OK):
        raise InvalidConfigError(f"output directory {dst.parent} does not exist or is not writable")
    model = load_model(src)
    before = ModelInfo.collect(model, src.stat().st_size)
    result = compress_model(model, config)
    tmp = _write_atomic(result.model, dst)
    try:
        lossless = config.prune_ratio == 0 and config.weight_bits is None
        check = validate_file(model, str(tmp), exact=lossless, n_samples=check_samples)
        if not check.passed:
            raise ValidationError(f"compressed model failed its check: {check.message}")
        after = ModelInfo.collect(result.model, tmp.stat().st_size)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return Report(str(src), str(dst), before, after, config.to_dict(),
                  units=[asdict(u) for u in result.solution.units],
                  skipped=[asdict(s) for s in result.plan.skipped],
                  validation=check.to_dict(), elapsed_s=time.perf_counter() - start, notes=result.notes)
