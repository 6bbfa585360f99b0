"""The one road, for PTQ and QAT alike:

    float model -> per backend: prepare -> calibrate (or fine-tune) -> convert -> write -> open from the file
                -> one measuring pass over the evaluation images for every artifact -> ArtifactResult each
                -> gates (the run's, then each backend's own) -> report (built from the list of results)

``quantize`` is the short way (a float model and real calibration images in, an INT8 model out); ``run_job`` is
the whole job ``mbquant ptq`` and ``mbquant qat`` run. Nothing here knows a backend by name: the table picks
them and each one writes, opens, gates and summarises its own artifacts.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import calibrate
from ._io import RunFolder
from .atomic import sha256_file
from .calibrate import CalibrationResult, CalibrationSet, calibration_set
from .config import QATConfig, QuantConfig, RunConfig, bias_correction_images
from .data.dataset import ImageFolderDataset, make_loader, samples_digest
from .distributed import Dist
from .errors import ConfigError, DataError, VerificationError
from .evaluate import Comparison, compare_dataset
from .mobile import table
from .mobile.backend import Backend, ModulePredictor, Predictor, Written
from .models.info import ModelInfo
from .progress import resources, stage
from .quant.adaround import AdaRoundResult, adaround
from .quant.bias_correction import BiasCorrectionResult, ReferenceMeans, correct_biases
from .quant.equalize import EqualizationResult, equalize
from .quant.export import FloatModel
from .records import ArtifactResult, FloatResult, Sidecar, paths
from .report import Report, host, library_versions
from .stats import clustered_se_pp, paired

FLOAT = "float"

__all__ = ["Finetune", "Quantized", "default_out_dir", "gate_failures", "quantize", "quantize_with", "run_job"]


@dataclass
class Quantized:
    """What :func:`quantize` returns: the INT8 model and how it was made."""

    int8: nn.Module
    config: QuantConfig                    # resolved for the backend
    calibration: CalibrationResult | None
    bias_correction: BiasCorrectionResult | None = None
    adaround: AdaRoundResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    source: FloatModel | None = None       # the float model quantized (equalized when the config asks)
    equalization: EqualizationResult | None = None


def _timed(seconds: dict[str, float], stage: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t, 2)
    return out


def source_model(fm: FloatModel, config: QuantConfig, calib: CalibrationSet,
                 seconds: dict[str, float]) -> tuple[FloatModel, EqualizationResult | None]:
    """The float model a backend quantizes: ``fm``, or its cross-layer-equalized copy when the config asks."""
    if not config.equalize:
        return fm, None
    eq, result = _timed(seconds, "equalize", lambda: equalize(fm.module, calib.source(config.batch_size)))
    return FloatModel(eq, fm.resolution), result


def quantize_with(backend: Backend, fm: FloatModel, config: QuantConfig, calib: CalibrationSet, *,
                  progress: bool = False) -> Quantized:
    """[equalize ->] prepare -> calibrate -> convert [-> AdaRound] [-> bias correction] for one backend; ``config``
    resolved for it."""
    seconds: dict[str, float] = {}
    fm, eq = source_model(fm, config, calib, seconds)
    with backend.session():
        _timed(seconds, "export", lambda: fm.graph)
        prepared = _timed(seconds, "prepare", lambda: backend.prepare(fm, config))
        images = config.bias_correction_images or bias_correction_images(fm.resolution)
        reference = ReferenceMeans(prepared, images) if config.bias_correction else None
        result = _timed(seconds, "calibrate", lambda: calibrate.run(
            prepared, calib, batch_size=config.batch_size, progress=progress, to_eval=backend.to_eval,
            forward=reference))
        int8 = _timed(seconds, "convert", lambda: backend.convert(prepared))
        rounding = None
        if config.adaround:
            rounding = _timed(seconds, "adaround", lambda: adaround(
                int8, fm.graph, calib.source(config.batch_size, config.adaround_images),
                iterations=config.adaround_iterations, seed=config.seed, progress=progress))
        bias = None
        if config.bias_correction:
            bias = _timed(seconds, "bias_correction", lambda: correct_biases(
                int8, fm.graph, calib.source(config.batch_size, images), reference=reference,
                progress=progress))
    return Quantized(int8, config, result, bias, rounding, seconds, fm, eq)


def quantize(model: nn.Module, calib: CalibrationSet | Path | str, *, info: ModelInfo,
             config: QuantConfig = QuantConfig(), backend: str | None = None, run: RunConfig | None = None,
             progress: bool = False) -> Quantized:
    """Float model + real calibration images -> INT8 model for ``backend`` (default: the phone's default backend;
    default recipe: the best measured for it).

    ``calib`` is a folder (sampled with ``config.num_calib`` and ``config.seed``) or a matching CalibrationSet."""
    spec = table.get_spec(backend) if backend is not None else table.select(None)[0]
    resolved = table.resolve(config, spec)
    calib_set = calibration_set(calib, info, resolved)
    return quantize_with(table.load(spec, run), FloatModel(model, info.resolution), resolved, calib_set,
                         progress=progress)


def default_out_dir(model_name: str) -> Path:
    return Path("runs") / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Built:
    """One backend's artifacts, written and opened from their files, before measurement."""

    backend: Backend
    config: QuantConfig
    int8: nn.Module
    files: list[tuple[Written, Predictor]]
    facts: dict[str, Any]
    source: FloatModel                     # the float model that was quantized
    ptq: nn.Module | None = None           # a QAT run's post-training INT8 model of the same checkpoint (compared)


