"""Reproduce the ResNet-56 block of UDFC's Table 2 and the ablations that settle the method's open points.

    python tools/reproduce_table2.py [MODEL ...] [--all-models] [--limit N] [--criteria l2 l1]
        [--ratios 0.3 0.4 0.5] [--bits float 4] [--preset NAME] [--set KEY=VALUE ...]
        [--ablation NAME ...] [--plot PNG] [--plot-ratios ...] [--out MD]

Default model: ../shared/models/cifar10/resnet56_nm.onnx (the checkpoint of the paper, 93.88 %).
Every cell compresses the model in memory with udfc_onnx and runs it in ONNX Runtime on the test
set; the table prints each accuracy with its drop from the model's own baseline, beside the paper's
numbers (columns L2 then L1, as in the paper) when the model is the paper's. ``--ablation`` runs the
named tables instead (``--ablation list`` lists them); ``--plot`` writes accuracy against pruning
ratio for prune / NM / UDFC (needs matplotlib: ``pip install -e .[tools]``).

Speed: the preprocessed test set is cached as .npy under $UDFC_CACHE (default ~/.cache/udfc-onnx)
and ORT runs batches of 1000 with the weight-only DequantizeLinear nodes folded to float at load
(``session.disable_quant_qdq``: the same numbers, about twice as fast). Use ``--limit 2000`` to explore.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from tools.common import load_dataset, normalization_for, shared_dir, shared_models  # noqa: E402
from udfc_onnx import PRESETS, CompressConfig, compress_model  # noqa: E402

PAPER_MODEL = "resnet56_nm"
# UDFC Table 2, ResNet-56 block: {(method, ratio): (L2, L1)}; prune/NM at FP32, UDFC with 4-bit weights.
PAPER_TABLE2 = {
    ("prune", 0.3): (76.95, 74.46), ("prune", 0.4): (46.44, 49.68), ("prune", 0.5): (24.34, 25.58),
    ("nm", 0.3): (85.22, 84.41), ("nm", 0.4): (76.56, 77.89), ("nm", 0.5): (56.18, 56.45),
    ("udfc", 0.3): (90.33, 90.28), ("udfc", 0.4): (86.99, 87.29), ("udfc", 0.5): (81.90, 81.60),
}
PAPER_BASELINE = 93.88
METHOD_NAMES = {"prune": "Prune", "nm": "NM", "udfc": "UDFC"}


def cache_dir() -> Path:
    return Path(os.environ.get("UDFC_CACHE", Path.home() / ".cache" / "udfc-onnx"))


def preprocessed(data: Path, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 normalised, y) of a whole npz, cached by file identity and normalisation."""
    st = data.stat()
    key = hashlib.sha1(f"{data.resolve()}|{st.st_size}|{st.st_mtime_ns}|{mean.ravel().tolist()}|{std.ravel().tolist()}"
                       .encode()).hexdigest()[:16]
    xp, yp = cache_dir() / f"{data.stem}-{key}-x.npy", cache_dir() / f"{data.stem}-{key}-y.npy"
    if xp.exists() and yp.exists():
        return np.load(xp, mmap_mode="r"), np.load(yp)
    x, y = load_dataset(data)
    xn = ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = xp.with_suffix(".tmp.npy")
    np.save(tmp, xn)
    np.save(yp, y)
    os.replace(tmp, xp)
    return xn, y


class Evaluator:
    """Top-1 accuracy of ONNX models of one family on the first ``limit`` test images."""

    def __init__(self, model_path: Path, data: Path, limit: int | None, norm: str | None, batch: int = 1000):
        mean, std = normalization_for(model_path, norm)
        x, y = preprocessed(data, mean, std)
        n = len(y) if not limit else min(limit, len(y))
        self.x, self.y, self.batch = np.ascontiguousarray(x[:n]), y[:n], batch

    def __call__(self, model: onnx.ModelProto) -> float:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        pred = np.concatenate([sess.run(None, {name: self.x[i:i + self.batch]})[0].argmax(1)
                               for i in range(0, len(self.y), self.batch)])
        return float((pred == self.y).mean() * 100)


