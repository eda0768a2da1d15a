"""Fuzz the CLI with mutated model bytes: a clean exit code and one line, never a traceback or partial output.

The CI budget is small and derandomized (the same examples every run). A longer, random campaign:

    UDFC_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py
"""
import contextlib
import io
import os
import tempfile
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


def _check_one(example, options):
    name, edits, data = example
    with tempfile.TemporaryDirectory(prefix="udfc-fuzz-") as tmp:
        src, out_dir = Path(tmp) / "in.onnx", Path(tmp) / "out"
        out_dir.mkdir()
        out = out_dir / "out.onnx"
        src.write_bytes(data)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([str(src), str(out), *options])
        err = stderr.getvalue()
        context = f"seed {name}, edits {edits}: exit {code}, stderr {err!r}"
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
    with capsys.disabled():
        print(f"\nfuzz campaign: {sum(counts.values())} examples, exit codes {dict(sorted(counts.items()))}")