@dataclass(frozen=True)
class Finetune:
    """What QAT needs beyond PTQ: the schedule, the training images, a checkpoint to resume, a step hook."""

    config: QATConfig
    train_set: ImageFolderDataset
    resume: dict | None = None
    on_step: Callable[[int, int], None] | None = None


def _sidecar(w: Written, backend: Backend, cfg: QuantConfig, info: ModelInfo, digests: dict[str, str],
             measured: dict[str, Any] | None = None) -> Sidecar:
    from .data.contract import spec_of

    return Sidecar(w.path.name, backend.name, backend.spec.runtime, info, cfg.to_dict(), spec_of(info.preset),
                   (1, 3, info.resolution, info.resolution), sha256_file(w.path), digests["calibration_digest"],
                   digests["eval_digest"], measured, w.details, library_versions())


def _build(spec, fm: FloatModel, info: ModelInfo, config: QuantConfig, run: RunConfig, calib: CalibrationSet,
           eval_set: ImageFolderDataset, staging: Path | None, ckpt_dir: Path | None, report: Report,
           digests: dict[str, str], *, finetune: Finetune | None, progress: bool, dist: Dist) -> Built | None:
    """[equalize ->] prepare -> calibrate or fine-tune -> convert -> write -> open, for one backend (None on other
    ranks)."""
    backend = table.load(spec, run)
    cfg = table.resolve(config, spec, qat=finetune is not None)
    facts: dict[str, Any] = {"config": cfg.to_dict()}
    without, ptq_int8 = None, None
    if finetune is None:
        if run.fallback == "auto":
            q, searched = _fallback(backend, fm, cfg, calib, eval_set, run, progress)
            cfg, without = q.config, searched.without
            facts.update(config=cfg.to_dict(), fallback=searched.to_dict())
            for note in searched.notes:
                report.note(f"{spec.name}: {note}")
            seconds = {**q.seconds, "fallback": facts["fallback"]["seconds"]}
        else:
            q = quantize_with(backend, fm, cfg, calib, progress=progress)
            seconds = q.seconds
        int8, src = q.int8, q.source
        facts.update(calibration=q.calibration.to_dict(),
                     bias_correction=q.bias_correction.to_dict() if q.bias_correction else None,
                     adaround=q.adaround.to_dict() if q.adaround else None,
                     equalization=q.equalization.to_dict() if q.equalization else None)
        if q.calibration.skipped_unreadable:
            report.warn(f"{q.calibration.skipped_unreadable} unreadable calibration images were skipped (first: "
                        f"{next(iter(calib.dataset.skipped)).name}); remove or fix them")
    else:
        seconds = {}
        ptq_cfg = table.resolve(config.replace(recipe="best"), spec)   # what QAT starts from and is compared with
        src, eq = source_model(fm, cfg, calib, seconds)
        facts["equalization"] = eq.to_dict() if eq else None
        int8 = _finetune(backend, src, info, cfg, calib, eval_set, ckpt_dir, report, finetune, facts, progress,
                         seconds, dist, ptq_cfg)
        if int8 is None:
            return None
        if finetune.config.compare_ptq:
            with stage(f"{spec.name}: post-training quantization of the same checkpoint, to compare", enabled=progress):
                ptq_int8 = _timed(seconds, "ptq_to_compare", lambda: quantize_with(backend, fm, ptq_cfg, calib)).int8
            facts["ptq_config"] = ptq_cfg.to_dict()
    from .quant.keep_float import resolve_names, within

    if cfg.keep_float:
        facts["kept_float"] = list(resolve_names(cfg.keep_float, fm.module, fm.graph))
    with backend.session():
        facts.update(backend.describe(int8, cfg))
        kept = facts.get("kept_float", [])
        unexpected = sorted(name for name in backend.float_layers(int8) if not within(name, kept))
        if unexpected:
            report.warn(f"{spec.name}: layers left in float that were not asked for: {', '.join(unexpected)}; "
                        f"they run in fp32 on the device (check the quantizer's coverage of those ops)")
        stem = staging / paths.artifact_name(info, "int8", "")
        with stage(f"{spec.name}: lower and write", enabled=progress):
            written = _timed(seconds, "write", lambda: backend.write(int8, stem, resolution=info.resolution))
        files = [(w, _timed(seconds, "open", lambda w=w: backend.open(w.path, _sidecar(w, backend, cfg, info,
                                                                                       digests))))
                 for w in written]
        if without is not None:
            facts["fallback"]["without"] = _without(backend, without, info, run, calib, digests, progress)
    facts["seconds"] = seconds
    return Built(backend, cfg, int8, files, facts, src, ptq_int8)


