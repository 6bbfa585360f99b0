"""Frozen, validated, JSON-serialisable configs. Every report records the config that made its artifact."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from .errors import ConfigError

OBSERVERS = ("histogram", "minmax", "percentile", "moving-average")
GRANULARITIES = ("per-channel", "per-tensor")
FORMATS = ("pte", "torchscript")
RELU6_MODES = ("clamp", "separate")  # TorchScript (eager engine) handling of ReLU6, see mbquant/quant/fuse.py

T = TypeVar("T", bound="_Config")


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} '{value}' is not supported; choose one of: {', '.join(allowed)}")


def _positive(value: float, what: str, flag: str) -> None:
    if not value > 0:
        raise ConfigError(f"{what} must be positive, got {value}; pass {flag} with a value > 0")


@dataclass(frozen=True)
class QuantConfig(_Config):
    """How a float model becomes INT8 (post-training; QAT adds :class:`QATConfig`).

    ``num_calib`` counts samples, not batches. ``fuse_relu6`` makes conv(-BN)-ReLU6 one quantized unit
    (output range clamped to [0, 6]); turning it off gives the stock XNNPACK quantizer's annotation.
    """

    observer: str = "histogram"
    granularity: str = "per-channel"
    num_calib: int = 512
    seed: int = 0
    batch_size: int = 32
    fuse_relu6: bool = True
    float_logits: bool = False
    bias_correction: bool = False
    percentile: float = 99.99

    def __post_init__(self) -> None:
        _choice(self.observer, OBSERVERS, "observer")
        _choice(self.granularity, GRANULARITIES, "weight granularity")
        if not isinstance(self.num_calib, int) or self.num_calib < 1:
            raise ConfigError(f"num_calib must be a positive number of samples, got {self.num_calib}; "
                              f"pass --num-calib 512 (or at least 1)")
        _positive(self.batch_size, "batch_size", "--batch-size")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile {self.percentile} is out of range; use 50 < p <= 100 (e.g. 99.99)")


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Float training recipe: SGD with Nesterov momentum, linear warmup then cosine decay."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_frac: float = 0.05
    label_smoothing: float = 0.0
    seed: int = 0
    max_train_samples: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}; pass --epochs 1 or more")
        _positive(self.batch_size, "batch_size", "--batch-size")
        _positive(self.lr, "learning rate", "--lr")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be positive, got {self.max_train_samples}")


@dataclass(frozen=True)
class QATConfig(_Config):
    """Quantization-aware fine-tuning schedule (after torchvision's QAT recipe, shortened).

    ``batch_size`` is per process (the global batch is ``batch_size * world_size`` under torchrun).
    ``freeze_bn_after``: after this many epochs BN uses (and stops updating) its running statistics;
    ``freeze_observers_after``: after this many epochs every range (scale/zero-point) is kept fixed.
    ``None`` never freezes. ``init_ranges``: start from ranges calibrated on the seeded calibration subset
    (as PTQ does) instead of the first training batch. ``max_train_samples``: a seeded subset per run.
    ``distill``: weight of the distillation term (KL divergence to the float model's softened outputs at
    ``distill_temperature``); 0 trains on the labels only, 1 only to match the float model.
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-5
    warmup_frac: float = 0.0
    freeze_bn_after: int | None = 1
    freeze_observers_after: int | None = 2
    init_ranges: bool = True
    seed: int = 0
    max_train_samples: int | None = None
    distill: float = 0.0
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill weight {self.distill} must be in [0, 1]; e.g. --distill 1.0 to match the float model")
        _positive(self.distill_temperature, "distillation temperature", "--distill-temperature")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}; pass --epochs 1 or more "
                              f"(QAT needs at least one epoch of training)")
        _positive(self.batch_size, "batch_size", "--batch-size")
        _positive(self.lr, "learning rate", "--lr")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        for name, flag in (("freeze_bn_after", "--freeze-bn-after"), ("freeze_observers_after", "--freeze-observers-after")):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ConfigError(f"{name} must be a number of epochs >= 0 (or unset to never freeze), got {v}; "
                                  f"e.g. {flag} 2")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be positive, got {self.max_train_samples}")


@dataclass(frozen=True)
class RunConfig(_Config):
    """What a quantize-and-export run checks and measures beyond how it quantizes.

    ``min_delegated``: smallest share of ops inside the XNNPACK delegate (0..1) before the run fails.
    ``max_drop``: largest top-1 drop (percentage points, float -> INT8 program) before the run fails.
    ``min_parity``: smallest top-1 agreement (%) between the reloaded program and the in-process INT8 model.
    ``eval_limit``: evaluate on at most this many images (None: all).
    ``formats``: artifacts to build and verify: ``pte`` (ExecuTorch/XNNPACK) and/or ``torchscript`` (.pt + .ptl
    through the legacy eager engine); ``relu6`` is how that engine quantizes ReLU6 (``clamp`` or ``separate``).
    """

    target: str = "phone"
    formats: tuple[str, ...] = ("pte",)
    relu6: str = "clamp"
    min_delegated: float = 0.99
    max_drop: float | None = None
    min_parity: float = 99.0
    eval_limit: int | None = None
    eval_batch_size: int = 100
    latency_runs: int = 20
    latency_threads: int = 1
    float_program: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        if not self.formats or len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"formats {list(self.formats)} must name each artifact format once; e.g. --format pte,torchscript")
        for fmt in self.formats:
            _choice(fmt, FORMATS, "format")
        _choice(self.relu6, RELU6_MODES, "ReLU6 handling")
        if not 0.0 <= self.min_delegated <= 1.0:
            raise ConfigError(f"min_delegated {self.min_delegated} must be a ratio in [0, 1]; e.g. --min-delegated 0.99")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"max_drop {self.max_drop} must be >= 0 percentage points; e.g. --max-drop 0.5")
        if not 0.0 <= self.min_parity <= 100.0:
            raise ConfigError(f"min_parity {self.min_parity} must be a percentage in [0, 100]")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"eval_limit {self.eval_limit} must be at least 1 (or unset for all images)")
        _positive(self.eval_batch_size, "eval batch size", "--eval-batch-size")
        _positive(self.latency_runs, "latency runs", "--latency-runs")
        _positive(self.latency_threads, "latency threads", "--latency-threads")
