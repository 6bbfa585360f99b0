"""A row of the capability table (:class:`BackendSpec`) and the options a backend declares (:class:`Option`).

Plain data, no torch: ``mbquant --help`` reads the rows, and the command line's backend flags are generated from the
options (``Option("cpu", ...)`` becomes ``--cpu``; its value reaches the backend in
:attr:`mbquant.config.RunConfig.options`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError

KINDS = ("choice", "flag", "switch", "number")


@dataclass(frozen=True)
class Option:
    """One backend option. ``kind``: ``choice`` (one of ``choices``), ``flag`` (off unless given), ``switch``
    (``--x``/``--no-x``), ``number`` (finite, in [``lo``, ``hi``], ``lo`` excluded when ``lo_open``; ``None`` means
    unset when ``default`` is None)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    metavar: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, backend: str) -> Any:
        """``value`` validated for this option (a ConfigError names the flag, the value and the fix)."""
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(f"{self.flag} {value!r} is not supported by backend '{backend}'; choose one of: "
                                  f"{', '.join(self.choices)}")
            return value
        if self.kind in ("flag", "switch"):
            if not isinstance(value, bool):
                raise ConfigError(f"{self.flag} must be true or false, got {value!r}")
            return value
        if value is None and self.default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.flag} must be a finite number, got {value!r}; {self.help}")
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        if below or (self.hi is not None and value > self.hi):
            rng = f"{'(' if self.lo_open else '['}{self.lo if self.lo is not None else '-inf'}, " \
                  f"{self.hi if self.hi is not None else 'inf'}]"
            raise ConfigError(f"{self.flag} {value!r} is out of range {rng}; pass a value in that range")
        return value


@dataclass(frozen=True)
class BackendSpec:
    """One runtime mbquant builds artifacts for (see :mod:`mbquant.mobile.table`)."""

    name: str                          # e.g. "pte-xnnpack"
    targets: tuple[str, ...]           # --target values that select it
    format: str                        # --format that selects it
    runtime: str                       # what runs the artifact
    package: str                       # the module that implements it (``backend(spec, options)``)
    suffixes: tuple[str, ...]          # files written per INT8 artifact
    granularities: tuple[str, ...]     # weight granularities its kernels run
    observers: tuple[str, ...]         # activation observers it accepts for PTQ
    keep_float: bool                   # layers may run in fp32 (--keep-float)
    bias_correction: bool              # --bias-correction supported
    float_program: bool                # can write the fp32 model as a reference artifact
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)   # choices its kernels make themselves
    qat: bool = True                   # quantization-aware training offered
    qat_refusal: str = ""              # why not, and what to do instead (when qat is False)
    qat_lr: float = 0.005              # QAT's learning rate unless --lr is given (measured per backend)
    default: bool = True               # what its (target, format) pairs select without --backend
    options: tuple[Option, ...] = ()
    bundle: bool = False               # an app bundle can carry its program
    sweep_variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # name -> QuantConfig fields
    sweep_default: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()     # Python modules it needs beyond mbquant's own dependencies
    install: str = ""                  # how to install them
    adaround: bool = False             # --adaround supported (the backend lowers a converted PT2E graph's weights)
    per_tensor_best: Mapping[str, Any] = field(default_factory=dict)   # the best recipe's changes for per-tensor weights

    def recipe(self, name: str) -> Mapping[str, Any]:
        return self.recipes[name]

    @property
    def target(self) -> str:
        return self.targets[0]

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)
