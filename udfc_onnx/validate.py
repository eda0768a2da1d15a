"""Check a written model: onnx.checker on the file, an ORT session, numerics against the original.

Both models are opened from their files (never re-serialised), so the same code serves models that
keep their weights in external data. ``count_fused_convs`` looks at ORT's optimised graph to see
which Convs became int8 kernels.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InvalidConfigError, UnsupportedModelError, first_line
from .lazy import as_external_data, materialized

__all__ = ["ValidationResult", "Reference", "open_reference", "run_reference", "parse_input_shapes", "resolve_input_shapes", "input_shapes", "random_inputs",
           "run_model", "session", "validate_file", "count_fused_convs", "MAX_FEED_ELEMENTS"]

# ORT logs failures itself (to the process's stderr, in colour) before raising them; every failure
# here is caught and reported in one line, so only fatal messages are let through.
_ORT_LOG_LEVEL = 4

#: Largest random validation batch per input (elements); beyond it the user must pick a shape.
MAX_FEED_ELEMENTS = 2**26


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_file`.

    ``passed`` requires the checker, an ORT session, finite outputs of the original shapes,
    and, when ``exact`` was asked, agreement within tolerance.
    """

    passed: bool
    message: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    cosine: float = float("nan")
    top1_agreement: float = float("nan")
    n_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_input_shapes(specs) -> dict[str, list[int]]:
    """Parse ``--overwrite-input-shape`` values ``name:d0,d1,...`` (or ``d0,d1,...`` for a one-input model).

    Returns
    -------
    dict of str to list of int
        Input name ("" for the nameless form) -> dims.

    Raises
    ------
    InvalidConfigError
        Empty name, a non-integer or non-positive dim, or the same input twice.
    """
    shapes: dict[str, list[int]] = {}
    for spec in specs or ():
        name, sep, dims_text = spec.rpartition(":")
        if sep and not name:
            raise InvalidConfigError(f"--overwrite-input-shape {spec!r}: empty input name (use name:d0,d1,...)")
        try:
            dims = [int(d) for d in dims_text.split(",")]
        except ValueError:
            raise InvalidConfigError(f"--overwrite-input-shape {spec!r}: dims must be comma-separated integers, "
                                     "as in input:1,3,224,224") from None
        if any(d <= 0 for d in dims):
            raise InvalidConfigError(f"--overwrite-input-shape {spec!r}: dims must be positive")
        if name in shapes:
            raise InvalidConfigError(f"--overwrite-input-shape gives input {name or '(unnamed)'!r} twice")
        shapes[name] = dims
    return shapes


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def resolve_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """Check parsed ``--overwrite-input-shape`` values against the model's inputs.

    Raises
    ------
    InvalidConfigError
        Unknown input name, the nameless form on a model with several inputs, or a rank that differs
        from the declared one.
    """
    if not shapes:
        return {}
    inputs = {i.name: i for i in _real_inputs(model)}
    resolved = {}
    for name, dims in shapes.items():
        if name == "":
            if len(inputs) != 1:
                raise InvalidConfigError(f"--overwrite-input-shape without a name needs a one-input model; "
                                         f"inputs are {', '.join(inputs)}")
            name = next(iter(inputs))
        if name not in inputs:
            raise InvalidConfigError(f"--overwrite-input-shape: no input {name!r} (inputs: {', '.join(inputs)})")
        shape = inputs[name].type.tensor_type.shape
        if inputs[name].type.tensor_type.HasField("shape") and len(shape.dim) != len(dims):
            raise InvalidConfigError(f"--overwrite-input-shape {name}: {len(dims)} dims given, the model declares {len(shape.dim)}")
        for i, (d, given) in enumerate(zip(shape.dim, dims)):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != given:
                raise InvalidConfigError(f"--overwrite-input-shape {name}: dim {i} is fixed at {d.dim_value} in the "
                                         "model; only symbolic dims can be set (the model is not changed)")
        resolved[name] = list(dims)
    return resolved


