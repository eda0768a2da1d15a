"""The command line, in-process through main(argv)."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.graphs import conv_chain
from udfc_onnx.cli import main


@pytest.fixture
def chain_path(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), path)
    return path


def run_file(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_compress_writes_checked_output_and_table(chain_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    before = chain_path.read_bytes()
    assert main([str(chain_path), str(out), "--prune-ratio", "0.5", "--weight-bits", "4"]) == 0
    printed = capsys.readouterr().out
    assert "Params" in printed and "MACs" in printed and "channels removed" in printed and "elapsed" in printed
    assert chain_path.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_lossless_cli_reproduces_logits(chain_path, tmp_path, rng):
    out = tmp_path / "same.onnx"
    assert main([str(chain_path), str(out), "--prune-ratio", "0", "--no-quant", "-q"]) == 0
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_file(out, x), run_file(chain_path, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--prune-ratio", "1"], "prune_ratio"),
    (["--prune-ratio", "-0.1"], "prune_ratio"),
    (["--prune-ratio", "nan"], "prune_ratio"),
    (["--weight-bits", "1"], "weight_bits"),
    (["--weight-bits", "9"], "weight_bits"),
    (["--method", "magic"], "invalid choice"),
])
def test_bad_options_fail_with_one_line_and_no_output(chain_path, tmp_path, capsys, args, message):
    out = tmp_path / "out.onnx"
    with pytest.raises(SystemExit) if message == "invalid choice" else _nullcontext() as exc:
        code = main([str(chain_path), str(out), *args])
    code = exc.value.code if message == "invalid choice" else code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_input_files(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(1000))
    for path, message in [(tmp_path / "missing.onnx", "no such file"), (junk, "ONNX"), (tmp_path, "directory")]:
        code = main([str(path), str(tmp_path / "o.onnx")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(chain_path, capsys):
    before = chain_path.read_bytes()
    assert main([str(chain_path), str(chain_path)]) == 2
    assert "input path" in capsys.readouterr().err
    assert chain_path.read_bytes() == before


def test_inspect_lists_units(chain_path, capsys):
    assert main(["inspect", str(chain_path)]) == 0
    out = capsys.readouterr().out
    assert "3 prunable units" in out and "prune  conv0" in out


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
