"""Collect before/after numbers of a model and render them (collecting and rendering are separate).

Besides the single-run table this module renders the dry-run plan, the per-unit decisions (``-v``),
the batch summary and the progress line: with ``cli.py`` it is the only module that prints.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .graph import GraphView, attribute
from .load import shape_skeleton

__all__ = ["ModelInfo", "Report", "DryRun", "Progress", "render_table", "render_units", "render_dry_run",
           "render_batch_table"]

def _dims(shape) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in shape.dim]
    return dims if all(d > 0 for d in dims) else None


def _fixed_shapes(model: onnx.ModelProto, spatial: int, input_shapes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Shapes of every tensor with batch 1, ``input_shapes`` applied and other unknown dims set to ``spatial``."""
    m = shape_skeleton(model)
    inits = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        given = (input_shapes or {}).get(inp.name)
        dims = inp.type.tensor_type.shape.dim
        if given is not None and len(given) == len(dims):
            for i, d in enumerate(dims):
                d.Clear()
                d.dim_value = 1 if i == 0 else given[i]  # MACs are per sample
            continue
        for i, d in enumerate(dims):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = 1 if i == 0 else spatial
    shapes = _inferred(m)
    for _ in range(4):  # onnx's inference stops at ops such as Cast -> Pad; fill in and infer again
        found = _propagate(m, shapes)
        if not found:
            break
        del m.graph.value_info[:]
        m.graph.value_info.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)
                                  for name, dims in found.items())
        shapes = {**found, **_inferred(m)}
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


_SAME_SHAPE_OPS = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                   "Selu", "Softplus", "Mish", "Gelu", "Erf", "BatchNormalization", "Identity", "Dropout", "Neg",
                   "Abs", "Exp", "Sqrt", "Softmax", "LRN", "InstanceNormalization", "Cast"}
_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where"}


def _window(node: onnx.NodeProto, spatial: list[int], kernel: list[int]) -> list[int] | None:
    """Output spatial dims of a Conv or pooling window (ONNX formulas, auto_pad and ceil_mode included)."""
    n = len(spatial)
    strides = list(attribute(node, "strides", [1] * n))
    dilations = list(attribute(node, "dilations", [1] * n))
    pads = list(attribute(node, "pads", [0] * 2 * n))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    rounding = np.ceil if attribute(node, "ceil_mode", 0) else np.floor
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n or len(kernel) != n:
        return None
    out = []
    for i in range(n):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-spatial[i] // strides[i]))
            continue
        extent = dilations[i] * (kernel[i] - 1) + 1
        total = spatial[i] + (0 if auto_pad == "VALID" else pads[i] + pads[i + n])
        out.append(int(rounding((total - extent) / strides[i])) + 1)
    return out if all(d > 0 for d in out) else None


