"""mbquant as a pytest plugin (registered through the ``pytest11`` entry point): accuracy-drop regression tests in a
user's own test suite.

    def test_int8_model_keeps_its_accuracy(mbquant_data):
        assert_accuracy_drop("mobilenet_v2_w0.5_r64_fmnist", "bundle/", mbquant_data, max_drop_pp=0.5,
                             min_agreement=99.0)

A failure raises AssertionError with the same readable verdict `mbquant check` prints (which model, which metric,
how much, versus what, on how many images, with the paired 95 % confidence interval of the drop). Options:
``--mbquant-data DIR`` (or ``$MBQUANT_DATA``) for the labelled folder, ``--mbquant-limit N`` for a seeded slice.
Importing this module imports nothing heavy; the check runs torch and the ExecuTorch runtime when called.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def assert_accuracy_drop(float_model: Any, artifact: Path | str, data: Path | str, *, max_drop_pp: float | None = 0.5,
                         min_agreement: float | None = None, strict_ci: bool = False, limit: int | None = None,
                         baseline: Path | str | None = None, tolerance: float | None = None):
    """Check ``artifact`` (a .pte/.pt/.ptl with its sidecar, or a bundle) against ``float_model`` (an nn.Module, a
    checkpoint path or a shipped checkpoint name) on the labelled folder ``data``; returns the verdict, raises
    AssertionError with its text on a regression."""
    from .check import check

    v = check(artifact, data, float_model=float_model, max_drop=max_drop_pp, min_agreement=min_agreement,
              strict_ci=strict_ci, limit=limit, baseline=baseline, tolerance=tolerance)
    if not v.ok:
        raise AssertionError(v.text())
    return v


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mbquant", "INT8 accuracy-drop checks (mbquant)")
    group.addoption("--mbquant-data", default=None, help="labelled ImageFolder the accuracy checks run on "
                    "(default: $MBQUANT_DATA)")
    group.addoption("--mbquant-limit", type=int, default=None, help="check on a seeded, stratified slice of N images")


@pytest.fixture
def mbquant_data(request: pytest.FixtureRequest) -> Path:
    """The labelled folder given with --mbquant-data or $MBQUANT_DATA (the test is skipped with a reason without)."""
    value = request.config.getoption("--mbquant-data") or os.environ.get("MBQUANT_DATA")
    if not value:
        pytest.skip("no labelled data: pass --mbquant-data DIR (or set MBQUANT_DATA) to run accuracy checks")
    return Path(value)


@pytest.fixture
def mbquant_limit(request: pytest.FixtureRequest) -> int | None:
    return request.config.getoption("--mbquant-limit")


@pytest.fixture
def mbquant_check(mbquant_limit):
    """``assert_accuracy_drop`` with the session's --mbquant-limit applied."""
    def run(float_model, artifact, data, **kwargs):
        kwargs.setdefault("limit", mbquant_limit)
        return assert_accuracy_drop(float_model, artifact, data, **kwargs)
    return run
