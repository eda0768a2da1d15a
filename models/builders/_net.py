"""Eager graph builder: emits ONNX nodes and runs them in NumPy at the same time.

Every op appended through :class:`Net` is also evaluated on a fixed
calibration batch.  That is how the BatchNormalization running statistics are
made *consistent with the data*: when a BN layer is added, its input
activations already exist in NumPy, so ``running_mean`` / ``running_var`` are
set to their per-channel batch mean / variance (O(L) instead of re-running a
partial graph per layer).  With ``with_bn=False`` the same BN parameters are
drawn and then folded into the producing Conv/Gemm, so both variants compute
the same function and consume the random stream identically.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BN_EPSILON",
    "MIN_OPSET",
    "MAX_OPSET",
    "Net",
    "T",
    "calibration_batch",
    "count_params",
    "single_thread_blas",
]

#: Epsilon written into every BatchNormalization node (PyTorch's default).
BN_EPSILON = 1e-5
#: Lowest opset supported: from 11 Clip takes min/max as inputs and Gemm's C
#: (bias) is optional, which the bias-free Gemm before a 1-D BN relies on.
MIN_OPSET = 11
#: Highest opset accepted (what the installed ``onnx`` knows; ORT may lag).
MAX_OPSET = onnx.defs.onnx_opset_version()
# Floor for a running variance: a channel that is exactly constant on the
# calibration batch (e.g. depthwise conv of a dead ReLU channel) would get var 0.
_VAR_FLOOR = 1e-6
_LEAKY_ALPHA = 0.1


def calibration_batch(channels: int, size: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """Return the fixed random batch used to calibrate BN statistics.

    Parameters
    ----------
    channels : int
        Input channels.
    size : int
        Spatial size (square images ``size x size``).
    n : int, optional
        Number of images.
    seed : int, optional
        The builder's ``seed``.  A separate stream from the weights is used so
        that changing ``n`` never changes the weights.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(n, channels, size, size)``, i.i.d. N(0, 1).
    """
    rng = np.random.default_rng([seed, 0xCA1B])
    return rng.standard_normal((n, channels, size, size), dtype=np.float32)


def count_params(model: onnx.ModelProto) -> int:
    """Total number of scalars stored in the model's initializers.

    This counts BN running statistics too (they are initializers in ONNX), so
    it is slightly above PyTorch's ``parameters()`` count.
    """
    total = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n
    return total


# --------------------------------------------------------------------------
# BLAS threading
# --------------------------------------------------------------------------
_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads")
_blas_cache: list | None = None


def _openblas_handles() -> list:
    """(setter, getter) pairs of the OpenBLAS libraries loaded in this process."""
    global _blas_cache
    if _blas_cache is None:
        _blas_cache = []
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                paths = {ln.split()[-1] for ln in maps if "openblas" in ln.lower()}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)
                for setter in _BLAS_SETTERS:
                    getter = setter.replace("set_num", "get_num")
                    if hasattr(lib, setter) and hasattr(lib, getter):
                        _blas_cache.append((getattr(lib, setter), getattr(lib, getter)))
                        break
        except Exception:  # not Linux / no OpenBLAS: leave threading alone
            _blas_cache = []
    return _blas_cache


def single_thread_blas(fn):
    """Run ``fn`` with OpenBLAS limited to one thread (restored afterwards).

    Why: calibration does many skinny GEMMs (M = batch*H*W, K and N = a few
    channels).  Multi-threaded OpenBLAS on such shapes is up to 10x *slower*
    than one thread on a busy 2-core machine.  The setting is process-global
    while a builder runs; without a detectable OpenBLAS this is a no-op.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        handles = _openblas_handles()
        saved = [get() for _, get in handles]
        for set_, _ in handles:
            set_(1)
        try:
            return fn(*args, **kwargs)
        finally:
            for (set_, _), n in zip(handles, saved):
                set_(n)

    return wrapper


# --------------------------------------------------------------------------
# NumPy reference kernels (NCHW, float32).  Only what the builders use.
# --------------------------------------------------------------------------
def _out_size(size: int, k: int, s: int, p: int) -> int:
    out = (size + 2 * p - k) // s + 1
    if out < 1:
        raise ValueError(f"input too small: spatial size {size} with kernel {k}, stride {s}, pad {p}")
    return out


