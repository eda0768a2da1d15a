"""Exception hierarchy of udfc_onnx.

Each error also inherits the builtin it narrows, so ``except ValueError`` keeps working
for callers that do not know this package (the scikit-learn convention).
"""
from __future__ import annotations

__all__ = ["UdfcError", "InvalidModelError", "UnsupportedModelError", "InvalidConfigError", "SolverError",
           "ValidationError", "first_line"]


class UdfcError(Exception):
    """Base class for every error raised by udfc_onnx."""


class InvalidModelError(UdfcError, ValueError):
    """The input is not a usable ONNX model (unreadable, truncated, fails the checker)."""


class UnsupportedModelError(UdfcError, ValueError):
    """A valid ONNX model this tool does not handle (opset, already quantized, no Conv/Gemm)."""


class InvalidConfigError(UdfcError, ValueError):
    """An option is outside its documented range (also: unusable output path, bad --config file)."""


class SolverError(UdfcError, ArithmeticError):
    """A compensation system is singular or its solution is not finite."""


class ValidationError(UdfcError):
    """The compressed model failed a check (checker, ORT session or numerics)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text (or its type name), at most ``limit`` characters.

    Errors from protobuf, onnx and onnxruntime often span many lines; the CLI prints one.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:  # "... input 'x' of node:" names the culprit on the next line
        line = f"{line} {lines[1]}"
    return line if len(line) <= limit else line[:limit - 3] + "..."
