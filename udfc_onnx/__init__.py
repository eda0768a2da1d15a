"""udfc-onnx: data-free pruning and quantization of ONNX CNNs with closed-form compensation."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import PRESETS, CompressConfig  # noqa: E402
from .errors import (InvalidConfigError, InvalidModelError, SolverError, UdfcError,  # noqa: E402
                     UnsupportedModelError, ValidationError)
from .pipeline import compress_file, compress_model  # noqa: E402

__all__ = ["__version__", "CompressConfig", "PRESETS", "compress_file", "compress_model", "UdfcError",
           "InvalidConfigError", "InvalidModelError", "UnsupportedModelError", "SolverError", "ValidationError"]
