"""Load an input model and reject what the tool cannot handle, with one clear reason.

Models over 2 GB keep their weights in external data files (the protobuf limit). Such a model is
read with its external data, checked by path (``onnx.checker.check_model(path)``), and the caller
learns that it had external data so the output is saved the same way.
"""
from __future__ import annotations

import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import InvalidModelError, UnsupportedModelError, first_line
from .lazy import as_external_data, is_lazy, materialize, read_lazy, tensor_array
from .resources import worker_threads

__all__ = ["LoadedModel", "read_model", "load_model", "check_supported", "check_channels", "check_finite", "shape_skeleton", "default_opset", "MIN_OPSET",
           "QUANTIZED_OPS", "PROTOBUF_LIMIT"]

MIN_OPSET = 11
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QGemm"}
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
#: Largest protobuf message (bytes); a model above it must keep its weights in external data.
PROTOBUF_LIMIT = 2**31 - 1
# Initializers above this many elements are shape-only in the copy used for shape inference:
# their values are never needed for shapes, and copying them would double the memory of a big model.
_SHAPE_ONLY_ELEMENTS = 4096


@dataclass
class LoadedModel:
    """A checked input model and how it is stored.

    Attributes
    ----------
    model : onnx.ModelProto
        External data read in; initializers of 64 KB and more may be lazy (still in the file:
        udfc_onnx.lazy, read with ``tensor_array``, written back with ``materialize``).
    path : Path
    external_data : bool
        Some tensor was stored in an external data file.
    file_bytes : int
        Size of the .onnx file plus its external data files.
    weights : dict of str to ndarray
        With ``read_model(..., keep_weights=True)``: the values of the lazy weight initializers
        that :func:`check_finite` read, by name. Each is a private array: a pass may take one and
        edit it instead of reading the file again (:meth:`udfc_onnx.graph.GraphView.take`).
    """

    model: onnx.ModelProto
    path: Path
    external_data: bool
    file_bytes: int
    weights: dict = field(default_factory=dict)


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" / ai.onnx) domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _external_files(model: onnx.ModelProto, base: Path) -> list[Path]:
    """External data files the model's tensors point to (unique, in order of first use)."""
    files: list[Path] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor) and not is_lazy(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            f = base / info.location
            if f not in files:
                files.append(f)
    return files


def shape_skeleton(model: onnx.ModelProto, *, value_info: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: large initializers keep dims and type, not data.

    ``value_info=True`` also copies the graph's value_info (shapes the model states itself, which
    inference keeps where it cannot infer them, e.g. after a custom op).
    """
    m = onnx.ModelProto(ir_version=model.ir_version)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = model.graph
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.input.extend(g.input)
    m.graph.output.extend(g.output)
    if value_info:
        m.graph.value_info.extend(g.value_info)
    for t in g.initializer:
        small = math.prod(t.dims) <= _SHAPE_ONLY_ELEMENTS and t.data_location != onnx.TensorProto.EXTERNAL
        m.graph.initializer.append(t if small else onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
    return m


def check_channels(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse a Conv/Gemm whose input does not have the channels its weight expects, or a
    BatchNormalization whose parameters are not one value per channel.

    onnx.checker accepts such a model and onnxruntime loads it (it fails only when run); the
    solver, which slices weights by channel, must not be the one to find out.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model))
    except Exception:
        return  # full_check already passed; shapes are then merely unknown
    dims = {vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            params = [weights.get(name) for name in node.input[1:5]]
            x = dims.get(node.input[0])
            sizes = {p[0] if len(p) == 1 else -1 for p in params if p is not None}
            if x and len(x) > 1 and x[1]:
                sizes.add(x[1])
            if len(sizes) > 1:
                raise InvalidModelError(f"{where}: BatchNormalization {node.name or node.output[0]} has parameters "
                                        f"that do not match its channels ({', '.join(str(list(p)) for p in params if p is not None)})")
            continue
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        x, w = dims.get(node.input[0]), weights[node.input[1]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and x and len(x) > 1 and x[1] and len(w) > 1:
            expected = w[1] * int(attrs.get("group", 1))
            if x[1] != expected:
                raise InvalidModelError(f"{where}: Conv {node.name or node.output[0]} gets {x[1]} input channels, "
                                        f"its weight expects {expected}")
        elif node.op_type == "Gemm" and x and len(x) == 2 and len(w) == 2:
            k = x[0] if attrs.get("transA", 0) else x[1]
            expected = w[1] if attrs.get("transB", 0) else w[0]
            if k and k != expected:
                raise InvalidModelError(f"{where}: Gemm {node.name or node.output[0]} gets {k} inputs, "
                                        f"its weight expects {expected}")


_WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "BatchNormalization")
_TYPED_FIELDS = ("float_data", "double_data", "int32_data", "int64_data", "uint64_data")


def _check_tensor_size(t: onnx.TensorProto, where: str) -> None:
    """Refuse an initializer whose stored values do not fill its declared shape exactly."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return
    count = math.prod(t.dims)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return
    if t.HasField("raw_data"):
        expected = count * itemsize if t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else (count + 1) // 2
        stored = len(t.raw_data)
    else:
        stored = sum(len(getattr(t, f)) for f in _TYPED_FIELDS)
        expected = count if t.data_type not in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 2 * count
        if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8,
                           onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                           onnx.TensorProto.BOOL, onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or \
                t.data_type >= onnx.TensorProto.FLOAT8E4M3FN:
            return  # packed into int32_data in ways that vary by type; the checker and ORT cover these
    if stored != expected:
        raise InvalidModelError(f"{where}: initializer {t.name} holds {stored} {'bytes' if t.HasField('raw_data') else 'values'} "
                                f"for shape {list(t.dims)} ({expected} expected)")


def check_finite(model: onnx.ModelProto, where: str = "model", *, keep: dict | None = None) -> None:
    """Refuse NaN or Inf in the float initializers of Conv/Gemm/MatMul/BatchNormalization.

    The solver would carry them into every compensated layer; an output check on random inputs
    catches them only when it runs (``--check-n 0`` skips it). ``keep``: a dict that receives the
    values of the lazy tensors read here (by name), for the passes that need them next.

    The tensors are read and checked on :func:`udfc_onnx.resources.worker_threads` threads (file
    reads and NumPy reductions release the GIL; ResNet-50: 0.07 s on one); the first bad one in
    graph order is the one named.
    """
    inits = {t.name: t for t in model.graph.initializer}
    for t in model.graph.initializer:
        _check_tensor_size(t, where)
    seen = set()
    checks = []  # (node, name, tensor) in graph order
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS:
            continue
        for name in node.input[1:]:
            t = inits.get(name)
            if t is None or name in seen or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                                onnx.TensorProto.FLOAT16):
                continue
            seen.add(name)
            checks.append((node, name, t))

    def problem(check) -> tuple[np.ndarray, str | None]:
        node, name, t = check
        values = tensor_array(t)
        # A finite sum means every value is finite (NaN and Inf carry through a sum); only a sum
        # that is not finite (a bad value, or an overflow) needs the elementwise test.
        with np.errstate(over="ignore", invalid="ignore"):
            total = values.sum()
        if not np.isfinite(total) and not np.all(np.isfinite(values)):
            return values, (f"{where}: weight {name} of {node.op_type} {node.name or node.output[0]} "
                            "has NaN or Inf values")
        if node.op_type == "BatchNormalization" and len(node.input) > 4 and name == node.input[4] and np.any(values < 0):
            return values, f"{where}: BatchNormalization {node.name or node.output[0]} has a negative variance in {name}"
        return values, None

    threads = min(worker_threads(), len(checks))
    with ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="udfc-check") as pool:
        for (_, name, t), (values, error) in zip(checks, pool.map(problem, checks)):
            if error is not None:
                raise InvalidModelError(error)
            if keep is not None and is_lazy(t):
                keep[name] = values


