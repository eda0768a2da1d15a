"""The command line, in-process through main(argv): conventions, table, report, overrides, external data."""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import conv_chain
from udfc_onnx import __version__
from udfc_onnx.cli import _batch_parser, _merge_parser, _single_parser, main
from udfc_onnx.validate import count_fused_convs


@pytest.fixture
def chain_path(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain(), path)
    return path


def run_file(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def leftovers(folder):
    return [p for p in os.listdir(folder) if p.endswith((".tmp", ".probe"))]


def test_compress_writes_checked_output_and_table(chain_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    before = chain_path.read_bytes()
    assert main([str(chain_path), str(out), "--prune-ratio", "0.5", "--weight-bits", "4"]) == 0
    printed = capsys.readouterr().out
    for row in ("Params", "MACs", "File size", "int8-fused Conv", "Conv", "max|diff|", "cosine", "elapsed"):
        assert row in printed
    assert chain_path.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    assert not leftovers(tmp_path)


def test_lossless_cli_reproduces_logits(chain_path, tmp_path, rng):
    out = tmp_path / "same.onnx"
    assert main([str(chain_path), str(out), "--prune-ratio", "0", "--no-quant", "-q"]) == 0
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_file(out, x), run_file(chain_path, x), rtol=1e-4, atol=1e-5)


def test_lossless_check_uses_rtol_atol(chain_path, tmp_path, capsys):
    # BN folding changes float rounding, so a zero tolerance must fail the lossless check: exit 1, nothing written.
    out = tmp_path / "same.onnx"
    assert main([str(chain_path), str(out), "--no-quant", "--rtol", "0", "--atol", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "failed its check" in err and "allowed 0" in err and len(err.splitlines()) == 1
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("parser", [_single_parser, _batch_parser, _merge_parser])
def test_help_documents_every_option_with_its_default(parser):
    for action in parser()._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        said = "required" if action.required else "default"
        assert action.help and said in action.help, f"{action.option_strings} lacks its {said} in --help"


@pytest.mark.parametrize("parser", [_single_parser, _batch_parser, _merge_parser])
def test_switches_are_store_true_never_type_bool(parser):
    for action in parser()._actions:
        assert action.type is not bool, action.option_strings
        if action.nargs == 0:
            assert isinstance(action.const, bool) or action.dest in ("help", "version"), action.option_strings


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert "--overwrite-input-shape" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"udfc-onnx {__version__}"
    assert main(["batch", "--help"]) == 0
    assert "--shard" in capsys.readouterr().out


def test_quiet_prints_nothing_and_verbose_prints_decisions(chain_path, tmp_path, capsys):
    assert main([str(chain_path), str(tmp_path / "a.onnx"), "--prune-ratio", "0.5", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main([str(chain_path), str(tmp_path / "b.onnx"), "--prune-ratio", "0.5", "-v"]) == 0
    out = capsys.readouterr().out
    assert "unit (producer)" in out and "conv0" in out and "4/8" in out


def test_progress_only_when_asked_off_a_terminal(chain_path, tmp_path, capsys):
    assert main([str(chain_path), str(tmp_path / "a.onnx")]) == 0
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal
    assert main([str(chain_path), str(tmp_path / "b.onnx"), "--progress", "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[1].split(" (")[0] for line in err] == ["load", "run original", "compress", "write",
                                                                            "validate", "measure"]


def test_report_json_has_table_numbers_and_unit_decisions(chain_path, tmp_path):
    report = tmp_path / "report.json"
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--prune-ratio", "0.5", "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["before"]["params"] > data["after"]["params"] > 0
    assert data["before"]["macs"] > data["after"]["macs"] > 0
    assert data["after"]["file_bytes"] == (tmp_path / "o.onnx").stat().st_size
    assert data["after"]["fused_convs"] == 0  # weight-only QDQ: ORT fuses nothing
    assert data["validation"]["passed"] and data["validation"]["n_samples"] == 8
    assert data["tool_version"] == __version__ and data["config"]["prune_ratio"] == 0.5
    unit = {u["producer"]: u for u in data["units"]}["conv0"]
    assert (unit["channels"], unit["kept"], unit["ratio"], unit["bits"], unit["override"]) == (8, 4, 0.5, 8, None)
    assert data["layers"]["fc"]["bits"] == 8 and data["elapsed_s"] > 0


def test_metadata_props_hold_version_and_settings(chain_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert main([str(chain_path), str(out), "--prune-ratio", "0.25", "--weight-bits", "6", "-q"]) == 0
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["udfc_onnx.version"] == __version__
    config = json.loads(meta["udfc_onnx.config"])
    assert (config["prune_ratio"], config["weight_bits"]) == (0.25, 6)
    assert meta["udfc_onnx.source"] == "chain.onnx" and len(meta["udfc_onnx.source_sha256"]) == 64
    assert json.loads(meta["udfc_onnx.check"])["check_n"] == 8


def test_recompressing_an_output_replaces_metadata_keys(chain_path, tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main([str(chain_path), str(first), "--no-quant", "--prune-ratio", "0.25", "-q"]) == 0
    assert main([str(first), str(second), "--no-quant", "-q"]) == 0
    keys = [p.key for p in onnx.load(second).metadata_props]
    assert len(keys) == len(set(keys))


def test_check_n_sets_the_number_of_compared_samples(chain_path, tmp_path):
    for n in (3, 0):
        report = tmp_path / f"r{n}.json"
        assert main([str(chain_path), str(tmp_path / f"o{n}.onnx"), "--check-n", str(n), "--report", str(report), "-q"]) == 0
        v = json.loads(report.read_text())["validation"]
        assert v["n_samples"] == n and v["passed"]
    assert "skipped" in v["message"]


def test_overwrite_input_shape_drives_macs_and_check_inputs(tmp_path):
    model = conv_chain()
    for dim, symbol in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        dim.dim_param = symbol  # symbolic spatial dims: the shape is the user's to choose
    src = tmp_path / "dynamic.onnx"
    onnx.save(model, src)
    reports = {}
    for name, shape in (("default", None), ("named", "input:1,3,64,64"), ("nameless", "1,3,64,64")):
        report = tmp_path / f"{name}.json"
        args = [str(src), str(tmp_path / f"{name}.onnx"), "--report", str(report), "--check-n", "4", "-q"]
        assert main(args + (["--overwrite-input-shape", shape] if shape else [])) == 0
        reports[name] = json.loads(report.read_text())
    # Symbolic dims default to 32; 64x64 has 4x the conv MACs (the Gemm head, 10 x 5, is unchanged).
    conv_macs = reports["default"]["before"]["macs"] - 10 * 5
    assert reports["named"]["before"]["macs"] - 10 * 5 == 4 * conv_macs
    assert reports["nameless"]["before"]["macs"] == reports["named"]["before"]["macs"]
    assert reports["named"]["validation"]["n_samples"] == 4  # batch 1 given, so run four times
    assert reports["default"]["validation"]["n_samples"] == 4


def test_overwrite_input_shape_rejects_unknown_names(chain_path, tmp_path, capsys):
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--overwrite-input-shape", "images:1,3,8,8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no input 'images'" in err and len(err.splitlines()) == 1
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--overwrite-input-shape", "input:1,3,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--overwrite-input-shape", "input:1,3,16,16"]) == 2
    assert "dim 2 is fixed at 8" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def _layer_config(tmp_path, text, suffix=".json"):
    path = tmp_path / f"layers{suffix}"
    path.write_text(text)
    return path


def test_config_overrides_ratio_bits_and_skip(chain_path, tmp_path):
    config = _layer_config(tmp_path, json.dumps({"settings": {"prune_ratio": 0.25}, "layers": {
        "conv0": {"ratio": 0.5}, "conv*": {"bits": 6}, "conv1": {"skip": True}}}))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(chain_path), str(out), "--config", str(config), "--report", str(report), "-q"]) == 0
    units = {u["producer"]: u for u in json.loads(report.read_text())["units"]}
    assert (units["conv0"]["channels"], units["conv0"]["kept"]) == (8, 4)      # ratio 0.5 from its rule
    assert (units["conv1"]["channels"], units["conv1"]["kept"]) == (12, 12)    # skip
    assert (units["conv2"]["channels"], units["conv2"]["kept"]) == (10, 7)     # settings: 0.25, int(10 * 0.75)
    layers = json.loads(report.read_text())["layers"]
    assert {k: v["bits"] for k, v in layers.items()} == {"conv0": 6, "conv1": None, "conv2": 6, "fc": 8}
    model = onnx.load(out)
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert not any("conv1" in name for name in dq_inputs)          # skipped layer kept float
    q = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    conv0_q = next(v for k, v in q.items() if "conv0" in k)
    assert np.abs(conv0_q).max() <= 31                              # 6-bit symmetric grid


def test_explicit_option_wins_over_config_settings(chain_path, tmp_path):
    config = _layer_config(tmp_path, json.dumps({"settings": {"prune_ratio": 0.5}}))
    report = tmp_path / "r.json"
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--config", str(config), "--prune-ratio", "0.25",
                 "--report", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["config"]["prune_ratio"] == 0.25


def test_yaml_config_when_pyyaml_is_installed(chain_path, tmp_path):
    pytest.importorskip("yaml")
    config = _layer_config(tmp_path, "layers:\n  conv0: {ratio: 0.5}\n", ".yaml")
    report = tmp_path / "r.json"
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--config", str(config), "--report", str(report), "-q"]) == 0
    units = {u["producer"]: u for u in json.loads(report.read_text())["units"]}
    assert units["conv0"]["kept"] == 4


def test_yaml_config_without_pyyaml_says_so(chain_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    config = _layer_config(tmp_path, "layers:\n  conv0: {ratio: 0.5}\n", ".yml")
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "PyYAML" in err and "JSON" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("layers, message", [
    ({"conv0": {"ratio": 1.0}}, "ratio must be a number in [0, 1)"),
    ({"conv0": {"bits": 9}}, "bits must be an integer in [2, 8]"),
    ({"conv0": {"skip": "yes"}}, "skip must be true or false"),
    ({"conv0": {"prune": 0.5}}, "unknown key"),
    ({"relu0": {"skip": True}}, "not Conv or Gemm"),
    ({"layer9.*": {"bits": 4}}, "names nodes not in the model: layer9.*"),
])
def test_bad_layer_rules_are_refused(chain_path, tmp_path, capsys, layers, message):
    config = _layer_config(tmp_path, json.dumps({"layers": layers}))
    assert main([str(chain_path), str(tmp_path / "o.onnx"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_dry_run_plans_and_writes_nothing(chain_path, tmp_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "plan.json"
    assert main([str(chain_path), str(out), "--prune-ratio", "0.5", "--dry-run", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "dry run: nothing written" in printed and "would remove" in printed and "4/8" in printed
    assert not out.exists()
    plan = json.loads(report.read_text())
    assert plan["dry_run"] and {u["producer"]: u["kept"] for u in plan["units"]} == {"conv0": 4, "conv1": 6, "conv2": 5}
    assert main([str(chain_path), "--dry-run", "-q"]) == 0  # OUT may be left out
    assert sorted(os.listdir(tmp_path)) == ["chain.onnx", "plan.json"]


def test_count_fused_convs_sees_qlinearconv(tmp_path):
    """A hand-written full-QDQ Conv (uint8 activations, int8 per-channel weights, int32 bias) is fused; float is not."""
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_z"), numpy_helper.from_array(np.float32(0.02), "x_s"),
             numpy_helper.from_array(np.uint8(0), "x_z"), numpy_helper.from_array(np.float32(0.05), "y_s"),
             numpy_helper.from_array(np.zeros(4, np.int32), "b_q"),
             numpy_helper.from_array(np.full(4, 0.0002, np.float32), "b_s"),
             numpy_helper.from_array(np.zeros(4, np.int32), "b_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "y_s", "x_z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "x_z"], ["out"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "qdq.onnx")
    onnx.save(conv_chain(), tmp_path / "float.onnx")
    assert count_fused_convs(tmp_path / "qdq.onnx") == 1
    assert count_fused_convs(tmp_path / "float.onnx") == 0


def _save_external(model, path):
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def test_external_data_in_external_data_out(tmp_path, rng):
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    _save_external(conv_chain(), src)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    report = tmp_path / "r.json"
    data_before = (src.parent / "model.onnx.data").read_bytes()
    assert main([str(src), str(out), "--prune-ratio", "0.5", "--no-quant", "--report", str(report), "-q"]) == 0
    assert (src.parent / "model.onnx.data").read_bytes() == data_before
    assert sorted(os.listdir(out.parent)) == ["small.onnx", "small.onnx.data"]
    external = [t for t in onnx.load(out, load_external_data=False).graph.initializer
                if t.data_location == TensorProto.EXTERNAL]
    assert external and all(dict((e.key, e.value) for e in t.external_data)["location"] == "small.onnx.data"
                            for t in external)
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads(report.read_text())
    assert data["external_data"] and data["before"]["file_bytes"] > src.stat().st_size
    assert data["after"]["file_bytes"] == sum(f.stat().st_size for f in out.parent.iterdir())
    # The same settings without external data give the same function.
    inline = tmp_path / "inline.onnx"
    onnx.save(conv_chain(), tmp_path / "chain.onnx")
    assert main([str(tmp_path / "chain.onnx"), str(inline), "--prune-ratio", "0.5", "--no-quant", "-q"]) == 0
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_file(out, x), run_file(inline, x), rtol=1e-6, atol=1e-6)


def test_output_over_the_protobuf_limit_goes_external(chain_path, tmp_path, monkeypatch):
    import udfc_onnx.pipeline as pipeline

    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 100)  # stands in for 2 GB: same decision, same path
    out = tmp_path / "o.onnx"
    assert main([str(chain_path), str(out), "-q"]) == 0
    assert (tmp_path / "o.onnx.data").exists()
    assert main([str(chain_path), str(tmp_path / "p.onnx"), "--save-as-external-data", "-q"]) == 0
    assert (tmp_path / "p.onnx.data").exists()
    assert not leftovers(tmp_path)


def test_inspect_lists_units(chain_path, capsys):
    assert main(["inspect", str(chain_path)]) == 0
    out = capsys.readouterr().out
    assert "3 prunable units" in out and "prune  conv0" in out
