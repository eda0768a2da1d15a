"""The fixed pass order of a run.

    load -> name nodes -> (opset >= 13 if quantizing) -> read BN stats -> fold BN
    -> find units -> plan -> solve -> rewrite initializers -> emit QDQ -> write -> validate

Each pass takes a model and returns a model plus a record; only this module sequences them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .canonical import matmul_to_gemm
from .compensate import Layer, Solution, layer_bits_for, solve_plan
from .config import INT8_CHANNEL_MULTIPLE, CompressConfig
from .errors import InvalidConfigError, ValidationError, first_line
from .fold import FoldRecord, fold_batchnorm
from .graph import GraphView, attribute, ensure_node_names, without_initializer_data
from .int8 import (CONV_INPUT_CHANNEL_MULTIPLE, FAST_CONV_OUTPUT_CHANNEL_MULTIPLE, Int8Record, fusion_report,
                   quantize_activations)
from .lazy import is_lazy, lazy_bytes, materialize, tensor_array, write_model
from .load import PROTOBUF_LIMIT, default_opset, read_model, shape_skeleton
from .moment_graph import estimate_layer_inputs
from .synthetic import synthetic_moments
from .overrides import OverrideRules
from .plan import Plan, make_plan, restrict_to_layers
from .qdq import MIN_QDQ_OPSET, emit_weight_qdq
from .report import DryRun, ModelInfo, Report
from .resources import limit_blas_threads, peak_rss_mb, release_memory
from .rewrite import apply_arrays
from .stats import read_bn_stats
from .units import RawFilterReader, find_units, limit_to_statistics, member_arrays, raw_filters_of
from .validate import open_reference, resolve_input_shapes, run_reference, validate_file

__all__ = ["CompressResult", "FileOptions", "analyze", "compress_model", "compress_file", "plan_file", "set_metadata"]


@dataclass
class CompressResult:
    """A compressed model and the records of every pass."""

    model: onnx.ModelProto
    plan: Plan
    fold: FoldRecord
    solution: Solution
    notes: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)   # node name -> LayerOverride (from --config)
    layer_bits: dict = field(default_factory=dict)  # Conv/Gemm name -> weight bits (None: float)
    int8: Int8Record | None = None  # set when activations="uint8"
    timings: dict = field(default_factory=dict)  # seconds per pass
    peak_rss_mb: dict = field(default_factory=dict)  # the process's peak RSS so far at the end of each pass


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


def _prepare(model: onnx.ModelProto, config: CompressConfig, notes: list[str], quantize: bool | None = None, *,
             inplace: bool = False) -> onnx.ModelProto:
    if inplace:
        model_copy = model
    else:
        model_copy = onnx.ModelProto()
        model_copy.CopyFrom(model)
    renamed = ensure_node_names(model_copy)
    if renamed:
        notes.append(f"named {renamed} unnamed or duplicate nodes")
    model_copy, canonical = matmul_to_gemm(model_copy)
    if canonical.rewritten:
        notes.append(f"wrote {len(canonical.rewritten)} MatMul with a constant 2-D weight as Gemm "
                     f"({len(canonical.biases_absorbed)} with their bias Add) so they are pruned and quantized like Gemm")
    opset = default_opset(model_copy)
    quantize = config.weight_bits is not None if quantize is None else quantize
    if quantize and opset < MIN_QDQ_OPSET:
        model_copy = onnx.version_converter.convert_version(model_copy, MIN_QDQ_OPSET)
        notes.append(f"converted opset {opset} -> {MIN_QDQ_OPSET} for per-channel DequantizeLinear")
    return model_copy


def analyze(model: onnx.ModelProto, config: CompressConfig, *, overrides: dict | None = None, inplace: bool = False,
            folded_weights: dict[str, np.ndarray] | None = None, weights_read: dict[str, np.ndarray] | None = None):
    """Read stats, fold BN and plan, without solving: (folded model, stats, raw filters, plan, fold record).

    ``overrides`` maps node names to resolved per-layer ``--config`` settings; ``inplace=True``
    folds ``model`` itself instead of a copy. ``folded_weights``: a dict that receives the folded
    Conv/Gemm weights, which are then not written into the folded model (its weight initializers
    keep their unfolded values, and the raw filters are read from them on demand): the caller
    writes them. This keeps one copy of the weights where the default keeps three.
    ``weights_read``: private arrays of weights read already, which the fold takes and folds in
    place (see :func:`udfc_onnx.fold.fold_batchnorm`).
    """
    stats = read_bn_stats(model)
    raw_filters = raw_filters_of(model) if folded_weights is None else RawFilterReader(model)
    folded, fold_record = fold_batchnorm(model, inplace=inplace, weights_out=folded_weights, weights_read=weights_read)
    units, skipped = find_units(folded, prune_residual=config.prune_residual)
    units = limit_to_statistics(units, stats)
    plan = make_plan(units, skipped, raw_filters, prune_ratio=config.prune_ratio, criterion=config.criterion,
                     weight_bits=config.weight_bits, overrides=overrides,
                     channel_multiple=config.kept_multiple)
    return folded, stats, raw_filters, plan, fold_record


def compress_model(model: onnx.ModelProto, config: CompressConfig, *, overrides: OverrideRules | None = None,
                   inplace: bool = False, weights_read: dict[str, np.ndarray] | None = None) -> CompressResult:
    """Compress a loaded model in memory.

    ``overrides`` are the per-layer rules of a ``--config`` file; a rule naming no node raises
    InvalidConfigError. The input is not modified, unless ``inplace=True``: then it is consumed
    (edited by the passes and left meaningless), which saves full-model copies on large models.
    NumPy's BLAS runs on ``UDFC_BLAS_THREADS`` threads (default 1) meanwhile: see :mod:`udfc_onnx.resources`.
    ``weights_read``: private arrays of the model's weights read already (``LoadedModel.weights``
    of ``read_model(..., keep_weights=True)``), used instead of reading them again. They are
    consumed: edited in place, and the dict is empty when this returns.
    """
    box = [model]
    del model  # with inplace=True and no reference left with the caller, the passes free the weights as they go
    with limit_blas_threads():
        return _compress_model(box, config, overrides=overrides, inplace=inplace, weights_read=weights_read)


def _compress_model(box: list, config: CompressConfig, *, overrides: OverrideRules | None,
                    inplace: bool, weights_read: dict[str, np.ndarray] | None = None) -> CompressResult:
    """:func:`compress_model` of ``box.pop()``: a caller that puts the only reference to an
    ``inplace`` model in ``box`` lets the passes free the memory of its weights as they go."""
    notes: list[str] = []
    clock = _Clock()
    if config.activations == "uint8" and not config.symmetric:
        config = config.replace(symmetric=True)
        notes.append("uint8 activations need symmetric weights (zero point 0, what QLinearConv takes): using symmetric")
    model = _prepare(box.pop(), config, notes,
                     quantize=config.weight_bits is not None or bool(overrides and overrides.sets_bits), inplace=inplace)
    resolved = overrides.resolve((n.name, n.op_type) for n in model.graph.node) if overrides else {}
    # From here on ``model`` is private to this call: the passes edit it instead of copying it.
    # Folded weights live in ``folded_weights`` only: until the rewrite writes them, the model's
    # weight initializers hold the unfolded values (which are the raw filters).
    folded_weights: dict[str, np.ndarray] = {}
    folded, stats, raw_filters, plan, fold_record = analyze(model, config, overrides=resolved, inplace=True,
                                                            folded_weights=folded_weights, weights_read=weights_read)
    del model
    if config.method == "prune":  # raw filters were needed for the ranking only
        raw_filters = {}
    release_memory()  # the analysis's temporaries (raw filters read one by one, shapes)
    clock.lap("analyze (fold BN, units, plan)")
    layers = collect_layers(folded)
    view = GraphView(folded)
    arrays: dict[str, np.ndarray] = {}
    for layer in layers.values():
        arrays[layer.weight] = (folded_weights[layer.weight] if layer.weight in folded_weights
                                else view.take(layer.weight, weights_read))
        if layer.bias in view.initializers:
            arrays[layer.bias] = view.array(layer.bias)
        else:
            out_ch = layer.out_major(arrays[layer.weight]).shape[0]
            arrays[layer.bias] = np.zeros(out_ch, arrays[layer.weight].dtype)
    plan = restrict_to_layers(plan, layers)
    asks_pruning = config.prune_ratio > 0 or any(o.ratio for o in resolved.values())
    if config.kept_multiple > 1 and asks_pruning:
        why = "int8 kernels run narrower convs slower; " if config.channel_multiple is None else ""
        notes.append(f"kept channel counts rounded up to multiples of {config.kept_multiple} "
                     f"({why}--channel-multiple 1 keeps the paper's int(C*(1-r)))")
    members = member_arrays(folded, [u.unit for u in plan.units])
    arrays.update({name: folded_weights.get(name, value) for name, value in members.items()})
    if weights_read:  # weights no pass took: dropped (a later pass that needs one reads it from the file)
        weights_read.clear()
        release_memory()
    clock.lap("read weights")
    # Data-free activation moments for UDFC's regression/selection and the bias correction (issue 3).
    # Input covariances are read for the regression of pruned units (and by the equalization);
    # every other layer reads only its input's means (the bias correction).
    covariance_for = None if config.cross_layer_equalization else {
        name for up in plan.units if len(up.keep) < up.unit.channels for name in up.unit.all_producers}
    layer_inputs = (estimate_layer_inputs(folded, stats, raw_filters, folded_weights, covariance_for=covariance_for)
                    if config.uses_moments else None)
    if config.method != "nm":  # only Neuron Merging's coefficients read raw filters in the solve
        raw_filters = {}
        # The model's own values of the folded weights (unfolded, stale) are never read again: a
        # copy without them lets their memory go, when the caller handed the model over (compress_file).
        folded = without_initializer_data(folded, folded_weights)
        view = None
        release_memory()
    clock.lap("input moments")
    activation_moments = synthetic_moments(folded, stats, plan, config, layers, notes, weights=folded_weights)
    if activation_moments is not None:
        clock.lap("synthetic activations")
    # ``arrays`` holds every folded weight (the same objects): with this dict gone, the solve frees
    # each old weight as it replaces it (ResNet-50: about the model's size off the peak).
    for name, value in folded_weights.items():
        arrays.setdefault(name, value)
    del folded_weights
    solution = solve_plan(plan, arrays, layers, stats, raw_filters, config, overrides=resolved, layer_inputs=layer_inputs,
                          activation_moments=activation_moments, consume=True)
    clock.lap("solve")
    if getattr(activation_moments, "failure", ""):
        notes.append(f"synthetic activations stopped ({activation_moments.failure}); later units used analytic moments")
    del raw_filters
    # The current value of every weight and bias of every layer: folded, then changed by the solution.
    current = arrays
    del arrays
    release_memory()
    # Float weights about to be replaced by integers are not written (saves a model-sized copy);
    # their initializers keep stale (unfolded) values, or none after the copy above, until the QDQ
    # pass drops them.
    to_write = {k: v for k, v in current.items() if k not in solution.quantized}
    rewritten, _ = apply_arrays(folded, to_write, layers, inplace=True, new_shapes=solution.arrays)
    int8 = None
    if config.activations == "uint8" or config.int4_storage:
        # Channels each layer keeps, so the int8 ranges slice the BN statistics the same way.
        keep = {name: up.keep for up in plan.units
                for name in (*up.unit.all_producers, *(m.node for m in up.unit.members))}
        rewritten, int8 = quantize_activations(rewritten, solution.quantized, layers, stats, keep, config,
                                               arrays=current)
        notes.append(f"int8: {len(int8.int8_layers)} Conv/Gemm with uint8 activations, {len(int8.weight_only)} weight-only; "
                     f"ranges from {int8.range_source}")
        if int8.padded_inputs:
            name, (channels, padded) = next(iter(int8.padded_inputs.items()))
            notes.append(f"int8: {len(int8.padded_inputs)} Conv input(s) given zero channels up to a multiple of "
                         f"{CONV_INPUT_CHANNEL_MULTIPLE}, which ORT's fast int8 conv kernel needs (e.g. {name}: "
                         f"{channels} -> {padded}); the outputs are the same")
    elif solution.quantized:
        rewritten, _ = emit_weight_qdq(rewritten, solution.quantized, layers, inplace=True)
    del current, to_write  # everything is in the model now
    # Weights no pass changed may still be in the input file (udfc_onnx.lazy): the result holds all.
    materialize(rewritten)
    release_memory()
    clock.lap("rewrite + QDQ")
    set_metadata(rewritten, {"udfc_onnx.version": __version__, "udfc_onnx.config": json.dumps(config.to_dict()),
                             "udfc_onnx.overrides": json.dumps(overrides.to_dict() if overrides else {})})
    try:
        _infer_shapes_in_place(rewritten)
    except Exception as exc:  # shapes are a convenience for viewers; ORT does not need them
        notes.append(f"shape inference failed on the output: {exc}")
    clock.lap("shape inference")
    layer_bits = {name: solution.quantized[l.weight].bits if l.weight in solution.quantized else None
                  for name, l in layers.items()}
    return CompressResult(rewritten, plan, fold_record, solution, notes, resolved, layer_bits, int8, clock.laps,
                          clock.peaks)


def _infer_shapes_in_place(model: onnx.ModelProto) -> None:
    """Add what ONNX shape inference finds (value_info, output types) to ``model`` itself.

    Inference runs on a copy without the weights' values: on the whole model it serialised and
    parsed every weight again (two more copies of the output at the peak).
    """
    inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model, value_info=True))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for ours, found in zip(model.graph.output, inferred.graph.output):
        ours.CopyFrom(found)


class _Clock:
    """Seconds spent between successive ``lap`` calls, by label, and the process's peak RSS (MB)
    so far at each (it only grows: the first pass that shows the final value reached the peak)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, label: str) -> None:
        now = time.perf_counter()
        self.laps[label] = self.laps.get(label, 0.0) + now - self._last
        peak = peak_rss_mb()
        if peak is not None:
            self.peaks[label] = round(peak, 1)
        self._last = now