def _fallback(backend: Backend, fm: FloatModel, cfg: QuantConfig, calib: CalibrationSet,
              eval_set: ImageFolderDataset, run: RunConfig, progress: bool):
    """``--fallback auto`` (:mod:`mbquant.fallback`): the chosen probe's Quantized and the search's result."""
    from . import fallback

    slice_set = fallback.held_out(calib, eval_set, run.fallback_images, cfg.seed)
    return fallback.search(lambda c: quantize_with(backend, fm, c, calib), backend.reference, fm, cfg, slice_set,
                           budget=run.max_drop, batch_size=run.eval_batch_size, progress=progress)


def _without(backend: Backend, q: Quantized, info: ModelInfo, run: RunConfig, calib: CalibrationSet,
             digests: dict[str, str], progress: bool) -> dict[str, Any]:
    """Size and latency of the program the recipe alone gives (every searched block INT8), written to a temporary
    folder and opened from its file: what the blocks kept in float cost."""
    x1 = next(iter(calib.batches(1)))
    with tempfile.TemporaryDirectory(prefix="mbquant-fallback-") as tmp, \
            stage(f"{backend.name}: lower the program without fallback (its size and latency)", enabled=progress):
        out = []
        for w in backend.write(q.int8, Path(tmp) / paths.artifact_name(info, "int8", ""), resolution=info.resolution):
            pred = backend.open(w.path, _sidecar(w, backend, q.config, info, digests))
            try:
                out.append({"file": w.path.name, "bytes": w.bytes, "latency": _latency(pred, x1, run)})
            finally:
                pred.close()
    return {"programs": out}


