"""mbquant: INT8 quantization and verified mobile export for MobileNet-family CNNs.

The public API is imported on first use (PEP 562), so ``import mbquant`` and ``mbquant --help`` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "QATConfig": "config", "QuantConfig": "config", "RunConfig": "config", "TrainConfig": "config",
    "MbquantError": "errors", "ConfigError": "errors", "DataError": "errors", "ModelError": "errors",
    "QuantizationError": "errors", "ExportError": "errors", "VerificationError": "errors",
    "ModelInfo": "models", "available_models": "models", "create": "models", "create_with_info": "models",
    "load_checkpoint": "models", "save_checkpoint": "models", "resolve_model": "models",
    "Quantized": "pipeline", "quantize": "pipeline", "run_job": "pipeline",
    "ArtifactResult": "records", "RunReport": "records", "Sidecar": "records", "Baseline": "records",
    "check": "check", "measure": "check",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'mbquant' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
