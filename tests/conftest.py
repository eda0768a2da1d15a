"""Shared fixtures: the repository on sys.path, the shared assets (skipped when absent), small graphs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("UDFC_SHARED", REPO.parent / "shared"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def shared_models() -> Path:
    path = SHARED / "models" / "cifar10"
    if not (path / "resnet56_nm.onnx").exists():
        pytest.skip(f"shared models not found at {path} (set UDFC_SHARED to the shared assets folder)")
    return path


@pytest.fixture(scope="session")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    path = SHARED / "data" / "cifar10_test.npz"
    if not path.exists():
        pytest.skip(f"CIFAR-10 test set not found at {path} (set UDFC_SHARED)")
    with np.load(path) as d:
        return d["x"], d["y"]