def _finetune(backend: Backend, fm: FloatModel, info: ModelInfo, cfg: QuantConfig, calib: CalibrationSet,
              eval_set: ImageFolderDataset, ckpt_dir: Path | None, report: Report, ft: Finetune, facts: dict,
              progress: bool, seconds: dict[str, float], dist: Dist, ptq_cfg: QuantConfig):
    """prepare_qat -> range init (``ptq_cfg``'s observer: where PTQ starts) -> fit_qat -> convert; returns the INT8
    model, None on ranks > 0."""
    from . import finetune
    from .calibrate.observers import activation_observer

    with backend.session():
        qm = _timed(seconds, "prepare", lambda: backend.prepare_qat(fm, cfg))
        qm.module.to(dist.device)
        if ft.config.init_ranges != "off" and ft.resume is None:
            observer = activation_observer(ptq_cfg) if ft.config.init_ranges == "recipe" else None
            seen = _timed(seconds, "calibrate", lambda: qm.init_ranges(
                (x.to(dist.device) for x in calib.batches(cfg.batch_size)), observer))
            facts["calibration"] = {"samples": seen, "use": "initial fake-quantize ranges",
                                    "observer": ptq_cfg.observer if observer is not None else "mean of batch min/max"}
        # one copy of the float model serves as teacher and as the reference the kept state is chosen against
        float_copy = copy.deepcopy(fm.module).eval() if ft.config.distill > 0 or ft.config.keep == "best" else None
        if ft.config.init_biases == "corrected" and ft.resume is None:
            start = _timed(seconds, "bias_correction", lambda: _corrected_start(qm, fm, calib, cfg, progress))
            facts["start_bias_correction"] = start.to_dict()
        result, warnings = _timed(seconds, "finetune", lambda: finetune.fit_qat(
            qm, info, ft.train_set, eval_set, config=ft.config, quant=cfg,
            float_digest=finetune.state_digest(fm.module), dist=dist, out_dir=ckpt_dir if dist.is_main else None,
            resume=ft.resume, progress=progress, on_step=ft.on_step,
            teacher=float_copy if ft.config.distill > 0 else None,
            reference=float_copy if ft.config.keep == "best" else None,
            calibration_images=[sample.path for sample in calib.dataset.samples]))
    if not dist.is_main:
        return None
    for w in warnings:
        report.warn(w)
    report.add("qat", {**result.to_dict(), "train_images_available": len(ft.train_set)})
    if result.selected_epoch is not None:
        _kept_line(report, backend.name, result)
    qm.module.to("cpu")
    with backend.session():
        return _timed(seconds, "convert", qm.convert)


def _kept_line(report: Report, name: str, result) -> None:
    """What ``keep="best"`` chose, in one line (a warning when no epoch beat the start)."""
    epochs = ", ".join(f"{row['held_out_agreement']:.2f}" for row in result.history)
    seen = (f"agreement with the float model on {result.held_out_images} held-out training images: start "
            f"{result.start_agreement:.2f} %, after each epoch {epochs} %")
    if result.selected_epoch == 0:
        report.warn(f"{name}: QAT kept its start ({seen}): no epoch beat it, so the INT8 model is the post-training "
                    f"state training started from (the recipe's ranges and corrected biases); train with a lower --lr "
                    f"or more images, or ship `mbquant ptq`")
    else:
        report.note(f"{name}: QAT kept epoch {result.selected_epoch} of {len(result.history)} ({seen})")


def _corrected_start(qm, fm: FloatModel, calib: CalibrationSet, cfg: QuantConfig,
                     progress: bool) -> BiasCorrectionResult:
    """Bias-correct the INT8 model the QAT graph converts to now (on CPU, the calibration images PTQ's bias
    correction reads) and carry each layer's shift into the graph's batch-norm (or layer) biases: training starts
    where the post-training recipe ends."""
    start = qm.converted_copy().to("cpu")
    result = correct_biases(start, fm.graph, calib.source(cfg.batch_size, bias_correction_images(fm.resolution)),
                            pair="order", progress=progress)
    qm.shift_outputs(list(result.shifts.values()))
    return result


def _fallback_note(report: Report, searched: dict | None, r: ArtifactResult) -> None:
    """What ``--fallback auto`` kept in float for this artifact and what that costs against the recipe alone."""
    if not searched:
        return
    kept = searched["kept"]
    if not kept and searched["met_on_slice"]:
        report.note(f"{r.backend}: --fallback auto kept no block in float: the recipe alone met --max-drop "
                    f"{searched['budget_pp']:g} pp on {searched['images']} held-out images")
        return
    line = (f"{r.backend}: --fallback auto kept {len(kept)} of {searched['units']} blocks in float "
            f"({', '.join(kept) or 'none'}; {searched['kept_params']:,} parameters) "
            f"{'to meet' if searched['met_on_slice'] else 'and did not meet'} --max-drop {searched['budget_pp']:g} pp "
            f"on {searched['images']} held-out images")
    other = next((p for p in (searched.get("without") or {}).get("programs", []) if p["file"] == r.file), None)
    if other is not None:
        line += f"; {r.file}: {r.bytes / 1024:.0f} KB vs {other['bytes'] / 1024:.0f} KB all-INT8"
        if r.latency and other["latency"]:
            line += f", {r.latency['median_ms']:.2f} ms vs {other['latency']['median_ms']:.2f} ms"
    curve = ", ".join(f"{c['kept']}: {c['drop_pp']:+.2f} pp / {c['agreement']:.2f} %" for c in searched["curve"])
    report.note(f"{line}; on the held-out images (blocks in float: drop / agreement): {curve}")


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
        readable = eval_set.readable_samples()
        out["images"] = [{"image": str(readable[i].path), "label": int(cmp.labels[i]), "reference": int(cmp.preds[ref][i]),
                          "artifact": int(cmp.preds[art][i]), "reference_margin": round(float(margins[i]), 4)}
                         for i in flipped[:limit].tolist()]
    return out


