"""Run calibration images through a prepared (observed) model and check every observer saw data."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import DataError, QuantizationError
from .subset import CalibrationSet

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    samples: int
    skipped: int
    observers: int
    batches: int

    def to_dict(self) -> dict:
        return {"samples": self.samples, "skipped_unreadable": self.skipped, "observers": self.observers,
                "batches": self.batches}


def observers_of(model: nn.Module) -> dict[str, nn.Module]:
    """The activation/weight observers inserted by ``prepare_pt2e`` (modules with min_val/max_val)."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "min_val") and hasattr(m, "max_val") and hasattr(m, "calculate_qparams")}


def _empty(obs: nn.Module) -> bool:
    mn, mx = obs.min_val, obs.max_val
    if mn.numel() == 0:
        return True
    return bool(torch.isinf(mn).all()) and bool(torch.isinf(mx).all())


def check_observers(prepared: nn.Module, samples: int) -> dict[str, nn.Module]:
    """Fail when any observer saw no data (its range would be made up, not measured)."""
    obs = observers_of(prepared)
    empty = [n for n, o in obs.items() if _empty(o)]
    if empty:
        raise QuantizationError(f"{len(empty)} of {len(obs)} observers saw no data after {samples} calibration "
                                f"samples (first: {empty[0]}); run real images through every branch of the model")
    return obs


def run(prepared: nn.Module, calib: CalibrationSet, *, batch_size: int = 32, progress: bool = False,
        to_eval: Callable[[nn.Module], object] | None = None) -> CalibrationResult:
    """Feed ``calib`` through ``prepared`` under ``torch.no_grad()`` in eval mode; return what was used.

    ``to_eval`` switches the model to eval mode (default: ``move_exported_model_to_eval``, as an exported
    graph ignores ``.eval()``; the eager engine passes ``nn.Module.eval``)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from tqdm import tqdm

    (to_eval or move_exported_model_to_eval)(prepared)
    samples = batches = 0
    skipped0 = len(calib.dataset.skipped)
    with torch.no_grad():
        for batch in tqdm(calib.loader(batch_size), disable=not progress, desc="calibrate", unit="batch", leave=False):
            if batch is None:
                continue
            x, _ = batch
            prepared(x)
            samples += len(x)
            batches += 1
    skipped = len(calib.dataset.skipped) - skipped0
    if samples == 0:
        raise DataError(f"no readable calibration images in '{calib.root}' ({skipped} unreadable); "
                        f"pass a folder of valid images (.jpg .jpeg .png .bmp .webp)")
    obs = check_observers(prepared, samples)
    log.info("calibrated on %d samples (%d unreadable skipped), %d observers", samples, skipped, len(obs))
    return CalibrationResult(samples, skipped, len(obs), batches)
