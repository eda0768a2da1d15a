"""Every builder architecture at --prune-ratio 0.3 --weight-bits 8 (udfc and prune) and at ratio 0 / float.

The same measurement as ``python tools/architectures.py`` (which prints the table): each run goes
through ``compress_file``, so the output passed onnx.checker and ONNX Runtime before it was kept.
"""
from __future__ import annotations

import pytest

from models.builders import BUILDERS
from tools.architectures import evaluate


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def row(request, tmp_path_factory):
    return evaluate(request.param, ratio=0.3, bits=8, samples=32, seed=0, workdir=tmp_path_factory.mktemp("arch"))


def test_pruned_output_is_smaller_and_lossless_setting_reproduces_the_model(row):
    assert row.pruned > 0
    assert row.macs_after < row.macs_before
    assert row.lossless_dev <= 1e-4  # --prune-ratio 0 --no-quant, relative to the output scale


def test_udfc_error_is_lower_than_plain_pruning_wherever_compensation_applies(row):
    if not row.compensation_applies:
        # no BN statistics (the BN-free MLP): UDFC prunes exactly like plain pruning
        assert row.name == "mlp" and row.err_udfc == pytest.approx(row.err_prune, rel=0.02)
        return
    assert row.err_udfc < row.err_prune
