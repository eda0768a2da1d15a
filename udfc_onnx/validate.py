"""Check a written model: onnx.checker on the file, an ORT session, numerics against the original."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["ValidationResult", "random_inputs", "run_model", "validate_file"]

_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


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


def input_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]] | None = None, batch: int = 2,
                 spatial: int = 32) -> dict[str, list[int]]:
    """Concrete shapes for every real graph input: symbolic batch -> ``batch``, other symbols -> ``spatial``."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if overrides and inp.name in overrides:
            shapes[inp.name] = list(overrides[inp.name])
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else spatial))
        shapes[inp.name] = dims
    return shapes


def random_inputs(model: onnx.ModelProto, rng: np.random.Generator, **kwargs) -> dict[str, np.ndarray]:
    """Standard-normal feeds for every graph input (see :func:`input_shapes`)."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    return {name: rng.standard_normal(shape).astype(_NP_TYPES.get(types[name], np.float32))
            for name, shape in input_shapes(model, **kwargs).items()}


def session(model_or_path, providers=("CPUExecutionProvider",)) -> ort.InferenceSession:
    """ORT session from a path or a ModelProto, with default graph optimisation."""
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(src, opts, providers=list(providers))


def run_model(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, feeds)


def validate_file(reference: onnx.ModelProto, candidate_path: str, *, exact: bool, rtol: float = 1e-4,
                  atol: float = 1e-4, n_samples: int = 8, seed: int = 0,
                  shape_overrides: dict[str, list[int]] | None = None,
                  reference_path: str | None = None) -> ValidationResult:
    """Check ``candidate_path`` and compare it with ``reference`` on random inputs.

    Parameters
    ----------
    reference : onnx.ModelProto
        The input model.
    candidate_path : str
        The written output (checked from the file, as a user will load it).
    reference_path : str, optional
        The original's file: ORT loads it from there, and ``reference`` only supplies the graph
        inputs (it may be a model without initializers; saves serialising a large model).
    exact : bool
        Require ``|cand - ref| <= atol + rtol * max|ref|`` (lossless settings); otherwise
        deviations are measured and reported, and only non-finite or misshapen outputs fail.
    """
    try:
        onnx.checker.check_model(candidate_path, full_check=True)
    except Exception as exc:
        return ValidationResult(False, f"onnx.checker rejects the output: {str(exc).strip().splitlines()[0]}")
    try:
        cand = session(candidate_path)
        ref = session(reference_path if reference_path is not None else reference)
    except Exception as exc:
        return ValidationResult(False, f"onnxruntime cannot load the output: {str(exc).strip().splitlines()[0]}")
    rng = np.random.default_rng(seed)
    feeds = random_inputs(reference, rng, overrides=shape_overrides, batch=n_samples)
    try:
        out_c = run_model(cand, feeds)
        out_r = run_model(ref, feeds)
    except Exception as exc:
        return ValidationResult(False, f"onnxruntime fails to run the output: {str(exc).strip().splitlines()[0]}")
    if len(out_c) != len(out_r) or any(a.shape != b.shape for a, b in zip(out_c, out_r)):
        return ValidationResult(False, "output shapes differ from the original model")
    if not all(np.all(np.isfinite(o)) for o in out_c):
        return ValidationResult(False, "output has non-finite values")
    a, b = out_r[0].astype(np.float64), out_c[0].astype(np.float64)
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    cos = float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    top1 = float(np.mean(a.reshape(a.shape[0], -1).argmax(1) == b.reshape(b.shape[0], -1).argmax(1))) if a.ndim >= 2 else float("nan")
    result = ValidationResult(True, "ok", max_abs, max_rel, cos, top1, n_samples)
    if exact and max_abs > atol + rtol * scale:
        result.passed = False
        result.message = f"output differs from the original by {max_abs:.3g} (allowed {atol + rtol * scale:.3g})"
    return result
