"""Collect before/after numbers of a model and render them (collecting and rendering are separate)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .graph import GraphView, attribute

__all__ = ["ModelInfo", "Report", "render_table"]


def _dims(shape) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in shape.dim]
    return dims if all(d > 0 for d in dims) else None


def _fixed_shapes(model: onnx.ModelProto, spatial: int) -> dict[str, list[int]]:
    """Shapes of every tensor with batch 1 and unknown spatial dims set to ``spatial``."""
    m = _without_large_initializers(model)
    inits = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = 1 if i == 0 else spatial
    del m.graph.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        return {}
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = _dims(vi.type.tensor_type.shape)
        if dims:
            shapes[vi.name] = dims
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _without_large_initializers(model: onnx.ModelProto, max_bytes: int = 4096) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape.

    Shape inference only needs their shapes (small ones, such as Reshape targets, keep their
    values), so a 100 MB model is not copied and serialised twice just to count MACs.
    """
    m = onnx.ModelProto()
    graph = model.graph
    for field_name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(m, field_name, getattr(model, field_name))
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = m.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    names = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.ByteSize() <= max_bytes:
            g.initializer.append(t)
        elif t.name not in names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


@dataclass
class ModelInfo:
    """Size numbers of one model.

    Attributes
    ----------
    params : int
        Elements of Conv/Gemm/MatMul weights and biases (stored as float or integers).
    macs : int
        Multiply-accumulates of Conv/Gemm/MatMul for one sample (batch 1).
    file_bytes : int
    op_counts : dict of str to int
    channels : dict of str to int
        Output channels of every Conv (by node name).
    """

    params: int = 0
    macs: int = 0
    file_bytes: int = 0
    op_counts: dict = field(default_factory=dict)
    channels: dict = field(default_factory=dict)

    @classmethod
    def collect(cls, model: onnx.ModelProto, file_bytes: int = 0, spatial: int = 32) -> "ModelInfo":
        view = GraphView(model)
        shapes = _fixed_shapes(model, spatial)

        def source(name: str) -> str:
            # Follow DequantizeLinear back to the stored integer tensor.
            prod = view.producer.get(name)
            return prod.input[0] if prod is not None and prod.op_type == "DequantizeLinear" else name

        params, macs, counted = 0, 0, set()
        channels = {}
        for node in model.graph.node:
            if node.op_type not in ("Conv", "Gemm", "MatMul"):
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
            elif node.op_type in ("Gemm", "MatMul") and w and out:
                k = w[1] if node.op_type == "Gemm" and attribute(node, "transB", 0) else w[0]
                macs += int(np.prod(out)) * k
        ops = Counter(n.op_type for n in model.graph.node)
        return cls(params, macs, file_bytes, dict(sorted(ops.items())), channels)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    """Everything a run did, for the table and for ``--report FILE.json``."""

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
    fusion: dict = field(default_factory=dict)  # udfc_onnx.int8.FusionReport as a dict, plus "summary"
    timings: dict = field(default_factory=dict)  # seconds per pass, in run order

    @property
    def channels_removed(self) -> int:
        return sum(self.before.channels.get(k, 0) - v for k, v in self.after.channels.items())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels_removed"] = self.channels_removed
        return d


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def render_table(report: Report) -> str:
    """onnxsim-style before/after table, plain text."""
    b, a = report.before, report.after
    rows = [("Params", _human(b.params), _human(a.params)),
            ("MACs (batch 1)", _human(b.macs), _human(a.macs)),
            ("File size", f"{b.file_bytes / 1e6:.3f} MB", f"{a.file_bytes / 1e6:.3f} MB")]
    for op in sorted(set(b.op_counts) | set(a.op_counts)):
        rows.append((op, str(b.op_counts.get(op, 0)), str(a.op_counts.get(op, 0))))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "Original")])
    w2 = max(len(r[2]) for r in rows + [("", "", "Compressed")])
    line = f"+{'-' * (w0 + 2)}+{'-' * (w1 + 2)}+{'-' * (w2 + 2)}+"
    out = [line, f"| {'':<{w0}} | {'Original':>{w1}} | {'Compressed':>{w2}} |", line]
    out += [f"| {r[0]:<{w0}} | {r[1]:>{w1}} | {r[2]:>{w2}} |" for r in rows]
    out.append(line)
    pruned = sum(1 for u in report.units if u["kept"] < u["channels"])
    v = report.validation
    out.append(f"channels removed: {report.channels_removed} in {pruned} of {len(report.units)} prunable units "
               f"({len(report.skipped)} convs left alone; `python -m udfc_onnx inspect` says why)")
    if v:
        out.append(f"check: {v.get('message')}; vs original on {v.get('n_samples')} random inputs: max|diff| "
                   f"{v.get('max_abs', float('nan')):.3g} (rel {v.get('max_rel', float('nan')):.3g}), cosine "
                   f"{v.get('cosine', float('nan')):.4f}, top-1 agreement {v.get('top1_agreement', float('nan')):.2f}")
    if report.fusion:
        out.append(report.fusion["summary"])
        out += [f"warning: {w}" for w in report.fusion.get("warnings", [])]
    out.append(f"elapsed: {report.elapsed_s:.2f} s")
    return "\n".join(out)