def _parity_difference(cmp: Comparison, ref: str, art: str, ref_ok: torch.Tensor, art_ok: torch.Tensor) -> dict:
    """The reference's outcome minus the artifact's, paired on the images, with the standard error that groups the
    flipped images by the class pair the two predict there (flips between the same classes move together)."""
    return {**paired(ref_ok, art_ok).to_dict(),
            "se_clustered_pp": round(clustered_se_pp(ref_ok, art_ok, cmp.preds[ref], cmp.preds[art]), 3)}


def _result(cmp: Comparison, built: Built, w: Written, pred: Predictor, eval_set: ImageFolderDataset,
            run: RunConfig, x1: torch.Tensor) -> ArtifactResult:
    ref, art = f"{built.backend.name}", f"{built.backend.name}:{w.path.name}"
    parity = {"agreement": round(cmp.agree(ref, art), 3), "max_abs_logit_diff": cmp.diff(ref, art),
              "flips": _flips(cmp, ref, art, eval_set),
              "top1_reference_minus_artifact": _parity_difference(cmp, ref, art, cmp.correct(ref), cmp.correct(art)),
              "agreement_float_reference_minus_artifact": _parity_difference(
                  cmp, ref, art, cmp.preds[ref] == cmp.preds[FLOAT], cmp.preds[art] == cmp.preds[FLOAT])}
    result = ArtifactResult(
        backend=built.backend.name, file=w.path.name, bytes=w.bytes, runtime=pred.runtime,
        images=cmp.count, top1=round(cmp.top1(art), 3), top5=round(cmp.top5(art), 3),
        drop_pp=round(cmp.drop(FLOAT, art), 3), agreement_float=round(cmp.agree(FLOAT, art), 3),
        drop_paired=cmp.paired_accuracy(FLOAT, art).to_dict(exact=True),
        reference_top1=round(cmp.top1(ref), 3), reference_agreement_float=round(cmp.agree(FLOAT, ref), 3),
        parity=parity, delegated=None if w.delegated is None else round(w.delegated, 4),
        latency=_latency(pred, x1, run), details=w.details, sha256=sha256_file(w.path))
    return replace(result, summary=tuple(built.backend.summary_lines(result)))


def _latency(pred: Predictor, x1: torch.Tensor, run: RunConfig) -> dict | None:
    lat = pred.latency(x1, run.latency_runs, run.latency_threads)
    return None if lat is None else {**lat, "threads": run.latency_threads}


def gate_failures(results: list[ArtifactResult], run: RunConfig, backends: dict[str, Backend] | None = None) -> list[str]:
    """Every quality gate, applied to every artifact in one place: the run's own (see
    :class:`~mbquant.config.RunConfig`), then each artifact's backend's (``backends`` by name)."""
    failures = []
    for r in results:
        name = f"{r.file} ({r.backend})"
        if run.max_drop is not None and r.drop_pp > run.max_drop:
            failures.append(f"{name}: top-1 drop {r.drop_pp:.3f} pp (float {r.top1 + r.drop_pp:.2f} % -> {r.top1:.2f} %"
                            f" on {r.images} images) is larger than --max-drop {run.max_drop}")
        for key, what in (("top1_reference_minus_artifact", "top-1 accuracy"),
                          ("agreement_float_reference_minus_artifact", "agreement with the float model")):
            p = r.parity[key]
            se = max(p["se_pp"], p.get("se_clustered_pp", 0.0))   # flips between the same two classes move together
            if p["diff_pp"] > run.parity_z * se + 1e-9:
                failures.append(
                    f"{name}: the reloaded artifact's {what} is {p['diff_pp']:.2f} pp below that of the INT8 model it "
                    f"was written from ({p['only_a']} vs {p['only_b']} images on {p['images']}; more than "
                    f"--parity-z {run.parity_z} standard errors of {se:.2f} pp, flips grouped by class pair): it "
                    f"does not compute what was quantized")
        if run.min_parity is not None and r.parity["agreement"] < run.min_parity:
            failures.append(f"{name}: agrees with its INT8 model on {r.parity['agreement']} % of images (< --min-parity "
                            f"{run.min_parity} %)")
        if backends is not None and r.backend in backends:
            failures += backends[r.backend].gate_failures(r, run)
    return failures


