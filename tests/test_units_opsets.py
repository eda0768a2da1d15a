"""Opsets 11..21, dynamic batch and spatial dims, and the command-line entry points of the group analysis."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.builders import BUILDERS
from udfc_onnx import CompressConfig, compress_model
from udfc_onnx.cli import main

SMALL = {
    "concat_block": dict(channels=8, branches=(4, 8)),
    "depthwise_block": dict(channels=8, expansion=3),
    "residual_block": dict(channels=8),
    "densenet": dict(blocks=(2,), growth=4),
    "conv_flatten_gemm": dict(),
    "mlp": dict(sizes=(3 * 8 * 8, 32, 16, 10), input_size=8),
}
DYNAMIC = {"concat_block", "depthwise_block", "residual_block", "densenet"}


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 21])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_opsets_and_dynamic_dims(name, opset):
    dynamic = name in DYNAMIC and opset != 13
    model = BUILDERS[name](opset=opset, dynamic_spatial=dynamic, **SMALL[name])
    dims = model.graph.input[0].type.tensor_type.shape.dim
    size = 24 if dynamic else dims[2].dim_value  # any size works when H, W are symbolic
    x = np.random.default_rng(1).standard_normal((3, dims[1].dim_value, size, size)).astype(np.float32)
    ref = run(model, x)
    same = compress_model(model, CompressConfig(prune_ratio=0.0, weight_bits=None)).model
    np.testing.assert_allclose(run(same, x), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    for bits in (None, 8):  # float keeps the opset; 8-bit converts opset < 13 for per-axis DequantizeLinear
        result = compress_model(model, CompressConfig(prune_ratio=0.5, weight_bits=bits))
        assert result.plan.units and all(len(u.keep) < u.unit.channels for u in result.plan.units)
        out = run(result.model, x)
        assert out.shape == ref.shape and np.all(np.isfinite(out))
        x2 = x[:1] if not dynamic else np.random.default_rng(2).standard_normal((1, x.shape[1], 40, 40)).astype(np.float32)
        assert run(result.model, x2).shape == (1, ref.shape[1])


@pytest.fixture
def densenet_path(tmp_path):
    path = tmp_path / "densenet.onnx"
    onnx.save(BUILDERS["densenet"](blocks=(2,), growth=4), path)
    return path


def test_inspect_lists_groups_offsets_and_reasons(densenet_path, capsys):
    assert main(["inspect", str(densenet_path), "--prune-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("5 prunable units (channel groups: 3 with full compensation, 2 mean-only")
    assert "prune  denseblock1.denselayer1.conv2 (4 ch, keep 2) [concat+flatten+branch]" in out
    assert "-> fc @8 via" in out and "slices BatchNormalization norm5 @8" in out
    assert "leave  fc: channels reach the graph output 'logits'" in out
    assert "no-fold norm5: BN does not follow a Conv or Gemm (pre-activation BN)" in out
    assert main(["inspect", str(densenet_path), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records["summary"]["groups"] == 5 and records["left_alone"] == [
        {"node": "fc", "reason": "channels reach the graph output 'logits'"}]


def test_prune_residual_flag(tmp_path, capsys):
    src, out = tmp_path / "res.onnx", tmp_path / "out.onnx"
    onnx.save(BUILDERS["residual_block"](channels=8), src)
    assert main(["inspect", str(src), "--prune-residual"]) == 0
    assert "prune  conv1, block1.conv2 (8 ch) [residual+branch] compensation none" in capsys.readouterr().out
    assert main([str(src), str(out), "--prune-ratio", "0.5", "--prune-residual", "-q"]) == 0
    model = onnx.load(out)
    assert {"udfc_onnx.config"} <= {p.key for p in model.metadata_props}
    assert json.loads(next(p.value for p in model.metadata_props if p.key == "udfc_onnx.config"))["prune_residual"] is True
    conv1 = next(t for t in model.graph.initializer if t.name == "conv1.weight_quantized")
    assert conv1.dims[0] == 4
