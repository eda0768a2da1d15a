"""Weights left in the input file: a parsed model whose large initializers are read on demand.

``onnx.load`` reads the whole file into one bytes object and parses it into a second copy, so a
100 MB model costs 200 MB at the load's peak, and the parsed copy of every weight stays until the
model goes (a protobuf message frees nothing it holds before it is freed itself). The compressor
only ever needs one weight at a time from the input (to fold, rank or check it), so
:func:`read_lazy` walks the file's protobuf wire format instead and parses everything but the
``raw_data`` of large initializers. Those become *lazy* tensors: ``data_location=EXTERNAL`` with
the file, offset and length of their bytes, marked with :data:`LAZY_KEY` so that neither this
package nor a reader of a saved model mistakes them for real external data.

A lazy tensor must never reach ONNX Runtime, the checker or a file: :func:`tensor_array` reads one,
:func:`materialize` writes their values back into a model (the output, before it is saved), and
:func:`materialized` is the copy a session gets when a model still has some. :func:`as_external_data`
is a copy in which they are ordinary external data (ONNX Runtime can open it without reading them).
"""
from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InvalidModelError

__all__ = ["LAZY_KEY", "LAZY_MIN_BYTES", "read_lazy", "is_lazy", "has_lazy", "lazy_bytes", "tensor_array",
           "materialize", "materialized", "as_external_data", "write_model"]

#: external_data key that marks a lazy tensor; its value is the absolute path of the file.
LAZY_KEY = "udfc_onnx.lazy_source"
# Size and modification time of the file when it was parsed: a read from a file that changed since
# (overwritten while the run goes on) is refused instead of mixing two models.
_STAMP_KEY = "udfc_onnx.lazy_stamp"
#: Initializers with at least this many bytes of raw data stay in the file (smaller ones are
#: parsed: BN statistics, biases and shape constants are read all the time and cost nothing).
LAZY_MIN_BYTES = 1 << 16

# Types whose raw bytes are a plain little-endian array of one NumPy dtype.
_PLAIN_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64}
_GRAPH, _INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer
_DIMS, _DATA_TYPE, _RAW_DATA, _SEGMENT, _DATA_LOCATION = 1, 2, 9, 3, 14  # TensorProto fields


class _Malformed(ValueError):
    """The wire format is not what this reader handles (the caller falls back to onnx.load)."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint too long")


def _fields(buf, start: int, end: int):
    """Yield ``(field, wire_type, tag_start, value_start, value_end)`` of one message's fields."""
    pos = start
    while pos < end:
        tag_start = pos
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value_start = pos
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            value_start, pos = pos, pos + 8
        elif wire == 2:
            length, value_start = _varint(buf, pos, end)
            pos = value_start + length
        elif wire == 5:
            value_start, pos = pos, pos + 4
        else:  # groups (3, 4) are not used by ONNX
            raise _Malformed(f"wire type {wire}")
        if pos > end or field == 0:
            raise _Malformed("field past the end of its message")
        yield field, wire, tag_start, value_start, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes | bytearray) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + bytes(payload)


def _tensor_without_raw(buf, start: int, end: int, threshold: int) -> tuple[bytes, int, int] | None:
    """The tensor's fields less its raw data, and where that data lies; None when it stays parsed."""
    kept = bytearray()
    raw = None
    for field, wire, tag_start, value_start, value_end in _fields(buf, start, end):
        if field == _RAW_DATA and wire == 2:
            if raw is not None:
                return None  # repeated raw_data (merged by protobuf): leave it to the parser
            raw = (value_start, value_end - value_start)
        elif field == _DATA_LOCATION and wire == 0 and _varint(buf, value_start, value_end)[0] != 0:
            raise _Malformed("external data")  # read with its files by the plain load
        elif field in (_SEGMENT, _DATA_LOCATION):
            return None
        else:
            kept += buf[tag_start:value_end]
    if raw is None or raw[1] < threshold:
        return None
    return bytes(kept), raw[0], raw[1]


def read_lazy(path: str | os.PathLike, min_bytes: int | None = None) -> onnx.ModelProto | None:
    """Parse ``path`` with its large initializers left in the file (lazy); None when it cannot.

    None (the caller then uses ``onnx.load``) for a file this wire-format walk does not handle: a
    graph given twice, malformed or truncated fields, an initializer in external data files, or a
    big-endian machine. Initializers inside subgraphs and functions are parsed as usual.
    """
    if sys.byteorder != "little":
        return None
    threshold = LAZY_MIN_BYTES if min_bytes is None else min_bytes
    p = Path(path).resolve()
    with open(p, "rb") as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        if size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                skeleton, lazy = _skeleton(buf, size, threshold)
            except _Malformed:
                return None
    if skeleton is None:
        return None
    try:
        model = onnx.ModelProto.FromString(skeleton)
    except Exception:
        return None
    source = str(p)
    inits = model.graph.initializer
    for index, offset, length in lazy:
        t = inits[index]
        count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if t.data_type not in _PLAIN_TYPES or count * _itemsize(t.data_type) != length:
            return None  # size or type checks are load's job: let the plain parse report them
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", p.name), ("offset", str(offset)), ("length", str(length)), (LAZY_KEY, source),
                           (_STAMP_KEY, _stamp(stat))):
            t.external_data.add(key=key, value=value)
    return model


