"""Quantize + lower each zoo model once per session (small widths, 32x32 inputs, real calibration images)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule

from mbquant.mobile.xnnpack.lower import Lowered, lower, write_pte
from mbquant.models import create
from tests.conftest import quantize_pt2e

ZOO_CASES = {
    "mobilenet_v1": 0.25,
    "mobilenet_v2": 0.35,
    "mobilenet_v3_small": 0.25,
    "mobilenet_v3_large": 0.25,
    "resnet18": 1.0,
}
RES = 32


@dataclass
class Case:
    model: torch.nn.Module
    int8: GraphModule
    lowered: Lowered
    pte: Path


@pytest.fixture(scope="session")
def zoo_case(calib32, tmp_path_factory):
    """INT8 logits (nothing kept in float), ReLU6 fused, percentile observer, no bias correction."""
    cache: dict[str, Case] = {}
    out = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> Case:
        if name not in cache:
            torch.manual_seed(0)
            model = create(name, num_classes=10, width_mult=ZOO_CASES[name])
            q = quantize_pt2e(model, RES, calib32, keep_float=(), bias_correction=False, batch_size=20)
            lowered = lower(q.int8, RES)
            cache[name] = Case(model, q.int8, lowered, write_pte(lowered, out / f"{name}.pte"))
        return cache[name]

    return get