# Random-input check budget: multiply-accumulates of the original over all samples (8 CIFAR
# ResNets, 1 ResNet-50 image at 224x224; at least one sample always), so validating a large model
# stays a fraction of a run.
VALIDATION_MACS = 8e9


def set_metadata(model: onnx.ModelProto, items: Mapping[str, str]) -> None:
    """Set ``metadata_props`` entries, replacing earlier values of the same keys (keys must be unique)."""
    keep = [p for p in model.metadata_props if p.key not in items]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in items.items():
        model.metadata_props.add(key=key, value=value)


# ----------------------------------------------------------------------------------------------
# The file-level wrapper: paths, external data, atomic write, validation, report, dry run.

#: Outputs whose serialized size would exceed this are saved with external data (2 GB protobuf
#: limit, less headroom for the graph itself).
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 2**26


@dataclass(frozen=True)
class FileOptions:
    """Settings of the file-level run (checking and writing), as opposed to the method's CompressConfig.

    Attributes
    ----------
    check_n : int, default=8
        Random samples compared with the original; 0 skips the numeric comparison.
    rtol, atol : float, default=1e-4
        Tolerance of the comparison when the settings are lossless (nothing pruned or quantized):
        ``max|out - ref| <= atol + rtol * max|ref|``.
    input_shapes : dict of str to list of int, optional
        ``--overwrite-input-shape``: shapes of the random check inputs and of the MAC count.
    overrides : OverrideRules, optional
        Per-layer rules of a ``--config`` file.
    external_data : bool, default=False
        Save weights to ``OUT.data`` even when the model is small (always above 2 GB, and when the
        input had external data).
    seed : int, default=0
        Seed of the random check inputs.
    """

    check_n: int = 8
    rtol: float = 1e-4
    atol: float = 1e-4
    input_shapes: dict | None = None
    overrides: OverrideRules | None = None
    external_data: bool = False
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.check_n, bool) or not isinstance(self.check_n, int) or self.check_n < 0:
            raise InvalidConfigError(f"check_n must be an integer >= 0, got {self.check_n!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InvalidConfigError(f"{name} must be a finite number >= 0, got {v!r}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "overrides"}
        d["overrides"] = self.overrides.to_dict() if self.overrides else {}
        return d


