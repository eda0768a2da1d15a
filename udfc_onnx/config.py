"""Settings of one compression run, validated once at the boundary."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import InvalidConfigError

__all__ = ["CompressConfig", "PRESETS"]

METHODS = ("udfc", "nm", "prune")
CRITERIA = ("l1", "l2")
QUANT_COMP = ("own", "next", "none")
REGRESSIONS = ("synthetic", "moments", "euclidean")
SELECTIONS = ("greedy", "norm")
SYNTHETIC_FITS = ("sequential", "layer")
SYNTHETIC_INPUTS = ("noise", "distilled")
DISTILL_FILLS = ("flip-shift", "noise")
BIAS_UNITS = ("e", "b")
GRANULARITIES = ("channel", "tensor")
ROUNDINGS = ("nearest", "gptq")
REFITS = ("patch", "channel")
# Below this width the symmetric grid loses too much (tools/reproduce_table2.py --ablation bits: on
# resnet56_nm at ratio 0 with bias correction, 4-bit symmetric -0.62 vs asymmetric -0.43, 3-bit -3.91 vs -1.07).
AUTO_ASYMMETRIC_BELOW = 5
# ORT CPU QLinearConv on resnet56_nm (tools/benchmark.py, settings p50-w4a8 vs p50-w4a8-m1): a conv with 8 output
# channels takes longer than the same conv with 16, so int8 output keeps counts in multiples of 16.
INT8_CHANNEL_MULTIPLE = 16


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
    channel_multiple : int or None, default=None
        Round each unit's kept channel count up to a multiple of this (at most all channels).
        None chooses by output: 16 with ``activations="uint8"`` (ORT's QLinearConv runs a
        conv with fewer than 16 output channels slower than one with 16: README, int8 section),
        1 otherwise (the paper's ``int(C*(1-r))``).
    prune_residual : bool, default=False
        Also prune residual streams, each as one channel group over all its producers and
        consumers (no filter compensation); by default only convs inside residual blocks are pruned.
    regression : {"synthetic", "moments", "euclidean"}, default="synthetic"
        UDFC's pruning regression [EXT except euclidean]. "synthetic": regress post-activation
        channels (plus a constant) on BN-matched synthetic activations, distilled images pushed
        through the model with every folded BN renormalised to its gamma/beta over the batch
        (udfc_onnx.synthetic; no data; see ``consumer_refit`` and ``weight_rounding``). Models over the sample budget fall back to "moments":
        predict pruned pre-activations from kept ones under analytically propagated second
        moments of the layer input. "euclidean": the paper's plain least squares of filters
        with the alpha1 bias term.
    synthetic_fit : {"sequential", "layer"}, default="sequential"
        "sequential": each unit is fitted on the synthetic activations of the network as
        compressed (and quantized) so far, every consumer input slice refitted to the original
        network's activations; "layer": each unit's pruned channels regressed on its kept ones
        in the original network. Plans with channel groups use "layer".
    consumer_refit : {"patch", "channel"}, default="patch"
        Sequential fit only: how a unit's consumer is refitted to the original network [EXT].
        "patch": the consumer's whole kept input slice, every tap of every kept channel, is
        regressed so that its output reproduces the original consumer's output over the
        synthetic input patches (``W2' = W2 S_ok S_kk^-1``, the producer already quantized);
        "channel": each original channel is predicted from the kept ones and the consumer reads
        the prediction (one coefficient per channel pair, shared by all taps). Consumers that are
        not plain group-1 2-D Convs reading the unit directly (Gemm heads, depthwise) use "channel".
    synthetic_samples : int or None, default=None
        Synthetic images; None picks them from a MAC budget (udfc_onnx.synthetic.sample_count).
    seed : int, default=0
        Seed of the synthetic noise.
    synthetic_inputs : {"noise", "distilled"}, default="distilled"
        Images the synthetic activations start from: standard normal noise, or that noise
        optimised ZeroQ-style until every BN's pre-activation batch mean and deviation match its
        running statistics (udfc_onnx.distill; Adam on the images, gradients from an ONNX reverse
        graph run by ORT). A graph the distillation cannot differentiate keeps the noise.
        Distilled (32 images, 20 steps, +5 s) beat the noise on 11 of 12 resnet56_nm 4-bit Table 2
        cells over seeds 0 and 1 (mean +0.8 points, +1.0 to +2.1 at 50 %; README).
    synthetic_renorm : bool, default=True
        Renormalise every folded BN's output over the synthetic batch to its beta/|gamma|
        (udfc_onnx.synthetic.bn_matched_model); False runs the folded graph as it is, which only
        makes sense with distilled inputs.
    distill_iterations : int, default=20
        Adam steps of the distillation (per chunk of ``distill_batch`` images).
    distill_batch : int or None, default=None
        Images whose BN statistics are matched together; None: all ``synthetic_samples`` at once.
    distill_lr : float, default=0.2
        Adam step size of the distillation (the images start standard normal).
    distill_images : int or None, default=32
        Images distilled; None: all ``synthetic_samples``. Fewer cost proportionally less per
        Adam step; the other samples are made by ``distill_fill``. 32 images x 20 steps with the
        cross-entropy and TV terms cost about 5 s on resnet56_nm and matched 256 images x 50 steps
        (130 s) on the 10 000-image Table 2 cells (README).
    distill_fill : {"flip-shift", "noise"}, default="flip-shift"
        How the samples beyond ``distill_images`` are made: random horizontal flips and shifts
        by up to 4 pixels (zero fill) of the distilled images, as CIFAR models are trained, or
        the starting Gaussian noise left as it is.
    distill_ce : float, default=1.0
        Weight of DeepInversion's cross-entropy of the logits toward balanced random target
        classes in the distillation loss (0: ZeroQ's BN statistics only).
    distill_tv : float, default=10.0
        Weight of the L2 total-variation prior of the images (udfc_onnx.distill.tv_prior).
    distill_l2 : float, default=0.0
        Weight of the mean-square prior of the images (udfc_onnx.distill.l2_prior).
    selection : {"greedy", "norm"} or None, default=None
        UDFC only: keep the channels whose removal leaves the least compensated error at the
        consumer [EXT], or the top norms by ``criterion`` (the paper; prune/nm always use norms).
        None (auto): norms for the sequential synthetic fit, whose refit of every consumer
        input slice does better on the norm-ranked set (resnet56_nm, 4-bit, L1, 2000 images,
        three seeds: 78.92 vs 77.88 % at 50 %, 86.83 vs 86.52 % at 40 %), greedy for the
        moment and per-layer synthetic fits (moments: +5.1 points at 50 % float).
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
    weight_rounding : {"nearest", "gptq"}, default="gptq"
        How weights are rounded onto their grid: each to its nearest level, or GPTQ
        (udfc_onnx.quant.gptq_quantize) under the second moment of the layer's input in the
        synthetic activations of the network compressed so far [EXT]. A run that prunes nothing
        takes the synthetic pass for it alone below 8 bits (udfc_onnx.synthetic.rounds_with_gptq_alone);
        layers without synthetic inputs (8-bit quantization alone, models over the sample budget,
        depthwise convs, per-tensor grids, own-scale s^q) round to nearest.
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
    prune_residual: bool = False
    channel_multiple: int | None = None

    regression: str = "synthetic"
    synthetic_fit: str = "sequential"
    synthetic_samples: int | None = None
    seed: int = 0
    synthetic_inputs: str = "distilled"
    synthetic_renorm: bool = True
    distill_iterations: int = 20
    distill_batch: int | None = None
    distill_lr: float = 0.2
    distill_images: int | None = 32
    distill_fill: str = "flip-shift"
    distill_ce: float = 1.0
    distill_tv: float = 10.0
    distill_l2: float = 0.0
    selection: str | None = None
    bias_correction: bool | None = None
    bias_units: str = "e"
    mean_weight: float = 4.0
    granularity: str = "channel"
    cross_layer_equalization: bool = False
    weight_rounding: str = "gptq"
    consumer_refit: str = "patch"

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

    def _check_distill_fields(self):
        if self.synthetic_inputs not in SYNTHETIC_INPUTS:
            raise InvalidConfigError(f"synthetic_inputs must be one of {SYNTHETIC_INPUTS}, got {self.synthetic_inputs!r}")
        if not isinstance(self.synthetic_renorm, bool):
            raise InvalidConfigError(f"synthetic_renorm must be true or false, got {self.synthetic_renorm!r}")
        n = self.distill_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidConfigError(f"distill_iterations must be an integer >= 0, got {n!r}")
        n = self.distill_batch
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidConfigError(f"distill_batch must be an integer >= 1 (or None for all samples), got {n!r}")
        lr = self.distill_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise InvalidConfigError(f"distill_lr must be a finite number > 0, got {lr!r}")
        n = self.distill_images
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidConfigError(f"distill_images must be an integer >= 1 (or None for all samples), got {n!r}")
        if self.distill_fill not in DISTILL_FILLS:
            raise InvalidConfigError(f"distill_fill must be one of {DISTILL_FILLS}, got {self.distill_fill!r}")
        for name in ("distill_ce", "distill_tv", "distill_l2"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise InvalidConfigError(f"{name} must be a finite number >= 0, got {w!r}")

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
        n = self.synthetic_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidConfigError(f"synthetic_samples must be an integer >= 1 (or None for auto), got {n!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        self._check_distill_fields()
        for name in ("alpha1", "alpha2", "ridge", "mean_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v) or v < 0:
                raise InvalidConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.quant_compensation not in QUANT_COMP:
            raise InvalidConfigError(f"quant_compensation must be one of {QUANT_COMP}, got {self.quant_compensation!r}")
        if self.nm_ratio not in ("published", "derived"):
            raise InvalidConfigError(f"nm_ratio must be 'published' or 'derived', got {self.nm_ratio!r}")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise InvalidConfigError(f"selection must be one of {SELECTIONS} (or null for auto), got {self.selection!r}")
        for name, allowed in (("regression", REGRESSIONS), ("bias_units", BIAS_UNITS),
                              ("synthetic_fit", SYNTHETIC_FITS),
                              ("granularity", GRANULARITIES), ("weight_rounding", ROUNDINGS),
                              ("consumer_refit", REFITS)):
            if getattr(self, name) not in allowed:
                raise InvalidConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("symmetric", "bias_transfer", "bias_correction", "regress_on_quantized", "cross_layer_equalization"):
            v = getattr(self, name)
            auto = name in ("symmetric", "bias_transfer", "bias_correction")
            if not (isinstance(v, bool) or (v is None and auto)):
                raise InvalidConfigError(f"{name} must be true or false{' (or null for auto)' if auto else ''}, got {v!r}")
        m = self.channel_multiple
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 1024):
            raise InvalidConfigError(f"channel_multiple must be an integer in [1, 1024] (or None for auto), got {m!r}")
        self._check_int8_fields()

    @property
    def kept_multiple(self) -> int:
        """Multiple the kept channel counts are rounded up to (``channel_multiple``, resolved)."""
        if self.channel_multiple is not None:
            return self.channel_multiple
        return INT8_CHANNEL_MULTIPLE if self.activations == "uint8" else 1

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
        udfc_moments = self.method == "udfc" and (self.regression != "euclidean" or self.selection != "norm")
        return udfc_moments or self.use_bias_correction

    @property
    def uses_gptq(self) -> bool:
        """Whether weights are rounded with GPTQ where synthetic inputs exist (per-channel grids
        whose steps UDFC's own-layer s^q does not rescale afterwards)."""
        own_scale = self.quant_compensation == "own" and self.method == "udfc"
        return self.weight_rounding == "gptq" and self.granularity == "channel" and not own_scale

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
        weight_rounding="nearest",
    ),
}
