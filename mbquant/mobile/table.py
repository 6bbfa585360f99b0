"""The one capability table: one row (:class:`~mbquant.mobile.spec.BackendSpec`) per runtime mbquant builds
artifacts for.

A row says which targets and format select it, what its kernels accept (weight granularities, observers), what may
stay in float, which post-training fixes it supports, each recipe's choices, the options it takes (the command
line's backend flags are generated from them), whether an app bundle can carry its program, and its sweep
variants. The pipeline checks a run against the table before any work and resolves every ``None`` field of a
:class:`~mbquant.config.QuantConfig` from the row's recipe. The code of a backend lives in the module the row names
and is imported only when a run uses it.

Adding a backend = one folder under ``mbquant/mobile/`` (a module with ``backend(spec, options) -> Backend``) + one
row here + its tests; a row can also be registered from outside (:func:`register`: how ``tests/`` adds one).

This module is plain data (no torch import): ``mbquant --help`` reads it.
"""
from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..config import ADAROUND_IMAGES, ADAROUND_ITERATIONS, LOGITS, OBSERVERS, QuantConfig
from ..errors import ConfigError
from .spec import BackendSpec, Option

if TYPE_CHECKING:
    from ..config import QATConfig, RunConfig
    from .backend import Backend

_STOCK = {"observer": "histogram", "fuse_relu6": False, "keep_float": (), "bias_correction": False, "equalize": False}
_QAT_BASE = {"fuse_relu6": True, "keep_float": (), "equalize": False}     # what a row's best may leave unnamed
# what QAT replaces in any recipe: the training fake-quantize, and no post-training fix (it learns them itself)
_QAT_LEARNS = MappingProxyType({"observer": "moving-average", "bias_correction": False, "adaround": False})
# post-training fixes a recipe runs only when it names them (rows registered from outside may predate a field)
_OFF_UNLESS_NAMED = MappingProxyType({"equalize": False, "adaround": False})


def _recipes(best: dict[str, Any], stock: dict[str, Any] | None = None) -> Mapping[str, Mapping[str, Any]]:
    """A row's recipes. QAT starts from the best post-training state: the ``best`` recipe's choices (ReLU6 fusion,
    layers kept in float, equalization) with the training fake-quantize and without the post-training fixes QAT
    learns itself (bias correction, rounding)."""
    return MappingProxyType({"best": MappingProxyType(dict(best)),
                             "stock": MappingProxyType({**_STOCK, **(stock or {})}),
                             "qat": MappingProxyType({**_QAT_BASE, **best, **_QAT_LEARNS})})


# name -> QuantConfig fields (a recipe and the single choices it is made of); measured in benchmarks/ptq_accuracy.py
_PTE_VARIANTS = MappingProxyType({
    "stock": MappingProxyType(dict(recipe="stock")),                                   # XNNPACKQuantizer as shipped
    "relu6": MappingProxyType(dict(recipe="stock", fuse_relu6=True)),
    "relu6+percentile": MappingProxyType(dict(recipe="stock", fuse_relu6=True, observer="percentile")),
    "percentile+fp32-logits": MappingProxyType(dict(fuse_relu6=False, bias_correction=False)),
    "relu6+percentile+fp32-logits": MappingProxyType(dict(bias_correction=False)),
    "best": MappingProxyType(dict()),                                                  # the default recipe
    "best+equalize": MappingProxyType(dict(equalize=True)),
    "best-histogram": MappingProxyType(dict(observer="histogram")),
    "relu6+minmax": MappingProxyType(dict(recipe="stock", fuse_relu6=True, observer="minmax")),
    "per-tensor-stock": MappingProxyType(dict(recipe="stock", granularity="per-tensor")),
    "per-tensor-relu6": MappingProxyType(dict(recipe="stock", fuse_relu6=True, granularity="per-tensor")),
    "per-tensor-best": MappingProxyType(dict(granularity="per-tensor")),
    "best+adaround": MappingProxyType(dict(adaround=True)),
    "per-tensor-best+adaround": MappingProxyType(dict(granularity="per-tensor", adaround=True)),
})
_TS_VARIANTS = MappingProxyType({
    "stock": MappingProxyType(dict(recipe="stock")),
    "best": MappingProxyType(dict()),
    "best+percentile": MappingProxyType(dict(observer="percentile")),
    "per-tensor-best": MappingProxyType(dict(granularity="per-tensor")),
})
_MCU_VARIANTS = MappingProxyType({
    "stock": MappingProxyType(dict(recipe="stock")),
    "equalize": MappingProxyType(dict(recipe="stock", equalize=True)),
    "bias-correction": MappingProxyType(dict(recipe="stock", bias_correction=True)),
    "best": MappingProxyType(dict()),
    "best+adaround": MappingProxyType(dict(adaround=True)),
})