def judgeable(cmp: Comparison, selected: int) -> list[str]:
    """Why the measurement cannot judge the quantization (too few readable images, a chance-level float model)."""
    from .stats import MIN_IMAGES, chance_message, indistinguishable_from_chance

    if cmp.count < MIN_IMAGES:
        return [f"{cmp.count} readable evaluation images (of {selected} selected) cannot judge the quantization: gates "
                f"need at least {MIN_IMAGES} (on 10 images the 95 % interval of a drop spans more than 60 pp); pass "
                f"--eval-limit {MIN_IMAGES} or more, or a folder with more images"]
    labels = cmp.labels.tolist()
    if indistinguishable_from_chance(int(cmp.correct(FLOAT).sum()), labels):
        return [chance_message(cmp.top1(FLOAT), labels, len(set(labels)))]
    return []


def _measure(fm: FloatModel, built: list[Built], eval_set: ImageFolderDataset, run: RunConfig,
             float_file: tuple[Written, Predictor] | None, progress: bool, seconds: dict[str, float], dist: Dist):
    """Every model on every evaluation image (sharded over ``dist``'s ranks), then the results; None on ranks > 0."""
    predictors: dict[str, Predictor] = {FLOAT: ModulePredictor(fm.graph, "in-process float model")}
    for b in built:
        predictors[b.backend.name] = b.backend.reference(b.int8)
        if b.ptq is not None:
            predictors[_ptq_name(b)] = b.backend.reference(b.ptq)
        for w, pred in b.files:
            predictors[f"{b.backend.name}:{w.path.name}"] = pred
    cmp = _timed(seconds, "evaluate", lambda: compare_dataset(predictors, eval_set, run.eval_batch_size, dist=dist,
                                                              workers=run.decode_workers, progress=progress,
                                                              desc=f"evaluate {len(predictors)} models"))
    if not dist.is_main:
        return None
    seconds.update({f"evaluate {name}": v for name, v in cmp.seconds.items()})
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


def _ptq_name(b: Built) -> str:
    return f"{b.backend.name} PTQ"


def versus_ptq(cmp: Comparison, b: Built) -> dict[str, Any]:
    """A QAT run's INT8 model against the post-training INT8 model of the same checkpoint (its backend's default
    recipe, same flags), on the same images: each one's drop and agreement with the float model, and the paired
    differences QAT minus PTQ with their standard errors. ``qat_worse``: QAT agrees with the float model on
    significantly fewer images than PTQ does (the paired difference's 95 % interval lies below zero); a difference
    inside it is within what the images resolve."""
    ptq, qat = _ptq_name(b), b.backend.name
    agreement, top1 = cmp.paired_agreement(FLOAT, qat, ptq), cmp.paired_accuracy(qat, ptq)
    return {"images": cmp.count, "ptq_config": b.facts.get("ptq_config"),
            "ptq": {"top1": round(cmp.top1(ptq), 3), "drop_pp": round(cmp.drop(FLOAT, ptq), 3),
                    "agreement_float": round(cmp.agree(FLOAT, ptq), 3)},
            "qat": {"top1": round(cmp.top1(qat), 3), "drop_pp": round(cmp.drop(FLOAT, qat), 3),
                    "agreement_float": round(cmp.agree(FLOAT, qat), 3)},
            "qat_minus_ptq": {"agreement": agreement.to_dict(), "top1": top1.to_dict()},
            "qat_worse": agreement.interval(1.96)[1] < 0}


