"""mbquant: INT8 quantization and verified mobile export for MobileNet-family CNNs."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import QATConfig, QuantConfig, RunConfig, TrainConfig
from .errors import (ConfigError, DataError, ExportError, MbquantError, ModelError, QuantizationError,
                     VerificationError)
from .models import ModelInfo, available_models, create, create_with_info, load_checkpoint, save_checkpoint
from .pipeline import Quantized, quantize, run_ptq, run_qat

__all__ = [
    "__version__",
    "QATConfig", "QuantConfig", "RunConfig", "TrainConfig",
    "MbquantError", "ConfigError", "DataError", "ModelError", "QuantizationError", "ExportError",
    "VerificationError",
    "ModelInfo", "available_models", "create", "create_with_info", "load_checkpoint", "save_checkpoint",
    "Quantized", "quantize", "run_ptq", "run_qat",
]
