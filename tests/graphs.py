"""Tiny ONNX graphs for unit tests, written inline with onnx.helper (fast, no builders needed)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def conv_chain(channels=(3, 8, 12, 10), *, bn=True, relu=True, head="gemm", seed=0, opset=13, spatial=8,
               pool=False) -> onnx.ModelProto:
    """Conv-[BN]-[Relu] x n, then GlobalAveragePool-Flatten-Gemm (head="gemm") or nothing.

    Input ``input`` (N, C0, spatial, spatial) with symbolic batch; output ``logits``.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))
        inits.append(_init(f"conv{i}.weight", w))
        conv_inputs = [x, f"conv{i}.weight"]
        if not bn:
            inits.append(_init(f"conv{i}.bias", rng.standard_normal(cout) * 0.1))
            conv_inputs.append(f"conv{i}.bias")
        nodes.append(helper.make_node("Conv", conv_inputs, [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        x = f"c{i}"
        if bn:
            for pname, val in (("gamma", rng.uniform(0.5, 1.5, cout)), ("beta", rng.normal(0, 0.3, cout)),
                               ("mean", rng.normal(0, 0.3, cout)), ("var", rng.uniform(0.5, 2.0, cout))):
                inits.append(_init(f"bn{i}.{pname}", val))
            nodes.append(helper.make_node("BatchNormalization", [x] + [f"bn{i}.{p}" for p in ("gamma", "beta", "mean", "var")],
                                          [f"b{i}"], name=f"bn{i}", epsilon=1e-5))
            x = f"b{i}"
        if relu:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
        if pool and i == 0:
            nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2]))
            x = f"p{i}"
    if head == "gemm":
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
        inits.append(_init("fc.weight", rng.standard_normal((5, channels[-1])) * 0.3))
        inits.append(_init("fc.bias", rng.standard_normal(5) * 0.1))
        nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])
    else:
        nodes.append(helper.make_node("Identity", [x], ["logits"], name="out"))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", channels[-1], spatial, spatial])
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels[0], spatial, spatial])
    graph = helper.make_graph(nodes, "conv_chain", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Initializer ``name`` as float64."""
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).astype(np.float64)


def make_twin_channel(model: onnx.ModelProto, layer: int, src: int, dst: int, factor: float) -> None:
    """Make channel ``dst`` of ``conv_chain``'s conv ``layer`` exactly ``factor`` x channel ``src``
    after its BN (and ReLU), in place."""
    from udfc_onnx.graph import set_initializer

    w = initializer_array(model, f"conv{layer}.weight")
    w[dst] = factor * w[src]
    set_initializer(model, f"conv{layer}.weight", w.astype(np.float32))
    p = {k: initializer_array(model, f"bn{layer}.{k}") for k in ("gamma", "beta", "mean", "var")}
    p["gamma"][dst], p["beta"][dst], p["mean"][dst] = factor * p["gamma"][src], factor * p["beta"][src], factor * p["mean"][src]
    p["var"][dst] = factor**2 * (p["var"][src] + 1e-5) - 1e-5  # sigma_dst = factor * sigma_src exactly
    for k, v in p.items():
        set_initializer(model, f"bn{layer}.{k}", v.astype(np.float32))