def _versus_ptq_lines(report: Report, b: Built, v: dict[str, Any]) -> None:
    q, p, d = v["qat"], v["ptq"], v["qat_minus_ptq"]["agreement"]
    line = (f"{b.backend.name}: QAT's INT8 model agrees with the float model on {q['agreement_float']:.2f} % of "
            f"{v['images']} images (drop {q['drop_pp']:.2f} pp), post-training quantization of the same checkpoint "
            f"on {p['agreement_float']:.2f} % (drop {p['drop_pp']:.2f} pp); QAT minus PTQ: {d['diff_pp']:+.2f} pp "
            f"agreement (SE {d['se_pp']:.2f} pp)")
    if v["qat_worse"]:
        report.warn(f"{line}: QAT did worse than post-training quantization here; ship `mbquant ptq` with the same "
                    f"flags (its INT8 model is the closer one), or train again with a lower --lr or --distill 1")
    else:
        within = d["ci95_pp"][0] <= 0 <= d["ci95_pp"][1]
        report.note(f"{line}" + (": within what these images resolve (95 % interval "
                                 f"{d['ci95_pp'][0]:+.2f} to {d['ci95_pp'][1]:+.2f} pp)" if within else ""))


def same_programs(built: list[Built], dist: Dist) -> None:
    """Every rank built the same files (each rank evaluates its shard on its own): compare their digests."""
    mine = [sha256_file(w.path) for b in built for w, _ in b.files]
    every = dist.gather(mine)
    if any(d != every[0] for d in every):
        names = [w.path.name for b in built for w, _ in b.files]
        differ = sorted({names[i] for d in every for i, (a, b) in enumerate(zip(d, every[0])) if a != b})
        raise VerificationError(f"the {dist.world} ranks built different programs ({', '.join(differ)}): the sharded "
                                f"evaluation would mix them; run in one process, or give every rank the same torch "
                                f"threads and the same calibration folder")


def check_run(config: QuantConfig, run: RunConfig, *, qat: bool = False) -> list:
    """Every problem of a run's request found before any work: the backends it names, their options and recipes."""
    specs = table.select(run.target, run.formats, run.backends)
    table.check_options(run.options, specs)
    for spec in specs:
        table.check_requirements(spec)
        table.resolve(config, spec, qat=qat)
    if qat and len(specs) != 1:
        raise ConfigError(f"QAT trains one model for one engine, got backends {[s.name for s in specs]}; run `mbquant "
                          f"qat` once per format")
    if run.fallback != "none":
        if qat:
            raise ConfigError(f"--fallback {run.fallback} searches post-training quantizations; QAT trains every layer "
                              f"in INT8: drop --fallback, or name layers with --keep-float")
        every_int8 = [s.name for s in specs if not s.keep_float]
        if every_int8:
            raise ConfigError(f"--fallback {run.fallback}: backend(s) {', '.join(every_int8)} run every layer in INT8 "
                              f"(layers kept in float are supported by: {table.having('keep_float')}); "
                              f"drop --fallback or pick those backends with --backend")
    return specs


def run_job(model: nn.Module, info: ModelInfo, *, calib: CalibrationSet, eval_set: ImageFolderDataset,
            out_dir: Path, config: QuantConfig = QuantConfig(), run: RunConfig = RunConfig(),
            finetune: Finetune | None = None, progress: bool = False, command: str = "",
            warnings: tuple[str, ...] = (), overwrite: bool = False) -> Report | None:
    """The whole job (see the module doc), written with the run-folder protocol (:class:`mbquant._io.RunFolder`):
    ``out_dir`` appears, complete, only when every artifact is verified and every gate passed; a run that fails
    a gate leaves its report in ``<out_dir>.failed/``. Returns the report; None on torchrun ranks > 0."""
    specs = check_run(config, run, qat=finetune is not None)
    if finetune is not None:
        finetune = replace(finetune, config=table.resolve_qat(finetune.config, specs[0]))
    from .stats import MIN_IMAGES

    if len(eval_set) < MIN_IMAGES:
        raise ConfigError(f"{len(eval_set)} evaluation images cannot judge the quantization: gates need at least "
                          f"{MIN_IMAGES} (on 10 images the 95 % interval of a drop spans more than 60 pp); pass "
                          f"--eval-limit {MIN_IMAGES} or more, or a folder with more images")
    from . import distributed

    dist = distributed.from_env()
    try:
        if not dist.is_main:     # a torchrun worker: trains or evaluates its shard, writes nothing of the user's
            with tempfile.TemporaryDirectory(prefix=f"mbquant-rank{dist.rank}-") as tmp:
                _job(model, info, specs, calib=calib, eval_set=eval_set, staging=Path(tmp), ckpt_dir=None,
                     config=config, run=run, finetune=finetune, progress=False, report=Report(command), dist=dist)
            return None
        resume = finetune is not None and finetune.resume is not None
        with RunFolder(Path(out_dir), overwrite=overwrite, resume=resume) as folder:
            report = Report(command, warnings=list(warnings))
            for note in folder.notes:
                report.note(note)
            _job(model, info, specs, calib=calib, eval_set=eval_set, staging=folder.staging, ckpt_dir=folder.work,
                 config=config, run=run, finetune=finetune, progress=progress, report=report, dist=dist)
            if report.ok:
                report.location = folder.publish()
            else:
                report.location = folder.fail()
        return report
    finally:
        distributed.shutdown(dist)


