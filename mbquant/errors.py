"""One error hierarchy for mbquant.

Every message says what went wrong, which value caused it, and how to fix it.
The CLI turns an :class:`MbquantError` into its message and ``exit_code``.
"""
from __future__ import annotations


class MbquantError(Exception):
    """Base class of every error mbquant raises on purpose."""

    exit_code = 1


class ConfigError(MbquantError, ValueError):
    """A user-supplied option or config value is invalid (a usage error)."""

    exit_code = 2


class DataError(MbquantError):
    """A dataset or image folder is missing, empty, corrupt or inconsistent."""


class ModelError(MbquantError):
    """An unknown model, or weights that do not fit the model."""

    exit_code = 2


class QuantizationError(MbquantError):
    """Preparing, calibrating or converting the model failed a check."""


class ExportError(MbquantError):
    """Lowering or writing an artifact failed."""


class TrainingError(MbquantError):
    """Training produced a model that cannot be shipped (e.g. one whose eval mode does not compute what training
    measured)."""


class VerificationError(MbquantError):
    """A reloaded artifact does not match the model it was made from, or a quality gate failed."""
