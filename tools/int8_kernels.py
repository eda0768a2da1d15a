"""Which conv shapes ORT's CPU int8 kernels run fast: one 3x3 conv, float against QDQ int8.

    python tools/int8_kernels.py [--cases 3-16,3p4-16,16-16,16-8,8-16,16-24,dw24] [--batch 32] [--size 32] [--reps 100]

Each case ``CIN-COUT`` is one Conv (3x3, padding 1, stride 1) followed by ReLU, at batch
``--batch`` on ``--size`` x ``--size`` maps: the float model, and the same conv written as full QDQ
as ``--activations uint8`` writes it (uint8 input and output with their QuantizeLinear and
DequantizeLinear, int8 symmetric per-channel weights, int32 bias), which ORT fuses into QLinearConv.
``dwC`` is a depthwise conv of C channels. ``CINpN-COUT`` gives the int8 conv's input N channels instead of CIN: a Pad of the uint8 input with its
zero point and zero weights, as the emitter does for input channel counts that are not a multiple of
4 (the outputs are the same; the script checks it). The models take turns, so machine load hits all
alike; the table gives the median of each and the int8/float ratio measured in this run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DEFAULT_CASES = "3-16,3p4-16,16-16,16-12,16-8,8-16,16-24,32-32,dw24,dw32"


def parse_case(text: str) -> tuple[int, int, int, int]:
    """``"CIN-COUT"``, ``"CINpPADDED-COUT"`` or ``"dwC"`` (depthwise, C channels) ->
    (input channels, int8 input channels, output channels, groups)."""
    if text.startswith("dw"):
        c = int(text[2:])
        return c, c, c, c
    left, cout = text.split("-")
    cin, _, padded = left.partition("p")
    return int(cin), int(padded or cin), int(cout), 1


def conv_model(cin: int, cout: int, batch: int, size: int, *, int8: bool, padded: int | None = None,
               seed: int = 0, groups: int = 1) -> bytes:
    """One Conv3x3 + ReLU, float or QDQ int8 (``padded``: int8 input channels, zero-padded;
    ``groups``: the conv's groups, ``cin`` for a depthwise conv)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin // groups, 3, 3)) / np.sqrt(9 * cin / groups)).astype(np.float32)
    b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, size, size])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, size, size])
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups)
    if not int8:
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **conv), helper.make_node("Relu", ["c"], ["y"])]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    else:
        x_scale, y_scale = np.float32(6 / 255), np.float32(4 / 255)
        w_scale = (np.abs(w).reshape(cout, -1).max(axis=1) / 127).astype(np.float32)
        q = np.clip(np.rint(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        padded = padded or cin
        q = np.pad(q, [(0, 0), (0, padded - cin), (0, 0), (0, 0)])
        inits = [numpy_helper.from_array(np.array(x_scale), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                 numpy_helper.from_array(q, "wq"), numpy_helper.from_array(w_scale, "ws"),
                 numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
                 numpy_helper.from_array(np.rint(b / (x_scale * w_scale)).astype(np.int32), "bq"),
                 numpy_helper.from_array((x_scale * w_scale).astype(np.float32), "bs"),
                 numpy_helper.from_array(np.zeros(cout, np.int32), "bz"),
                 numpy_helper.from_array(np.array(y_scale), "ys"), numpy_helper.from_array(np.array(0, np.uint8), "yz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"])]
        source = "xq"
        if padded != cin:
            inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, padded - cin, 0, 0], np.int64), "pads"))
            nodes.append(helper.make_node("Pad", ["xq", "pads", "xz"], ["xp"], mode="constant"))
            source = "xp"
        nodes += [helper.make_node("DequantizeLinear", [source, "xs", "xz"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
                  helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0),
                  helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], **conv),
                  helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),  # zero point 0: the ReLU
                  helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [x_info], [y_info], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def timed_turns(sessions: dict, x: np.ndarray, reps: int, block: int = 5) -> dict[str, float]:
    """Median seconds per run of each session; the sessions take turns (one untimed run each turn)."""
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for s in sessions.values():
        s.run(None, {"x": x})
    while min(len(t) for t in times.values()) < reps:
        for key, s in sessions.items():
            s.run(None, {"x": x})
            for _ in range(block):
                start = time.perf_counter()
                s.run(None, {"x": x})
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args(argv)
    cases = [(text, *parse_case(text)) for text in args.cases.split(",")]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions, inputs = {}, {}
    for text, cin, padded, cout, groups in cases:
        sessions[(text, "float")] = ort.InferenceSession(
            conv_model(cin, cout, args.batch, args.size, int8=False, groups=groups), opts)
        sessions[(text, "int8")] = ort.InferenceSession(
            conv_model(cin, cout, args.batch, args.size, int8=True, padded=padded, groups=groups), opts)
        inputs[cin] = np.abs(np.random.default_rng(1).standard_normal((args.batch, cin, args.size, args.size),
                                                                      dtype=np.float32))
    for text, cin, padded, cout, _ in cases:  # a padded case computes what its plain int8 case computes
        if padded != cin:
            plain = ort.InferenceSession(conv_model(cin, cout, args.batch, args.size, int8=True), opts)
            same = np.array_equal(plain.run(None, {"x": inputs[cin]})[0],
                                  sessions[(text, "int8")].run(None, {"x": inputs[cin]})[0])
            if not same:
                print(f"int8_kernels: case {text} differs from its unpadded int8 model")
                return 1
    print(f"onnxruntime {ort.__version__}; one 3x3 conv + ReLU, batch {args.batch}, {args.size}x{args.size}, "
          f"median of {args.reps} runs, models taking turns\n")
    print("| case | int8 input channels | float ms | int8 ms | int8 / float |\n|---|---|---|---|---|")
    for text, cin, padded, cout, groups in cases:
        pair = {k: sessions[(text, k)] for k in ("float", "int8")}
        t = timed_turns(pair, inputs[cin], args.reps)
        name = f"depthwise {cin}" if groups > 1 else f"{cin}->{cout}"
        print(f"| {name} | {padded} | {t['float'] * 1e3:.3f} | {t['int8'] * 1e3:.3f} | {t['int8'] / t['float']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
