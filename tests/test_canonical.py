"""MatMul(+Add) heads are written as Gemm so they are pruned and quantized like Gemm."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from models.builders import build_conv_flatten_gemm
from udfc_onnx import CompressConfig, compress_model
from udfc_onnx.canonical import matmul_to_gemm
from udfc_onnx.int8 import check_fusion


def as_matmul_add(model: onnx.ModelProto, with_add: bool = True) -> onnx.ModelProto:
    """Every Gemm(transB=1) rewritten as MatMul(x, W.T) [+ Add(b)], the way tf2onnx writes a head."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[1]))
        mm_out = node.output[0] + "_mm" if with_add else node.output[0]
        nodes.append(helper.make_node("MatMul", node.input[:2], [mm_out], name=node.name))
        if with_add:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], node.output, name=node.name + "_add"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_matmul_add_becomes_one_gemm_with_the_same_outputs(rng):
    original = build_conv_flatten_gemm()
    model = as_matmul_add(original)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    expected = run(model, x)
    converted, record = matmul_to_gemm(model)
    ops = [n.op_type for n in converted.graph.node]
    assert "MatMul" not in ops and ops.count("Gemm") == 1 and len(record.biases_absorbed) == 1
    onnx.checker.check_model(converted)
    np.testing.assert_allclose(run(converted, x), expected, rtol=1e-5, atol=1e-5)


def test_matmul_without_add_and_rank3_input():
    model = as_matmul_add(build_conv_flatten_gemm(), with_add=False)
    converted, record = matmul_to_gemm(model)
    assert record.rewritten and not record.biases_absorbed
    # A MatMul on a 3-D activation (a transformer's, not a CNN head) is left, with its reason.
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [w])
    _, record = matmul_to_gemm(helper.make_model(graph))
    assert record.left == {"mm": "input has rank 3, Gemm takes 2"}


def test_matmul_head_is_pruned_and_fused_into_qgemm(tmp_path):
    config = CompressConfig(prune_ratio=0.5, weight_bits=8, activations="uint8", channel_multiple=1)
    result = compress_model(as_matmul_add(build_conv_flatten_gemm()), config)
    assert any("MatMul" in n and "Gemm" in n for n in result.notes)
    as_gemm = compress_model(build_conv_flatten_gemm(), config)

    def pruned(r):
        return sorted((up.unit.producer, len(up.keep)) for up in r.plan.units if len(up.keep) < up.unit.channels)
    assert pruned(result) == pruned(as_gemm) and len(pruned(result)) == 2  # incl. the conv feeding Flatten
    path = tmp_path / "out.onnx"
    onnx.save(result.model, path)
    report = check_fusion(path)
    assert report.fused_gemms == report.gemms == 1
    assert report.fused_convs == report.convs
