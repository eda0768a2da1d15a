"""End-to-end on the real pretrained ResNets in ../shared (skipped when absent)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from udfc_onnx import CompressConfig, compress_model
from udfc_onnx.cli import main
from udfc_onnx.fold import fold_batchnorm

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2023, 0.1994, 0.2010], np.float32).reshape(1, 3, 1, 1)


def logits(model_or_path, x):
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def images(cifar_test):
    x, y = cifar_test
    return ((x[:500].astype(np.float32) / 255 - MEAN) / STD).astype(np.float32), y[:500]


def test_fold_is_exact_on_resnet56(shared_models, images):
    model = onnx.load(shared_models / "resnet56_nm.onnx")
    folded, record = fold_batchnorm(model)
    assert len(record.folded) == 57
    x = images[0][:64]
    np.testing.assert_allclose(logits(folded, x), logits(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet56_nm.onnx", "resnet20.onnx"])
def test_lossless_cli_reproduces_logits(shared_models, images, tmp_path, name):
    out = tmp_path / "same.onnx"
    assert main([str(shared_models / name), str(out), "--prune-ratio", "0", "--no-quant", "-q"]) == 0
    x = images[0][:64]
    np.testing.assert_allclose(logits(str(out), x), logits(str(shared_models / name), x), rtol=1e-4, atol=1e-4)


def test_half_pruned_4bit_resnet56(shared_models, images, tmp_path):
    src = shared_models / "resnet56_nm.onnx"
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out), "--prune-ratio", "0.5", "--weight-bits", "4", "-q"]) == 0
    assert out.stat().st_size <= src.stat().st_size / 4
    model = onnx.load(out)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for stage, width in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        for block in range(9):
            assert dims[f"{stage}.{block}.conv1.weight_quantized"][0] == width // 2
            assert dims[f"{stage}.{block}.conv2.weight_quantized"][:2] == [width, width // 2]
    assert not [t for t in model.graph.initializer if t.name.endswith(".weight") and t.data_type == onnx.TensorProto.FLOAT]
    x, y = images
    acc = (logits(str(out), x).argmax(1) == y).mean()
    assert acc > 0.15  # a working model, above chance (accuracy itself is tracked in tools/)


def test_udfc_beats_plain_pruning_on_resnet56(shared_models, images):
    model = onnx.load(shared_models / "resnet56_nm.onnx")
    x, y = images
    acc = {m: (logits(compress_model(model, CompressConfig(prune_ratio=0.3, weight_bits=None, method=m)).model, x)
               .argmax(1) == y).mean() for m in ("prune", "udfc")}
    assert acc["udfc"] > acc["prune"] + 0.05