def input_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]] | None = None, batch: int = 2,
                 spatial: int = 32) -> dict[str, list[int]]:
    """Concrete shapes for every real graph input: symbolic batch -> ``batch``, other symbols -> ``spatial``."""
    shapes = {}
    for inp in _real_inputs(model):
        if overrides and inp.name in overrides:
            shapes[inp.name] = list(overrides[inp.name])
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else spatial))
        shapes[inp.name] = dims
    return shapes


def _batch_is_free(model: onnx.ModelProto, overrides: dict[str, list[int]] | None) -> bool:
    """True when every input's first dim is symbolic (so one run can carry all samples)."""
    for inp in _real_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        if (overrides and inp.name in overrides) or not dims or (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return False
    return True


def _guessed_dims(model: onnx.ModelProto, overrides: dict[str, list[int]] | None) -> bool:
    """True when some input has a symbolic dim beyond the batch that no override set."""
    for inp in _real_inputs(model):
        if overrides and inp.name in overrides:
            continue
        if any(not (d.HasField("dim_value") and d.dim_value > 0) for d in inp.type.tensor_type.shape.dim[1:]):
            return True
    return False


def _random_array(rng: np.random.Generator, shape: list[int], elem_type: int) -> np.ndarray:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        dtype = np.dtype(np.float32)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 10, shape).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32)


def random_inputs(model: onnx.ModelProto, rng: np.random.Generator, **kwargs) -> dict[str, np.ndarray]:
    """Random feeds for every graph input (see :func:`input_shapes`): N(0, 1) floats, small integers.

    Raises
    ------
    UnsupportedModelError
        A feed would exceed :data:`MAX_FEED_ELEMENTS` elements.
    """
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    feeds = {}
    for name, shape in input_shapes(model, **kwargs).items():
        if math.prod(shape) > MAX_FEED_ELEMENTS:
            raise UnsupportedModelError(f"input {name} shape {shape} is too large for random check inputs; "
                                        "set --overwrite-input-shape or --check-n 0")
        feeds[name] = _random_array(rng, shape, types[name])
    return feeds


def session(model_or_path, providers=("CPUExecutionProvider",), *, optimized_path: str | None = None,
            **options) -> ort.InferenceSession:
    """ORT session from a path or a ModelProto, with default graph optimisation.

    ``options`` are SessionOptions attributes; ``optimized_path`` makes ORT save the graph it
    optimised there (see :func:`udfc_onnx.int8.save_optimized_graph`).
    """
    src = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else materialized(model_or_path).SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = _ORT_LOG_LEVEL
    for key, value in options.items():
        setattr(opts, key, value)
    if optimized_path is not None:
        from .int8 import save_optimized_graph

        save_optimized_graph(opts, optimized_path)
    return ort.InferenceSession(str(src) if isinstance(src, os.PathLike) else src, opts, providers=list(providers))


def run_model(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, feeds)


