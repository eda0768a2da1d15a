"""Load an input model and reject what the tool cannot handle, with one clear reason."""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from .errors import InvalidModelError, UnsupportedModelError

__all__ = ["load_model", "check_supported", "MIN_OPSET", "QUANTIZED_OPS"]

MIN_OPSET = 11
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QGemm"}
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" / ai.onnx) domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read ``path`` (with its external data) and run the ONNX checker.

    Raises
    ------
    InvalidModelError
        Missing, a directory, empty, not a protobuf, truncated, or failing onnx.checker.
    UnsupportedModelError
        See :func:`check_supported`.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidModelError(f"{p}: no such file")
    if p.is_dir():
        raise InvalidModelError(f"{p}: is a directory, not an ONNX file")
    if p.stat().st_size == 0:
        raise InvalidModelError(f"{p}: empty file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise InvalidModelError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'decode failed'})") from None
    if not model.HasField("graph") or not model.graph.node or not model.opset_import:
        raise InvalidModelError(f"{p}: not an ONNX model (no graph, nodes or opset; truncated or not a model file)")
    try:
        # From the file, not the proto: serialising a large model again (and ByteSize) cost as much as loading it.
        onnx.checker.check_model(str(p))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{p}: fails onnx.checker: {first}") from None
    check_supported(model, str(p))
    return model


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