def _skeleton(buf, size: int, threshold: int) -> tuple[bytes | None, list[tuple[int, int, int]]]:
    out = bytearray()
    lazy: list[tuple[int, int, int]] = []
    graphs = 0
    for field, wire, tag_start, value_start, value_end in _fields(buf, 0, size):
        if field != _GRAPH or wire != 2:
            out += buf[tag_start:value_end]
            continue
        graphs += 1
        graph = bytearray()
        index = 0
        for f2, w2, t2, v2, e2 in _fields(buf, value_start, value_end):
            if f2 == _INITIALIZER and w2 == 2:
                stripped = _tensor_without_raw(buf, v2, e2, threshold)
                if stripped is None:
                    graph += buf[t2:e2]
                else:
                    graph += _length_delimited(_INITIALIZER, stripped[0])
                    lazy.append((index, stripped[1], stripped[2]))
                index += 1
            else:
                graph += buf[t2:e2]
        out += _length_delimited(_GRAPH, graph)
    if graphs != 1:
        return None, []
    return bytes(out), lazy


def _itemsize(data_type: int) -> int:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def is_lazy(t: onnx.TensorProto) -> bool:
    """True for a tensor :func:`read_lazy` left in its file."""
    return t.data_location == onnx.TensorProto.EXTERNAL and any(e.key == LAZY_KEY for e in t.external_data)


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in model.graph.initializer)


def lazy_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a lazy tensor's data (0 for any other tensor)."""
    if not is_lazy(t):
        return 0
    return int(next(e.value for e in t.external_data if e.key == "length"))


def _stamp(stat: os.stat_result) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _read(t: onnx.TensorProto) -> np.ndarray:
    info = {e.key: e.value for e in t.external_data}
    path = info[LAZY_KEY]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    length = int(info["length"])
    try:
        with open(path, "rb") as f:
            if _stamp(os.fstat(f.fileno())) != info.get(_STAMP_KEY):
                raise InvalidModelError(f"{path}: the input changed while it was being compressed")
            # Straight into the array: no bytes object, no mapping of the file kept resident.
            values = np.fromfile(f, dtype=dtype, count=length // dtype.itemsize, offset=int(info["offset"]))
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read weight {t.name} ({exc.strerror or exc})") from None
    if values.nbytes != length:
        raise InvalidModelError(f"{path}: the input changed while it was being compressed (weight {t.name} is cut short)")
    return values.reshape(tuple(t.dims))


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` that also reads a lazy tensor from its file (a new, writable array)."""
    return _read(t) if is_lazy(t) else numpy_helper.to_array(t)


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every lazy initializer of ``model`` into it, in place; returns ``model``."""
    for t in model.graph.initializer:
        if is_lazy(t):
            values = _read(t)
            t.ClearField("data_location")
            del t.external_data[:]
            t.raw_data = values.tobytes()
    return model


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when it has no lazy initializer, else a copy with their values read in."""
    if not has_lazy(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return materialize(copy)


def as_external_data(model: onnx.ModelProto, *, location: str | None = None) -> tuple[onnx.ModelProto, Path | None]:
    """A copy of ``model`` whose lazy tensors are ordinary external data, and their folder.

    Each lazy tensor becomes a plain reference (location, offset, length) to its bytes in the
    source file, relative to the returned folder. ONNX Runtime opens such a copy without reading
    the weights, when they are given to it in memory (``SessionOptions.add_initializer``, see
    :func:`udfc_onnx.validate.open_reference`). With ``location``, each lazy tensor points at that
    file instead, with no offset or length (the checker's copy, :func:`udfc_onnx.load.read_model`).
    The folder is None when ``location`` is given, when ``model`` has no lazy tensor, or when they
    come from more than one file.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    sources = set()
    for t in copy.graph.initializer:
        if not is_lazy(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        sources.add(info[LAZY_KEY])
        del t.external_data[:]
        if location is not None:
            t.external_data.add(key="location", value=location)
            continue
        for key in ("location", "offset", "length"):
            t.external_data.add(key=key, value=info[key])
    return copy, Path(sources.pop()).parent if len(sources) == 1 and location is None else None


def _copy_without(message, skip: str):
    """A copy of protobuf ``message`` without its field ``skip`` (never copied, however large)."""
    out = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(out, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # message
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` as ``onnx.save`` does, without serialising it into one buffer.

    The model less its graph, the graph less its initializers, then each initializer in turn
    (protobuf readers take a message's fields in any order): one tensor's bytes at a time, where
    ``SerializeToString`` grew a buffer of the whole model by doubling (ResNet-50-size output,
    18 MB: 0.04-0.05 s of copies and page faults, against 0.02 s). No lazy tensor may be left.
    """
    if has_lazy(model):
        raise ValueError("write_model: the model still has lazy tensors (materialize it first)")
    graph = model.graph
    graph_head = _copy_without(graph, "initializer").SerializeToString()
    sizes = [t.ByteSize() for t in graph.initializer]
    graph_size = len(graph_head) + sum(len(_encode_varint(_INITIALIZER << 3 | 2)) + len(_encode_varint(n)) + n
                                       for n in sizes)
    with open(path, "wb") as f:
        f.write(_copy_without(model, "graph").SerializeToString())
        f.write(_encode_varint(_GRAPH << 3 | 2) + _encode_varint(graph_size))
        f.write(graph_head)
        for t, n in zip(graph.initializer, sizes):
            f.write(_encode_varint(_INITIALIZER << 3 | 2) + _encode_varint(n))
            f.write(t.SerializeToString())
