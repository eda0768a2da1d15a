"""Settings of one compression run, validated once at the boundary."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import InvalidConfigError

__all__ = ["CompressConfig", "PRESETS"]

METHODS = ("udfc", "nm", "prune")
CRITERIA = ("l1", "l2")
QUANT_COMP = ("own", "next", "none")


@dataclass(frozen=True)
class CompressConfig:
    """Every option of a run; defaults are the best measured settings (see README).

    Attributes
    ----------
    prune_ratio : float, default=0.0
        Fraction of output channels removed from each prunable unit; keeps int(C*(1-r)).
    criterion : {"l1", "l2"}, default="l1"
        Filter norm that ranks channels (on raw, unfolded weights).
    method : {"udfc", "nm", "prune"}, default="udfc"
        Compensation: UDFC least squares, Neuron Merging, or none.
    weight_bits : int or None, default=8
        Per-output-channel weight bits (2..8); None keeps float weights.
    symmetric : bool, default=True
        Symmetric (zero point 0) or min/max asymmetric weight grid.
    alpha1, alpha2 : float, default=0.01, 0.008
        The paper's weights of the bias terms for pruning and quantization.
    quant_compensation : {"own", "next", "none"}, default="own"
        Where UDFC's quantization scale s^q goes: the layer's own dequant scale [EXT],
        the consumer's input slice (the paper), or nowhere.
    bias_transfer : bool or None, default=None
        Move the expected residual of pruned channels into the consumer bias [EXT];
        None means on for udfc, off for the nm/prune baselines.
    ridge : float, default=0.0
        Relative Tikhonov term of the pruning regression [EXT].
    regress_on_quantized : bool, default=True
        Regress pruned filters on the quantized kept filters (spec 4 variant a).
    nm_ratio : {"published", "derived"}, default="published"
        BN ratio of the Neuron Merging baseline.
    prune_residual : bool, default=False
        Also prune residual streams, each as one channel group over all its producers and
        consumers (no filter compensation); by default only convs inside residual blocks are pruned.
    """

    prune_ratio: float = 0.0
    criterion: str = "l1"
    method: str = "udfc"
    weight_bits: int | None = 8
    symmetric: bool = True
    alpha1: float = 0.01
    alpha2: float = 0.008
    quant_compensation: str = "own"
    bias_transfer: bool | None = None
    ridge: float = 0.0
    regress_on_quantized: bool = True
    nm_ratio: str = "published"
    prune_residual: bool = False

    # --- int8 deployment output (udfc_onnx/int8.py, udfc_onnx/activations.py) ---
    # activations : {"float", "uint8"}, default="float"
    #     "uint8" writes full QDQ (uint8 activations, int8 symmetric weights, int32 bias) that ORT
    #     fuses into QLinearConv/QGemm/QLinearAdd...; "float" writes weight-only QDQ (smaller, not faster).
    # activation_sigmas : float, default=6.0
    #     Data-free activation range: mu_c +- n sigma_c from BN statistics (measured, see README).
    # calibration : str or None
    #     npz of samples; per-tensor min/max from ORT replace the data-free ranges.
    # calibration_norm : {"cifar", "imagenet"} or None
    #     Normalisation of uint8 images ``x`` in the calibration file.
    # int4_storage : bool
    #     Store 2..4-bit weights as INT4 (opset 21): smaller file, runs slower (ORT does not fuse INT4).
    activations: str = "float"
    activation_sigmas: float = 6.0
    calibration: str | None = None
    calibration_norm: str | None = None
    int4_storage: bool = False

    def _check_int8_fields(self):
        if self.activations not in ("float", "uint8"):
            raise InvalidConfigError(f"activations must be 'float' or 'uint8', got {self.activations!r}")
        n = self.activation_sigmas
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise InvalidConfigError(f"activation_sigmas must be a finite number > 0, got {n!r}")
        if self.activations == "uint8" and self.weight_bits is None:
            raise InvalidConfigError("activations='uint8' needs quantized weights (weight_bits 2..8), got weight_bits=None")
        if self.calibration is not None and self.activations != "uint8":
            raise InvalidConfigError("calibration only sets activation ranges: it needs activations='uint8'")
        if self.calibration_norm not in (None, "cifar", "imagenet"):
            raise InvalidConfigError(f"calibration_norm must be 'cifar', 'imagenet' or None, got {self.calibration_norm!r}")
        if self.int4_storage and (self.weight_bits is None or self.weight_bits > 4):
            raise InvalidConfigError(f"int4_storage needs weight_bits <= 4, got {self.weight_bits!r}")

    def __post_init__(self):
        r = self.prune_ratio
        if not isinstance(r, (int, float)) or isinstance(r, bool) or math.isnan(r) or not 0 <= r < 1:
            raise InvalidConfigError(f"prune_ratio must be a number in [0, 1), got {r!r}")
        if self.criterion not in CRITERIA:
            raise InvalidConfigError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.method not in METHODS:
            raise InvalidConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        b = self.weight_bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8):
            raise InvalidConfigError(f"weight_bits must be an integer in [2, 8] (or None for float), got {b!r}")
        for name in ("alpha1", "alpha2", "ridge"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v) or v < 0:
                raise InvalidConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.quant_compensation not in QUANT_COMP:
            raise InvalidConfigError(f"quant_compensation must be one of {QUANT_COMP}, got {self.quant_compensation!r}")
        if self.nm_ratio not in ("published", "derived"):
            raise InvalidConfigError(f"nm_ratio must be 'published' or 'derived', got {self.nm_ratio!r}")
        self._check_int8_fields()

    @property
    def use_bias_transfer(self) -> bool:
        """Whether the mean-residual bias transfer runs."""
        return self.method == "udfc" if self.bias_transfer is None else self.bias_transfer

    def to_dict(self) -> dict:
        """Plain dict of every field (for reports and metadata)."""
        return asdict(self)

    def replace(self, **changes) -> "CompressConfig":
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CompressConfig(**values)


# Named settings; "paper" is the faithful reading of the method spec, with no extensions.
PRESETS: dict[str, dict] = {
    "paper": dict(
        method="udfc", symmetric=False, alpha1=0.01, alpha2=0.008, quant_compensation="next",
        bias_transfer=False, ridge=0.0, regress_on_quantized=True,
    ),
}