def check_output_path(in_path: Path, out_path: Path) -> None:
    """Refuse an output that is the input, a directory, or in a directory we cannot write.

    Writability is probed by creating (and removing) a file there: permission bits do not tell
    the whole story (root, read-only mounts, /proc).
    """
    if out_path.resolve() == in_path.resolve() or (out_path.exists() and in_path.exists() and os.path.samefile(in_path, out_path)):
        raise InvalidConfigError(f"output path {out_path} is the input path; the input is never overwritten")
    if out_path.is_dir():
        raise InvalidConfigError(f"output path {out_path} is a directory")
    parent = out_path.parent
    if not parent.is_dir():
        raise InvalidConfigError(f"output directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InvalidConfigError(f"output directory {parent} is not writable ({exc.strerror or first_line(exc)})") from None


def _serialized_size(model: onnx.ModelProto) -> int:
    """Bytes the model would take as one protobuf (summed per part: a >2 GB whole cannot be measured)."""
    g = model.graph
    return sum(t.ByteSize() + lazy_bytes(t) for t in g.initializer) + sum(n.ByteSize() for n in g.node) + 4096


def _serialized_size_bound(model: onnx.ModelProto) -> int | None:
    """An upper bound of :func:`_serialized_size` that encodes no tensor (None with a string tensor).

    A tensor's data takes its item size per element as raw or lazy data, at most 16 bytes per
    element otherwise (a varint takes up to 10, a complex128 16); its name, dims and other fields
    are given a margin.
    """
    bound = 4096 + sum(n.ByteSize() for n in model.graph.node)
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.STRING:
            return None
        count = math.prod(t.dims)
        if is_lazy(t):
            data = lazy_bytes(t)
        elif t.HasField("raw_data"):
            try:  # (a packed INT4 counts a byte per element: still a bound)
                data = count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except Exception:  # a type NumPy does not know
                data = 16 * count
        else:
            data = 16 * count
        bound += data + 256 + len(t.name) + len(t.doc_string) + 11 * len(t.dims) + sum(
            len(e.key) + len(e.value) + 16 for e in t.external_data)
    return bound


def _needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model is too large to save as one protobuf (:data:`EXTERNAL_DATA_THRESHOLD`).

    Measured exactly only when :func:`_serialized_size_bound` does not settle it: ``ByteSize``
    encodes every tensor (ResNet-50-sized output: 5-9 ms).
    """
    bound = _serialized_size_bound(model)
    return (bound is None or bound > EXTERNAL_DATA_THRESHOLD) and _serialized_size(model) > EXTERNAL_DATA_THRESHOLD


def staging_glob(out_path: Path) -> str:
    """Glob (in ``out_path.parent``) of the staging folders :func:`compress_file` writes before renaming."""
    return f".{out_path.name}.*.tmp"


def _stage(model: onnx.ModelProto, out_path: Path, external: bool) -> Path:
    """Save ``model`` into a fresh staging folder beside ``out_path``; return the folder.

    Inside it the files have their final names (``OUT`` and, with external data, ``OUT.data``), so
    the external data reference stays valid when both are renamed into place.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        if external:  # note: onnx.save moves the weights out of `model` (raw_data is cleared)
            onnx.save(model, str(staging / out_path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=out_path.name + ".data", size_threshold=1024)
        else:
            write_model(model, staging / out_path.name)  # onnx.save without a model-sized buffer
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _commit(staging: Path, out_path: Path) -> None:
    """Rename the staged files into place, the data file first so the model never points at nothing."""
    umask = os.umask(0)
    os.umask(umask)
    for f in staging.iterdir():  # onnx writes external data as 0600; outputs get the usual permissions
        os.chmod(f, 0o666 & ~umask)
    data = staging / (out_path.name + ".data")
    if data.exists():
        os.replace(data, out_path.parent / data.name)
    os.replace(staging / out_path.name, out_path)


def _non_finite_initializer(model: onnx.ModelProto) -> str | None:
    """Name of the first float initializer with NaN or Inf (the input had none: load checks it)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    for t in model.graph.initializer:
        if t.data_type in floats and not np.all(np.isfinite(tensor_array(t))):
            return t.name
    return None


def _output_bytes(staging: Path, out_path: Path) -> int:
    """Bytes of the staged output: the model and its external data file (not ORT's optimised copy)."""
    return sum(f.stat().st_size for f in (staging / out_path.name, staging / (out_path.name + ".data")) if f.is_file())


def _in_background(fn: Callable, *args) -> Future:
    """``fn(*args)`` on a thread of its own; the caller takes its result (or exception) from the future.

    For work that releases the GIL (ORT, hashlib) and that the caller needs later. The thread is
    not waited for when the caller fails first (a process still waits for it before it exits).
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"udfc-{fn.__name__}")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _decisions(units, resolved: dict, layer_bits: dict, prune_ratio: float) -> list[dict]:
    """Per-unit decisions for the report: the solver's record plus the ratio asked, override and bits."""
    out = []
    for u in units:
        d = asdict(u) if not isinstance(u, dict) else dict(u)
        override = resolved.get(d["producer"])
        d["ratio"] = override.ratio if override is not None and override.ratio is not None else prune_ratio
        d["override"] = override.to_dict() if override is not None else None
        d["bits"] = layer_bits.get(d["producer"])
        out.append(d)
    return out


def _layers_record(layer_bits: dict, resolved: dict) -> dict:
    return {name: {"bits": bits, "override": resolved[name].to_dict() if name in resolved else None}
            for name, bits in layer_bits.items()}


def compress_file(in_path: str | os.PathLike, out_path: str | os.PathLike, config: CompressConfig, *,
                  options: FileOptions | None = None, check_samples: int | None = None,
                  progress: Callable[[str], None] | None = None) -> Report:
    """Load, compress, write atomically and validate; return the report.

    The output appears only after it passed validation; the input is never written. A model
    loaded with external data, or an output above 2 GB, is saved with its weights in ``OUT.data``.

    Parameters
    ----------
    options : FileOptions, optional
        Checking and writing settings (defaults: ``FileOptions()``).
    check_samples : int, optional
        Shorthand for ``options.check_n``.
    progress : callable, optional
        Called with the name of each step as it starts (load, run original, compress, write,
        validate, measure).

    Raises
    ------
    InvalidModelError, UnsupportedModelError, InvalidConfigError
        Bad input, options or output path (nothing written).
    ValidationError
        The compressed model failed its checks (nothing written).
    """
    start = time.perf_counter()
    options = options or FileOptions()
    if check_samples is not None:
        options = dataclasses.replace(options, check_n=check_samples)
    step = progress or (lambda what: None)
    src, dst = Path(in_path), Path(out_path)
    check_output_path(src, dst)
    clock = _Clock()
    step("load")
    # The checks read every weight once; they are kept (ResNet-50: 100 MB) for ORT's reference
    # session and the BN fold, which would each read the file again.
    loaded = read_model(src, keep_weights=True)
    clock.lap("load + check input")
    shapes = resolve_input_shapes(loaded.model, options.input_shapes)
    before = ModelInfo.collect(loaded.model, loaded.file_bytes, input_shapes=shapes)
    before.fused_convs = 0  # an input with any quantized op is refused, so ORT fuses none of it
    clock.lap("report (before)")
    step("run original")  # the input must load and run in ORT before any work is spent on it
    samples = min(options.check_n, max(1, int(VALIDATION_MACS // max(before.macs, 1))))
    # ORT runs on the weights read above, as they are (no copy; ResNet-50: 0.02 s to open instead
    # of 0.15-0.2 s parsing the file). The session goes with run_reference's frame, before the
    # fold edits those arrays.
    expected = run_reference(loaded.model, n_samples=samples, seed=options.seed, shape_overrides=shapes,
                             opened=open_reference(loaded.model, weights=loaded.weights,
                                                   path=str(src) if src.is_file() else None))
    release_memory()  # the reference session is gone; without this its heap stays under every later peak
    # The source's digest goes into the output's metadata; hashlib releases the GIL, so the hash
    # runs on the other core while the analysis works on one (ResNet-50: 0.05-0.1 s off the run).
    source_sha256 = _in_background(_sha256, src)
    clock.lap("run original")
    step("compress")
    # The loaded model is handed over (no copy, no reference kept here, so the passes can free its
    # weights as they go): validation compares with the outputs run above.
    box = [loaded.model]
    weights_read = loaded.weights
    loaded = dataclasses.replace(loaded, model=None, weights={})
    result = compress_model(box.pop(), config, overrides=options.overrides, inplace=True, weights_read=weights_read)
    del weights_read
    # The float value of every changed initializer (ResNet-50: 50 MB) is in the model now; nothing
    # below reads the copies, and the checks' ORT sessions stack on what is still held here. (Where
    # the command line keeps freed blocks for reuse, release_memory leaves them to those sessions.)
    result.solution.arrays = {}
    release_memory()
    timings = {**clock.laps, **result.timings}
    peaks = {**clock.peaks, **result.peak_rss_mb}
    clock = _Clock()
    set_metadata(result.model, {"udfc_onnx.source": src.name, "udfc_onnx.source_sha256": source_sha256.result(),
                                "udfc_onnx.check": json.dumps({"check_n": options.check_n, "rtol": options.rtol,
                                                               "atol": options.atol, "input_shapes": shapes})})
    bad = _non_finite_initializer(result.model)
    if bad:
        raise ValidationError(f"compressed model failed its check: weight {bad} has NaN or Inf values")
    external = options.external_data or loaded.external_data or _needs_external_data(result.model)
    step("write")
    staging = _stage(result.model, dst, external)
    staged = staging / dst.name
    clock.lap("write")
    notes = list(result.notes)
    try:
        if external:  # shape inference through the file: a model over 2 GB cannot be inferred in memory
            try:
                onnx.shape_inference.infer_shapes_path(str(staged), str(staged))
                notes = [n for n in notes if not n.startswith("shape inference failed")]
            except Exception as exc:
                notes.append(f"shape inference on the saved file failed: {first_line(exc)}")
        step("validate")
        lossless = not result.solution.quantized and all(u.kept == u.channels for u in result.solution.units)
        # The validation session saves the graph ORT made of the output, for the fusion count.
        optimized = str(staging / (dst.name + ".ort.onnx")) if result.solution.quantized else None  # never dst.name
        check = validate_file(None, str(staged), exact=lossless, rtol=options.rtol, atol=options.atol,
                              expected=expected, optimized_path=optimized)
        clock.lap("validate (checker, ORT, random inputs)")
        if not check.passed:
            raise ValidationError(f"compressed model failed its check: {check.message}")
        step("measure")
        after = ModelInfo.collect(result.model, _output_bytes(staging, dst), input_shapes=shapes)
        clock.lap("report (after)")
        fusion = _check_fusion(staged, optimized, result.solution, notes)
        after.fused_convs = fusion.get("fused_convs") if fusion else 0
        clock.lap("ORT fusion check")
        _commit(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Report(str(src), str(dst), before, after, config.to_dict(),
                  units=_decisions(result.solution.units, result.overrides, result.layer_bits, config.prune_ratio),
                  skipped=[asdict(s) for s in result.plan.skipped], validation=check.to_dict(),
                  elapsed_s=time.perf_counter() - start, notes=notes,
                  layers=_layers_record(result.layer_bits, result.overrides), overrides=options.to_dict()["overrides"],
                  options={k: v for k, v in options.to_dict().items() if k != "overrides"},
                  external_data=external, tool_version=__version__, fusion=fusion, timings={**timings, **clock.laps},
                  peak_rss_mb={**peaks, **clock.peaks})


def plan_file(in_path: str | os.PathLike, out_path: str | os.PathLike | None, config: CompressConfig, *,
              options: FileOptions | None = None) -> DryRun:
    """What :func:`compress_file` would do (``--dry-run``): load, analyse and plan; solve and write nothing.

    The output path (when given) is checked as for a real run, so a dry run also says whether the
    run could write.
    """
    start = time.perf_counter()
    options = options or FileOptions()
    src = Path(in_path)
    if out_path is not None:
        check_output_path(src, Path(out_path))
    loaded = read_model(src)
    shapes = resolve_input_shapes(loaded.model, options.input_shapes)
    before = ModelInfo.collect(loaded.model, loaded.file_bytes, input_shapes=shapes)
    notes: list[str] = []
    rules = options.overrides
    model = _prepare(loaded.model, config, notes, quantize=config.weight_bits is not None or bool(rules and rules.sets_bits))
    resolved = rules.resolve((n.name, n.op_type) for n in model.graph.node) if rules else {}
    # in place on _prepare's copy, folded weights in a dict nobody keeps: no weight-sized copies
    folded, _, _, plan, _ = analyze(model, config, overrides=resolved, inplace=True, folded_weights={})
    layers = collect_layers(folded)
    units = [{"producer": u.unit.producer, "consumers": [c.node for c in u.unit.consumers], "channels": u.unit.channels,
              "kept": len(u.keep), "method": config.method}
             for u in plan.units if u.unit.producer in layers and all(c.node in layers for c in u.unit.consumers)]
    layer_bits = {name: layer_bits_for(name, config, resolved) for name in layers}
    external = options.external_data or loaded.external_data or _needs_external_data(loaded.model)
    return DryRun(str(src), "" if out_path is None else str(out_path), before, config.to_dict(),
                  units=_decisions(units, resolved, layer_bits, config.prune_ratio),
                  skipped=[asdict(s) for s in plan.skipped], layers=_layers_record(layer_bits, resolved),
                  overrides=rules.to_dict() if rules else {}, external_data=external, notes=notes,
                  elapsed_s=time.perf_counter() - start)


def _check_fusion(path: Path, optimized: str | None, solution: Solution, notes: list[str]) -> dict:
    """What ORT's optimiser fused in the written model, read from the graph the validation session
    saved at ``optimized`` (None: nothing was quantized, nothing to count)."""
    if optimized is None:
        return {}
    try:
        fusion = fusion_report(path, optimized)
    except Exception as exc:  # the output already passed validation; this is information only
        notes.append(f"ORT fusion check failed: {first_line(exc)}")
        return {}
    report = dict(asdict(fusion), summary=fusion.summary())
    narrow = [u for u in solution.units if u.kept < INT8_CHANNEL_MULTIPLE <= u.channels]
    if fusion.fused_convs and narrow:
        report["warnings"].append(
            f"{len(narrow)} pruned unit(s) keep fewer than {INT8_CHANNEL_MULTIPLE} channels (e.g. {narrow[0].producer}: "
            f"{narrow[0].kept}/{narrow[0].channels}): ORT's QLinearConv runs such convs no faster than with "
            f"{INT8_CHANNEL_MULTIPLE}, so that pruning costs accuracy for no speed (--channel-multiple 16 avoids it)")
    # ORT's fast int8 conv takes output channel counts that are multiples of 8 only (MlasConvSymPackWSize):
    # a pruned 32-channel conv keeping 19 ran 1.7x as long as one keeping 24 (tools/int8_kernels.py).
    odd = [u for u in solution.units if u.kept >= INT8_CHANNEL_MULTIPLE and u.kept % FAST_CONV_OUTPUT_CHANNEL_MULTIPLE
           and u.channels % FAST_CONV_OUTPUT_CHANNEL_MULTIPLE == 0]
    if fusion.fused_convs and odd:
        report["warnings"].append(
            f"{len(odd)} pruned unit(s) keep a channel count that is not a multiple of {FAST_CONV_OUTPUT_CHANNEL_MULTIPLE} "
            f"(e.g. {odd[0].producer}: {odd[0].kept}/{odd[0].channels}): ORT's fast int8 conv kernel does not take "
            f"them, so they run on a slower path (--channel-multiple 16 avoids it)")
    return report
