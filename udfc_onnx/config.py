"""Settings of one compression run, validated once at the boundary."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import InvalidConfigError

__all__ = ["CompressConfig", "PRESETS"]

METHODS = ("udfc", "nm", "prune")
CRITERIA = ("l1", "l2")
QUANT_COMP = ("own", "next", "none")
REGRESSIONS = ("moments", "euclidean")
SELECTIONS = ("greedy", "norm")
BIAS_UNITS = ("e", "b")
GRANULARITIES = ("channel", "tensor")
# Below this width the symmetric grid loses too much (tools/reproduce_table2.py --ablation bits: on
# resnet56_nm at ratio 0 with bias correction, 4-bit symmetric -0.62 vs asymmetric -0.43, 3-bit -3.91 vs -1.07).
AUTO_ASYMMETRIC_BELOW = 5


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
    symmetric : bool or None, default=None
        Symmetric (zero point 0) or min/max asymmetric weight grid. None chooses by width:
        symmetric from 5 bits up (what ORT's int8 kernels need), asymmetric for 2-4 bits;
        pass True to keep int8-kernel-compatible weights at every width.
    alpha1, alpha2 : float, default=0.01, 0.008
        The paper's weights of the bias terms for pruning and quantization.
    quant_compensation : {"own", "next", "none"}, default="none"
        Where UDFC's quantization scale s^q goes: the layer's own dequant scale [EXT],
        the consumer's input slice (the paper), or nowhere. Measured: the least-squares s^q
        shrinks every layer a little and costs accuracy at 3-4 bits, so it is off by default.
    bias_transfer : bool or None, default=None
        Move the expected residual of pruned channels into the consumer bias [EXT];
        None means on for udfc, off for the nm/prune baselines.
    ridge : float, default=0.0
        Relative Tikhonov term of the pruning regression [EXT].
    regress_on_quantized : bool, default=True
        Regress pruned filters on the quantized kept filters (spec 4 variant a).
    nm_ratio : {"published", "derived"}, default="published"
        BN ratio of the Neuron Merging baseline.
    regression : {"moments", "euclidean"}, default="moments"
        UDFC's pruning regression: predict pruned pre-activations from kept ones under
        data-free second moments of the layer input [EXT], or the paper's plain least squares
        of filters with the alpha1 bias term.
    selection : {"greedy", "norm"}, default="greedy"
        UDFC only: keep the channels whose removal leaves the least compensated error at the
        consumer [EXT], or the top norms by ``criterion`` (the paper; prune/nm always use norms).
    bias_correction : bool or None, default=None
        Data-free DFQ bias correction of every quantized layer, ``b -= (Q(W) - W) E[x]``;
        None means on for udfc, off for the nm/prune baselines.
    bias_units : {"e", "b"}, default="e"
        Euclidean regression only: the alpha1 bias term in pre-BN units e = b/a with raw
        filters (identical to folded filters with folded biases b), or in folded units b with
        raw filters (alpha1 then acts as alpha1 * a_j^2 per pruned channel j).
    mean_weight : float, default=4.0
        Moment regression only: weight of the mean part of the pre-activation second moments,
        ``S = D R D + mean_weight * beta beta^T`` (1 is the exact E[P P^T]; more makes the kept
        channels reproduce the pruned channels' means more strictly, which the bias transfer
        and the BN statistics' train/test gap favour) [EXT].
    granularity : {"channel", "tensor"}, default="channel"
        One weight scale per output channel, or one per tensor (stored per channel, all equal;
        UDFC's own-scale s^q is then not applied).
    cross_layer_equalization : bool, default=False
        DFQ cross-layer equalization of every unit (producer rows and consumer columns scaled
        to equal ranges) before anything else.
    """

    prune_ratio: float = 0.0
    criterion: str = "l1"
    method: str = "udfc"
    weight_bits: int | None = 8
    symmetric: bool | None = None
    alpha1: float = 0.01
    alpha2: float = 0.008
    quant_compensation: str = "none"
    bias_transfer: bool | None = None
    ridge: float = 0.0
    regress_on_quantized: bool = True
    nm_ratio: str = "published"
    regression: str = "moments"
    selection: str = "greedy"
    bias_correction: bool | None = None
    bias_units: str = "e"
    mean_weight: float = 4.0
    granularity: str = "channel"
    cross_layer_equalization: bool = False

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
        for name in ("alpha1", "alpha2", "ridge", "mean_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v) or v < 0:
                raise InvalidConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.quant_compensation not in QUANT_COMP:
            raise InvalidConfigError(f"quant_compensation must be one of {QUANT_COMP}, got {self.quant_compensation!r}")
        if self.nm_ratio not in ("published", "derived"):
            raise InvalidConfigError(f"nm_ratio must be 'published' or 'derived', got {self.nm_ratio!r}")
        for name, allowed in (("regression", REGRESSIONS), ("selection", SELECTIONS), ("bias_units", BIAS_UNITS),
                              ("granularity", GRANULARITIES)):
            if getattr(self, name) not in allowed:
                raise InvalidConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("symmetric", "bias_transfer", "bias_correction", "regress_on_quantized", "cross_layer_equalization"):
            v = getattr(self, name)
            auto = name in ("symmetric", "bias_transfer", "bias_correction")
            if not (isinstance(v, bool) or (v is None and auto)):
                raise InvalidConfigError(f"{name} must be true or false{' (or null for auto)' if auto else ''}, got {v!r}")

    @property
    def use_bias_transfer(self) -> bool:
        """Whether the mean-residual bias transfer runs."""
        return self.method == "udfc" if self.bias_transfer is None else self.bias_transfer

    @property
    def use_bias_correction(self) -> bool:
        """Whether quantized layers get the data-free bias correction."""
        return self.method == "udfc" if self.bias_correction is None else self.bias_correction

    @property
    def uses_moments(self) -> bool:
        """Whether the run needs the data-free activation moments of the graph."""
        udfc_moments = self.method == "udfc" and (self.regression == "moments" or self.selection == "greedy")
        return udfc_moments or self.use_bias_correction

    def symmetric_for(self, bits: int) -> bool:
        """Grid of a ``bits``-wide layer: the explicit choice, else symmetric from 5 bits up."""
        return bits >= AUTO_ASYMMETRIC_BELOW if self.symmetric is None else self.symmetric

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
        bias_transfer=False, ridge=0.0, regress_on_quantized=True, regression="euclidean", selection="norm",
        bias_correction=False, bias_units="e", granularity="channel", cross_layer_equalization=False,
    ),
}
