"""tools/reproduce_table2.py: table layout, paper columns (L2 then L1), ablation registry, cache."""
from pathlib import Path

import numpy as np
import pytest

from tests.graphs import conv_chain
from tools import reproduce_table2 as rt


class FakeAccuracy:
    """Evaluator stand-in: distinct accuracies in call order (compression still runs for real)."""

    def __init__(self):
        self.calls = 0
        self.y = np.zeros(123)

    def __call__(self, model):
        self.calls += 1
        return 50.0 + self.calls


def _ctx(stem="resnet56_nm"):
    ctx = rt.Context(Path(f"/nowhere/{stem}.onnx"), conv_chain((3, 8, 6)), FakeAccuracy(), {})
    ctx.baseline = 90.0
    return ctx


def test_table2_puts_paper_l2_then_l1_beside_ours():
    ctx = _ctx()
    text = rt.table2(ctx, ["prune", "udfc"], [0.5], ["l2", "l1"], ["float", "4"])
    lines = text.splitlines()
    assert "| method | ratio | paper L2 | paper L1 | float L2 | float L1 | 4-bit L2 | 4-bit L1 |" in lines
    prune = next(line for line in lines if line.startswith("| Prune | 50% |"))
    assert "24.34 (-69.54) | 25.58 (-68.30)" in prune  # the paper's numbers, drop from 93.88
    assert "(-" in prune and ctx.evaluate.calls == 8 and "123 images" in lines[0]


def test_table2_on_other_models_has_no_paper_columns():
    text = rt.table2(_ctx("resnet20"), ["prune"], [0.3], ["l1"], ["float"])
    assert "paper" not in text.splitlines()[2]


def test_every_ablation_is_registered_and_documented_in_help():
    expected = {"alpha1", "alpha2", "bias-units", "bias-transfer", "ridge", "regress-quantized", "quant-scale", "dfq",
                "granularity", "bits", "selection", "leads", "mean-weight"}
    assert expected <= set(rt.ABLATIONS)


def test_grid_rows_and_columns():
    ctx = _ctx()
    text = rt._grid(ctx, "T", [("a", {}), ("b", dict(method="prune"))], rt._ratio_cols([0.3, 0.5]))
    assert text.splitlines()[2] == "| setting | 30% float | 50% float |"
    assert len([line for line in text.splitlines() if line.startswith("| a |") or line.startswith("| b |")]) == 2


def test_preprocessed_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("UDFC_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8), y=np.arange(5))
    mean, std = np.full((1, 3, 1, 1), 0.5, np.float32), np.full((1, 3, 1, 1), 0.25, np.float32)
    x1, y1 = rt.preprocessed(data, mean, std)
    x2, y2 = rt.preprocessed(data, mean, std)  # from the cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    np.testing.assert_allclose(np.asarray(x2), np.asarray(x1))
    with np.load(data) as d:
        np.testing.assert_allclose(np.asarray(x1), (d["x"] / 255.0 - 0.5) / 0.25, atol=1e-5)
    assert y2.tolist() == list(range(5))


def test_list_ablations_exits_zero(capsys):
    assert rt.main(["--ablation", "list"]) == 0
    assert "bits" in capsys.readouterr().out


def test_bad_set_fails_early():
    with pytest.raises(Exception):
        rt.main(["--set", "regression=nonsense", "--limit", "1"])
