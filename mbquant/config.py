"""Frozen, validated, JSON-serialisable configs. Every report records the config that made its artifact.

This module imports nothing heavy (no torch): the CLI builds its parser from these names.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

OBSERVERS = ("histogram", "minmax", "percentile", "moving-average")
GRANULARITIES = ("per-channel", "per-tensor")
RECIPES = ("best", "stock", "qat")
INIT_RANGES = ("recipe", "minmax", "off")
INIT_BIASES = ("corrected", "float")
KEEP = ("best", "last")
SELECT_IMAGES = 2000     # held-out training images QAT's keep="best" chooses on, at most (and a fifth of the folder)
MAX_DECODE_WORKERS = 64  # image-decoding processes a loader may start (RunConfig.decode_workers, --decode-workers)
SEED_MAX = 2 ** 32 - 1  # a 32-bit generator seed (mbquant.data.slicing)
BIAS_CORRECTION_IMAGES = 512  # bias correction reads at most this many calibration images unless told otherwise ...
BIAS_CORRECTION_PIXELS = 512 * 96 * 96  # ... and, at larger inputs, as many as hold this many pixels (see below) ...
BIAS_CORRECTION_MIN_IMAGES = 128  # ... but never fewer than this many
ADAROUND_IMAGES = 256  # AdaRound learns each layer's rounding on at most this many calibration images unless told otherwise
ADAROUND_ITERATIONS = 500  # AdaRound's optimiser steps per layer unless told otherwise
LOGITS = "logits"  # --keep-float alias: the layer(s) whose output is the model's output (the classifier)


def bias_correction_images(resolution: int) -> int:
    """How many calibration images bias correction reads when not told: as many as hold the pixels per channel of
    512 images at 96 px (the shipped checkpoints' inputs are 64-96 px: 512 images for them), at least 128.

    A layer's mean shift is averaged over images x output positions, and positions grow with the input's area, so
    at 224 px 128 images hold more than 512 images at 96 px. Measured (split halves, the same INT8 graph corrected
    on two disjoint image sets): the corrections differ between halves by 1.04x their size with 512 images at
    64 px, 1.10x with 128 at 64 px and 1.11x with 128 at 224 px: the image count barely moves that spread, and 224
    px with 128 images is no noisier than 64 px with 128. The correction costs about two INT8 forward passes per
    image it reads."""
    if resolution <= 0:
        raise ConfigError(f"input resolution must be a positive number of pixels, got {resolution}")
    fit = -(-BIAS_CORRECTION_PIXELS // (resolution * resolution))
    return max(BIAS_CORRECTION_MIN_IMAGES, min(BIAS_CORRECTION_IMAGES, fit))


T = TypeVar("T", bound="_Config")


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self: T, **changes: Any) -> T:
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})  # type: ignore[arg-type]


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} '{value}' is not supported; choose one of: {', '.join(allowed)}")


def _number(value: Any, what: str, flag: str, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, integer: bool = False) -> None:
    """A finite number (an int when ``integer``) inside [lo, hi] (``lo`` excluded when ``lo_open``)."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ConfigError(f"{what} must be {kind}, got {value!r}; pass {flag} with a finite value")
    below = value <= lo if (lo is not None and lo_open) else (lo is not None and value < lo)
    if below or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{what} {value!r} is out of range {rng}; pass {flag} with a value in that range")


def _positive_int(value: Any, what: str, flag: str) -> None:
    _number(value, what, flag, lo=1, integer=True)


def check_decode_workers(workers: Any) -> None:
    """A number of image-decoding processes: 0 (decode in the calling process) up to MAX_DECODE_WORKERS."""
    _number(workers, "decode workers", "--decode-workers N (0: decode in this process)", lo=0, hi=MAX_DECODE_WORKERS,
            integer=True)


@dataclass(frozen=True)
class QuantConfig(_Config):
    """How a float model becomes INT8. Fields left ``None`` take the value of ``recipe`` for the backend.

    Recipes (each backend's values are in :mod:`mbquant.mobile.table`):
    ``best`` (default) is the best combination measured for the backend (on the phone: conv-ReLU6 fusion,
    percentile observer, fp32 classifier, bias correction); ``stock`` is the stock PT2E flow (XNNPACK's
    quantizer as shipped: histogram observer, ReLU6 not fused, everything INT8); ``qat`` is the starting
    point of quantization-aware training (ReLU6 fused, everything INT8).

    ``fuse_relu6``: quantize conv(-BN)-ReLU6 as one unit, after the clamp (ReLU6 is never replaced by ReLU).
    ``equalize``: cross-layer equalization of the float model first (:mod:`mbquant.quant.equalize`).
    ``keep_float``: layers (module names, or ``"logits"`` for the layer producing the model output) that run
    in fp32 on their dequantized INT8 inputs. ``num_calib`` counts samples, not batches.
    ``bias_correction_images``: how many of the calibration images bias correction reads (the first ones, in
    whole batches; unset: :func:`bias_correction_images` of the input resolution, 512 up to 96 px and fewer
    above). Its time and the disk it keeps between layers grow with them (at 224 px: about two INT8 forward
    passes and 1.4 MB per image), so a larger calibration set buys better ranges without a slower correction.
    ``adaround``: learn each INT8 weight's rounding (up or down) per layer on the calibration images
    (:mod:`mbquant.quant.adaround`), on the first ``adaround_images`` of them (unset: at most ``ADAROUND_IMAGES``),
    ``adaround_iterations`` optimiser steps per layer (unset: ``ADAROUND_ITERATIONS``); before bias correction.
    Its time grows with the iterations and the layers (not with the images); its memory with the images (each
    layer's input and float output).
    """

    recipe: str = "best"
    observer: str | None = None
    granularity: str = "per-channel"
    fuse_relu6: bool | None = None
    keep_float: tuple[str, ...] | None = None
    bias_correction: bool | None = None
    equalize: bool | None = None
    percentile: float = 99.99
    num_calib: int = 512
    seed: int = 0
    batch_size: int = 32
    bias_correction_images: int | None = None
    adaround: bool | None = None
    adaround_images: int | None = None
    adaround_iterations: int | None = None

    def __post_init__(self) -> None:
        _choice(self.recipe, RECIPES, "recipe")
        if self.observer is not None:
            _choice(self.observer, OBSERVERS, "observer")
        _choice(self.granularity, GRANULARITIES, "weight granularity")
        for name in ("fuse_relu6", "bias_correction", "equalize", "adaround"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{name} must be true, false or unset (the recipe decides), got {v!r}")
        if self.keep_float is not None:
            if isinstance(self.keep_float, str) or not all(isinstance(n, str) and n for n in self.keep_float):
                raise ConfigError(f"keep_float must be a list of layer names, got {self.keep_float!r}; "
                                  f"e.g. --keep-float logits or --keep-float classifier.1,features.0")
            object.__setattr__(self, "keep_float", tuple(self.keep_float))
        _positive_int(self.num_calib, "num_calib (calibration samples)", "--num-calib")
        _number(self.seed, "seed", "--seed", lo=0, hi=SEED_MAX, integer=True)
        _positive_int(self.batch_size, "calibration batch size", "--batch-size")
        if self.bias_correction_images is not None:
            _positive_int(self.bias_correction_images, "bias_correction_images", "--bias-correction-images")
        if self.adaround_images is not None:
            _positive_int(self.adaround_images, "adaround_images", "--adaround-images")
        if self.adaround_iterations is not None:
            _positive_int(self.adaround_iterations, "adaround_iterations", "--adaround-iterations")
        _number(self.percentile, "percentile", "--percentile", lo=50.0, hi=100.0, lo_open=True)


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Float training recipe: SGD with Nesterov momentum, linear warmup then cosine decay.

    After the last epoch every BatchNorm's running statistics are re-estimated on ``bn_recalibration`` training
    images (cumulative average, train-mode BN, no gradient step; 0 skips it), and the eval-mode top-1 on those
    images may not fall more than ``max_eval_gap_pp`` below the last epoch's train-mode top-1: a model whose eval
    mode does not compute what training measured is not written."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_frac: float = 0.05
    label_smoothing: float = 0.0
    seed: int = 0
    max_train_samples: int | None = None
    bn_recalibration: int = 2048
    max_eval_gap_pp: float = 20.0

    def __post_init__(self) -> None:
        _check_training(self)
        _number(self.label_smoothing, "label_smoothing", "--label-smoothing", lo=0.0, hi=1.0)
        _number(self.bn_recalibration, "bn_recalibration (training images)", "--bn-recalibration (0 to skip)", lo=0,
                integer=True)
        _number(self.max_eval_gap_pp, "max_eval_gap_pp", "--max-eval-gap (percentage points)", lo=0.0, hi=100.0)


@dataclass(frozen=True)
class QATConfig(_Config):
    """Quantization-aware fine-tuning schedule.

    The defaults start where the backend's post-training recipe ends and train toward the float model: the recipe's
    ranges (``init_ranges="recipe"``), its corrected biases (``init_biases``), BN statistics and ranges kept from
    the start (``freeze_bn_after=0``, ``freeze_observers_after=0``: batch statistics would undo the corrected biases),
    distillation (``distill=1``), and the state kept is the one that agrees best with the float model on held-out
    training images (``keep="best"``, the start included); measured against label training, mean-of-min/max ranges,
    float biases and torchvision's schedule (BN frozen after 1 epoch, ranges after 2) in README, "QAT defaults".

    ``batch_size`` is per process (the global batch is ``batch_size * world_size`` under torchrun).
    ``freeze_bn_after``: after this many epochs BN uses (and stops updating) its running statistics;
    ``freeze_observers_after``: after this many epochs every range (scale/zero-point) is kept fixed.
    ``None`` never freezes. ``init_ranges``: where the ranges start, measured on the seeded calibration subset:
    ``recipe`` (the backend's post-training observer, e.g. percentile: the ranges PTQ of the same checkpoint uses),
    ``minmax`` (the mean of the per-batch min/max), ``off`` (the first training batch sets them).
    ``max_train_samples``: a seeded subset per run. ``compare_ptq``: also quantize the checkpoint post-training with
    the backend's default recipe and the same flags, measure it on the same images, and say in the report whether
    QAT beat it.
    ``distill``: weight of the distillation term (KL divergence to the float model's softened outputs at
    ``distill_temperature``); 0 trains on the labels only, 1 only to match the float model.
    ``lr``: the SGD learning rate; ``None`` takes the backend's (its row's ``qat_lr`` in
    :mod:`mbquant.mobile.table`, measured per backend).
    ``init_biases``: ``corrected`` starts from the biases post-training bias correction gives the starting INT8 model
    (measured on the calibration images, carried into the batch norms it folds into), so training starts where the
    backend's PTQ recipe ends; ``float`` from the float model's. ``None``: ``corrected`` on backends with bias
    correction whose ranges are initialised, ``float`` elsewhere.
    ``keep``: ``best`` holds out ``select_images`` images of the training folder (a seeded draw, never trained on;
    unset: a fifth of the folder, at most ``SELECT_IMAGES``), measures on them the top-1 agreement with the float
    model of the INT8 model the state converts to (a converted copy; the fake-quantized model is not a faithful
    proxy on every backend, README "QAT defaults") at the start and after every epoch, and keeps the best state (the
    start wins ties); ``last`` keeps the last epoch's and holds nothing out.
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-5
    warmup_frac: float = 0.0
    freeze_bn_after: int | None = 0
    freeze_observers_after: int | None = 0
    init_ranges: str = "recipe"
    seed: int = 0
    max_train_samples: int | None = None
    distill: float = 1.0
    distill_temperature: float = 1.0
    compare_ptq: bool = True
    init_biases: str | None = None
    keep: str = "best"
    select_images: int | None = None

    def __post_init__(self) -> None:
        _check_training(self)
        _choice(self.init_ranges, INIT_RANGES, "QAT range initialisation (--init-ranges)")
        if self.init_biases is not None:
            _choice(self.init_biases, INIT_BIASES, "QAT bias initialisation (--init-biases)")
        _choice(self.keep, KEEP, "QAT state kept (--keep)")
        if self.select_images is not None:
            _positive_int(self.select_images, "select_images (held-out images)", "--select-images")
            if self.keep != "best":
                raise ConfigError(f"--select-images {self.select_images} with --keep {self.keep}: held-out images "
                                  f"only choose the state with --keep best; drop one of them")
        if self.init_biases == "corrected" and self.init_ranges == "off":
            raise ConfigError("--init-biases corrected with --init-ranges off: bias correction measures the starting "
                              "INT8 model, which needs its ranges; pass --init-ranges recipe (the default) or "
                              "--init-biases float")
        if self.init_ranges == "off" and self.freeze_observers_after == 0:
            raise ConfigError("--init-ranges off with --freeze-observers-after 0: no range would ever be measured; "
                              "pass --init-ranges recipe (the default), or let the observers run for an epoch "
                              "(--freeze-observers-after 1)")
        _number(self.distill, "distill weight", "--distill (e.g. --distill 1.0 to match the float model)", lo=0.0,
                hi=1.0)
        _number(self.distill_temperature, "distillation temperature", "--distill-temperature", lo=0.0, lo_open=True)
        for name, flag in (("freeze_bn_after", "--freeze-bn-after"), ("freeze_observers_after", "--freeze-observers-after")):
            v = getattr(self, name)
            if v is not None:
                _number(v, f"{name} (a number of epochs, or never)", f"{flag} N (N >= 0) or {flag} never", lo=0,
                        integer=True)


def _check_training(cfg: TrainConfig | QATConfig) -> None:
    _positive_int(cfg.epochs, "epochs", "--epochs 1 or more")
    _positive_int(cfg.batch_size, "training batch size", "--batch-size")
    if cfg.lr is not None:
        _number(cfg.lr, "learning rate", "--lr", lo=0.0, lo_open=True, hi=10.0)
    _number(cfg.momentum, "momentum", "--momentum", lo=0.0, hi=0.999)
    _number(cfg.weight_decay, "weight_decay", "--weight-decay", lo=0.0, hi=1.0)
    _number(cfg.warmup_frac, "warmup_frac", "--warmup-frac", lo=0.0, hi=0.99)
    _number(cfg.seed, "seed", "--seed", lo=0, hi=SEED_MAX, integer=True)
    if cfg.max_train_samples is not None:
        _positive_int(cfg.max_train_samples, "max_train_samples", "--max-train-samples")


@dataclass(frozen=True)
class RunConfig(_Config):
    """What a quantize-and-export run builds, checks and measures beyond how it quantizes.

    ``target`` and ``formats`` pick the backends (the default rows of :mod:`mbquant.mobile.table`); ``backends``
    names rows directly instead. ``options`` are the backend options the user set (name -> value; each row declares
    its own, e.g. ``cpu`` and ``flash_kb`` for pte-cortex-m, ``min_delegated`` for pte-xnnpack); the table validates
    them and fills the defaults.
    Gates every artifact gets, in one place (:func:`mbquant.pipeline.gate_failures`), besides its backend's own:
    ``max_drop``: largest top-1 drop in percentage points, float model -> the artifact itself;
    the artifact may not be significantly worse than the in-process INT8 model it was written from
    (top-1 and agreement with the float model; paired test, ``parity_z`` standard errors);
    ``min_parity``: an optional floor on top-1 agreement (%) between the artifact and that INT8 model.
    ``eval_limit``: evaluate on a seeded, class-stratified subset of this many images (None: all).
    ``decode_workers``: processes that decode and preprocess the evaluation images ahead of the models (0: this
    process does); the same images in the same order, so the same numbers.
    ``fallback``: ``"auto"`` keeps the fewest blocks in fp32 that bring the drop within ``max_drop`` on
    ``fallback_images`` held-out calibration-folder images (:mod:`mbquant.fallback`); ``"none"``: never.
    """

    target: str | None = "phone"
    formats: tuple[str, ...] = ("pte",)
    backends: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    max_drop: float | None = None
    min_parity: float | None = None
    parity_z: float = 3.0
    eval_limit: int | None = None
    eval_batch_size: int = 100
    decode_workers: int = 0
    latency_runs: int = 20
    latency_threads: int = 1
    float_program: bool = True
    fallback: str = "none"
    fallback_images: int = 2000

    _OPTIONS_V1 = ("cpu", "int8_input", "strict", "flash_kb", "ram_kb", "min_delegated")   # fields before options

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "backends", tuple(self.backends))
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise ConfigError(f"options must map option names to values, got {self.options!r}")
        object.__setattr__(self, "options", {k: v for k, v in self.options.items() if v is not None})
        if self.target is not None and not isinstance(self.target, str):
            raise ConfigError(f"target must be a name (e.g. phone), got {self.target!r}")
        if not self.backends and (not self.formats or len(set(self.formats)) != len(self.formats)):
            raise ConfigError(f"formats {list(self.formats)} must name each artifact format once; e.g. --format pte,torchscript")
        if self.max_drop is not None:
            _number(self.max_drop, "max_drop (percentage points)", "--max-drop (e.g. 0.5)", lo=0.0, hi=100.0)
        if self.min_parity is not None:
            _number(self.min_parity, "min_parity (%)", "--min-parity (e.g. 99)", lo=0.0, hi=100.0)
        _number(self.parity_z, "parity_z", "--parity-z (e.g. 3)", lo=0.0, lo_open=True, hi=10.0)
        if self.eval_limit is not None:
            _positive_int(self.eval_limit, "eval_limit", "--eval-limit")
        _positive_int(self.eval_batch_size, "eval batch size", "--eval-batch-size")
        check_decode_workers(self.decode_workers)
        _positive_int(self.latency_runs, "latency runs", "--latency-runs")
        _positive_int(self.latency_threads, "latency threads", "--latency-threads")
        _choice(self.fallback, ("none", "auto"), "fallback")
        _positive_int(self.fallback_images, "fallback_images", "--fallback-images")
        if self.fallback == "auto" and self.max_drop is None:
            raise ConfigError("--fallback auto keeps layers in float until the drop is within a budget, and no budget "
                              "was given; add --max-drop PP (e.g. --max-drop 0.1)")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Also reads the ``run`` section of format-1 reports, whose backend options were fields."""
        d = dict(d)
        old = {k: d.pop(k) for k in cls._OPTIONS_V1 if k in d}
        if old:
            d["options"] = {**old, **d.get("options", {})}
        return super().from_dict.__func__(cls, d)  # type: ignore[attr-defined]