CPUS = ("cortex-m4", "cortex-m7", "cortex-m33", "cortex-m55")
MIN_DELEGATED = Option("min_delegated", "number", 0.99, "fail below this share of ops inside the delegate (a ratio, "
                       "e.g. 0.99)", lo=0.0, hi=1.0, metavar="RATIO")
STRICT = Option("strict", "switch", True, "fail when an op of the program is not an INT8 kernel (default on)")

BUILTIN: tuple[BackendSpec, ...] = (
    BackendSpec(
        "pte-xnnpack", ("phone",), "pte", "ExecuTorch runtime + XNNPACK delegate (ARM phones)",
        "mbquant.mobile.xnnpack", (".pte",), ("per-channel", "per-tensor"), OBSERVERS, keep_float=True,
        bias_correction=True, float_program=True,
        # measured on the phone checkpoint (README, "PTQ choices"): drop 0.03 pp, float~.pte agreement 99.53 %
        recipes=_recipes({"observer": "percentile", "fuse_relu6": True, "keep_float": (LOGITS,),
                          "bias_correction": True}),
        options=(MIN_DELEGATED,), bundle=True, sweep_variants=_PTE_VARIANTS, adaround=True,
        # QAT from the PTQ state with distillation (README, "QAT defaults"): float~.pte agreement 99.33 % at 0.0005,
        # 98.89 % at 0.005 (one epoch of 4,000 images, phone checkpoint)
        qat_lr=0.0005,
        # per-tensor weights (V2 0.35, all val images): drop 1.82 -> 0.06 pp, agreement 93.38 -> 99.10 % with CLE
        per_tensor_best=MappingProxyType({"equalize": True}),
        sweep_default=("stock", "relu6", "relu6+percentile", "relu6+percentile+fp32-logits", "best", "best+equalize",
                       "per-tensor-stock", "per-tensor-best")),
    BackendSpec(
        "ts-qnnpack", ("phone",), "torchscript", "TorchScript (.pt) / lite interpreter (.ptl), qnnpack engine",
        "mbquant.mobile.torchscript", (".pt", ".ptl"), ("per-channel", "per-tensor"), OBSERVERS, keep_float=False,
        bias_correction=False, float_program=False,
        # measured (README, "TorchScript artifacts"): ReLU6 fused as the clamp, histogram observer, drop 0.22 pp
        recipes=_recipes({"observer": "histogram", "fuse_relu6": True, "keep_float": (), "bias_correction": False}),
        sweep_variants=_TS_VARIANTS, sweep_default=tuple(_TS_VARIANTS)),
    BackendSpec(
        "ts-x86", ("x86",), "torchscript", "TorchScript (.pt) / lite interpreter (.ptl), x86 engine (servers)",
        "mbquant.mobile.torchscript", (".pt", ".ptl"), ("per-channel", "per-tensor"), OBSERVERS, keep_float=False,
        bias_correction=False, float_program=False,
        recipes=_recipes({"observer": "histogram", "fuse_relu6": True, "keep_float": (), "bias_correction": False}),
        sweep_variants=_TS_VARIANTS, sweep_default=tuple(_TS_VARIANTS)),
    BackendSpec(
        "pte-cortex-m", ("mcu",), "pte", "ExecuTorch runtime + CMSIS-NN INT8 kernels (cortex_m:: ops), Cortex-M MCUs",
        "mbquant.mobile.cortex_m", (".pte",), ("per-channel",), ("histogram",), keep_float=False, bias_correction=True,
        float_program=False, fixed=MappingProxyType({"fuse_relu6": True}), qat=True,
        # QAT: CortexMQuantizer's patterns with fake-quantize specs of the same numerics (cortex_m/quantizer.py),
        # on the graph with BN folded first (its patterns have no conv-BN); without BN to renormalise them, the
        # folded weights take a 10x smaller learning rate (measured, README "MCU": 0.005 lost 5.4 pp)
        qat_lr=0.0005,
        # ExecuTorch's CortexMQuantizer: histogram observer, per-channel conv weights, ReLU/ReLU6 folded into the
        # kernels' output range; measured (README, "MCU"): equalization + bias correction is the best combination
        recipes=_recipes({"observer": "histogram", "fuse_relu6": True, "keep_float": (), "bias_correction": True,
                          "equalize": True}, stock={"fuse_relu6": True}),
        options=(Option("cpu", "choice", "cortex-m4", "the Cortex-M core the program is planned for (CMSIS-NN "
                        "scratch sizes)", choices=CPUS),
                 Option("int8_input", "flag", False, "the program takes the quantized image (scale/zero point in the "
                        "sidecar and the firmware header)"),
                 STRICT,
                 Option("flash_kb", "number", None, "fail when the program is larger (KiB, e.g. 300)", lo=0.0,
                        lo_open=True, hi=1e7, metavar="KIB"),
                 Option("ram_kb", "number", None, "fail when the RAM peak (arena: activations, scratch, input/output) "
                        "is larger (KiB, e.g. 64)", lo=0.0, lo_open=True, hi=1e7, metavar="KIB")),
        sweep_variants=_MCU_VARIANTS, sweep_default=tuple(_MCU_VARIANTS), adaround=True),
    BackendSpec(
        "onnx-qdq", ("phone", "x86"), "onnx", "ONNX Runtime (CPU provider), INT8 QDQ model",
        "mbquant.mobile.onnx", (".onnx",), ("per-channel", "per-tensor"), OBSERVERS, keep_float=True,
        bias_correction=True, float_program=True,
        # measured on the phone checkpoint (README, "ONNX"): the phone recipe's choices hold for ONNX Runtime
        recipes=_recipes({"observer": "percentile", "fuse_relu6": True, "keep_float": (LOGITS,),
                          "bias_correction": True}),
        sweep_variants=_PTE_VARIANTS,
        sweep_default=("stock", "relu6", "relu6+percentile", "relu6+percentile+fp32-logits", "best", "best+equalize"),
        requires=("onnx", "onnxscript", "onnxruntime"), install="pip install 'mbquant[onnx]'", adaround=True,
        per_tensor_best=MappingProxyType({"equalize": True})),
)