@dataclass
class Context:
    """One model under test: its proto, evaluator, baseline and the settings every cell starts from."""

    path: Path
    model: onnx.ModelProto
    evaluate: Evaluator
    base_values: dict
    baseline: float = 0.0
    log: list = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.evaluate.y)

    def config(self, **changes) -> CompressConfig:
        values = dict(self.base_values)
        values.update(changes)
        return CompressConfig(**values)

    def accuracy(self, **changes) -> float:
        """Compress with the base settings plus ``changes`` and evaluate."""
        cfg = self.config(**changes)
        start = time.perf_counter()
        compressed = compress_model(self.model, cfg).model
        compress_s = time.perf_counter() - start
        acc = self.evaluate(compressed)
        brief = {k: v for k, v in changes.items()}
        print(f"  {self.path.stem} {brief}: {acc:.2f} [compress {compress_s:.1f}s, total {time.perf_counter() - start:.0f}s]",
              file=sys.stderr, flush=True)
        return acc

    def cell(self, acc: float) -> str:
        return f"{acc:.2f} ({acc - self.baseline:+.2f})"


def parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)


def bits_value(b: str):
    return None if b == "float" else int(b)


def bits_label(b) -> str:
    return "float" if b in (None, "float") else f"{b}-bit"


# ----------------------------------------------------------------------------------------- Table 2