def _conv2d(x, w, b, stride, pad, groups):
    n, c, h, wd = x.shape
    cout, cg, kh, kw = w.shape
    ho, wo = _out_size(h, kh, stride, pad), _out_size(wd, kw, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    hs, ws = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    if groups == 1:
        # Sum of kh*kw GEMMs over shifted NHWC windows: no big im2col buffer.
        xh = np.ascontiguousarray(xp.transpose(0, 2, 3, 1))
        wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (kh, kw, C, Cout): BLAS-friendly
        out = np.zeros((n * ho * wo, cout), np.float32)
        for i in range(kh):
            for j in range(kw):
                patch = xh[:, i : i + hs : stride, j : j + ws : stride, :].reshape(-1, c)
                out += patch @ wt[i, j]
        out = out.reshape(n, ho, wo, cout).transpose(0, 3, 1, 2)
    elif groups == c == cout and cg == 1:
        # Depthwise: per-channel multiply-accumulate of shifted windows.
        out = np.zeros((n, cout, ho, wo), np.float32)
        for i in range(kh):
            for j in range(kw):
                out += xp[:, :, i : i + hs : stride, j : j + ws : stride] * w[None, :, 0, i, j, None, None]
    else:
        ci, co = c // groups, cout // groups
        out = np.concatenate(
            [
                _conv2d(x[:, g * ci : (g + 1) * ci], w[g * co : (g + 1) * co], None, stride, pad, 1)
                for g in range(groups)
            ],
            axis=1,
        )
    if b is not None:
        out = out + b[None, :, None, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def _pool2d(x, k, stride, pad, mode):
    n, c, h, wd = x.shape
    ho, wo = _out_size(h, k, stride, pad), _out_size(wd, k, stride, pad)
    fill = -np.inf if mode == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill) if pad else x
    hs, ws = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    out = None
    for i in range(k):
        for j in range(k):
            win = xp[:, :, i : i + hs : stride, j : j + ws : stride]
            if out is None:
                out = win.copy()
            elif mode == "max":
                np.maximum(out, win, out=out)
            else:
                out += win
    if mode == "avg":
        out /= k * k  # builders only use unpadded average pooling
    return out.astype(np.float32)


# --------------------------------------------------------------------------
# The eager builder
# --------------------------------------------------------------------------
@dataclass
class T:
    """Handle of a graph tensor together with its calibration activations."""

    name: str
    value: np.ndarray
    producer: int | None = None  # index into Net.nodes; None for graph inputs
    # Set when a BN was folded into this tensor's producer: the tensor name now
    # carries the *normalized* values, so this pre-BN handle must not be reused.
    stale: bool = False


class Net:
    """Accumulates ONNX nodes + initializers while evaluating them in NumPy.

    Parameters
    ----------
    opset : int
        Default-domain opset of the model.
    seed : int
        Seed of the weight stream (``numpy.random.default_rng(seed)``).
    with_bn : bool
        If False, every :meth:`bn` that directly follows a bias-free Conv/Gemm
        with no other consumer is folded into it.  Other BNs (pre-activation)
        are kept as BatchNormalization nodes.
    dead_fraction : float
        Fraction of channels per BN layer whose gamma is near zero.
    """

    def __init__(self, *, opset: int, seed: int, with_bn: bool, dead_fraction: float = 0.05):
        if not (MIN_OPSET <= int(opset) <= MAX_OPSET):
            raise ValueError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
        if not 0.0 <= dead_fraction < 1.0:
            raise ValueError(f"dead_fraction must be in [0, 1), got {dead_fraction}")
        self.opset = int(opset)
        self.rng = np.random.default_rng(seed)
        self.fold = not with_bn
        self.dead_fraction = dead_fraction
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self._uses: dict[str, int] = {}
        self._names: set[str] = set()
        self._input: onnx.ValueInfoProto | None = None

    # ---------------------------------------------------------------- utils
    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def _init(self, name: str, array: np.ndarray) -> str:
        assert name not in self.inits, name
        self.inits[name] = np.ascontiguousarray(array, dtype=np.float32)
        return name

    def _emit(self, op: str, inputs: list[T | str], name: str, value: np.ndarray,
              out_name: str | None = None, **attrs) -> T:
        names = []
        for i in inputs:
            if isinstance(i, T):
                if i.stale:
                    raise RuntimeError(f"tensor {i.name!r} was consumed by a folded BN; "
                                       "pass foldable=False to that bn()")
                self._uses[i.name] = self._uses.get(i.name, 0) + 1
                names.append(i.name)
            else:
                names.append(i)
        out = out_name or name
        self.nodes.append(helper.make_node(op, names, [out], name=name, **attrs))
        return T(out, value, len(self.nodes) - 1)

    # --------------------------------------------------------------- inputs
    def input(self, x: np.ndarray, *, dynamic_spatial: bool = False) -> T:
        """Declare graph input ``input`` (batch dim ``N``) fed with ``x`` for calibration."""
        dims: list = ["N", *x.shape[1:]]
        if dynamic_spatial:
            dims[2:] = ["H", "W"]
        self._input = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
        self._names.add("input")
        return T("input", x.astype(np.float32), None)

    # ---------------------------------------------------------- parametric
    def conv(self, x: T, cout: int, k: int, *, stride: int = 1, pad: int | None = None,
             groups: int = 1, name: str) -> T:
        """Bias-free Conv with He-normal weights (bias appears only by folding a BN)."""
        cin = x.value.shape[1]
        if cin % groups or cout % groups:
            raise ValueError(f"{name}: channels {cin}->{cout} not divisible by groups={groups}")
        pad = k // 2 if pad is None else pad
        fan_in = cin // groups * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)
        name = self._unique(name)
        wname = self._init(f"{name}.weight", w)
        val = _conv2d(x.value, self.inits[wname], None, stride, pad, groups)
        return self._emit("Conv", [x, wname], name, val, kernel_shape=[k, k], strides=[stride, stride],
                          pads=[pad] * 4, dilations=[1, 1], group=groups)

    def gemm(self, x: T, out_features: int, *, bias: bool = True, init: str = "he",
             name: str, out_name: str | None = None) -> T:
        """Gemm ``y = x @ W.T + b`` (PyTorch Linear layout, ``transB=1``).

        ``init='he'`` for hidden layers feeding ReLU, ``'lecun'`` (std
        ``1/sqrt(fan_in)``) for classifiers, so logits stay O(1).
        """
        fin = x.value.shape[1]
        std = np.sqrt((2.0 if init == "he" else 1.0) / fin)
        w = self.rng.standard_normal((out_features, fin)) * std
        name = self._unique(name)
        wname = self._init(f"{name}.weight", w)
        ins: list = [x, wname]
        val = x.value @ self.inits[wname].T
        if bias:
            b = self.rng.uniform(-1.0, 1.0, out_features) / np.sqrt(fin)
            ins.append(self._init(f"{name}.bias", b))
            val = val + self.inits[f"{name}.bias"]
        return self._emit("Gemm", ins, name, val.astype(np.float32), out_name=out_name, transB=1)

    def bn(self, x: T, *, name: str, foldable: bool = True) -> T:
        """BatchNormalization calibrated on ``x``'s activations.

        With ``with_bn=False`` and ``foldable`` it is folded into ``x``'s
        producer when that is a bias-free Conv/Gemm not yet consumed elsewhere;
        ``x`` is then marked stale.  Pass ``foldable=False`` for pre-activation
        BNs whose input is also used un-normalized later (DenseNet).
        """
        v = x.value.astype(np.float64)
        axes = (0,) if v.ndim == 2 else (0, 2, 3)
        mean = v.mean(axis=axes)
        var = np.maximum(v.var(axis=axes), _VAR_FLOOR)
        c = mean.shape[0]
        gamma = self.rng.uniform(0.5, 1.5, c)
        n_dead = int(round(self.dead_fraction * c))
        if n_dead:
            dead = self.rng.choice(c, n_dead, replace=False)
            # Realistic "dead" channels: |gamma| < 1e-3, random sign.
            gamma[dead] = self.rng.uniform(1e-5, 5e-4, n_dead) * self.rng.choice([-1.0, 1.0], n_dead)
        beta = self.rng.normal(0.0, 0.2, c)
        scale = gamma / np.sqrt(var + BN_EPSILON)
        shift = beta - mean * scale
        bshape = (1, c) if v.ndim == 2 else (1, c, 1, 1)
        val = (v * scale.reshape(bshape) + shift.reshape(bshape)).astype(np.float32)

        node = self.nodes[x.producer] if x.producer is not None else None
        if (self.fold and foldable and node is not None and node.op_type in ("Conv", "Gemm")
                and len(node.input) == 2 and self._uses.get(x.name, 0) == 0):
            # Fold at "export": W' = W * gamma/sqrt(var+eps), b = beta - mean*gamma/sqrt(var+eps).
            wname = node.input[1]
            w = self.inits[wname].astype(np.float64)
            self.inits[wname] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            bname = self._init(wname[: -len(".weight")] + ".bias", shift)
            node.input.append(bname)
            x.stale = True
            return T(x.name, val, x.producer)

        name = self._unique(name)
        ins = [x] + [self._init(f"{name}.{p}", a) for p, a in
                     (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var))]
        return self._emit("BatchNormalization", ins, name, val, epsilon=BN_EPSILON)

    # --------------------------------------------------------- activations
    def relu(self, x: T, *, name: str) -> T:
        return self._emit("Relu", [x], self._unique(name), np.maximum(x.value, 0))

    def relu6(self, x: T, *, name: str) -> T:
        """ReLU6 as ``Clip(x, min, max)`` with scalar initializer bounds (opset >= 11 form)."""
        val = np.clip(x.value, 0.0, 6.0)
        name = self._unique(name)
        if "relu6.min" not in self.inits:  # shared scalar bounds
            self._init("relu6.min", np.array(0.0))
            self._init("relu6.max", np.array(6.0))
        return self._emit("Clip", [x, "relu6.min", "relu6.max"], name, val)

    def leaky_relu(self, x: T, *, name: str) -> T:
        val = np.where(x.value > 0, x.value, _LEAKY_ALPHA * x.value).astype(np.float32)
        return self._emit("LeakyRelu", [x], self._unique(name), val, alpha=_LEAKY_ALPHA)

    def act(self, x: T, kind: str, *, name: str) -> T:
        """Dispatch ``kind`` in {'relu', 'relu6', 'leakyrelu', 'none'}."""
        if kind == "relu":
            return self.relu(x, name=name)
        if kind == "relu6":
            return self.relu6(x, name=name)
        if kind == "leakyrelu":
            return self.leaky_relu(x, name=name)
        if kind == "none":
            return x
        raise ValueError(f"unknown activation {kind!r}; use relu, relu6, leakyrelu or none")

    # ------------------------------------------------------ shape / pools
    def maxpool(self, x: T, k: int, stride: int, pad: int = 0, *, name: str) -> T:
        val = _pool2d(x.value, k, stride, pad, "max")
        return self._emit("MaxPool", [x], self._unique(name), val, kernel_shape=[k, k],
                          strides=[stride, stride], pads=[pad] * 4)

    def avgpool(self, x: T, k: int, stride: int, *, name: str) -> T:
        val = _pool2d(x.value, k, stride, 0, "avg")
        return self._emit("AveragePool", [x], self._unique(name), val, kernel_shape=[k, k],
                          strides=[stride, stride])

    def gap(self, x: T, *, name: str) -> T:
        val = x.value.mean(axis=(2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
        return self._emit("GlobalAveragePool", [x], self._unique(name), val)

    def flatten(self, x: T, *, name: str) -> T:
        return self._emit("Flatten", [x], self._unique(name), x.value.reshape(x.value.shape[0], -1), axis=1)

    def add(self, a: T, b: T, *, name: str) -> T:
        return self._emit("Add", [a, b], self._unique(name), a.value + b.value)

    def concat(self, xs: list[T], *, name: str) -> T:
        val = np.concatenate([x.value for x in xs], axis=1)
        return self._emit("Concat", list(xs), self._unique(name), val, axis=1)

    # ------------------------------------------------------------ finalize
    def model(self, out: T, *, graph_name: str, doc: str = "",
              metadata: dict | None = None) -> onnx.ModelProto:
        """Assemble the ModelProto; ``out`` must be named ``logits``."""
        assert out.name == "logits" and self._input is not None
        n_out = out.value.shape[1]
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [self._input],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
            initializer=[numpy_helper.from_array(a, name) for name, a in self.inits.items()],
        )
        opsets = [helper.make_opsetid("", self.opset)]
        m = helper.make_model(graph, opset_imports=opsets, producer_name="udfc-onnx-models",
                              doc_string=doc)
        # The lowest IR version that carries this opset: what ORT reads everywhere.
        m.ir_version = helper.find_min_ir_version_for(opsets)
        if metadata:
            helper.set_model_props(m, {k: str(v) for k, v in metadata.items()})
        return m