BACKENDS: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec:
    """Add a row (a backend outside mbquant's tree, e.g. a test's). Refused: a name that exists, an option that
    another row declares differently, a second default row for one (target, format) pair."""
    if spec.name in BACKENDS:
        raise ConfigError(f"backend '{spec.name}' is already in the table; pick another name")
    for opt in spec.options:
        other = next((o for s in BACKENDS.values() for o in s.options if o.name == opt.name), None)
        if other is not None and other != opt:
            raise ConfigError(f"backend '{spec.name}' declares option {opt.flag} differently from another row; a flag "
                              f"means one thing: reuse that declaration or pick another name")
    if spec.default:
        for target in spec.targets:
            clash = next((s for s in BACKENDS.values() if s.default and s.format == spec.format
                          and target in s.targets), None)
            if clash is not None:
                raise ConfigError(f"backends '{clash.name}' and '{spec.name}' would both be the default for --target "
                                  f"{target} --format {spec.format}; register '{spec.name}' with default=False (it "
                                  f"is then chosen with --backend {spec.name})")
    BACKENDS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    BACKENDS.pop(name, None)


for _spec in BUILTIN:
    register(_spec)


def targets() -> list[str]:
    return sorted({t for s in BACKENDS.values() for t in s.targets})


def formats() -> list[str]:
    return sorted({s.format for s in BACKENDS.values()})


def options() -> list[Option]:
    """Every option any row declares, once."""
    out: dict[str, Option] = {}
    for s in BACKENDS.values():
        for o in s.options:
            out.setdefault(o.name, o)
    return list(out.values())


def declared_by(name: str) -> list[str]:
    return [s.name for s in BACKENDS.values() if s.option(name) is not None]


