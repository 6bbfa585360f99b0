"""Quantize + lower each zoo model once per session (small widths, 32x32 inputs, real calibration images)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.fx import GraphModule

from mbquant import calibrate
from mbquant.config import QuantConfig
from mbquant.data import small_preset
from mbquant.mobile import Lowered, lower, write_pte
from mbquant.models import create
from mbquant.pipeline import quantize

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
    pte: object


@pytest.fixture(scope="session")
def zoo_case(small_folder, tmp_path_factory):
    cache: dict[str, Case] = {}
    out = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> Case:
        if name not in cache:
            torch.manual_seed(0)
            model = create(name, num_classes=10, width_mult=ZOO_CASES[name])
            calib = calibrate.from_folder(small_folder, small_preset(RES), 40, seed=0)
            q = quantize(model, calib, resolution=RES, config=QuantConfig(num_calib=40, batch_size=20))
            lowered = lower(q.int8, RES)
            cache[name] = Case(model, q.int8, lowered, write_pte(lowered, out / f"{name}.pte"))
        return cache[name]

    return get