def _checker_error(path: str) -> str | None:
    """``onnx.checker`` with ``full_check`` (strict shape inference: a model whose shapes do not
    agree is refused here, not found out in the middle of the solver); None when it passes."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        return first_line(exc)
    return None


# Name of the empty file a lazy tensor points to in the checker's copy.
_CHECKER_STUB = "weights.stub"


def _lazy_checker_error(model: onnx.ModelProto, source: str) -> str | None:
    """:func:`_checker_error` of a lazily read model, without reading its large weights.

    Checking the file by path made the checker read and parse all of it (ResNet-50, 100 MB: 0.17 s
    and a 200 MB peak, the run's highest before the solve). The checker's copy here keeps every
    tensor's type and dims and points each lazy one at an empty stub file, so the checker sees all
    but the weights' bytes; those were measured already (:func:`udfc_onnx.lazy.read_lazy` matches
    each one's length to its dims and type) and :func:`check_finite` reads their values.
    """
    copy, _ = as_external_data(model, location=_CHECKER_STUB)
    try:
        with tempfile.TemporaryDirectory(prefix="udfc-check-") as folder:
            Path(folder, _CHECKER_STUB).touch()
            path = Path(folder, "model.onnx")
            path.write_bytes(copy.SerializeToString())
            return _checker_error(str(path))
    except OSError:  # no writable temporary folder: check the file itself
        return _checker_error(source)


def read_model(path: str | os.PathLike, *, keep_weights: bool = False) -> LoadedModel:
    """Read ``path`` with its external data, run the ONNX checker and :func:`check_supported`.

    ``keep_weights=True`` keeps the lazy weights the checks read in ``LoadedModel.weights``
    (the whole model's weights in memory, read once) instead of dropping them.

    Raises
    ------
    InvalidModelError
        Missing, a directory, empty, not a protobuf, truncated, external data missing, or failing
        onnx.checker.
    UnsupportedModelError
        See :func:`check_supported`.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidModelError(f"{p}: no such file")
    if p.is_dir():
        raise InvalidModelError(f"{p}: is a directory, not an ONNX file")
    try:
        size = p.stat().st_size
        if size == 0:
            raise InvalidModelError(f"{p}: empty file")
    except OSError as exc:
        raise InvalidModelError(f"{p}: cannot read ({exc.strerror or first_line(exc)})") from None
    try:  # read first: a permission problem is not a decode problem
        # Large weights stay in the file until a pass needs one (udfc_onnx.lazy): the parsed
        # model is a fraction of the file, and no bytes copy of the whole file is made.
        model = read_lazy(p)
    except OSError as exc:
        raise InvalidModelError(f"{p}: cannot read ({exc.strerror or first_line(exc)})") from None
    data = None
    if model is not None:
        checker_error = _lazy_checker_error(model, str(p))
    else:
        # A file the lazy reader does not take (external data, malformed, truncated): the checker
        # reads it by path (above 2 GB it must, with the external data), before this process reads
        # the model, so its own copy does not stack on the load's peak. Its verdict is given after
        # the checks below, which name the problem more precisely.
        checker_error = _checker_error(str(p))
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidModelError(f"{p}: cannot read ({exc.strerror or first_line(exc)})") from None
    if data is not None:
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:  # protobuf DecodeError and friends
            detail = first_line(exc).replace("Error parsing message with type 'onnx.ModelProto': ", "")
            raise InvalidModelError(f"{p}: not a readable ONNX model (protobuf decode failed: {detail})") from None
        del data
    if not model.HasField("graph") or not model.graph.node or not model.opset_import:
        raise InvalidModelError(f"{p}: not an ONNX model (no graph, nodes or opset; truncated or not a model file)")
    try:
        files = _external_files(model, p.parent)
    except Exception as exc:
        raise InvalidModelError(f"{p}: bad external data reference ({first_line(exc)})") from None
    external = bool(files)
    for f in files:
        if not f.is_file():
            raise InvalidModelError(f"{p}: external data file {f.name} is missing")
    if checker_error is not None:
        raise InvalidModelError(f"{p}: fails onnx.checker: {checker_error}")
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise InvalidModelError(f"{p}: cannot read its external data ({first_line(exc)})") from None
    check_supported(model, str(p))
    check_channels(model, str(p))
    weights: dict = {}
    check_finite(model, str(p), keep=weights if keep_weights else None)
    return LoadedModel(model, p, external, size + sum(f.stat().st_size for f in files), weights)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check ``path`` (see :func:`read_model`); return the model only, every weight in it."""
    return materialize(read_model(path).model)


def check_supported(model: onnx.ModelProto, where: str = "model") -> None:
    """Raise UnsupportedModelError for an opset below 11, a quantized model, or no Conv/Gemm."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(f"{where}: opset {opset} is not supported (need >= {MIN_OPSET}; convert with onnx.version_converter)")
    if opset > onnx.defs.onnx_opset_version():
        raise UnsupportedModelError(f"{where}: opset {opset} is newer than this onnx ({onnx.defs.onnx_opset_version()})")
    ops = {n.op_type for n in model.graph.node}
    quantized = sorted(ops & QUANTIZED_OPS)
    if quantized:
        raise UnsupportedModelError(f"{where}: already quantized (contains {', '.join(quantized)})")
    int_weights = [t.name for t in model.graph.initializer if t.data_type in _INT_TYPES and len(t.dims) >= 2]
    if int_weights:
        raise UnsupportedModelError(f"{where}: already quantized (integer weight {int_weights[0]})")
    if not ops & {"Conv", "Gemm"}:
        raise UnsupportedModelError(f"{where}: no Conv or Gemm to compress")
