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
from .int8 import Int8Record, check_fusion, quantize_activations
from .load import default_opset, load_model
from .plan import Plan, make_plan
from .qdq import MIN_QDQ_OPSET, emit_weight_qdq
from .report import ModelInfo, Report
from .rewrite import apply_arrays
from .stats import read_bn_stats
from .units import find_units
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
    int8: Int8Record | None = None  # set when activations="uint8"
    timings: dict = field(default_factory=dict)  # seconds per pass


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


def _prepare(model: onnx.ModelProto, config: CompressConfig, notes: list[str], *, inplace: bool = False) -> onnx.ModelProto:
    if inplace:
        model_copy = model
    else:
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


def analyze(model: onnx.ModelProto, config: CompressConfig, *, inplace: bool = False):
    """Read stats, fold BN and plan, without solving: (folded model, stats, raw filters, plan, fold record).

    ``inplace=True`` folds ``model`` itself instead of a copy.
    """
    stats = read_bn_stats(model)
    view = GraphView(model)
    raw_filters = {n.name: view.array(n.input[1]) for n in model.graph.node
                   if n.op_type == "Conv" and view.is_constant(n.input[1])}
    folded, fold_record = fold_batchnorm(model, inplace=inplace)
    units, skipped = find_units(folded)
    plan = make_plan(units, skipped, raw_filters, prune_ratio=config.prune_ratio, criterion=config.criterion,
                     weight_bits=config.weight_bits)
    return folded, stats, raw_filters, plan, fold_record


def compress_model(model: onnx.ModelProto, config: CompressConfig, *, inplace: bool = False) -> CompressResult:
    """Compress a loaded model in memory.

    The input is not modified, unless ``inplace=True``: then it is consumed (edited by the passes
    and left meaningless), which saves full-model copies on large models.
    """
    notes: list[str] = []
    clock = _Clock()
    if config.activations == "uint8" and not config.symmetric:
        config = config.replace(symmetric=True)
        notes.append("uint8 activations need symmetric weights (zero point 0, what QLinearConv takes): using symmetric")
    model = _prepare(model, config, notes, inplace=inplace)
    # From here on ``model`` is private to this call: the passes edit it instead of copying it.
    folded, stats, raw_filters, plan, fold_record = analyze(model, config, inplace=True)
    if config.method != "nm":  # raw filters were needed for the ranking only; free them before solving
        raw_filters = {}
    clock.lap("analyze (fold BN, units, plan)")
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
    plan.units = [u for u in plan.units if u.unit.producer in layers and all(c.node in layers for c in u.unit.consumers)]
    clock.lap("read weights")
    solution = solve_plan(plan, arrays, layers, stats, raw_filters, config)
    clock.lap("solve")
    del arrays, raw_filters  # unchanged weights stay in the model; changed ones are in the solution
    # Float weights about to be replaced by integers are not written (saves a model-sized copy);
    # their initializers keep stale values until the QDQ pass drops them.
    to_write = {k: v for k, v in solution.arrays.items() if k not in solution.quantized}
    rewritten, _ = apply_arrays(folded, to_write, layers, inplace=True)
    int8 = None
    if config.activations == "uint8" or config.int4_storage:
        keep = {up.unit.producer: up.keep for up in plan.units}
        rewritten, int8 = quantize_activations(rewritten, solution.quantized, layers, stats, keep, config,
                                               arrays=solution.arrays)
        notes.append(f"int8: {len(int8.int8_layers)} Conv/Gemm with uint8 activations, {len(int8.weight_only)} weight-only; "
                     f"ranges from {int8.range_source}")
    elif solution.quantized:
        rewritten, _ = emit_weight_qdq(rewritten, solution.quantized, layers)
    clock.lap("rewrite + QDQ")
    rewritten.metadata_props.add(key="udfc_onnx.version", value=__version__)
    rewritten.metadata_props.add(key="udfc_onnx.config", value=str(config.to_dict()))
    try:
        rewritten = onnx.shape_inference.infer_shapes(rewritten)
    except Exception as exc:  # shapes are a convenience for viewers; ORT does not need them
        notes.append(f"shape inference failed on the output: {exc}")
    clock.lap("shape inference")
    return CompressResult(rewritten, plan, fold_record, solution, notes, int8, clock.laps)


class _Clock:
    """Seconds spent between successive ``lap`` calls, by label."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, label: str) -> None:
        now = time.perf_counter()
        self.laps[label] = self.laps.get(label, 0.0) + now - self._last
        self._last = now


# Random-input check budget: multiply-accumulates of the original over all samples (8 CIFAR
# ResNets, 3 ResNet-50 images at 224x224), so validating a large model stays a fraction of a run.
VALIDATION_MACS = 16e9


def _interface(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's real inputs and outputs, without nodes or weights (what validation needs to make feeds)."""
    inits = {t.name for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.graph.name = model.graph.name
    out.graph.input.extend(i for i in model.graph.input if i.name not in inits)
    out.graph.output.extend(model.graph.output)
    return out


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
    clock = _Clock()
    model = load_model(src)
    clock.lap("load + check input")
    before = ModelInfo.collect(model, src.stat().st_size)
    interface = _interface(model)
    clock.lap("report (before)")
    # The loaded model is handed over (no copy) and dropped: validation reads the original from its file.
    result = compress_model(model, config, inplace=True)
    del model
    timings = {**clock.laps, **result.timings}
    clock = _Clock()
    tmp = _write_atomic(result.model, dst)
    clock.lap("write")
    try:
        lossless = config.prune_ratio == 0 and config.weight_bits is None
        samples = max(1, min(check_samples, int(VALIDATION_MACS // max(before.macs, 1))))
        check = validate_file(interface, str(tmp), exact=lossless, n_samples=samples, reference_path=str(src))
        clock.lap("validate (checker, ORT, random inputs)")
        if not check.passed:
            raise ValidationError(f"compressed model failed its check: {check.message}")
        after = ModelInfo.collect(result.model, tmp.stat().st_size)
        clock.lap("report (after)")
        fusion = _check_fusion(tmp, config, result.notes)
        clock.lap("ORT fusion check")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return Report(str(src), str(dst), before, after, config.to_dict(),
                  units=[asdict(u) for u in result.solution.units],
                  skipped=[asdict(s) for s in result.plan.skipped],
                  validation=check.to_dict(), elapsed_s=time.perf_counter() - start, notes=result.notes,
                  fusion=fusion, timings={**timings, **clock.laps})


def _check_fusion(path: Path, config: CompressConfig, notes: list[str]) -> dict:
    """What ORT's optimiser fused in the written model (only when weights were quantized)."""
    if config.weight_bits is None:
        return {}
    try:
        fusion = check_fusion(path)
    except Exception as exc:  # the output already passed validation; this is information only
        notes.append(f"ORT fusion check failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        return {}
    return dict(asdict(fusion), summary=fusion.summary())
