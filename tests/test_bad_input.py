"""Bad input: each case gives one line on stderr, a non-zero exit, no output file, and the input untouched."""
import json
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import conv_chain
from udfc_onnx.cli import main
from udfc_onnx.errors import InvalidModelError
from udfc_onnx.lazy import has_lazy, read_lazy


class Case:
    """Runs main() on one bad input and checks the contract every bad input shares."""

    def __init__(self, tmp_path, capsys):
        self.tmp_path, self.capsys = tmp_path, capsys
        self.out = tmp_path / "out" / "model.onnx"
        self.out.parent.mkdir()

    def run(self, src, *options, out=None, code=2, message=""):
        out = self.out if out is None else out
        before = (src.read_bytes(), src.stat().st_mtime_ns) if src.is_file() else None
        got = main([str(src), str(out), *options])
        err = self.capsys.readouterr().err
        lines = err.strip().splitlines()
        assert got == code, err
        assert len(lines) == 1 and lines[0].startswith("udfc_onnx: error: "), err
        assert message in lines[0], lines[0]
        assert "Traceback" not in err
        assert not out.is_file() or out == src
        assert not [p for p in os.listdir(self.out.parent) if p != "keep"], os.listdir(self.out.parent)
        if before is not None:
            assert (src.read_bytes(), src.stat().st_mtime_ns) == before
        return lines[0]


@pytest.fixture
def case(tmp_path, capsys):
    return Case(tmp_path, capsys)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.onnx"
    onnx.save(conv_chain(), path)
    return path