def get_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ConfigError(f"backend '{name}' is not supported; supported: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def select(target: str | None, formats: Iterable[str] = ("pte",), backends: Iterable[str] = ()) -> list[BackendSpec]:
    """The rows a run asks for: ``backends`` by name (each must serve ``target`` when one is given), else the default
    row of ``target`` (phone when None) for each format, in the order given."""
    backends = tuple(backends)
    if backends:
        specs = [get_spec(b) for b in backends]
        for s in specs:
            if target is not None and target not in s.targets:
                raise ConfigError(f"backend '{s.name}' builds for {', '.join(s.targets)}, not --target {target}; drop "
                                  f"--target or pick a backend of that target")
        if len({s.name for s in specs}) != len(specs):
            raise ConfigError(f"--backend names {list(backends)} repeat a backend; name each once")
        return specs
    target = target or "phone"
    offered = {s.format: s for s in BACKENDS.values() if s.default and target in s.targets}
    if not offered:
        raise ConfigError(f"target '{target}' is not supported; supported: {', '.join(targets())}")
    out = []
    for fmt in formats:
        if fmt not in offered:
            raise ConfigError(f"format '{fmt}' is not supported on target '{target}'; supported: "
                              f"{', '.join(sorted(offered))}")
        out.append(offered[fmt])
    return out


def backend_options(spec: BackendSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """The row's options: each declared one from ``given`` (validated) or its default."""
    return {o.name: o.check(given[o.name], spec.name) if given.get(o.name) is not None else o.default
            for o in spec.options}


def check_options(given: Mapping[str, Any], specs: list[BackendSpec]) -> None:
    """Options the user set must be known and taken by a backend this run builds (else they would be ignored)."""
    for name, value in given.items():
        if value is None:
            continue
        owners = declared_by(name)
        if not owners:
            raise ConfigError(f"unknown backend option '{name}'; known: {', '.join(o.name for o in options())}")
        if not any(s.option(name) for s in specs):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} applies to backend {', '.join(owners)}, which this run does not build "
                              f"({', '.join(s.name for s in specs)}); drop {flag} or pick that backend")
        for s in specs:
            if s.option(name):
                backend_options(s, {name: value})


def check_requirements(spec: BackendSpec) -> None:
    """The Python modules a backend needs beyond mbquant's own, checked before any work."""
    import importlib.util

    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"backend '{spec.name}' needs {', '.join(missing)}, which is not installed; install it with "
                          f"{spec.install or 'pip install ' + ' '.join(missing)} and run the command again")


