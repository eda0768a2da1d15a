"""Weights left in the input file (udfc_onnx.lazy): same values as onnx.load, never written or run lazily."""
import os

import numpy as np
import onnx
import pytest

from tests.graphs import conv_chain
from udfc_onnx import CompressConfig
from udfc_onnx.graph import GraphView
from udfc_onnx.lazy import LAZY_KEY, has_lazy, is_lazy, materialize, materialized, read_lazy, tensor_array
from udfc_onnx.load import load_model, read_model
from udfc_onnx.pipeline import FileOptions, compress_file
from udfc_onnx.validate import run_model, session


@pytest.fixture
def model_path(tmp_path):
    # conv1 (96 x 64 x 3 x 3, 221 KB) is above the 64 KB threshold; every other tensor is below
    path = tmp_path / "chain.onnx"
    onnx.save(conv_chain((3, 64, 96, 10), spatial=8), str(path))
    return path


def test_lazy_model_equals_onnx_load(model_path):
    lazy = read_lazy(model_path)
    plain = onnx.load(str(model_path))
    big = [t.name for t in lazy.graph.initializer if is_lazy(t)]
    assert big == ["conv1.weight"]
    assert lazy.ByteSize() < plain.ByteSize() / 4
    for a, b in zip(lazy.graph.initializer, plain.graph.initializer):
        np.testing.assert_array_equal(tensor_array(a), onnx.numpy_helper.to_array(b))
    assert materialized(lazy) == plain  # field for field, as onnx.load parses the file
    assert has_lazy(lazy)  # materialized() copied


def test_every_raw_tensor_can_be_lazy_and_reads_are_new_writable_arrays(model_path):
    lazy = read_lazy(model_path, min_bytes=1)
    plain = onnx.load(str(model_path))
    raw = [t.name for t in plain.graph.initializer if t.HasField("raw_data")]
    assert [t.name for t in lazy.graph.initializer if is_lazy(t)] == raw
    view = GraphView(lazy)
    a, b = view.array("conv1.weight"), view.array("conv1.weight", copy=False)
    assert a.flags.writeable and b.flags.writeable and a is not b
    a[...] = 0  # the file is not touched
    np.testing.assert_array_equal(view.array("conv1.weight"), onnx.numpy_helper.to_array(
        next(t for t in plain.graph.initializer if t.name == "conv1.weight")))


def test_sessions_get_a_materialized_copy(model_path):
    lazy = read_lazy(model_path)
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_model(session(lazy), x)[0], run_model(session(str(model_path)), x)[0], rtol=1e-6)
    assert has_lazy(lazy)  # the session's copy was materialized, not the model


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty_graph_twice"])
def test_files_the_walk_does_not_handle_give_none(model_path, tmp_path, damage):
    data = model_path.read_bytes()
    bad = tmp_path / "bad.onnx"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\xff" * 1000)
    else:  # a second graph field: protobuf would merge the two, the walk refuses
        bad.write_bytes(data + b"\x3a\x00")
    assert read_lazy(bad) is None


def test_read_model_is_lazy_and_load_model_is_not(model_path):
    loaded = read_model(model_path)
    assert has_lazy(loaded.model)
    assert not has_lazy(load_model(model_path))
    assert load_model(model_path) == onnx.load(str(model_path))


@pytest.mark.parametrize("settings", [dict(prune_ratio=0.0, weight_bits=None), dict(prune_ratio=0.3, weight_bits=8)])
def test_outputs_hold_every_weight_and_the_input_is_untouched(tmp_path, settings):
    # without BN and with nothing to change, the weights stay lazy until the output is written
    model_path = tmp_path / "chain.onnx"
    onnx.save(conv_chain((3, 64, 96, 10), spatial=8, bn=settings["weight_bits"] is not None), str(model_path))
    before = model_path.read_bytes()
    out = tmp_path / "out.onnx"
    compress_file(model_path, out, CompressConfig(**settings), options=FileOptions(check_n=2))
    written = onnx.load(str(out))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    assert not any(e.key == LAZY_KEY for t in written.graph.initializer for e in t.external_data)
    assert model_path.read_bytes() == before
    assert [f for f in os.listdir(tmp_path) if f.endswith(".data")] == []
    if settings["weight_bits"] is None:  # nothing changed: the weights were written from the file
        ref = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer}
        w = next(t for t in written.graph.initializer if t.name == "conv1.weight")
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(w), ref["conv1.weight"])


def test_materialize_in_place(model_path):
    lazy = read_lazy(model_path)
    assert materialize(lazy) is lazy and not has_lazy(lazy)
    assert lazy == onnx.load(str(model_path))


def test_a_changed_input_is_refused_not_mixed(model_path):
    from udfc_onnx.errors import InvalidModelError

    lazy = read_lazy(model_path)
    t = next(t for t in lazy.graph.initializer if is_lazy(t))
    tensor_array(t)
    onnx.save(conv_chain((3, 64, 96, 10), spatial=8, seed=5), str(model_path))  # overwritten mid-run
    with pytest.raises(InvalidModelError, match="changed while it was being compressed"):
        tensor_array(t)


def test_read_model_can_keep_the_weights_it_checked(model_path):
    assert read_model(model_path).weights == {}
    loaded = read_model(model_path, keep_weights=True)
    assert list(loaded.weights) == ["conv1.weight"]  # the lazy ones: the rest is in the model already
    value = loaded.weights["conv1.weight"]
    assert value.flags.writeable and value.flags.owndata is not None
    np.testing.assert_array_equal(value, onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(model_path)).graph.initializer if t.name == "conv1.weight")))


