"""Exception hierarchy of udfc_onnx.

Each error also inherits the builtin it narrows, so ``except ValueError`` keeps working
for callers that do not know this package (the scikit-learn convention).
"""
from __future__ import annotations


class UdfcError(Exception):
    """Base class for every error raised by udfc_onnx."""


class InvalidModelError(UdfcError, ValueError):
    """The input is not a usable ONNX model (unreadable, truncated, fails the checker)."""


class UnsupportedModelError(UdfcError, ValueError):
    """A valid ONNX model this tool does not handle (opset, already quantized, no Conv/Gemm)."""


class InvalidConfigError(UdfcError, ValueError):
    """An option is outside its documented range."""


class SolverError(UdfcError, ArithmeticError):
    """A compensation system is singular or its solution is not finite."""


class ValidationError(UdfcError):
    """The compressed model failed a check (checker, ORT session or numerics)."""
