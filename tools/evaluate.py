"""Top-1 accuracy of an ONNX classifier on an npz data set (shared/data layout).

    python tools/evaluate.py MODEL.onnx [MODEL2.onnx ...] [--data ../shared/data/cifar10_test.npz]
        [--norm cifar|imagenet] [--limit N]

Preprocessing: x/255, then per-channel mean/std (by model name, see tools/common.py, or --norm).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.common import load_dataset, normalization_for, shared_dir  # noqa: E402


def make_session(model) -> ort.InferenceSession:
    """CPU session from a path, bytes or ModelProto."""
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])


def logits(model, x: np.ndarray, mean: np.ndarray, std: np.ndarray, batch: int = 500) -> np.ndarray:
    """Model outputs for uint8 images ``x`` (N,3,H,W)."""
    sess = make_session(model)
    name = sess.get_inputs()[0].name
    outs = []
    for i in range(0, len(x), batch):
        xb = (x[i:i + batch].astype(np.float32) / 255.0 - mean) / std
        outs.append(sess.run(None, {name: xb.astype(np.float32)})[0])
    return np.concatenate(outs)


def accuracy(model, x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy in percent."""
    return float((logits(model, x, mean, std, batch).argmax(1) == y).mean() * 100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--data", default=str(shared_dir() / "data" / "cifar10_test.npz"))
    p.add_argument("--norm", choices=["cifar", "imagenet"], default=None,
                   help="normalisation (default: by model name)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    args = p.parse_args(argv)
    x, y = load_dataset(args.data, args.limit)
    print(f"| model | top-1 % ({len(y)} images) |\n|---|---|")
    for path in args.models:
        mean, std = normalization_for(path, args.norm)
        print(f"| {path} | {accuracy(path, x, y, mean, std):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
