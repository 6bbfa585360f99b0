"""``pte-xnnpack``: PT2E INT8 -> ExecuTorch program with the XNNPACK delegate (ARM phones).

quantizer.py (composed quantizer), lower.py (lowering, delegation, atomic write), runtime.py (PteModel, runtime
threads), client.py (the torch-free reference client and the host/ARM C++ runners), runner/pte_runner.cpp.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from ...config import QuantConfig
from ...quant.export import FloatModel
from ...quant.keep_float import resolve_names
from ..backend import Predictor, Written
from ..pt2e import PT2EBackend
from .lower import lower, write_pte
from .quantizer import build_quantizer
from .runtime import PteModel

class XnnpackBackend(PT2EBackend):
    def quantizer(self, fm: FloatModel, config: QuantConfig, *, qat: bool):
        layers = resolve_names(config.keep_float or (), fm.module, fm.graph)
        return build_quantizer(config, layers, qat=qat)

    def write(self, model: nn.Module, stem: Path, *, resolution: int) -> list[Written]:
        t = time.perf_counter()
        lowered = lower(model, resolution)
        seconds = round(time.perf_counter() - t, 1)
        path = write_pte(lowered, Path(f"{stem}.pte"))
        return [Written(path, {"lower_seconds": seconds, "delegation": lowered.delegation.to_dict()},
                        delegated=lowered.delegation.ratio)]

    def open(self, path: Path, sidecar) -> Predictor:
        return PteModel(path)

    def gate_failures(self, result, run) -> list[str]:
        bound = self.options["min_delegated"]
        if result.delegated is None or result.delegated >= bound:
            return []
        outside = result.details.get("delegation", {}).get("ops_outside_delegate", {})
        return [f"{result.file} ({result.backend}): only {result.delegated:.2%} of ops run in the XNNPACK delegate "
                f"(< --min-delegated {bound}); outside it: {outside}; those ops would run in the portable kernels"]

    def summary_lines(self, result) -> list[str]:
        d = result.details.get("delegation") or {}
        islands = d.get("float_islands")
        if not islands:
            return []
        parts = ", ".join(f"{v['islands']} x {k} ({v['fp32_values_per_image']:,} fp32 values per image)"
                          for k, v in sorted(islands.items(), key=lambda kv: -kv[1]["fp32_values_per_image"]))
        return [f"{result.file}: inside the XNNPACK delegate {d.get('int8_regions', 0)} regions run INT8 kernels; "
                f"float islands (converted to fp32 and back): {parts}"]

    def verify_on_arm(self, bundle: Any, data: Path, limit: int | None) -> dict[str, Any]:
        from .client import compare_runners

        return compare_runners(bundle.root, data, limit=limit)