def _propagate(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Output shapes of common CNN ops whose inputs have known shapes; returns only the new ones."""
    known = dict(shapes)
    for t in model.graph.initializer:
        known.setdefault(t.name, list(t.dims))
    found = {}
    for node in model.graph.node:
        if not node.output or node.output[0] in known:
            continue
        ins = [known.get(i) for i in node.input]
        x = ins[0] if ins else None
        out = None
        if node.op_type in _SAME_SHAPE_OPS and x:
            out = x
        elif node.op_type in _BROADCAST_OPS and any(ins):
            try:
                out = list(np.broadcast_shapes(*[tuple(s) for s in ins if s]))
            except ValueError:
                out = None
        elif node.op_type == "Conv" and x and len(ins) > 1 and ins[1]:
            spatial = _window(node, x[2:], list(ins[1][2:]))
            out = [x[0], ins[1][0]] + spatial if spatial else None
        elif node.op_type in ("MaxPool", "AveragePool", "LpPool") and x:
            spatial = _window(node, x[2:], list(attribute(node, "kernel_shape", [])))
            out = x[:2] + spatial if spatial else None
        elif node.op_type in ("GlobalAveragePool", "GlobalMaxPool") and x:
            out = x[:2] + [1] * (len(x) - 2)
        elif node.op_type == "Flatten" and x:
            axis = int(attribute(node, "axis", 1)) % max(len(x), 1)
            out = [int(np.prod(x[:axis])), int(np.prod(x[axis:]))]
        if out:
            known[node.output[0]] = found[node.output[0]] = [int(d) for d in out]
    return found


def _inferred(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes that onnx's shape inference finds ({} when it fails)."""
    try:
        m = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return {}
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = _dims(vi.type.tensor_type.shape)
        if dims:
            shapes[vi.name] = dims
    return shapes


@dataclass
class ModelInfo:
    """Size numbers of one model.

    Attributes
    ----------
    params : int
        Elements of Conv/Gemm/MatMul weights and biases (stored as float or integers) and of
        BatchNormalization scales and biases (as PyTorch counts parameters).
    macs : int
        Multiply-accumulates of Conv/Gemm/MatMul for one sample (batch 1).
    file_bytes : int
        The .onnx file plus its external data files.
    op_counts : dict of str to int
    channels : dict of str to int
        Output channels of every Conv (by node name).
    fused_convs : int or None
        Convs ORT runs as int8 kernels (QLinearConv after its optimiser); None when not measured.
    """

    params: int = 0
    macs: int = 0
    file_bytes: int = 0
    op_counts: dict = field(default_factory=dict)
    channels: dict = field(default_factory=dict)
    fused_convs: int | None = None

    @classmethod
    def collect(cls, model: onnx.ModelProto, file_bytes: int = 0, spatial: int = 32,
                input_shapes: dict[str, list[int]] | None = None) -> "ModelInfo":
        """Count params, MACs (batch 1; ``input_shapes`` or ``spatial`` for unknown dims) and ops."""
        view = GraphView(model)
        shapes = _fixed_shapes(model, spatial, input_shapes)

        def source(name: str) -> str:
            # Follow DequantizeLinear back to the stored integer tensor.
            prod = view.producer.get(name)
            return prod.input[0] if prod is not None and prod.op_type == "DequantizeLinear" else name

        params, macs, counted = 0, 0, set()
        channels = {}
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                # scale and bias are trained parameters (the running statistics are buffers): counting
                # them keeps "before" comparable with the folded "after", where they became conv biases
                for inp in node.input[1:3]:
                    if inp in view.initializers and inp not in counted:
                        counted.add(inp)
                        params += int(np.prod(view.initializers[inp].dims))
            if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
                continue
            for inp in node.input[1:]:
                src = source(inp) if inp else ""
                if src in view.initializers and src not in counted:
                    counted.add(src)
                    params += int(np.prod(view.initializers[src].dims))
            w = shapes.get(node.input[1]) or shapes.get(source(node.input[1]))
            out = shapes.get(node.output[0])
            if node.op_type == "Conv" and w:
                channels[node.name] = w[0]
                if out:
                    macs += int(np.prod(out)) * int(np.prod(w[1:]))
            elif node.op_type in ("Gemm", "MatMul") and w and len(w) == 2:
                trans_b = node.op_type == "Gemm" and attribute(node, "transB", 0)
                k, n = (w[1], w[0]) if trans_b else (w[0], w[1])
                # Unknown output (a Reshape fed by computed shapes): a Gemm sees one row per sample.
                macs += (int(np.prod(out)) if out else n) * k
        ops = Counter(n.op_type for n in model.graph.node)
        return cls(params, macs, file_bytes, dict(sorted(ops.items())), channels)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    """Everything a run did, for the table and for ``--report FILE.json``.

    ``units`` holds one decision per prunable unit (channels, kept, ratio, bits, override, method),
    ``layers`` every Conv/Gemm with its weight bits (None: float) and override.
    """

    input_path: str
    output_path: str
    before: ModelInfo
    after: ModelInfo
    config: dict
    units: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    notes: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    external_data: bool = False
    tool_version: str = ""
    fusion: dict = field(default_factory=dict)  # udfc_onnx.int8.FusionReport as a dict, plus "summary"
    timings: dict = field(default_factory=dict)  # seconds per pass, in run order
    peak_rss_mb: dict = field(default_factory=dict)  # the process's peak RSS so far after each pass (Linux)

    @property
    def channels_removed(self) -> int:
        return sum(self.before.channels.get(k, 0) - v for k, v in self.after.channels.items())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels_removed"] = self.channels_removed
        return d


@dataclass
class DryRun:
    """What a run would do (``--dry-run``): the plan, without solving or writing anything."""

    input_path: str
    output_path: str
    before: ModelInfo
    config: dict
    units: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    external_data: bool = False
    notes: list = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dry_run"] = True
        return d


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def _grid(header: tuple[str, ...], rows: list[tuple[str, ...]], align: str) -> list[str]:
    """A plain-text table; ``align`` has one '<' or '>' per column."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = (lambda r: "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)) + " |")
    return [line, fmt(header), line] + [fmt(r) for r in rows] + [line]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _opt(n) -> str:
    return "n/a" if n is None else str(n)


def render_table(report: Report) -> str:
    """onnxsim-style before/after table, plain text."""
    b, a = report.before, report.after
    rows = [("Params", _human(b.params), _human(a.params)),
            ("MACs (batch 1)", _human(b.macs), _human(a.macs)),
            ("File size", f"{b.file_bytes / 1e6:.3f} MB", f"{a.file_bytes / 1e6:.3f} MB"),
            ("int8-fused Conv (ORT)", _opt(b.fused_convs), _opt(a.fused_convs))]
    for op in sorted(set(b.op_counts) | set(a.op_counts)):
        rows.append((op, str(b.op_counts.get(op, 0)), str(a.op_counts.get(op, 0))))
    out = _grid(("", "Original", "Compressed"), rows, "<>>")
    pruned = sum(1 for u in report.units if u["kept"] < u["channels"])
    quantized = sum(1 for bits in report.layers.values() if bits.get("bits") is not None)
    out.append(f"channels removed: {report.channels_removed} in {pruned} of {len(report.units)} prunable units "
               f"({len(report.skipped)} convs left alone; `python -m udfc_onnx inspect` says why); "
               f"{quantized} of {len(report.layers)} layers with integer weights")
    v = report.validation
    if v:
        out.append(f"check: {v.get('message')}; vs original on {v.get('n_samples')} random inputs: max|diff| "
                   f"{v.get('max_abs', float('nan')):.3g} (rel {v.get('max_rel', float('nan')):.3g}), cosine "
                   f"{v.get('cosine', float('nan')):.4f}, top-1 agreement {v.get('top1_agreement', float('nan')):.2f}")
    if report.fusion:
        out.append(report.fusion["summary"])
        out += [f"warning: {w}" for w in report.fusion.get("warnings", [])]
    out.append(f"elapsed: {report.elapsed_s:.2f} s")
    return "\n".join(out)


def render_units(units: list[dict], skipped: list[dict], layers: dict, notes: list[str]) -> str:
    """Per-unit decisions, layers left alone and notes (``-v``)."""
    out = []
    if units:
        rows = [(u["producer"], f"{u['kept']}/{u['channels']}", f"{u.get('ratio', 0):.3g}",
                 _opt(layers.get(u["producer"], {}).get("bits")) if layers else "",
                 u.get("method", ""), "" if "compensated" not in u else "yes" if u["compensated"] else "no",
                u.get("regression", ""),
                 ", ".join(f"{k}={v}" for k, v in (u.get("override") or {}).items()))
                for u in units]
        # statistics: which data-free fit the unit used (synthetic-patch, synthetic-sequential, synthetic, moments, euclidean)
        out += _grid(("unit (producer)", "kept", "ratio", "bits", "method", "compensated", "statistics", "override"),
                     rows, "<>>><<<<")
    out += [f"left alone: {s['node']}: {s['reason']}" for s in skipped]
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def render_dry_run(plan: DryRun) -> str:
    """What ``--dry-run`` would do, as text."""
    b = plan.before
    removed = sum(u["channels"] - u["kept"] for u in plan.units)
    quantized = {name: v["bits"] for name, v in plan.layers.items() if v["bits"] is not None}
    out = [f"dry run: nothing written. {plan.input_path}: {_human(b.params)} params, {_human(b.macs)} MACs, "
           f"{b.file_bytes / 1e6:.3f} MB"]
    out.append(render_units(plan.units, plan.skipped, plan.layers, plan.notes))
    bits = Counter(quantized.values())
    out.append(f"would remove {removed} channels in {sum(1 for u in plan.units if u['kept'] < u['channels'])} of "
               f"{len(plan.units)} prunable units; integer weights for {len(quantized)} of {len(plan.layers)} layers"
               + (f" ({', '.join(f'{n} at {k} bits' for k, n in sorted(bits.items()))})" if bits else ""))
    if plan.output_path:
        out.append(f"would write {plan.output_path}" + (" with external data" if plan.external_data else ""))
    return "\n".join(out)


def render_batch_table(rows: list[dict]) -> str:
    """One line per model of a batch (status, sizes, MACs, time), then the totals."""
    def size(n):
        return _human(n) + "B"

    def pair(a, b, fmt):
        return "" if a is None else f"{fmt(a)} -> {fmt(b)}" if b is not None else fmt(a)
    table = [(r["name"], r["status"], pair(r.get("params_before"), r.get("params_after"), _human),
              pair(r.get("macs_before"), r.get("macs_after"), _human),
              pair(r.get("bytes_before"), r.get("bytes_after"), size), f"{r.get('seconds', 0):.1f}",
              _clip(r.get("message", ""), 90)) for r in rows]
    out = _grid(("model", "status", "params", "MACs", "file size", "s", "message"), table, "<<>>>><")
    counts = Counter(r["status"] for r in rows)
    out.append(f"{len(rows)} models: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(out)


class Progress:
    """Progress of long work on stderr.

    On a terminal it redraws one bar in place (``\\r``); when forced on elsewhere (``--progress``
    into a log) it writes one line per step. Disabled, it does nothing.

    Parameters
    ----------
    total : int
        Steps expected.
    label : str
    enabled : bool or None, default=None
        None: only when ``stream`` is a terminal.
    """

    def __init__(self, total: int, label: str, *, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else enabled
        self.total, self.label, self.done = max(total, 1), label, 0
        self.start = time.perf_counter()

    def step(self, what: str) -> None:
        """Mark the start of step ``what`` (the bar shows how many steps are already done)."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            filled = int(20 * self.done / self.total)
            text = f"\r{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} {what} {elapsed:.0f}s"
            self.stream.write(text[:120].ljust(80))
        else:
            self.stream.write(f"{self.label}: [{self.done + 1}/{self.total}] {what} ({elapsed:.1f} s)\n")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        """Clear the bar (terminal) so the report that follows starts on a clean line."""
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 80 + "\r")
            self.stream.flush()