def test_reference_session_runs_on_the_kept_arrays_without_a_copy(model_path):
    import onnxruntime as ort

    from udfc_onnx.validate import open_reference, random_inputs

    loaded = read_model(model_path, keep_weights=True)
    feeds = random_inputs(loaded.model, np.random.default_rng(0))
    shared = open_reference(loaded.model, weights=loaded.weights)
    by_path = open_reference(str(model_path))
    assert len(shared._udfc_shared_weights) == 1
    np.testing.assert_array_equal(run_model(shared, feeds)[0], run_model(by_path, feeds)[0])
    # ORT reads the very buffer: a change of the array shows in the next run (hence: no edits while it lives)
    loaded.weights["conv1.weight"][:] = 0
    assert not np.array_equal(run_model(shared, feeds)[0], run_model(by_path, feeds)[0])
    # an array that does not fit its tensor (ORT would not notice) is not given: ORT reads the file
    for odd in (np.zeros(5, np.float32), np.zeros((96, 64, 3, 3), np.float64)):
        other = open_reference(loaded.model, weights={"conv1.weight": odd}, path=str(model_path))
        assert other._udfc_shared_weights == []
        np.testing.assert_array_equal(run_model(other, feeds)[0], run_model(by_path, feeds)[0])
    # a model with no weight left in the file is opened as usual
    plain = open_reference(materialized(loaded.model), weights=loaded.weights)
    assert isinstance(plain, ort.InferenceSession) and not hasattr(plain, "_udfc_shared_weights")


def test_the_fold_takes_the_kept_weights_and_gives_the_read_result(model_path):
    from udfc_onnx.fold import fold_batchnorm

    loaded = read_model(model_path, keep_weights=True)
    kept = loaded.weights["conv1.weight"]
    folded_read, folded_kept = {}, {}
    fold_batchnorm(read_model(model_path).model, weights_out=folded_read)
    fold_batchnorm(loaded.model, weights_out=folded_kept, weights_read=loaded.weights)
    assert loaded.weights == {} and folded_kept["conv1.weight"] is kept  # folded in place, not read again
    for name in folded_read:
        np.testing.assert_array_equal(folded_kept[name], folded_read[name])


def test_graph_view_takes_a_read_array_only_while_it_fits(model_path):
    view = GraphView(read_model(model_path).model)
    right = tensor_array(view.initializers["conv1.weight"])
    read = {"conv1.weight": right}
    assert view.take("conv1.weight", read) is right and read == {}
    stale = {"conv1.weight": right.reshape(right.shape[0], -1)}  # dims changed since it was read
    taken = view.take("conv1.weight", stale)
    assert taken.shape == right.shape and stale == {}
    np.testing.assert_array_equal(taken, right)
    assert view.take("conv1.weight", None).shape == right.shape


@pytest.mark.parametrize("settings, reads_expected", [
    (dict(weight_bits=8, regression="euclidean", selection="norm", bias_correction=False), 1),  # the check only:
    # ORT and the fold use the array it read
    (dict(prune_ratio=0.3, method="prune"), 2),  # + the ranking's raw filters
    (dict(weight_bits=8), 1),  # nothing pruned: no input covariance, so no spatial fit on raw filters
    (dict(prune_ratio=0.3, weight_bits=8), 3),  # + the ranking + the input moments' spatial fit
])
def test_compress_file_reads_a_weight_once_plus_once_per_use_of_its_raw_values(model_path, tmp_path, monkeypatch,
                                                                                settings, reads_expected):
    import udfc_onnx.lazy as lazy

    reads = []
    original = lazy._read
    monkeypatch.setattr(lazy, "_read", lambda t: reads.append(t.name) or original(t))
    compress_file(model_path, tmp_path / "out.onnx", CompressConfig(**settings))
    assert reads.count("conv1.weight") == reads_expected


def test_write_model_writes_what_onnx_save_writes(tmp_path):
    from onnx import helper

    from udfc_onnx.lazy import write_model

    model = conv_chain((3, 64, 96, 10), spatial=8)
    model.metadata_props.add(key="k", value="v")
    model.doc_string = "doc"
    model.graph.value_info.append(helper.make_tensor_value_info("c0", onnx.TensorProto.FLOAT, None))
    model.functions.append(helper.make_function("custom", "f", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                                [helper.make_opsetid("", 13)]))
    model.opset_import.append(helper.make_opsetid("custom", 1))
    write_model(model, tmp_path / "parts.onnx")
    onnx.save(model, str(tmp_path / "whole.onnx"))
    parts, whole = onnx.load(str(tmp_path / "parts.onnx")), onnx.load(str(tmp_path / "whole.onnx"))
    assert parts == whole == model
    onnx.checker.check_model(str(tmp_path / "parts.onnx"), full_check=True)
    empty = onnx.ModelProto()
    empty.CopyFrom(model)
    del empty.graph.initializer[:]
    write_model(empty, tmp_path / "no_init.onnx")
    assert onnx.load(str(tmp_path / "no_init.onnx")) == empty
    with pytest.raises(ValueError, match="lazy"):  # its weights are still in the input file
        write_model(read_lazy(tmp_path / "whole.onnx"), tmp_path / "lazy.onnx")