def _save(tmp_path, name, model):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _tiny(nodes, inits=(), out_shape=(1, 4, 6, 6), opset=13):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    graph = helper.make_graph(nodes, "bad", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


# --- the input file

def test_missing_file(case, tmp_path):
    case.run(tmp_path / "nope.onnx", message="nope.onnx: no such file")


def test_directory(case, tmp_path):
    (tmp_path / "folder.onnx").mkdir()
    case.run(tmp_path / "folder.onnx", message="is a directory, not an ONNX file")


def test_empty_file(case, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    case.run(tmp_path / "empty.onnx", message="empty file")


def test_random_bytes(case, tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    case.run(path, message="not a readable ONNX model (protobuf decode failed")


def test_truncated_protobuf(case, tmp_path, good):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(good.read_bytes()[: good.stat().st_size * 3 // 5])
    case.run(path, message="not a readable ONNX model")


def test_truncated_to_a_valid_prefix(case, tmp_path, good):
    # Cut right after a whole field: protobuf parses it, but what is left is no model.
    path = tmp_path / "prefix.onnx"
    path.write_bytes(good.read_bytes()[:2])
    case.run(path, message="not an ONNX model (no graph, nodes or opset")


def test_fails_onnx_checker(case, tmp_path):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    model = _tiny([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["undefined"], ["y"])], [w])
    case.run(_save(tmp_path, "unchecked.onnx", model), message="fails onnx.checker")



@pytest.mark.parametrize("fault", ["undefined input", "shapes disagree"])
def test_fails_onnx_checker_with_weights_left_in_the_file(case, tmp_path, fault):
    # A weight above udfc_onnx.lazy.LAZY_MIN_BYTES is not read for the checker (it checks a copy
    # that points at a stub): the rest of the model must still be checked in full.
    w = numpy_helper.from_array(np.ones((1024, 3, 3, 3), np.float32), "w")
    w2 = numpy_helper.from_array(np.ones((4, 1024, 1, 1), np.float32), "w2")
    second = "undefined" if fault == "undefined input" else "c"
    model = _tiny([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Conv", [second, "w2"], ["y"])],
                  [w, w2], out_shape=(1, 4, 6, 6) if fault == "undefined input" else (1, 4, 7, 7))
    path = _save(tmp_path, "unchecked.onnx", model)
    assert has_lazy(read_lazy(path))
    case.run(path, message="fails onnx.checker")


def test_opset_below_11(case, tmp_path):
    case.run(_save(tmp_path, "old.onnx", conv_chain(opset=10)), message="opset 10 is not supported (need >= 11")


def test_no_conv_or_gemm(case, tmp_path):
    case.run(_save(tmp_path, "relu.onnx", _tiny([helper.make_node("Relu", ["x"], ["y"])], out_shape=(1, 3, 8, 8))),
             message="no Conv or Gemm to compress")


def test_already_quantized_qdq(case, tmp_path):
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z"),
             numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Conv", ["d", "w"], ["y"])]
    case.run(_save(tmp_path, "qdq.onnx", _tiny(nodes, inits)), message="already quantized (contains DequantizeLinear")


def test_already_quantized_integer_weights(case, tmp_path):
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_int8")]
    nodes = [helper.make_node("Cast", ["w_int8"], ["w"], to=TensorProto.FLOAT), helper.make_node("Conv", ["x", "w"], ["y"])]
    case.run(_save(tmp_path, "int8.onnx", _tiny(nodes, inits)), message="already quantized (integer weight w_int8)")


def test_missing_external_data(case, tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(conv_chain(), str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    case.run(path, message="external data file ext.onnx.data is missing")


# --- the output path

def test_output_equal_to_input(case, good):
    case.run(good, out=good, message="is the input path; the input is never overwritten")


def test_output_directory_missing(case, good, tmp_path):
    case.run(good, out=tmp_path / "no" / "such" / "dir" / "o.onnx", message="does not exist")


def test_output_directory_is_a_file(case, good, tmp_path):
    (tmp_path / "plain").write_text("x")
    case.run(good, out=tmp_path / "plain" / "o.onnx", message="does not exist")


def test_unwritable_output_directory(case, good, tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "o.onnx"
    elif os.path.isdir("/sys/kernel"):  # root ignores permission bits; sysfs refuses new files even to root
        target = __import__("pathlib").Path("/sys/kernel/udfc_test_output.onnx")
    else:
        pytest.skip("running as root without a read-only directory to try")
    case.run(good, out=target, message="is not writable")
    assert not target.exists()


def test_output_is_a_directory(case, good, tmp_path):
    (tmp_path / "out" / "keep").mkdir()
    case.run(good, out=tmp_path / "out" / "keep", message="is a directory")


# --- option values

@pytest.mark.parametrize("ratio", ["-0.1", "1", "1.5", "nan"])
def test_bad_prune_ratio(case, good, ratio):
    case.run(good, "--prune-ratio", ratio, message=f"prune_ratio must be a number in [0, 1), got {float(ratio)!r}")


@pytest.mark.parametrize("bits", ["0", "1", "9", "33"])
def test_bad_weight_bits(case, good, bits):
    case.run(good, "--weight-bits", bits, message=f"weight_bits must be an integer in [2, 8] (or None for float), got {bits}")


@pytest.mark.parametrize("option, message", [
    (["--method", "magic"], "argument --method: invalid choice: 'magic'"),
    (["--criterion", "l3"], "argument --criterion: invalid choice: 'l3'"),
    (["--quant-compensation", "later"], "argument --quant-compensation: invalid choice"),
    (["--preset", "fast"], "argument --preset: invalid choice: 'fast'"),
    (["--weight-bits", "eight"], "argument --weight-bits: invalid int value: 'eight'"),
    (["--prune-ratio", "half"], "argument --prune-ratio: invalid float value: 'half'"),
    (["--check-n", "-1"], "check_n must be an integer >= 0"),
    (["--rtol", "inf"], "rtol must be a finite number >= 0"),
    (["--alpha1", "-1"], "alpha1 must be a finite number >= 0"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--weight-bits", "4", "--no-quant"], "not allowed with argument --weight-bits"),
])
def test_unknown_or_bad_option_values(case, good, option, message):
    case.run(good, *option, message=message)


# --- the --config file

def test_config_naming_missing_nodes(case, good, tmp_path):
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"layers": {"conv0": {"ratio": 0.5}, "backbone.conv9": {"skip": True}}}))
    case.run(good, "--config", str(config), message="names nodes not in the model: backbone.conv9")


def test_config_not_json(case, good, tmp_path):
    config = tmp_path / "layers.json"
    config.write_text("{layers: oops")
    case.run(good, "--config", str(config), message="not valid JSON")


def test_config_unknown_setting(case, good, tmp_path):
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"settings": {"prune_rate": 0.5}}))
    case.run(good, "--config", str(config), message="unknown setting(s) 'prune_rate'")


def test_config_setting_out_of_range(case, good, tmp_path):
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"settings": {"weight_bits": 33}}))
    case.run(good, "--config", str(config), message="weight_bits must be an integer in [2, 8]")


def test_config_file_missing(case, good, tmp_path):
    case.run(good, "--config", str(tmp_path / "none.json"), message="cannot read config file")