def resolve(config: QuantConfig, spec: BackendSpec, *, qat: bool = False) -> QuantConfig:
    """The fully specified config ``spec`` runs: ``None`` fields from the recipe, explicit ones checked. With
    per-tensor weights the ``best`` recipe takes the row's ``per_tensor_best`` changes (measured for them).

    With ``qat`` the observer is the training fake-quantize (moving-average) and bias correction is off
    (QAT learns that correction); asking for either explicitly is an error."""
    recipe = {**_OFF_UNLESS_NAMED, **spec.recipe(config.recipe)}
    if config.recipe == "best" and config.granularity == "per-tensor":
        recipe = {**recipe, **spec.per_tensor_best}
    if qat and not spec.qat:
        raise ConfigError(f"QAT is not offered for backend '{spec.name}': {spec.qat_refusal or 'its row says so'}")
    if qat:
        if config.observer not in (None, "moving-average"):
            raise ConfigError(f"observer '{config.observer}' is for post-training quantization; QAT uses "
                              f"moving-average fake-quantize: drop --observer")
        if config.bias_correction or config.bias_correction_images is not None:
            asked = "--bias-correction" if config.bias_correction else \
                f"--bias-correction-images {config.bias_correction_images}"
            raise ConfigError(f"{asked}: bias correction is a post-training fix; QAT learns the correction itself, "
                              f"starting from the corrected biases (--init-biases corrected, the default where the "
                              f"backend has it): drop the flag")
        if config.adaround or config.adaround_images is not None or config.adaround_iterations is not None:
            asked = "--adaround" if config.adaround else ("--adaround-images" if config.adaround_images is not None
                                                          else "--adaround-iterations")
            raise ConfigError(f"{asked}: AdaRound is a post-training fix; QAT learns the weights themselves: drop the "
                              f"flag")
        recipe = {**recipe, **_QAT_LEARNS}
    if config.bias_correction is False and config.bias_correction_images is not None:
        raise ConfigError(f"--bias-correction-images {config.bias_correction_images} with --no-bias-correction: "
                          f"drop one of them")
    tuning = [f"--adaround-{k} {v}" for k, v in (("images", config.adaround_images),
                                                  ("iterations", config.adaround_iterations)) if v is not None]
    if config.adaround is False and tuning:
        raise ConfigError(f"{' '.join(tuning)} with --no-adaround: drop one of them")
    values = {k: (getattr(config, k) if getattr(config, k) is not None else v) for k, v in recipe.items()}
    for k, v in spec.fixed.items():
        if values[k] != v:
            raise ConfigError(f"backend '{spec.name}' always has {k.replace('_', '-')} = {v} (its kernels do it); "
                              f"drop the flag that asks for {values[k]}")
    if config.granularity not in spec.granularities:
        raise ConfigError(f"weight granularity '{config.granularity}' is not supported by backend '{spec.name}' "
                          f"({spec.runtime}); supported: {', '.join(spec.granularities)}")
    if not qat and values["observer"] not in spec.observers:     # QAT: the backend's own fake-quantize
        raise ConfigError(f"observer '{values['observer']}' is not supported by backend '{spec.name}'; "
                          f"supported: {', '.join(spec.observers)}")
    if values["keep_float"] and not spec.keep_float:
        raise ConfigError(f"--keep-float {','.join(values['keep_float'])}: backend '{spec.name}' runs every layer in "
                          f"INT8 (layers kept in float are supported by: {having('keep_float')}); drop --keep-float")
    if values["adaround"] and config.bias_correction is None and config.bias_correction_images is None:
        # measured (README, "AdaRound"): the learned rounding already fits each layer's float output, mean included;
        # a bias correction after it lowered agreement on every checkpoint tried. Asked for, both run.
        values["bias_correction"] = False
    if values["bias_correction"] and not spec.bias_correction:
        raise ConfigError(f"--bias-correction is not supported by backend '{spec.name}'; supported by: "
                          f"{having('bias_correction')}; drop the flag or pass --no-bias-correction")
    if values["adaround"] and not spec.adaround:
        raise ConfigError(f"--adaround is not supported by backend '{spec.name}'; supported by: {having('adaround')}; "
                          f"drop the flag")
    if not values["adaround"] and tuning:
        raise ConfigError(f"{' '.join(tuning)} without AdaRound (the recipe of backend '{spec.name}' does not run "
                          f"it): add --adaround or drop {' and '.join(t.split()[0] for t in tuning)}")
    if values["adaround"]:
        values["adaround_images"] = config.adaround_images or ADAROUND_IMAGES
        values["adaround_iterations"] = config.adaround_iterations or ADAROUND_ITERATIONS
    return config.replace(**values)


def resolve_qat(schedule: "QATConfig", spec: BackendSpec) -> "QATConfig":
    """The QAT schedule ``spec`` trains with: an unset learning rate takes the row's ``qat_lr``; unset starting
    biases are the corrected ones where the row has bias correction and the ranges are measured first."""
    if schedule.init_biases == "corrected" and not spec.bias_correction:
        raise ConfigError(f"--init-biases corrected: backend '{spec.name}' has no bias correction (supported by: "
                          f"{having('bias_correction')}); pass --init-biases float")
    if schedule.init_biases is None:
        corrected = spec.bias_correction and schedule.init_ranges != "off"
        schedule = schedule.replace(init_biases="corrected" if corrected else "float")
    return schedule if schedule.lr is not None else schedule.replace(lr=spec.qat_lr)


def having(capability: str) -> str:
    return ", ".join(s.name for s in BACKENDS.values() if getattr(s, capability))


def load(spec: BackendSpec | str, run: "RunConfig | None" = None) -> "Backend":
    """The backend object of a row (imports its module), with its options from ``run``."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    check_requirements(spec)
    module = importlib.import_module(spec.package)
    return module.backend(spec, backend_options(spec, run.options if run is not None else {}))
