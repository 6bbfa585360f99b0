"""Run calibration images through a prepared (observed) model and check every observer saw data."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .. import compat
from ..errors import QuantizationError
from .subset import CalibrationSet


@dataclass(frozen=True)
class CalibrationResult:
    samples: int
    skipped_unreadable: int
    observers: int
    batches: int

    def to_dict(self) -> dict:
        return asdict(self)


def observers_of(model: nn.Module) -> dict[str, nn.Module]:
    """The activation/weight observers a prepare step inserted (modules with min_val/max_val)."""
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
        to_eval: Callable[[nn.Module], object] | None = None,
        forward: Callable[[torch.Tensor], object] | None = None) -> CalibrationResult:
    """Feed ``calib`` through ``prepared`` under ``torch.no_grad()`` in eval mode; return what was used.

    ``to_eval`` switches the model to eval mode (default: ``move_exported_model_to_eval``, as an exported
    graph ignores ``.eval()``; the eager engine passes ``nn.Module.eval``). ``forward`` runs each batch (default:
    ``prepared`` itself); a stage that wants values from the same pass passes one that runs ``prepared`` too."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from tqdm import tqdm

    with compat.pattern_graphs_once():
        (to_eval or move_exported_model_to_eval)(prepared)
    samples = batches = 0
    with torch.no_grad():
        for x in tqdm(calib.batches(batch_size), total=-(-len(calib.dataset) // batch_size), disable=not progress,
                      desc="calibrate", unit="batch", leave=False):
            (forward or prepared)(x)
            samples += len(x)
            batches += 1
    obs = check_observers(prepared, samples)
    return CalibrationResult(samples, calib.skipped, len(obs), batches)
