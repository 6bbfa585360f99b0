"""The one road, for PTQ and QAT alike:

    float model -> per backend: prepare -> calibrate (or fine-tune) -> convert -> write -> reload
                -> one measuring pass over the evaluation images for every artifact -> ArtifactResult each
                -> gates, applied once to every result -> report (built from the list of results)

``quantize`` is the short way (a float model and real calibration images in, an INT8 model out); ``run_job`` is
the whole job ``mbquant ptq`` and ``mbquant qat`` run.
"""
from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import calibrate
from ._io import RunFolder, write_json
from .calibrate import CalibrationResult, CalibrationSet
from .config import QATConfig, QuantConfig, RunConfig
from .data import MAX_IMAGE_PIXELS, ImageFolderDataset, load_folder, make_loader
from .errors import ConfigError, DataError
from .evaluate import Comparison, compare
from .mobile import table
from .mobile.backend import Backend, ModulePredictor, Predictor, Written, artifact_name
from .models import ModelInfo
from .quant.bias_correction import BiasCorrectionResult, correct_biases
from .quant.equalize import EqualizationResult, equalize
from .quant.export import FloatModel
from .report import ArtifactResult, FloatResult, Report, host, library_versions

FLOAT = "float"


@dataclass
class Quantized:
    """What :func:`quantize` returns: the INT8 model and how it was made."""

    int8: nn.Module
    config: QuantConfig                    # resolved for the backend
    calibration: CalibrationResult | None
    bias_correction: BiasCorrectionResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    source: FloatModel | None = None       # the float model quantized (equalized when the config asks)
    equalization: EqualizationResult | None = None


def _timed(seconds: dict[str, float], stage: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t, 2)
    return out


