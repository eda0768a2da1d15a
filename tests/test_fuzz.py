"""Fuzz the CLI with mutated model bytes: a clean exit code and one line, never a traceback or partial output.

Two mutators: byte edits (flips, inserts, deletions, truncation: mostly unreadable protobuf) and
field edits (op types, attributes, wiring, dims, opset, dtypes: readable models that are almost
valid, which reach the checker, the channel checks and the pipeline). The CI budget is small and
derandomized (the same examples every run). A longer, random campaign:

    UDFC_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py
"""
import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.builders import BUILDERS
from tests.conftest import SHARED
from tests.graphs import conv_chain
from udfc_onnx.cli import main

EXAMPLES = int(os.environ.get("UDFC_FUZZ_EXAMPLES", "60"))
CAMPAIGN = "UDFC_FUZZ_EXAMPLES" in os.environ


def _seeds() -> dict[str, bytes]:
    seeds = {"graphs.conv_chain": conv_chain().SerializeToString()}
    for name in ("conv_chain", "conv_flatten_gemm", "residual_block", "concat_block", "depthwise_block"):
        seeds[f"builders.{name}"] = BUILDERS[name]().SerializeToString()
    resnet20 = SHARED / "models" / "cifar10" / "resnet20.onnx"
    if resnet20.exists():  # the real model when the shared assets are there
        seeds["shared.resnet20"] = resnet20.read_bytes()
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw):
    """A seed model with 1-6 byte-level edits: flips, overwrites, inserts, deletions, truncation."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    edits = []
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate", "duplicate"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x12, 0x1A, 0x22]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        else:
            size = draw(st.integers(1, 64))
            data[at:at] = data[at:at + size]
        edits.append((kind, at))
    return name, edits, bytes(data)


_OPS = ["Conv", "Relu", "Add", "Identity", "Flatten", "Gemm", "MaxPool", "GlobalAveragePool", "BatchNormalization",
        "Concat", "QuantizeLinear", "Transpose"]


@st.composite
def restructured(draw):
    """A seed model with 1-3 field-level edits that keep the protobuf readable: the checker,
    the channel checks and the pipeline see models that are almost valid."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    model = onnx.load_model_from_string(SEEDS[name])
    graph = model.graph
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["op", "attr", "rewire", "dims", "opset", "drop", "input_dim", "init_dtype"]))
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))] if graph.node else None
        if kind == "op" and node is not None:
            node.op_type = draw(st.sampled_from(_OPS))
        elif kind == "attr" and node is not None and node.attribute:
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.ints:
                attr.ints[draw(st.integers(0, len(attr.ints) - 1))] = draw(st.integers(-2, 9))
            else:
                attr.i = draw(st.integers(-2, 9))
        elif kind == "rewire" and node is not None and node.input:
            names = [i.name for i in graph.input] + [o for n in graph.node for o in n.output] + \
                    [t.name for t in graph.initializer]
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
        elif kind == "dims" and graph.initializer:
            tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            if tensor.dims:
                tensor.dims[draw(st.integers(0, len(tensor.dims) - 1))] = draw(st.integers(0, 70))
        elif kind == "opset":
            model.opset_import[0].version = draw(st.integers(7, 25))
        elif kind == "drop" and node is not None:
            graph.node.remove(node)
        elif kind == "input_dim" and graph.input:
            dims = graph.input[0].type.tensor_type.shape.dim
            if dims:
                dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.sampled_from([0, 1, 2, 5, 64, 10**6]))
        elif kind == "init_dtype" and graph.initializer:
            tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            tensor.data_type = draw(st.sampled_from([onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                                     onnx.TensorProto.INT8, onnx.TensorProto.INT64]))
        edits.append(kind)
    return name, edits, model.SerializeToString()


def _check_one(example, options):
    name, edits, data = example
    with tempfile.TemporaryDirectory(prefix="udfc-fuzz-") as tmp:
        src, out_dir = Path(tmp) / "in.onnx", Path(tmp) / "out"
        out_dir.mkdir()
        out = out_dir / "out.onnx"
        src.write_bytes(data)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main([str(src), str(out), *options])
        err = stderr.getvalue()
        context = f"seed {name}, edits {edits}: exit {code}, stderr {err!r}"
        ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "udfc_onnx" in w.filename]
        assert not ours, f"{context}; warnings {ours}"  # numpy warnings in the solver mean bad numbers got in
        assert "Traceback" not in err, context
        assert code in (0, 1, 2), context  # 3 would be an internal error: a bug the fuzzer found
        assert src.read_bytes() == data, context
        if code == 0:
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            assert sorted(os.listdir(out_dir)) in (["out.onnx"], ["out.onnx", "out.onnx.data"]), context
        else:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("udfc_onnx: error: "), context
            assert os.listdir(out_dir) == [], context
    return code


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not CAMPAIGN, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(example=mutated())
def test_mutated_models_exit_cleanly(example):
    _check_one(example, ["--prune-ratio", "0.3", "--weight-bits", "6", "--check-n", "2", "-q"])


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=not CAMPAIGN, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(example=restructured(), check_n=st.sampled_from(["0", "2"]))
def test_restructured_models_exit_cleanly(example, check_n):
    # --check-n 0 skips running the original first: the static checks alone must stop a bad model.
    _check_one(example, ["--prune-ratio", "0.3", "--weight-bits", "6", "--check-n", check_n, "-q"])


def test_seeds_themselves_compress():
    for name, data in SEEDS.items():
        assert _check_one((name, [], data), ["--prune-ratio", "0.3", "--check-n", "2", "-q"]) == 0, name


@pytest.mark.skipif(not CAMPAIGN, reason="campaign statistics only with UDFC_FUZZ_EXAMPLES")
def test_campaign_outcomes(capsys):
    """With UDFC_FUZZ_EXAMPLES set: run that many examples and print how each exit code occurred."""
    counts: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(example=mutated())
    def run(example):
        code = _check_one(example, ["--prune-ratio", "0.3", "--weight-bits", "6", "--check-n", "2", "-q"])
        counts[code] = counts.get(code, 0) + 1

    run()
    structured: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(example=restructured(), check_n=st.sampled_from(["0", "2"]))
    def run_structured(example, check_n):
        code = _check_one(example, ["--prune-ratio", "0.3", "--weight-bits", "6", "--check-n", check_n, "-q"])
        structured[code] = structured.get(code, 0) + 1

    run_structured()
    with capsys.disabled():
        print(f"\nfuzz campaign, byte edits: {sum(counts.values())} examples, exit codes {dict(sorted(counts.items()))}")
        print(f"fuzz campaign, field edits: {sum(structured.values())} examples, exit codes {dict(sorted(structured.items()))}")