def table2(ctx: Context, methods, ratios, criteria, bits_list) -> str:
    paper = ctx.path.stem == PAPER_MODEL
    results = {}
    for method in methods:
        for ratio in ratios:
            for bits in bits_list:
                for crit in criteria:
                    results[method, ratio, bits, crit] = ctx.accuracy(method=method, prune_ratio=ratio,
                                                                      weight_bits=bits_value(bits), criterion=crit)
    head = ["method", "ratio"]
    if paper:
        head += [f"paper {c.upper()}" for c in criteria]
    head += [f"{bits_label(b)} {c.upper()}" for b in bits_list for c in criteria]
    lines = [f"**{ctx.path.stem}**: baseline {ctx.baseline:.2f} % on {ctx.images} images"
             + (f" (paper {PAPER_BASELINE}); paper: Prune/NM FP32, UDFC 4-bit weights" if paper else ""),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        for ratio in ratios:
            row = [METHOD_NAMES.get(method, method), f"{ratio:.0%}"]
            if paper:
                ref = PAPER_TABLE2.get((method, round(ratio, 2)))
                for c in criteria:
                    row.append("—" if ref is None else f"{ref[0 if c == 'l2' else 1]:.2f} ({ref[0 if c == 'l2' else 1] - PAPER_BASELINE:+.2f})")
            row += [ctx.cell(results[method, ratio, b, c]) for b in bits_list for c in criteria]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- distilled inputs

def memoize_distillation() -> None:
    """Reuse distilled inputs across cells of one process.

    They depend on the folded model and the distillation settings only, not on the ratio, the
    criterion or the bits, and cost most of a distilled cell's time; a cell that reuses them
    prints a note, and its compress time leaves the distillation out.
    """
    import hashlib as _hashlib

    from udfc_onnx import synthetic

    compute = synthetic.distill_inputs
    cache = {}

    def cached(folded, stats, samples, **kwargs):
        key = (_hashlib.sha1(folded.SerializeToString()).hexdigest(), samples, tuple(sorted(kwargs.items())))
        if key not in cache:
            start = time.perf_counter()
            cache[key] = compute(folded, stats, samples, **kwargs)
            result = cache[key]
            print(f"  distilled {samples} images {kwargs}: loss {result.loss_start:.3g} -> {result.loss_end:.3g} "
                  f"[{time.perf_counter() - start:.1f}s]", file=sys.stderr, flush=True)
        else:
            print(f"  distilled inputs reused {kwargs}", file=sys.stderr, flush=True)
        return cache[key]

    synthetic.distill_inputs = cached


# ----------------------------------------------------------------------------------------- ablations

def _grid(ctx: Context, title: str, rows: list[tuple[str, dict]], cols: list[tuple[str, dict]], note: str = "") -> str:
    """Markdown table: one row per setting, one column per (ratio, bits, ...) condition."""
    lines = [f"**{title}** ({ctx.path.stem}, baseline {ctx.baseline:.2f} % on {ctx.images} images)"
             + (f"\n\n{note}" if note else ""), "",
             "| setting | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, changes in rows:
        cells = [ctx.cell(ctx.accuracy(**{**cc, **changes})) for _, cc in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_cols(ratios, bits="float", **extra) -> list[tuple[str, dict]]:
    return [(f"{r:.0%} {bits_label(bits)}", dict(prune_ratio=r, weight_bits=bits_value(bits), **extra)) for r in ratios]


PAPER = dict(PRESETS["paper"])


def ablation_leads(ctx, args):
    """Every lead of the issue, one at a time from the paper's reading, at each ratio (L1)."""
    udfc = dict(method="udfc")
    rows = [
        ("prune (no compensation)", dict(method="prune")),
        ("NM, published code ratio", dict(method="nm")),
        ("NM, derived ratio a_j/a_i", dict(method="nm", nm_ratio="derived")),
        ("UDFC paper: Euclidean LS, alpha1 0.01", {**PAPER, **udfc}),
        ("+ mean-residual bias transfer", {**PAPER, **udfc, "bias_transfer": True}),
        ("+ input-moment regression", {**PAPER, **udfc, "bias_transfer": True, "regression": "moments"}),
        ("+ greedy selection (= defaults before synthetic, float part)",
         {**PAPER, **udfc, "bias_transfer": True, "regression": "moments", "selection": "greedy"}),
        ("moment defaults (regression moments)", dict(udfc, regression="moments")),
        ("defaults (BN-matched synthetic, sequential)", dict(udfc)),
    ]
    cols = _ratio_cols(args.ratios, "float") + _ratio_cols(args.ratios, "4")
    return _grid(ctx, "Leads: what closes the gap (L1)", rows, cols,
                 "The paper preset quantizes asymmetric min/max with s^q in the consumer; later rows change one thing each.")


def ablation_alpha1(ctx, args):
    rows = [(f"alpha1 = {a:g}", dict(PAPER, alpha1=a)) for a in (0, 1e-3, 5e-3, 0.01, 0.02, 0.04, 0.1)]
    rows += [(f"alpha1 = {a:g}, bias transfer", dict(PAPER, alpha1=a, bias_transfer=True)) for a in (0, 0.01, 0.04)]
    return _grid(ctx, "alpha1 sweep (paper reading: Euclidean LS, norm selection; Fig. 3 left analogue)",
                 rows, _ratio_cols(args.ratios, "float") + _ratio_cols([0.5], "4"))


def ablation_alpha2(ctx, args):
    rows = [(f"alpha2 = {a:g}", dict(PAPER, alpha2=a)) for a in (0, 1e-3, 4e-3, 8e-3, 0.016, 0.04, 0.1)]
    rows.append(("no quant compensation", dict(PAPER, quant_compensation="none")))
    cols = [(f"{b}-bit, ratio 0", dict(prune_ratio=0.0, weight_bits=b)) for b in (2, 3)]
    cols += [("4-bit, ratio 50%", dict(prune_ratio=0.5, weight_bits=4))]
    return _grid(ctx, "alpha2 sweep (paper reading; s^q in the consumer; Fig. 3 right analogue: 2-bit)", rows, cols)


def ablation_bias_units(ctx, args):
    rows = [(f"{u}-units, alpha1 {a:g}", dict(PAPER, bias_units=u, alpha1=a)) for u in ("e", "b") for a in (0.01, 0.04)]
    note = ("e-units with raw filters and b-units with folded filters are the same loss up to a_j^2 (identical "
            "coefficients; the solver uses the folded form). 'b' here is the genuinely different reading: raw "
            "filters with the folded bias b, i.e. alpha1 scaled by a_j^2 per pruned channel.")
    return _grid(ctx, "Bias term in e- or b-units (paper reading)", rows, _ratio_cols(args.ratios, "float"), note)


def ablation_bias_transfer(ctx, args):
    rows = []
    for reg in ("euclidean", "moments"):
        for bt in (False, True):
            rows.append((f"{reg}, bias transfer {'on' if bt else 'off'}",
                         dict(regression=reg, selection="norm" if reg == "euclidean" else "greedy", bias_transfer=bt)))
    return _grid(ctx, "Mean-residual bias transfer [EXT]", rows, _ratio_cols(args.ratios, "float"))


def ablation_ridge(ctx, args):
    rows = [(f"ridge {r:g}", dict(ridge=r)) for r in (0, 1e-3, 1e-2, 0.1)]
    rows += [(f"paper Euclidean + transfer, ridge {r:g}", dict(PAPER, bias_transfer=True, ridge=r)) for r in (0, 0.1, 0.3)]
    return _grid(ctx, "Ridge of the pruning regression [EXT]", rows, _ratio_cols(args.ratios, "float"))


def ablation_regress_quantized(ctx, args):
    rows = [(f"{name}, regress on {'quantized' if q else 'float'} kept filters", dict(base, regress_on_quantized=q))
            for name, base in (("defaults", {}), ("paper", PAPER)) for q in (True, False)]
    cols = _ratio_cols(args.ratios, "4") + _ratio_cols([0.5], "3")
    return _grid(ctx, "Joint regression on quantized vs float kept filters (spec 4 a/b)", rows, cols)


def ablation_quant_scale(ctx, args):
    rows = [(f"s^q {where}", dict(quant_compensation=where)) for where in ("own", "next", "none")]
    rows += [(f"paper, s^q {where}", dict(PAPER, quant_compensation=where)) for where in ("own", "next", "none")]
    cols = [(f"{b}-bit, ratio 0", dict(prune_ratio=0.0, weight_bits=b)) for b in (2, 3, 4)]
    cols += [(f"4-bit, {r:.0%}", dict(prune_ratio=r, weight_bits=4)) for r in (0.3, 0.5)]
    return _grid(ctx, "Where UDFC's quantization scale s^q goes: own dequant scale [EXT] / consumer (paper) / nowhere",
                 rows, cols)


def ablation_dfq(ctx, args):
    rows = [("plain", dict(bias_correction=False, cross_layer_equalization=False, quant_compensation="none")),
            ("DFQ bias correction", dict(bias_correction=True, cross_layer_equalization=False, quant_compensation="none")),
            ("cross-layer equalization", dict(bias_correction=False, cross_layer_equalization=True, quant_compensation="none")),
            ("CLE + bias correction", dict(bias_correction=True, cross_layer_equalization=True, quant_compensation="none")),
            ("defaults", {})]
    cols = []
    for gran in ("channel", "tensor"):
        cols += [(f"{b}-bit per-{gran}", dict(prune_ratio=0.0, weight_bits=b, granularity=gran)) for b in (4, 6, 8)]
    cols += [("4-bit per-channel, 50%", dict(prune_ratio=0.5, weight_bits=4))]
    return _grid(ctx, "DFQ: data-free bias correction and cross-layer equalization (s^q none; grid by width)", rows,
                 cols)


def ablation_granularity(ctx, args):
    rows = [(f"per-{g}, {'symmetric' if s else 'asymmetric'}", dict(granularity=g, symmetric=s))
            for g in ("channel", "tensor") for s in (True, False)]
    cols = [(f"{b}-bit, ratio 0", dict(prune_ratio=0.0, weight_bits=b)) for b in (4, 6, 8)]
    cols += [("4-bit, 50%", dict(prune_ratio=0.5, weight_bits=4))]
    return _grid(ctx, "Per-tensor vs per-channel weight scales (defaults otherwise)", rows, cols)


def ablation_bits(ctx, args):
    settings = [
        ("symmetric, plain", dict(symmetric=True, bias_correction=False, quant_compensation="none")),
        ("symmetric + bias correction", dict(symmetric=True, bias_correction=True, quant_compensation="none")),
        ("symmetric + bias correction + s^q own", dict(symmetric=True, bias_correction=True, quant_compensation="own")),
        ("asymmetric, plain", dict(symmetric=False, bias_correction=False, quant_compensation="none")),
        ("asymmetric + bias correction", dict(symmetric=False, bias_correction=True, quant_compensation="none")),
        ("asymmetric + bias correction + s^q own", dict(symmetric=False, bias_correction=True, quant_compensation="own")),
        ("paper (asymmetric, s^q next, alpha2 0.008)", dict(PAPER)),
        ("defaults", {}),
    ]
    bits = args.bits_range
    cols = [(f"{b}-bit", dict(prune_ratio=0.0, weight_bits=b)) for b in bits]
    return _grid(ctx, "Weight bits with and without compensation, ratio 0 (per-channel)", settings, cols)


def ablation_selection(ctx, args):
    rows = [(f"{sel} selection, {reg} regression", dict(selection=sel, regression=reg))
            for sel in ("norm", "greedy") for reg in ("euclidean", "moments")]
    cols = _ratio_cols(args.ratios, "float")
    return _grid(ctx, "Kept set by norm vs by compensated reconstruction error [EXT] (bias transfer on)", rows, cols)


def ablation_synthetic(ctx, args):
    """Which data-free statistics the UDFC regression and greedy selection use (L1, defaults otherwise)."""
    rows = [
        ("analytic moments (pre-activation, propagated input moments)", dict(regression="moments")),
        ("synthetic, per layer (original network)", dict(regression="synthetic", synthetic_fit="layer")),
        ("synthetic, sequential, greedy selection", dict(regression="synthetic", selection="greedy")),
        ("synthetic, sequential, greedy, 32 samples", dict(regression="synthetic", selection="greedy", synthetic_samples=32)),
        ("synthetic, sequential, greedy, 256 samples", dict(regression="synthetic", selection="greedy", synthetic_samples=256)),
        ("synthetic, sequential, greedy, seed 1", dict(regression="synthetic", selection="greedy", seed=1)),
        ("synthetic, sequential, norm selection (= defaults)", dict(regression="synthetic", selection="norm")),
    ]
    cols = _ratio_cols(args.ratios, "4")
    return _grid(ctx, "Data-free statistics of the regression: analytic moments vs BN-matched synthetic activations (L1)",
                 rows, cols, "Synthetic: Gaussian noise through the model with every folded BN renormalised to its "
                 "gamma/beta over the batch (udfc_onnx/synthetic.py); samples from the MAC budget unless given.")


def ablation_refit(ctx, args):
    """How the sequential fit refits a consumer and rounds the weights (L1, defaults otherwise)."""
    rows = [
        ("channel refit, nearest rounding (defaults before)", dict(consumer_refit="channel", weight_rounding="nearest")),
        ("channel refit, GPTQ rounding", dict(consumer_refit="channel", weight_rounding="gptq")),
        ("patch refit, nearest rounding", dict(consumer_refit="patch", weight_rounding="nearest")),
        ("patch refit, GPTQ rounding (= defaults)", dict(consumer_refit="patch", weight_rounding="gptq")),
    ]
    cols = _ratio_cols(args.ratios, "float") + _ratio_cols(args.ratios, "4")
    return _grid(ctx, "Consumer refit and weight rounding of the sequential synthetic fit [EXT] (L1)", rows, cols,
                 "channel: one coefficient per (original, kept) channel pair, shared by the consumer's taps; patch: "
                 "the consumer's kept input slice regressed over whole synthetic input patches onto the original "
                 "consumer's output. GPTQ: error-feedback rounding under each layer's synthetic input second moment.")


def ablation_distill(ctx, args):
    """Noise vs ZeroQ-distilled synthetic inputs, with and without the BN renormalisation (L1, 4-bit).

    With ``--distill-variants`` the step rows give way to one row per variant, e.g.
    ``distill_images=32,distill_ce=1,distill_tv=10,distill_iterations=20`` (the cheap DeepInversion setting).
    """
    rows = [("noise, BN-renormalised", dict(synthetic_inputs="noise"))]
    for iterations in args.distill_iterations if not args.distill_variants else []:
        rows += [(f"distilled {iterations} steps, BN-renormalised", dict(synthetic_inputs="distilled",
                                                                         distill_iterations=iterations)),
                 (f"distilled {iterations} steps, plain folded graph", dict(synthetic_inputs="distilled",
                                                                            distill_iterations=iterations,
                                                                            synthetic_renorm=False))]
    if not args.distill_variants:
        rows.append(("noise, plain folded graph", dict(synthetic_inputs="noise", synthetic_renorm=False)))
    for variant in args.distill_variants:  # "key=value,key=value": distilled inputs with those config fields
        changes = {k: parse_value(v) for k, v in (item.split("=", 1) for item in variant.split(","))}
        rows.append((f"distilled, {variant}", dict(synthetic_inputs="distilled", **changes)))
    cols = _ratio_cols(args.ratios, "4")
    return _grid(ctx, "Synthetic inputs: Gaussian noise vs ZeroQ-distilled images (udfc_onnx/distill.py)", rows, cols,
                 "Distilled: Adam on the input images until every BN's batch mean and deviation of its "
                 "pre-activations match its running statistics; the same images serve every cell.")


def ablation_mean_weight(ctx, args):
    rows = [(f"mean_weight {w:g}", dict(mean_weight=w, regression="moments")) for w in (1.0, 2.0, 4.0, 16.0)]
    return _grid(ctx, "Weight of the means in the moment regression [EXT] (1 = exact second moment)", rows,
                 _ratio_cols(args.ratios, "4"))


def _oracle_arrays(ctx: Context, ratio: float, fit_x: np.ndarray, sequential: bool) -> onnx.ModelProto:
    """Data-DRIVEN upper bound of UDFC's compensation family (diagnostic only, uses images).

    L1 kept sets as the paper; each pruned channel's post-ReLU activation is regressed on the kept
    ones plus a constant with real activations of ``fit_x``. ``sequential``: each unit is fitted on
    the activations of the network whose earlier units are already compressed, with the original
    network's activations as targets (every input slice of the consumer is refitted).
    """
    from onnx import helper

    from udfc_onnx.compensate import _consumer_view, _from_consumer_view
    from udfc_onnx.graph import GraphView
    from udfc_onnx.pipeline import _prepare, analyze, collect_layers
    from udfc_onnx.rewrite import apply_arrays

    cfg = CompressConfig(prune_ratio=ratio, weight_bits=None, criterion="l1")
    model = _prepare(ctx.model, cfg, [])
    folded, _, _, plan, _ = analyze(model, cfg)
    layers = collect_layers(folded)
    view = GraphView(folded)
    arrays = {}
    for layer in layers.values():
        arrays[layer.weight] = view.array(layer.weight)
        arrays[layer.bias] = (view.array(layer.bias) if layer.bias in view.initializers
                              else np.zeros(layer.out_major(arrays[layer.weight]).shape[0], np.float32))

    def activations(m, names):
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        for n in names:
            probe.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(list(names), {sess.get_inputs()[0].name: fit_x})
        return {n: np.maximum(o, 0).transpose(0, 2, 3, 1).reshape(-1, o.shape[1]).astype(np.float64)
                for n, o in zip(names, outs)}

    outputs = {up.unit.producer: view.nodes_by_name[up.unit.producer].output[0] for up in plan.units}
    original = activations(folded, list(outputs.values()))
    for up in plan.units:
        unit = up.unit
        keep = np.asarray(up.keep)
        prod, cs = layers[unit.producer], unit.consumers[0]
        cons = layers[cs.node]
        W = prod.out_major(arrays[prod.weight])
        C = W.shape[0]
        target = original[outputs[unit.producer]]
        inputs = activations(apply_arrays(folded, arrays, layers)[0], [outputs[unit.producer]])[outputs[unit.producer]] \
            if sequential else target
        X = np.hstack([inputs[:, keep], np.ones((len(inputs), 1))])
        gram = X.T @ X
        gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
        full = _consumer_view(cons, arrays[cons.weight], cs, C).astype(np.float64)
        if sequential:  # every input slice refitted to the original activations
            coef = np.linalg.solve(gram, X.T @ target)  # (t+1, C)
            new = np.einsum("ocb,kc->okb", full, coef[:-1])
            const = full.sum(2) @ coef[-1]
        else:  # pruned slices folded into kept ones, kept slices unchanged
            drop = np.setdiff1d(np.arange(C), keep)
            coef = np.linalg.solve(gram, X.T @ target[:, drop])  # (t+1, p)
            new = full[:, keep] + np.einsum("ojb,kj->okb", full[:, drop], coef[:-1])
            const = full[:, drop].sum(2) @ coef[-1]
        arrays[cons.bias] = (arrays[cons.bias] + const).astype(np.float32)
        arrays[cons.weight] = _from_consumer_view(cons, new, arrays[cons.weight]).astype(np.float32)
        arrays[prod.weight] = prod.stored(W[keep]).astype(np.float32)
        arrays[prod.bias] = arrays[prod.bias][keep]
    return apply_arrays(folded, arrays, layers)[0]


def ablation_oracle(ctx, args):
    """Data-driven ceilings of the compensation family (diagnostic: uses the last test images)."""
    x, _ = preprocessed(Path(args.data), *normalization_for(ctx.path, args.norm))
    n_fit = args.oracle_images
    fit_x = np.ascontiguousarray(x[len(x) - n_fit:])
    overlap = max(0, ctx.images - (len(x) - n_fit))
    lines = [f"**Data-driven ceilings (fitted on the last {n_fit} test images{', ' + str(overlap) + ' of them also evaluated' if overlap else ', disjoint from the evaluated ones'}; L1 kept sets)** "
             f"({ctx.path.stem}, baseline {ctx.baseline:.2f} % on {ctx.images} images)", "",
             "| setting | " + " | ".join(f"{r:.0%} float" for r in args.ratios) + " |", "|---|" + "---|" * len(args.ratios)]
    for label, seq in (("per-layer least squares on real activations", False),
                       ("sequential least squares on real activations", True)):
        cells = []
        for r in args.ratios:
            start = time.perf_counter()
            acc = ctx.evaluate(_oracle_arrays(ctx, r, fit_x, seq))
            print(f"  oracle {label} {r}: {acc:.2f} [{time.perf_counter() - start:.0f}s]", file=sys.stderr, flush=True)
            cells.append(ctx.cell(acc))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [ctx.cell(ctx.accuracy(prune_ratio=r, weight_bits=None)) for r in args.ratios]
    lines.append("| data-free defaults (for comparison) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ABLATIONS = {
    "leads": ablation_leads,
    "alpha1": ablation_alpha1,
    "alpha2": ablation_alpha2,
    "bias-units": ablation_bias_units,
    "bias-transfer": ablation_bias_transfer,
    "ridge": ablation_ridge,
    "regress-quantized": ablation_regress_quantized,
    "quant-scale": ablation_quant_scale,
    "dfq": ablation_dfq,
    "granularity": ablation_granularity,
    "bits": ablation_bits,
    "selection": ablation_selection,
    "refit": ablation_refit,
    "mean-weight": ablation_mean_weight,
    "synthetic": ablation_synthetic,
    "distill": ablation_distill,
    "oracle": ablation_oracle,
}


# ----------------------------------------------------------------------------------------- plot

def plot(ctx: Context, path: Path, ratios, criterion: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e .[tools]") from None
    series = [("prune", "Prune (float)", dict(method="prune", weight_bits=None)),
              ("nm", "NM (float)", dict(method="nm", weight_bits=None)),
              ("udfc", "UDFC (float)", dict(method="udfc", weight_bits=None)),
              ("udfc4", "UDFC (4-bit weights)", dict(method="udfc", weight_bits=4))]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    rows = []
    for key, label, changes in series:
        accs = [ctx.accuracy(prune_ratio=r, criterion=criterion, **changes) for r in ratios]
        rows.append((label, accs))
        ax.plot([r * 100 for r in ratios], accs, marker="o", label=label)
    if ctx.path.stem == PAPER_MODEL:
        col = 0 if criterion == "l2" else 1
        for method, label, marker in (("prune", "Prune", "x"), ("nm", "NM", "x"), ("udfc", "UDFC 4-bit", "x")):
            pts = sorted((r, v[col]) for (m, r), v in PAPER_TABLE2.items() if m == method)
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], linestyle=":", marker=marker, color="gray", alpha=0.7)
        ax.plot([], [], linestyle=":", marker="x", color="gray", label="paper Table 2")
    ax.axhline(ctx.baseline, color="black", linewidth=0.8, linestyle="--", label=f"baseline {ctx.baseline:.2f}")
    ax.set_xlabel("pruning ratio (%)")
    ax.set_ylabel(f"top-1 accuracy (%), {ctx.images} test images")
    ax.set_title(f"{ctx.path.stem}: data-free pruning, {criterion.upper()} criterion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    head = "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |"
    lines = [f"Plot written to {path}", "", head, "|---|" + "---|" * len(ratios)]
    lines += [f"| {label} | " + " | ".join(f"{a:.2f}" for a in accs) + " |" for label, accs in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help=f"ONNX models (default: shared/models/cifar10/{PAPER_MODEL}.onnx)")
    p.add_argument("--all-models", action="store_true", help="every model under shared/models")
    p.add_argument("--data", default=str(shared_dir() / "data" / "cifar10_test.npz"))
    p.add_argument("--norm", default=None, help="input normalisation (default: by model name)")
    p.add_argument("--limit", type=int, default=None, help="first N test images only (default: all)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.4, 0.5])
    p.add_argument("--criteria", nargs="+", choices=["l1", "l2"], default=["l2", "l1"])
    p.add_argument("--bits", nargs="+", default=["float", "4"], help="weight bits of the Table 2 cells (or 'float')")
    p.add_argument("--methods", nargs="+", choices=["prune", "nm", "udfc"], default=["prune", "nm", "udfc"])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="base settings of every cell")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field everywhere")
    p.add_argument("--ablation", nargs="+", default=None, metavar="NAME", help="ablation tables to run ('list', 'all')")
    p.add_argument("--bits-range", nargs="+", type=int, default=[2, 3, 4, 5, 6, 8], help="bits of --ablation bits")
    p.add_argument("--oracle-images", type=int, default=1000, help="images --ablation oracle fits on (the last ones)")
    p.add_argument("--distill-iterations", nargs="+", type=int, default=[50],
                   help="Adam steps of --ablation distill")
    p.add_argument("--distill-variants", nargs="+", default=[], metavar="K=V,K=V",
                   help="--ablation distill: instead of the step rows, one distilled row per variant (config fields, "
                        "e.g. distill_images=64,distill_ce=1)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write accuracy vs pruning ratio")
    p.add_argument("--plot-ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument("--plot-criterion", choices=["l1", "l2"], default="l1")
    p.add_argument("--out", default=None, metavar="MD", help="also write the markdown here")
    args = p.parse_args(argv)
    if args.ablation and "list" in args.ablation:
        for name, fn in ABLATIONS.items():
            print(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    names = list(ABLATIONS) if args.ablation and "all" in args.ablation else (args.ablation or [])
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        p.error(f"unknown ablation(s) {unknown}; known: {', '.join(ABLATIONS)}")
    paths = [Path(m) for m in args.models]
    if args.all_models:
        paths += shared_models()
    if not paths:
        paths = [shared_dir() / "models" / "cifar10" / f"{PAPER_MODEL}.onnx"]
    base = dict(PRESETS[args.preset]) if args.preset else {}
    base.update({k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    CompressConfig(**base)  # fail early on a bad --set
    memoize_distillation()
    out = []
    for path in paths:
        model = onnx.load(str(path))
        ctx = Context(path, model, Evaluator(path, Path(args.data), args.limit, args.norm), base)
        ctx.baseline = ctx.evaluate(model)
        header = (f"## {path.stem}\n\nsettings: {'preset ' + args.preset + ', ' if args.preset else ''}"
                  f"overrides {base or 'none'}; {ctx.images} images; baseline {ctx.baseline:.2f} %")
        print(header + "\n", flush=True)
        out.append(header)
        jobs = [] if names or args.plot else [lambda: table2(ctx, args.methods, args.ratios, args.criteria, args.bits)]
        jobs += [lambda name=name: ABLATIONS[name](ctx, args) for name in names]
        if args.plot:
            target = Path(args.plot) if len(paths) == 1 else Path(args.plot).with_name(f"{Path(args.plot).stem}_{path.stem}.png")
            jobs.append(lambda: plot(ctx, target, args.plot_ratios, args.plot_criterion))
        for job in jobs:  # print each table as soon as it is done
            section = job()
            print(section + "\n", flush=True)
            out.append(section)
    if args.out:
        Path(args.out).write_text("\n\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