def test_report_path_equal_to_input(case, good):
    case.run(good, "--report", str(good), message="--report")


def test_internal_errors_are_one_line_with_exit_3(case, good, monkeypatch):
    import udfc_onnx.pipeline as pipeline

    def broken(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(pipeline, "compress_model", broken)
    case.run(good, code=3, message="internal error: KeyError")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_unreadable_input(case, good, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    good.chmod(0)
    try:
        case.run(good, message="cannot read")
    finally:
        good.chmod(0o644)


def _with_initializer(model, name, slicer):
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(slicer(numpy_helper.to_array(t)), name))
    return model


def test_conv_channels_that_do_not_match(case, tmp_path):
    # onnx.checker (even full_check) accepts this and onnxruntime loads it; it fails only when run.
    model = _with_initializer(conv_chain(), "conv1.weight", lambda w: w[:, :5])
    case.run(_save(tmp_path, "channels.onnx", model), "--check-n", "0", message="Conv conv1 gets 8 input channels, its weight expects 5")


def test_batchnorm_parameters_that_do_not_match(case, tmp_path):
    model = _with_initializer(conv_chain(), "bn1.gamma", lambda g: g[:7])
    case.run(_save(tmp_path, "bn.onnx", model), "--check-n", "0", message="BatchNormalization bn1 has parameters")


def _flatten_head_for_4x4():
    """Conv -> Flatten -> Gemm sized for 4x4 inputs, with symbolic H and W: the checker cannot tell."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_input_that_onnxruntime_cannot_run(case, tmp_path):
    # Symbolic dims set to 32 make 4096 features for a Gemm that takes 64: running the original finds it.
    line = case.run(_save(tmp_path, "head.onnx", _flatten_head_for_4x4()),
                    message="onnxruntime cannot run the input model on random inputs")
    assert line.endswith("(symbolic dims were set to 32: try --overwrite-input-shape)")


def test_the_hint_is_right(tmp_path, capsys):
    src = _save(tmp_path, "head.onnx", _flatten_head_for_4x4())
    assert main([str(src), str(tmp_path / "o.onnx"), "--overwrite-input-shape", "x:1,3,4,4", "-q"]) == 0


def test_one_line_on_the_process_stderr(tmp_path):
    """ORT logs its own failures to the process's stderr; the CLI silences them so its line is the only one."""
    import subprocess

    src = _save(tmp_path, "head.onnx", _flatten_head_for_4x4())
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "udfc_onnx", str(src), str(tmp_path / "o.onnx")], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("udfc_onnx: error: "), run.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("name, value", [("conv1.weight", np.inf), ("bn1.var", np.nan)])
def test_non_finite_weights(case, tmp_path, name, value):
    def poison(w):
        w = w.copy()
        w.flat[0] = value
        return w
    model = _with_initializer(conv_chain(), name, poison)
    case.run(_save(tmp_path, "nonfinite.onnx", model), "--check-n", "0", message=f"weight {name} of")


def test_initializer_data_that_does_not_fill_its_shape(case, tmp_path):
    # More bytes than the declared dims: the checker only objects to too few.
    model = conv_chain()
    weight = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    weight.dims[2] = 1
    case.run(_save(tmp_path, "dims.onnx", model), message="initializer conv1.weight holds 3456 bytes for shape [12, 8, 1, 3]")


def test_large_finite_weights_whose_sum_overflows_are_accepted():
    from udfc_onnx.load import check_finite

    def huge(w):
        return np.full_like(w, 3e38)  # float32 max is 3.4e38: their float32 sum is inf
    check_finite(_with_initializer(conv_chain(), "conv1.weight", huge))

    def huge_and_nan(w):
        w = huge(w)
        w.flat[-1] = np.nan
        return w
    with pytest.raises(InvalidModelError, match="weight conv1.weight of"):
        check_finite(_with_initializer(conv_chain(), "conv1.weight", huge_and_nan))


def test_the_first_non_finite_weight_in_graph_order_is_named():
    from udfc_onnx.load import check_finite

    def poison(w):
        w = w.copy()
        w.flat[3] = -np.inf
        return w
    model = _with_initializer(_with_initializer(conv_chain(), "conv1.weight", poison), "bn1.var", poison)
    for _ in range(5):  # read on worker threads: the order of the message must not depend on timing
        with pytest.raises(InvalidModelError, match="weight conv1.weight of"):
            check_finite(model)
