"""Shared helpers of the evaluation tools: where the shared assets are, and preprocessing."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Per-channel normalisation after x/255, from shared/MANIFEST.md and models/demo/preprocess.json.
NORMALIZATION = {
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "cifar": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
}
# Which normalisation each known model expects (by file stem prefix).
MODEL_NORMALIZATION = {"resnet56_nm": "cifar", "resnet20": "imagenet", "resnet56": "imagenet",
                       "cifar10_vgg_small": "cifar"}


def shared_dir() -> Path:
    """The shared assets folder: $UDFC_SHARED, else ../shared beside the repository."""
    return Path(os.environ.get("UDFC_SHARED", REPO.parent / "shared"))


def shared_models() -> list[Path]:
    """Every ONNX model under shared/models."""
    return sorted((shared_dir() / "models").rglob("*.onnx"))


def normalization_for(model_path: str | os.PathLike, override: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) for a model: ``override`` by name, else by the model's stem (longest prefix match)."""
    name = override
    if name is None:
        stem = Path(model_path).stem
        matches = [k for k in MODEL_NORMALIZATION if stem.startswith(k)]
        if not matches:
            raise SystemExit(f"no known normalisation for {stem}; pass --norm {{{','.join(NORMALIZATION)}}}")
        name = MODEL_NORMALIZATION[max(matches, key=len)]
    mean, std = NORMALIZATION[name]
    return np.asarray(mean, np.float32).reshape(1, 3, 1, 1), np.asarray(std, np.float32).reshape(1, 3, 1, 1)


def load_dataset(path: str | os.PathLike, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``x`` uint8 (N,3,H,W) and ``y`` int64 (N,) from an npz in the shared/data layout."""
    with np.load(path) as data:
        x, y = data["x"], data["y"]
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y