def _samples(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


@dataclass
class Reference:
    """The original model's outputs on the random check inputs.

    Attributes
    ----------
    feeds : list of dict of str to ndarray
        One feed per run (one run when the batch is symbolic, several for a fixed batch).
    outputs : list of ndarray
        Each output of the model, runs concatenated on axis 0.
    n_samples : int
    """

    feeds: list
    outputs: list
    n_samples: int


def _stack(runs: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.concatenate([r[i] for r in runs]) if runs[0][i].ndim else runs[0][i] for i in range(len(runs[0]))]


def open_reference(reference: onnx.ModelProto | str, *, weights: Mapping[str, np.ndarray] | None = None,
                   path: str | None = None) -> ort.InferenceSession:
    """The ORT session :func:`run_reference` runs: the original model (a ModelProto or its path), unoptimised.

    Unoptimised: the plain float graph is the most faithful reference, and the optimiser's
    relaid-out copies of every weight (NCHWc) would nearly double the session's memory
    (ResNet-50: 160 MB instead of 300 MB above the process, and no slower to build and run once).

    ``weights``: values of the lazily read ``reference``'s weights already in memory
    (``LoadedModel.weights``). ORT then runs on these arrays as they are (no copy; nothing read or
    parsed again; ResNet-50: 0.02 s and 20 MB to open instead of 0.15-0.2 s and 125 MB): they must
    not change while the session lives. ``path``: the file ORT opens itself otherwise (default:
    ``reference``).

    Raises
    ------
    UnsupportedModelError
        onnxruntime cannot load the input.
    """
    if weights and isinstance(reference, onnx.ModelProto):
        shared = _session_on_arrays(reference, weights)
        if shared is not None:
            return shared
    try:
        return session(path or reference, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except Exception as exc:
        raise UnsupportedModelError(f"onnxruntime cannot load the input model: {first_line(exc)}") from None


def _session_on_arrays(reference: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> ort.InferenceSession | None:
    """:func:`open_reference` of a lazily read model whose weights ``weights`` holds; None when ORT
    does not take it that way (the caller then lets ORT read the file and name any problem)."""
    model, folder = as_external_data(reference)
    if folder is None:
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = _ORT_LOG_LEVEL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Lazy tensors not in ``weights`` (if any) are read by ORT from the source file.
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    # ORT does not check a given array against the tensor's dims: only exact matches are given.
    declared = {t.name: (tuple(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
                for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    shared = []
    for name, array in weights.items():
        if declared.get(name) == (array.shape, array.dtype) and array.flags.c_contiguous:
            value = ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU: the array's own buffer
            opts.add_initializer(name, value)
            shared.append(value)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:
        return None
    sess._udfc_shared_weights = shared  # ORT reads these buffers: they live as long as the session
    return sess


def run_reference(reference: onnx.ModelProto, *, n_samples: int, seed: int = 0,
                  shape_overrides: dict[str, list[int]] | None = None, reference_path: str | None = None,
                  opened: ort.InferenceSession | None = None) -> Reference:
    """Open and run the original model on random inputs, before anything is compressed.

    A symbolic batch carries every sample in one run; a fixed batch is run as often as needed.
    ``opened`` is the session of :func:`open_reference` when the caller opened it already;
    otherwise it is opened here from ``reference_path`` (or ``reference``).

    Raises
    ------
    UnsupportedModelError
        onnxruntime cannot load or run the input, or its outputs are not finite (then random
        inputs are no test of it): a problem of the input, found before any work.
    """
    ref = opened if opened is not None else open_reference(reference_path or reference)
    if n_samples <= 0:
        return Reference([], [], 0)
    rng = np.random.default_rng(seed)
    if _batch_is_free(reference, shape_overrides):
        feeds = [random_inputs(reference, rng, overrides=shape_overrides, batch=n_samples)]
    else:
        feeds = [random_inputs(reference, rng, overrides=shape_overrides)]
        while sum(map(_samples, feeds)) < n_samples:
            feeds.append(random_inputs(reference, rng, overrides=shape_overrides))
    try:
        outputs = _stack([run_model(ref, f) for f in feeds])
    except Exception as exc:
        hint = " (symbolic dims were set to 32: try --overwrite-input-shape)" if _guessed_dims(reference, shape_overrides) else ""
        raise UnsupportedModelError(f"onnxruntime cannot run the input model on random inputs: {first_line(exc)}{hint}") from None
    if not all(np.all(np.isfinite(o)) for o in outputs if o.dtype.kind == "f"):
        raise UnsupportedModelError("the input model gives non-finite outputs on random inputs; "
                                    "set --overwrite-input-shape or --check-n 0")
    return Reference(feeds, outputs, sum(map(_samples, feeds)))


def validate_file(reference: onnx.ModelProto, candidate_path: str, *, exact: bool, rtol: float = 1e-4,
                  atol: float = 1e-4, n_samples: int = 8, seed: int = 0,
                  shape_overrides: dict[str, list[int]] | None = None,
                  reference_path: str | None = None, expected: Reference | None = None,
                  optimized_path: str | None = None) -> ValidationResult:
    """Check ``candidate_path`` and compare it with ``reference`` on random inputs.

    Parameters
    ----------
    reference : onnx.ModelProto
        The input model (its inputs' types and shapes make the feeds).
    candidate_path : str
        The written output (checked from the file, as a user will load it).
    reference_path : str, optional
        The original's file: ORT loads it from there, and ``reference`` only supplies the graph
        inputs (it may be a model without initializers; saves serialising a large model).
    exact : bool
        Require ``|cand - ref| <= atol + rtol * max|ref|`` (lossless settings); otherwise
        deviations are measured and reported, and only non-finite or misshapen outputs fail.
    n_samples : int
        Random samples to compare; 0 skips the numeric comparison (checker and session still run).
    shape_overrides : dict of str to list of int, optional
        Input shapes that replace the declared ones (``--overwrite-input-shape``).
    expected : Reference, optional
        The reference outputs, when :func:`run_reference` ran already (then the arguments above
        that make them are not used).
    optimized_path : str, optional
        Where the candidate's session (ORT's default optimisation level) saves the graph it made,
        for :func:`udfc_onnx.int8.fusion_report`: the graph checked is the graph counted, and no
        second session of the output is built for the count.

    Raises
    ------
    UnsupportedModelError
        The reference itself cannot be loaded or run by onnxruntime (a problem of the input).
    """
    if expected is None:
        expected = run_reference(reference, n_samples=n_samples, seed=seed, shape_overrides=shape_overrides,
                                 reference_path=reference_path)
    try:
        onnx.checker.check_model(candidate_path, full_check=True)
    except Exception as exc:
        return ValidationResult(False, f"onnx.checker rejects the output: {first_line(exc)}")
    try:
        cand = session(candidate_path, optimized_path=optimized_path)
    except Exception as exc:
        return ValidationResult(False, f"onnxruntime cannot load the output: {first_line(exc)}")
    if expected.n_samples == 0:
        return ValidationResult(True, "ok (numeric comparison skipped: --check-n 0)")
    try:
        out_c = _stack([run_model(cand, f) for f in expected.feeds])
    except Exception as exc:
        return ValidationResult(False, f"onnxruntime fails to run the output: {first_line(exc)}")
    out_r = expected.outputs
    if len(out_c) != len(out_r) or any(a.shape != b.shape for a, b in zip(out_c, out_r)):
        return ValidationResult(False, "output shapes differ from the original model")
    if not all(np.all(np.isfinite(o)) for o in out_c if o.dtype.kind == "f"):
        return ValidationResult(False, "output has non-finite values")
    a, b = out_r[0].astype(np.float64), out_c[0].astype(np.float64)
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    cos = float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    top1 = float(np.mean(a.reshape(a.shape[0], -1).argmax(1) == b.reshape(b.shape[0], -1).argmax(1))) if a.ndim >= 2 and a.size else float("nan")
    result = ValidationResult(True, "ok", max_abs, max_rel, cos, top1, expected.n_samples)
    if exact and max_abs > atol + rtol * scale:
        result.passed = False
        result.message = f"output differs from the original by {max_abs:.3g} (allowed {atol + rtol * scale:.3g})"
    return result


def count_fused_convs(path: str | os.PathLike) -> int | None:
    """How many Convs ORT's CPU provider runs as int8 kernels (QLinearConv) in the model at ``path``.

    Builds a session at the extended optimisation level (the one that fuses QDQ groups, without the
    hardware-specific layout passes) with ``optimized_model_filepath`` and counts QLinearConv nodes, in
    any domain, in the saved graph. Returns None when ORT cannot build or save it.
    """
    from .int8 import check_fusion  # the full fusion report; this is its Conv count

    try:
        return check_fusion(path).fused_convs
    except Exception:
        return None
