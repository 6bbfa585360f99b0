"""The one capability table: one row per runtime mbquant builds artifacts for.

A row says which target and format select it, what its kernels accept (weight granularities, observers),
what may stay in float, which post-training fixes it supports, and each recipe's choices for it. The
pipeline checks a run against the table before any work and resolves every ``None`` field of a
:class:`~mbquant.config.QuantConfig` from the row's recipe. The code of a backend lives in the package the row
names (``mbquant.mobile.<package>``) and is imported only when a run uses it.

Adding a backend = one row here + one package under ``mbquant/mobile/`` that provides
:class:`mbquant.mobile.backend.Backend` + its tests under ``tests/mobile/<package>/``.

This module is plain data (no torch import): ``mbquant --help`` reads it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from ..config import LOGITS, OBSERVERS, QuantConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import RunConfig
    from .backend import Backend

_ALL_OBSERVERS = OBSERVERS


@dataclass(frozen=True)
class BackendSpec:
    name: str                          # e.g. "pte-xnnpack"
    target: str                        # --target that selects it
    format: str                        # --format that selects it
    runtime: str                       # what runs the artifact
    package: str                       # mbquant.mobile.<package> implements it
    suffixes: tuple[str, ...]          # files written per INT8 artifact
    granularities: tuple[str, ...]     # weight granularities its kernels run
    observers: tuple[str, ...]         # activation observers it accepts for PTQ
    keep_float: bool                   # layers may run in fp32 (--keep-float)
    bias_correction: bool              # --bias-correction supported
    delegate: bool                     # has a delegate whose coverage is gated (--min-delegated)
    float_program: bool                # can write the fp32 model as a reference artifact
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)   # choices its kernels make themselves
    qat: bool = True                   # quantization-aware training offered

    def recipe(self, name: str) -> Mapping[str, Any]:
        return self.recipes[name]


_STOCK = {"observer": "histogram", "fuse_relu6": False, "keep_float": (), "bias_correction": False, "equalize": False}
_QAT = {"observer": "moving-average", "fuse_relu6": True, "keep_float": (), "bias_correction": False, "equalize": False}


def _recipes(best: dict[str, Any], stock: dict[str, Any] | None = None) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({"best": MappingProxyType({"equalize": False, **best}),
                             "stock": MappingProxyType({**_STOCK, **(stock or {})}), "qat": MappingProxyType(dict(_QAT))})


BACKENDS: dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec(
        "pte-xnnpack", "phone", "pte", "ExecuTorch runtime + XNNPACK delegate (ARM phones)", "xnnpack", (".pte",),
        ("per-channel", "per-tensor"), _ALL_OBSERVERS, keep_float=True, bias_correction=True, delegate=True,
        float_program=True,
        # measured on the phone checkpoint (README, "PTQ choices"): drop 0.03 pp, float~.pte agreement 99.58 %
        recipes=_recipes({"observer": "percentile", "fuse_relu6": True, "keep_float": (LOGITS,),
                          "bias_correction": True})),
    BackendSpec(
        "ts-qnnpack", "phone", "torchscript", "TorchScript (.pt) / lite interpreter (.ptl), qnnpack engine",
        "torchscript", (".pt", ".ptl"), ("per-channel", "per-tensor"), _ALL_OBSERVERS, keep_float=False,
        bias_correction=False, delegate=False, float_program=False,
        # measured (README, "TorchScript artifacts"): ReLU6 fused as the clamp, histogram observer, drop 0.22 pp
        recipes=_recipes({"observer": "histogram", "fuse_relu6": True, "keep_float": (), "bias_correction": False})),
    BackendSpec(
        "ts-x86", "x86", "torchscript", "TorchScript (.pt) / lite interpreter (.ptl), x86 engine (servers)",
        "torchscript", (".pt", ".ptl"), ("per-channel", "per-tensor"), _ALL_OBSERVERS, keep_float=False,
        bias_correction=False, delegate=False, float_program=False,
        recipes=_recipes({"observer": "histogram", "fuse_relu6": True, "keep_float": (), "bias_correction": False})),
    BackendSpec(
        "pte-cortex-m", "mcu", "pte", "ExecuTorch runtime + CMSIS-NN INT8 kernels (cortex_m:: ops), Cortex-M MCUs",
        "cortex_m", (".pte",), ("per-channel",), ("histogram",), keep_float=False, bias_correction=True,
        delegate=False, float_program=False, fixed=MappingProxyType({"fuse_relu6": True}), qat=False,
        # ExecuTorch's CortexMQuantizer: histogram observer, per-channel conv weights, ReLU/ReLU6 folded into the
        # kernels' output range; measured (README, "MCU"): equalization + bias correction is the best combination
        recipes=_recipes({"observer": "histogram", "fuse_relu6": True, "keep_float": (), "bias_correction": True,
                          "equalize": True}, stock={"fuse_relu6": True})),
)}


def targets() -> list[str]:
    return sorted({s.target for s in BACKENDS.values()})


def get_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ConfigError(f"backend '{name}' is not supported; supported: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def select(target: str, formats: tuple[str, ...]) -> list[BackendSpec]:
    """The backends a ``--target`` / ``--format`` pair asks for, in the order of ``formats``."""
    offered = {s.format: s for s in BACKENDS.values() if s.target == target}
    if not offered:
        raise ConfigError(f"target '{target}' is not supported; supported: {', '.join(targets())}")
    out = []
    for fmt in formats:
        if fmt not in offered:
            raise ConfigError(f"format '{fmt}' is not supported on target '{target}'; supported: "
                              f"{', '.join(offered)}")
        out.append(offered[fmt])
    return out


def resolve(config: QuantConfig, spec: BackendSpec, *, qat: bool = False) -> QuantConfig:
    """The fully specified config ``spec`` runs: ``None`` fields from the recipe, explicit ones checked.

    With ``qat`` the observer is the training fake-quantize (moving-average) and bias correction is off
    (QAT learns that correction); asking for either explicitly is an error."""
    recipe = spec.recipe(config.recipe)
    if qat and not spec.qat:
        raise ConfigError(f"QAT is not offered for backend '{spec.name}': ExecuTorch's CortexMQuantizer has no QAT "
                          f"configuration (and its patterns do not cover conv-BN training); fine-tune with "
                          f"`mbquant qat --target phone` or use `mbquant ptq --target {spec.target}` (equalization + bias "
                          f"correction)")
    if qat:
        if config.observer not in (None, "moving-average"):
            raise ConfigError(f"observer '{config.observer}' is for post-training quantization; QAT uses "
                              f"moving-average fake-quantize: drop --observer")
        if config.bias_correction:
            raise ConfigError("--bias-correction is a post-training fix; QAT learns the correction itself: drop the flag")
        recipe = {**recipe, "observer": "moving-average", "bias_correction": False}
    values = {k: (getattr(config, k) if getattr(config, k) is not None else v) for k, v in recipe.items()}
    for k, v in spec.fixed.items():
        if values[k] != v:
            raise ConfigError(f"backend '{spec.name}' always has {k.replace('_', '-')} = {v} (its kernels do it); "
                              f"drop the flag that asks for {values[k]}")
    if config.granularity not in spec.granularities:
        raise ConfigError(f"weight granularity '{config.granularity}' is not supported by backend '{spec.name}' "
                          f"({spec.runtime}); supported: {', '.join(spec.granularities)}")
    if values["observer"] not in spec.observers:
        raise ConfigError(f"observer '{values['observer']}' is not supported by backend '{spec.name}'; "
                          f"supported: {', '.join(spec.observers)}")
    if values["keep_float"] and not spec.keep_float:
        raise ConfigError(f"--keep-float {','.join(values['keep_float'])}: backend '{spec.name}' runs every layer in "
                          f"INT8 (layers kept in float are supported by: {_having('keep_float')}); drop --keep-float")
    if values["bias_correction"] and not spec.bias_correction:
        raise ConfigError(f"--bias-correction is not supported by backend '{spec.name}'; supported by: "
                          f"{_having('bias_correction')}; drop the flag or pass --no-bias-correction")
    return config.replace(**values)


def _having(capability: str) -> str:
    return ", ".join(s.name for s in BACKENDS.values() if getattr(s, capability))


def load(spec: BackendSpec | str, run: "RunConfig | None" = None) -> "Backend":
    """The backend object of a row (imports its package), set up for ``run`` (target options such as the CPU)."""
    from ..config import RunConfig

    spec = get_spec(spec) if isinstance(spec, str) else spec
    module = importlib.import_module(f"{__package__}.{spec.package}")
    return module.backend(spec, run or RunConfig(target=spec.target, formats=(spec.format,)))
