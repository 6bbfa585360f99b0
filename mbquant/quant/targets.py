"""Deployment targets and what each accepts (a capability table, checked before any work is done)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import QuantConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str                      # the ExecuTorch backend that runs the INT8 program
    formats: tuple[str, ...]          # artifact formats this toolkit builds for the target
    granularities: tuple[str, ...]    # weight granularities the backend's kernels take
    dynamic_batch: bool               # whether the exported program accepts any batch size up to a bound

    def check(self, config: QuantConfig, fmt: str = "pte") -> None:
        if fmt not in self.formats:
            raise ConfigError(f"format '{fmt}' is not supported on target '{self.name}'; supported: {', '.join(self.formats)}")
        if config.granularity not in self.granularities:
            raise ConfigError(f"weight granularity '{config.granularity}' is not supported on target '{self.name}' "
                              f"({self.backend}); supported: {', '.join(self.granularities)}")


TARGETS: dict[str, Target] = {
    "phone": Target("phone", "ARM phones: ExecuTorch with the XNNPACK delegate (.pte), or TorchScript on the "
                    "qnnpack engine (.pt/.ptl)", "XnnpackBackend", ("pte", "torchscript"), ("per-channel", "per-tensor"),
                    True),
    "x86": Target("x86", "x86 servers: TorchScript on the x86 (fbgemm/onednn) quantized engine", "x86 engine",
                  ("torchscript",), ("per-channel", "per-tensor"), True),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"target '{name}' is not supported; supported: {', '.join(TARGETS)}")
    return TARGETS[name]