def calibration_set(calib: CalibrationSet | Path | str, info: ModelInfo, config: QuantConfig, *,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> CalibrationSet:
    """``calib`` as a CalibrationSet of ``config.num_calib`` samples drawn with ``config.seed``."""
    if isinstance(calib, CalibrationSet):
        if (calib.requested, calib.seed) != (config.num_calib, config.seed):
            raise ConfigError(f"the calibration set holds {calib.requested} samples drawn with seed {calib.seed}, but "
                              f"the config asks for num_calib={config.num_calib}, seed={config.seed}; pass the folder "
                              f"instead (it is sampled from the config) or a matching set")
        return calib
    return calibrate.from_folder(calib, info.preset, config.num_calib, seed=config.seed,
                                 expected_classes=list(info.classes) or None, max_pixels=max_pixels)


def source_model(fm: FloatModel, config: QuantConfig, calib: CalibrationSet,
                 seconds: dict[str, float]) -> tuple[FloatModel, EqualizationResult | None]:
    """The float model a backend quantizes: ``fm``, or its cross-layer-equalized copy when the config asks."""
    if not config.equalize:
        return fm, None
    eq, result = _timed(seconds, "equalize", lambda: equalize(fm.module, list(calib.batches(config.batch_size))))
    return FloatModel(eq, fm.resolution), result


def quantize_with(backend: Backend, fm: FloatModel, config: QuantConfig, calib: CalibrationSet, *,
                  progress: bool = False) -> Quantized:
    """[equalize ->] prepare -> calibrate -> convert [-> bias correction] for one backend; ``config`` resolved for
    it."""
    seconds: dict[str, float] = {}
    fm, eq = source_model(fm, config, calib, seconds)
    with backend.session():
        _timed(seconds, "export", lambda: fm.graph)
        prepared = _timed(seconds, "prepare", lambda: backend.prepare(fm, config))
        result = _timed(seconds, "calibrate", lambda: calibrate.run(
            prepared, calib, batch_size=config.batch_size, progress=progress, to_eval=backend.to_eval))
        int8 = _timed(seconds, "convert", lambda: backend.convert(prepared))
        bias = None
        if config.bias_correction:
            bias = _timed(seconds, "bias_correction", lambda: correct_biases(
                int8, fm.graph, list(calib.batches(config.batch_size))))
    return Quantized(int8, config, result, bias, seconds, fm, eq)


def quantize(model: nn.Module, calib: CalibrationSet | Path | str, *, info: ModelInfo,
             config: QuantConfig = QuantConfig(), backend: str = "pte-xnnpack", run: RunConfig | None = None,
             progress: bool = False) -> Quantized:
    """Float model + real calibration images -> INT8 model for ``backend`` (default recipe: the best measured).

    ``calib`` is a folder (sampled with ``config.num_calib`` and ``config.seed``) or a matching CalibrationSet."""
    spec = table.get_spec(backend)
    resolved = table.resolve(config, spec)
    calib_set = calibration_set(calib, info, resolved)
    return quantize_with(table.load(spec, run), FloatModel(model, info.resolution), resolved, calib_set,
                         progress=progress)


def files_digest(items) -> str:
    """A short hash of which labelled files (name, label, size; in order) ``items`` of (path, label) are: names the
    data in reports, sidecars and baselines."""
    h = hashlib.sha256()
    for path, label in items:
        h.update(f"{Path(path).name}:{label}:{Path(path).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def samples_digest(ds: ImageFolderDataset) -> str:
    """:func:`files_digest` of a dataset's samples."""
    return files_digest((s.path, s.label) for s in ds.samples)


def load_eval_set(root: Path, info: ModelInfo, limit: int | None, *, seed: int = 0,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFolderDataset:
    """The labelled evaluation images; with ``limit``, a seeded class-stratified subset of that many."""
    ds = load_folder(root, info.preset, expected_classes=list(info.classes) or None, max_pixels=max_pixels)
    if not ds.labelled:
        raise DataError(f"evaluation folder '{root}' has no class subfolders; pass a labelled ImageFolder")
    keep = eval_indices([s.label for s in ds.samples], limit, seed)
    if keep is not None:
        ds = ImageFolderDataset([ds.samples[i] for i in keep], ds.classes, ds.transform, max_pixels=max_pixels)
    return ds


def eval_indices(labels: list[int], limit: int | None, seed: int = 0) -> list[int] | None:
    """Which of the labelled images ``--eval-limit`` evaluates: a seeded class-stratified subset of ``limit``, or
    None for all of them."""
    if limit is None or limit >= len(labels):
        return None
    return calibrate.stratified_indices(labels, limit, seed)


def default_out_dir(model_name: str) -> Path:
    return Path("runs") / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Built:
    """One backend's artifacts, written and loaded, before measurement."""

    backend: Backend
    config: QuantConfig
    int8: nn.Module
    files: list[tuple[Written, Predictor]]
    facts: dict[str, Any]
    source: FloatModel                     # the float model that was quantized


@dataclass(frozen=True)
class Finetune:
    """What QAT needs beyond PTQ: the schedule, the training images, a checkpoint to resume, a step hook."""

    config: QATConfig
    train_set: ImageFolderDataset
    resume: dict | None = None
    on_step: Callable[[int, int], None] | None = None


def _build(spec: table.BackendSpec, fm: FloatModel, info: ModelInfo, config: QuantConfig, run: RunConfig,
           calib: CalibrationSet, eval_set: ImageFolderDataset, staging: Path | None, ckpt_dir: Path | None,
           report: Report, *, finetune: Finetune | None, progress: bool) -> Built | None:
    """[equalize ->] prepare -> calibrate or fine-tune -> convert -> write -> load, for one backend (None on other
    ranks)."""
    backend = table.load(spec, run)
    cfg = table.resolve(config, spec, qat=finetune is not None)
    facts: dict[str, Any] = {"config": cfg.to_dict()}
    if finetune is None:
        q = quantize_with(backend, fm, cfg, calib, progress=progress)
        int8, seconds, src = q.int8, q.seconds, q.source
        facts.update(calibration=q.calibration.to_dict(),
                     bias_correction=q.bias_correction.to_dict() if q.bias_correction else None,
                     equalization=q.equalization.to_dict() if q.equalization else None)
        if q.calibration.skipped_unreadable:
            report.warn(f"{q.calibration.skipped_unreadable} unreadable calibration images were skipped")
    else:
        seconds = {}
        src, eq = source_model(fm, cfg, calib, seconds)
        facts["equalization"] = eq.to_dict() if eq else None
        int8 = _finetune(backend, src, info, cfg, calib, eval_set, ckpt_dir, report, finetune, facts, progress,
                         seconds)
        if int8 is None:
            return None
    if cfg.keep_float:
        from .quant.keep_float import resolve_names

        facts["kept_float"] = list(resolve_names(cfg.keep_float, fm.module, fm.graph))
    with backend.session():
        facts.update(backend.describe(int8, cfg))
        unexpected = sorted(set(backend.float_layers(int8)) - set(facts.get("kept_float", [])))
        if unexpected:
            report.warn(f"{spec.name}: layers left in float that were not asked for: {', '.join(unexpected)}")
        stem = staging / artifact_name(info, "int8", "")
        written = _timed(seconds, "write", lambda: backend.write(int8, stem, resolution=info.resolution))
        files = [(w, _timed(seconds, "load", lambda w=w: backend.load(w.path))) for w in written]
    facts["seconds"] = seconds
    return Built(backend, cfg, int8, files, facts, src)


def _finetune(backend: Backend, fm: FloatModel, info: ModelInfo, cfg: QuantConfig, calib: CalibrationSet,
              eval_set: ImageFolderDataset, ckpt_dir: Path | None, report: Report, ft: Finetune, facts: dict,
              progress: bool, seconds: dict[str, float]):
    """prepare_qat -> range init -> fit_qat -> convert; returns the INT8 model, None on ranks > 0."""
    from . import distributed, finetune

    dist = distributed.from_env()
    try:
        with backend.session():
            qm = _timed(seconds, "prepare", lambda: backend.prepare_qat(fm, cfg))
            qm.module.to(dist.device)
            if ft.config.init_ranges and ft.resume is None:
                seen = _timed(seconds, "calibrate", lambda: qm.init_ranges(
                    x.to(dist.device) for x in calib.batches(cfg.batch_size)))
                facts["calibration"] = {"samples": seen, "use": "initial fake-quantize ranges"}
            result, warnings = _timed(seconds, "finetune", lambda: finetune.fit_qat(
                qm, info, ft.train_set, eval_set, config=ft.config, quant=cfg,
                float_digest=finetune.state_digest(fm.module), dist=dist, out_dir=ckpt_dir if dist.is_main else None,
                resume=ft.resume, progress=progress, on_step=ft.on_step,
                teacher=copy.deepcopy(fm.module).eval() if ft.config.distill > 0 else None))
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return None
    for w in warnings:
        report.warn(w)
    report.add("qat", {**result.to_dict(), "train_images_available": len(ft.train_set)})
    qm.module.to("cpu")
    with backend.session():
        return _timed(seconds, "convert", qm.convert)


def _flips(cmp: Comparison, ref: str, art: str, eval_set: ImageFolderDataset, limit: int = 20) -> dict[str, Any]:
    """Images where the artifact's top-1 differs from its INT8 model's, with the INT8 model's top-2 margin there
    (a rounding difference flips only near-ties) and where that margin ranks among all images."""
    flipped = (cmp.preds[ref] != cmp.preds[art]).nonzero().flatten()
    margins = cmp.margins[ref]
    out: dict[str, Any] = {"count": int(flipped.numel()), "margin_median_all": round(float(margins.median()), 4)}
    if flipped.numel():
        fm = margins[flipped]
        out.update(margin_median=round(float(fm.median()), 4), margin_max=round(float(fm.max()), 4),
                   margin_max_percentile=round(100.0 * float((margins <= fm.max()).float().mean()), 2))
        readable = [s for s in eval_set.samples if s.path not in eval_set.skipped]
        out["images"] = [{"image": str(readable[i].path), "label": int(cmp.labels[i]), "reference": int(cmp.preds[ref][i]),
                          "artifact": int(cmp.preds[art][i]), "reference_margin": round(float(margins[i]), 4)}
                         for i in flipped[:limit].tolist()]
    return out


def _result(cmp: Comparison, built: Built, w: Written, pred: Predictor, eval_set: ImageFolderDataset,
            run: RunConfig, x1: torch.Tensor) -> ArtifactResult:
    ref, art = f"{built.backend.name}", f"{built.backend.name}:{w.path.name}"
    parity = {"agreement": round(cmp.agree(ref, art), 3), "max_abs_logit_diff": cmp.diff(ref, art),
              "flips": _flips(cmp, ref, art, eval_set),
              "top1_reference_minus_artifact": cmp.paired_accuracy(ref, art).to_dict(),
              "agreement_float_reference_minus_artifact": cmp.paired_agreement(FLOAT, ref, art).to_dict()}
    return ArtifactResult(
        backend=built.backend.name, file=w.path.name, bytes=w.bytes, runtime=pred.runtime,
        images=cmp.count, top1=round(cmp.top1(art), 3), top5=round(cmp.top5(art), 3),
        drop_pp=round(cmp.drop(FLOAT, art), 3), agreement_float=round(cmp.agree(FLOAT, art), 3),
        drop_paired=cmp.paired_accuracy(FLOAT, art).to_dict(),
        reference_top1=round(cmp.top1(ref), 3), reference_agreement_float=round(cmp.agree(FLOAT, ref), 3),
        parity=parity, delegated=None if w.delegated is None else round(w.delegated, 4),
        latency=_latency(pred, x1, run),
        details=w.details)


def _latency(pred: Predictor, x1: torch.Tensor, run: RunConfig) -> dict | None:
    lat = pred.latency(x1, run.latency_runs, run.latency_threads)
    return None if lat is None else {**lat, "threads": run.latency_threads}


def gate_failures(results: list[ArtifactResult], run: RunConfig) -> list[str]:
    """Every quality gate, applied to every artifact in one place (see :class:`~mbquant.config.RunConfig`)."""
    failures = []
    for r in results:
        name = f"{r.file} ({r.backend})"
        if r.delegated is not None and r.delegated < run.min_delegated:
            outside = r.details.get("delegation", {}).get("ops_outside_delegate", {})
            failures.append(f"{name}: only {r.delegated:.2%} of ops run in the delegate (< --min-delegated "
                            f"{run.min_delegated}); outside it: {outside}")
        if run.max_drop is not None and r.drop_pp > run.max_drop:
            failures.append(f"{name}: top-1 drop {r.drop_pp:.3f} pp (float {r.top1 + r.drop_pp:.2f} % -> {r.top1:.2f} %"
                            f" on {r.images} images) is larger than --max-drop {run.max_drop}")
        for key, what in (("top1_reference_minus_artifact", "top-1 accuracy"),
                          ("agreement_float_reference_minus_artifact", "agreement with the float model")):
            p = r.parity[key]
            if p["diff_pp"] > run.parity_z * p["se_pp"] + 1e-9:
                failures.append(
                    f"{name}: the reloaded artifact's {what} is {p['diff_pp']:.2f} pp below that of the INT8 model it "
                    f"was written from ({p['only_a']} vs {p['only_b']} images on {p['images']}; more than "
                    f"--parity-z {run.parity_z} standard errors of {p['se_pp']:.2f} pp): it does not compute what "
                    f"was quantized")
        if run.strict and r.details.get("non_int8_ops"):
            failures.append(f"{name}: ops that are not INT8 kernels: {', '.join(r.details['non_int8_ops'])} (--strict); "
                            f"the program would run them in float or not at all on the device")
        failures += _budget_failures(name, r.details.get("memory"), run)
        if run.min_parity is not None and r.parity["agreement"] < run.min_parity:
            failures.append(f"{name}: agrees with its INT8 model on {r.parity['agreement']} % of images (< --min-parity "
                            f"{run.min_parity} %)")
    return failures


def _budget_failures(name: str, memory: dict | None, run: RunConfig) -> list[str]:
    """--flash-kb / --ram-kb against a program's memory report, naming what is largest and what to shrink."""
    if not memory:
        return []
    out = []
    flash = memory["flash"]["program_bytes"]
    if run.flash_kb is not None and flash > run.flash_kb * 1024:
        big = ", ".join(f"{c['dtype']} {c['shape']} {c['bytes']:,} B" for c in memory["flash"]["largest_constants"][:3])
        out.append(f"{name}: the program is {flash:,} B, over --flash-kb {run.flash_kb:g} ({run.flash_kb * 1024:,.0f} B); "
                   f"largest constants: {big}; shrink the width (--width-mult of the trained model) or the classes")
    ram = memory["ram"]["arena_bytes"]
    if run.ram_kb is not None and ram > run.ram_kb * 1024:
        live = ", ".join(f"{t['written_by']} {t['shape']} {t['bytes']:,} B" for t in memory["ram"]["peak_tensors"][:3])
        out.append(f"{name}: the RAM peak (planned arena: activations, scratch, input/output) is {ram:,} B, over "
                   f"--ram-kb {run.ram_kb:g} ({run.ram_kb * 1024:,.0f} B); at the peak, set by "
                   f"{memory['ram']['peak_set_by']}: {live}; shrink the resolution or the width, or pass --int8-input")
    return out


def _measure(fm: FloatModel, built: list[Built], eval_set: ImageFolderDataset, run: RunConfig,
             float_file: tuple[Written, Predictor] | None, progress: bool):
    predictors: dict[str, Predictor] = {FLOAT: ModulePredictor(fm.graph, "in-process float model")}
    for b in built:
        predictors[b.backend.name] = b.backend.reference(b.int8)
        for w, pred in b.files:
            predictors[f"{b.backend.name}:{w.path.name}"] = pred
    cmp = compare(predictors, make_loader(eval_set, run.eval_batch_size), progress=progress,
                  desc=f"evaluate {len(predictors)} models")
    if cmp.count == 0 or not cmp.labelled:
        raise DataError(f"no readable labelled evaluation images among {len(eval_set)} ({cmp.skipped} unreadable); "
                        f"pass a labelled ImageFolder with readable images")
    x8 = next(b for b in make_loader(eval_set, 8) if b is not None)[0]
    results = [_result(cmp, b, w, pred, eval_set, run, x8[:1]) for b in built for w, pred in b.files]
    fl = FloatResult(cmp.count, round(cmp.top1(FLOAT), 3), round(cmp.top5(FLOAT), 3))
    if float_file is not None:
        w, pred = float_file
        fl = FloatResult(fl.images, fl.top1, fl.top5, w.path.name, w.bytes, _latency(pred, x8[:1], run))
    return cmp, results, fl, x8


def _sidecar(path: Path, r: ArtifactResult, built: Built, info: ModelInfo, digests: dict[str, str]) -> None:
    """``<artifact>.json``: what the file is and how it was made (read by apps and by ``mbquant check``)."""
    write_json(Path(f"{path}.json"), {
        "artifact": r.file, "backend": r.backend, "runtime": r.runtime, "model": info.to_dict(),
        "config": built.config.to_dict(), "preset": info.preset.to_dict(), "classes": list(info.classes),
        "input_shape": [1, 3, info.resolution, info.resolution], **digests,
        "measured": {"images": r.images, "top1": r.top1, "drop_pp": r.drop_pp, "agreement_float": r.agreement_float,
                     "parity": r.parity["agreement"]},
        "details": r.details, "versions": library_versions()})


def run_job(model: nn.Module, info: ModelInfo, *, calib: CalibrationSet, eval_set: ImageFolderDataset,
            out_dir: Path, config: QuantConfig = QuantConfig(), run: RunConfig = RunConfig(),
            finetune: Finetune | None = None, progress: bool = False, command: str = "",
            warnings: tuple[str, ...] = (), overwrite: bool = False) -> Report | None:
    """The whole job (see the module doc), written with the run-folder protocol (:class:`mbquant._io.RunFolder`):
    ``out_dir`` appears, complete, only when every artifact is verified and every gate passed; a run that fails
    a gate leaves its report in ``<out_dir>.failed/``. Returns the report; None on torchrun ranks > 0."""
    specs = table.select(run.target, run.formats)
    for spec in specs:  # every config problem is found before any work
        table.resolve(config, spec, qat=finetune is not None)
    if finetune is not None and len(specs) != 1:
        raise ConfigError(f"QAT trains one model for one engine, got formats {list(run.formats)}; run `mbquant qat` "
                          f"once per format")
    if int(os.environ.get("RANK", "0")) != 0:  # a torchrun worker: trains its shard, writes nothing
        _job(model, info, specs, calib=calib, eval_set=eval_set, staging=None, ckpt_dir=None, config=config, run=run,
             finetune=finetune, progress=progress, report=Report(command))
        return None
    resume = finetune is not None and finetune.resume is not None
    with RunFolder(Path(out_dir), overwrite=overwrite, resume=resume) as folder:
        report = Report(command, warnings=[*warnings, *folder.notes])
        _job(model, info, specs, calib=calib, eval_set=eval_set, staging=folder.staging, ckpt_dir=folder.work,
             config=config, run=run, finetune=finetune, progress=progress, report=report)
        if report.ok:
            report.location = folder.publish()
        else:
            report.location = folder.fail()
    return report


def _job(model: nn.Module, info: ModelInfo, specs: list, *, calib: CalibrationSet, eval_set: ImageFolderDataset,
         staging: Path | None, ckpt_dir: Path | None, config: QuantConfig, run: RunConfig, finetune: Finetune | None,
         progress: bool, report: Report) -> None:
    fm = FloatModel(model, info.resolution)
    for name, section in (("model", info.to_dict()), ("config", config.to_dict()), ("run", run.to_dict()),
                          ("qat_config", finetune.config.to_dict() if finetune else None), ("host", host())):
        if section is not None:
            report.add(name, section)
    digests = {"calibration_digest": samples_digest(calib.dataset), "eval_digest": samples_digest(eval_set)}
    report.add("data", {"calibration": calib.to_dict(), "eval_root": str(Path(eval_set.samples[0].path).parents[1]),
                        "eval_images": len(eval_set), **digests})
    built: list[Built] = []
    for spec in specs:
        b = _build(spec, fm, info, config, run, calib, eval_set, staging, ckpt_dir, report, finetune=finetune,
                   progress=progress)
        if b is None:
            return
        built.append(b)
    float_file, seconds = None, {}
    if run.float_program and any(b.backend.spec.float_program for b in built):
        b = next(b for b in built if b.backend.spec.float_program)
        w = _timed(seconds, "float_program", lambda: b.backend.write(
            fm.graph, staging / artifact_name(info, "fp32", ""), resolution=info.resolution)[0])
        float_file = (w, b.backend.load(w.path))
    try:
        cmp, results, fl, x8 = _timed(seconds, "verify", lambda: _measure(fm, built, eval_set, run, float_file,
                                                                           progress))
    finally:
        for b in built:
            for _, pred in b.files:
                pred.close()
    report.add("backends", {b.backend.name: {**b.facts, **_timed(seconds, "diagnose", lambda: b.backend.diagnose(
        b.source, b.int8, x8))} for b in built})
    report.add("seconds", seconds)
    report.add("float", fl)
    report.add("artifacts", [r.to_dict() for r in results])
    if cmp.skipped:
        report.warn(f"{cmp.skipped} unreadable evaluation images were skipped (first: "
                    f"{', '.join(sorted(p.name for p in eval_set.skipped)[:3])})")
    for r in results:
        for note in r.details.get("notes", []):
            report.warn(f"{r.backend}: {note}")
    for failure in gate_failures(results, run):
        report.fail(failure)
    by_name = {b.backend.name: b for b in built}
    for r in results:
        _sidecar(staging / r.file, r, by_name[r.backend], info, digests)
        by_name[r.backend].backend.companions(staging / r.file, info, r.details)
    report.write(staging)