def _job(model: nn.Module, info: ModelInfo, specs: list, *, calib: CalibrationSet, eval_set: ImageFolderDataset,
         staging: Path, ckpt_dir: Path | None, config: QuantConfig, run: RunConfig, finetune: Finetune | None,
         progress: bool, report: Report, dist: Dist) -> None:
    started = time.perf_counter()
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
        b = _build(spec, fm, info, config, run, calib, eval_set, staging, ckpt_dir, report, digests,
                   finetune=finetune, progress=progress, dist=dist)
        if b is None:
            return
        built.append(b)
    # QAT trained on every rank and converted on rank 0 alone: it evaluates there; PTQ built on every rank
    eval_dist = dist if finetune is None else Dist()
    if eval_dist.active:
        same_programs(built, eval_dist)
    float_file, seconds = None, {}
    if run.float_program and dist.is_main and any(b.backend.spec.float_program for b in built):
        b = next(b for b in built if b.backend.spec.float_program)
        with stage(f"{b.backend.name}: lower and write the fp32 program", enabled=progress):
            w = _timed(seconds, "float_program", lambda: b.backend.write(
                fm.graph, staging / paths.artifact_name(info, "fp32", ""), resolution=info.resolution)[0])
        float_file = (w, b.backend.open(w.path, _sidecar(w, b.backend, b.config, info, digests)))
    try:
        measured = _timed(seconds, "verify", lambda: _measure(fm, built, eval_set, run, float_file, progress,
                                                               seconds, eval_dist))
    finally:
        for b in built:
            for _, pred in b.files:
                pred.close()
        if float_file is not None:
            float_file[1].close()
    if measured is None:
        return
    cmp, results, fl, x8 = measured
    by_backend = {b.backend.name: b for b in built}
    with stage("per-layer SQNR", enabled=progress):
        report.add("backends", {b.backend.name: {**b.facts, **_timed(seconds, "diagnose", lambda: b.backend.diagnose(
            b.source, b.int8, x8))} for b in built})
    report.add("seconds", seconds)
    report.add("float", fl)
    report.add("artifacts", [r.to_dict() for r in results])
    if cmp.skipped:
        report.warn(f"{cmp.skipped} unreadable evaluation images were skipped (first: "
                    f"{', '.join(sorted(p.name for p in eval_set.skipped)[:3])}); remove or fix them")
    for r in results:
        _fallback_note(report, by_backend[r.backend].facts.get("fallback"), r)
        for note in r.details.get("notes", []):
            report.note(f"{r.backend}: {note}")
        for warning in r.details.get("warnings", []):
            report.warn(f"{r.backend}: {warning}")
    compared = {}
    for b in built:
        if b.ptq is not None:
            compared[b.backend.name] = versus_ptq(cmp, b)
            _versus_ptq_lines(report, b, compared[b.backend.name])
    if compared:
        report.add("versus_ptq", compared)
    for failure in judgeable(cmp, len(eval_set)):
        report.fail(failure)
    for failure in gate_failures(results, run, {b.backend.name: b.backend for b in built}):
        report.fail(failure)
    by_name = {b.backend.name: b for b in built}
    for b in built:
        for w, _ in b.files:
            r = next(r for r in results if r.file == w.path.name)
            _sidecar(w, b.backend, b.config, info, digests, measured={
                "images": r.images, "top1": r.top1, "drop_pp": r.drop_pp, "agreement_float": r.agreement_float,
                "parity": r.parity["agreement"]}).write(paths.sidecar(w.path))
            by_name[r.backend].backend.companions(w.path, info, r.details)
    report.add("resources", resources(started))
    report.write(staging)
