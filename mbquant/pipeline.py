"""The PTQ road, stage by stage: prepare -> calibrate -> convert -> lower -> write -> reload -> compare -> report.

``quantize`` is the short way (a float model and real calibration images in, an INT8 graph out);
``run_ptq`` is the whole job the CLI runs. ``export_verify_report`` is shared with QAT.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule

from . import calibrate
from ._io import ensure_writable_dir, write_json
from .calibrate import CalibrationResult, CalibrationSet
from .calibrate.bias_correction import BiasCorrectionResult, correct_biases
from .config import QATConfig, QuantConfig, RunConfig
from .data import ImageFolderDataset, load_folder, make_loader
from .errors import ConfigError, DataError
from .evaluate import compare, layer_sqnr
from .mobile import PteModel, latency_ms, lower, set_runtime_threads, write_pte
from .models import ModelInfo
from .quant import ptq
from .quant.graph import GraphSummary, summarize
from .quant.targets import get_target
from .report import Report, format_table, library_versions

log = logging.getLogger(__name__)


@dataclass
class Quantized:
    int8: GraphModule
    calibration: CalibrationResult
    graph: GraphSummary
    seconds: float
    bias_correction: BiasCorrectionResult | None = None


def quantize(model: nn.Module, calib: CalibrationSet, *, resolution: int, config: QuantConfig = QuantConfig(),
             target: str = "phone", progress: bool = False) -> Quantized:
    """Float model + real calibration images -> converted INT8 PT2E graph (BN folded, checked)."""
    start = time.perf_counter()
    prepared = ptq.prepare(model, resolution, config, get_target(target))
    result = calibrate.run(prepared, calib, batch_size=config.batch_size, progress=progress)
    int8 = ptq.convert(prepared)
    bias = None
    if config.bias_correction:
        batches = [b[0] for b in calib.loader(config.batch_size) if b is not None]
        bias = correct_biases(int8, ptq.export_float(model, resolution), batches)
    return Quantized(int8, result, summarize(int8), round(time.perf_counter() - start, 2), bias)


def _output_layers(gm: GraphModule) -> set[str]:
    return {src.name for n in gm.graph.nodes if n.op == "output" for src in n.all_input_nodes}


def samples_digest(ds: ImageFolderDataset) -> str:
    """A short hash of which files (path and size) a dataset holds: names the data in reports and sidecars."""
    h = hashlib.sha256()
    for s in ds.samples:
        h.update(f"{s.path.name}:{s.label}:{s.path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def load_eval_set(root: Path, info: ModelInfo, limit: int | None, *, seed: int = 0) -> ImageFolderDataset:
    """The labelled evaluation images; with ``limit``, a seeded class-stratified subset of that many."""
    ds = load_folder(root, info.preset, expected_classes=list(info.classes) or None)
    if not ds.labelled:
        raise DataError(f"evaluation folder '{root}' has no class subfolders; pass a labelled ImageFolder")
    if limit is not None and limit < len(ds):
        keep = calibrate.stratified_indices([s.label for s in ds.samples], limit, seed)
        ds = ImageFolderDataset([ds.samples[i] for i in keep], ds.classes, ds.transform)
    return ds


def default_out_dir(model_name: str) -> Path:
    return Path("runs") / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_ptq(model: nn.Module, info: ModelInfo, *, calib: Path, eval_dir: Path | None, out_dir: Path,
            config: QuantConfig = QuantConfig(), run: RunConfig = RunConfig(), progress: bool = False,
            command: str = "ptq") -> Report:
    """The whole `mbquant ptq` job. Input problems raise before any artifact is written."""
    report = Report(command)
    target = get_target(run.target)
    target.check(config, "pte")
    ensure_writable_dir(out_dir)
    classes = list(info.classes) or None
    calib_set = calibrate.from_folder(calib, info.preset, config.num_calib, seed=config.seed, expected_classes=classes)
    if eval_dir is None:
        if not calib_set.dataset.labelled:
            raise ConfigError(f"calibration folder '{calib}' has no labels, so it cannot measure accuracy; "
                              f"pass --eval with a labelled folder (one subfolder per class)")
        eval_dir = Path(calib)
        report.warn(f"evaluating on the calibration folder '{calib}'; pass --eval with held-out images for an "
                    f"unbiased accuracy drop")
    eval_set = load_eval_set(eval_dir, info, run.eval_limit, seed=config.seed)
    report.add("model", info.to_dict())
    report.add("config", config.to_dict())
    report.add("run", run.to_dict())

    q = quantize(model, calib_set, resolution=info.resolution, config=config, target=run.target, progress=progress)
    report.add("calibration", {**calib_set.to_dict(), **q.calibration.to_dict(), "digest": samples_digest(calib_set.dataset)})
    if q.calibration.skipped:
        report.warn(f"{q.calibration.skipped} unreadable calibration images were skipped")
    report.add("quantization", {**q.graph.to_dict(), "seconds": q.seconds,
                                "bias_correction": q.bias_correction.to_dict() if q.bias_correction else None})
    requested = _output_layers(q.int8) if config.float_logits else set()
    unexpected = [op for op in q.graph.float_ops if op.split(" ")[0] not in requested]
    if unexpected:
        report.warn(f"{len(unexpected)} ops stay in float: {', '.join(unexpected[:5])}")
    export_verify_report(model, q.int8, info, eval_set, out_dir, report, config=config, run=run, progress=progress)
    return report


def run_qat(model: nn.Module, info: ModelInfo, *, data: Path, out_dir: Path, config: QuantConfig = QuantConfig(),
            qat: QATConfig = QATConfig(), run: RunConfig = RunConfig(), resume: Path | None = None,
            progress: bool = False, command: str = "qat", on_step=None) -> Report | None:
    """The whole `mbquant qat` job: prepare_qat -> range init -> fine-tune (resumable, DDP under torchrun) ->
    convert -> the same export, verification and report as PTQ. Returns None on ranks other than 0."""
    from . import distributed, finetune
    from .quant import qat as qat_stages

    if config.bias_correction:
        raise ConfigError("--bias-correction is a post-training fix; QAT learns the correction itself: drop the flag")
    target = get_target(run.target)
    target.check(config, "pte")
    data = Path(data)
    classes = list(info.classes) or None
    train_set = load_folder(data / "train", info.preset, train=True, expected_classes=classes)
    eval_set = load_eval_set(data / "val", info, run.eval_limit, seed=config.seed)
    calib_set = calibrate.from_folder(data / "train", info.preset, config.num_calib, seed=config.seed,
                                      expected_classes=classes)
    float_digest = finetune.state_digest(model)
    checkpoint = None
    if resume is not None:  # checked before any work: another model, other weights or flags fail here
        checkpoint = finetune.load_qat_checkpoint(resume, info=info, float_digest=float_digest, quant=config, config=qat)
    dist = distributed.from_env()
    try:
        if dist.is_main:
            ensure_writable_dir(out_dir)
        report = Report(command)
        for name, section in (("model", info.to_dict()), ("config", config.to_dict()), ("qat_config", qat.to_dict()),
                              ("run", run.to_dict())):
            report.add(name, section)
        qg = qat_stages.prepare_qat(model, info.resolution, config, target)
        qg.module.to(dist.device)
        if qat.init_ranges and resume is None:
            seen = qg.init_ranges(b[0].to(dist.device) for b in calib_set.loader(config.batch_size) if b is not None)
            report.add("calibration", {**calib_set.to_dict(), "samples": seen, "digest": samples_digest(calib_set.dataset),
                                       "use": "initial fake-quantize ranges"})
        result, warnings = finetune.fit_qat(
            qg, info, train_set, eval_set, config=qat, quant=config, float_digest=float_digest,
            dist=dist, out_dir=out_dir if dist.is_main else None, resume=checkpoint,
            eval_batch_size=run.eval_batch_size, progress=progress, on_step=on_step)
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return None
    for w in warnings:
        report.warn(w)
    qg.module.to("cpu")
    int8 = qg.convert()
    report.add("qat", {**result.to_dict(), "train_images_available": len(train_set)})
    report.add("quantization", summarize(int8).to_dict())
    export_verify_report(model, int8, info, eval_set, out_dir, report, config=config, run=run, progress=progress)
    return report


def export_verify_report(model: nn.Module, int8: GraphModule, info: ModelInfo, eval_set: ImageFolderDataset,
                         out_dir: Path, report: Report, *, config: QuantConfig, run: RunConfig,
                         progress: bool = False) -> Report:
    """Lower and write the INT8 (and float) programs, reload them, measure accuracy/parity/latency, apply gates."""
    stem = f"{info.name}_w{info.width_mult:g}_r{info.resolution}"
    int8_path = out_dir / f"{stem}_int8.pte"
    t = time.perf_counter()
    lowered = lower(int8, info.resolution)
    lower_s = round(time.perf_counter() - t, 1)
    write_pte(lowered, int8_path)
    programs = {"int8": {"path": str(int8_path), "bytes": int8_path.stat().st_size, "lower_seconds": lower_s,
                         "delegation": lowered.delegation.to_dict()}}
    float_gm = ptq.export_float(model, info.resolution)  # the float numerics both programs are made from
    float_path = None
    if run.float_program:
        float_path = out_dir / f"{stem}_fp32.pte"
        t = time.perf_counter()
        flow = lower(float_gm, info.resolution)
        write_pte(flow, float_path)
        programs["fp32"] = {"path": str(float_path), "bytes": float_path.stat().st_size,
                            "lower_seconds": round(time.perf_counter() - t, 1), "delegation": flow.delegation.to_dict()}
    report.add("programs", programs)

    pte = PteModel(int8_path)
    predictors = {"float": float_gm, "int8_module": int8, "int8_pte": pte}
    loader = make_loader(eval_set, run.eval_batch_size)
    cmp = compare(predictors, loader, progress=progress, desc="evaluate float/int8/.pte")
    first = next(b for b in make_loader(eval_set, 8) if b is not None)[0]
    sqnr = layer_sqnr(float_gm, int8, first)
    drop = cmp.drop("float", "int8_pte")
    accuracy = {
        "eval_root": str(eval_set.samples[0].path.parent.parent),
        "images": cmp.count, "skipped_unreadable": cmp.skipped, "digest": samples_digest(eval_set),
        "float_top1": round(cmp.accuracy["float"].top1, 3), "float_top5": round(cmp.accuracy["float"].top5, 3),
        "int8_module_top1": round(cmp.accuracy["int8_module"].top1, 3),
        "int8_pte_top1": round(cmp.accuracy["int8_pte"].top1, 3), "int8_pte_top5": round(cmp.accuracy["int8_pte"].top5, 3),
        "top1_drop_pp": round(drop, 3),
        "agreement_float_vs_int8_pte": round(cmp.agree("float", "int8_pte"), 3),
        "agreement_float_vs_int8_module": round(cmp.agree("float", "int8_module"), 3),
    }
    parity = {"agreement_pte_vs_module": round(cmp.agree("int8_module", "int8_pte"), 3),
              "max_abs_logit_diff": cmp.diff("int8_module", "int8_pte"), "images": cmp.count}
    report.add("accuracy", accuracy)
    report.add("parity", parity)
    report.add("layer_sqnr_worst5", sqnr[:5])
    report.add("layer_sqnr_all", sqnr)
    for failure in gate_failures(run, delegated=lowered.delegation.ratio, parity=parity["agreement_pte_vs_module"],
                                 drop=drop, outside=lowered.delegation.outside_ops):
        report.fail(failure)

    set_runtime_threads(run.latency_threads)
    x1 = first[:1]
    lat = {"host": f"{platform.machine()} CPU of this host (not a phone)", "threads": run.latency_threads,
           "int8_pte": latency_ms(pte, x1, runs=run.latency_runs)}
    if float_path is not None:
        lat["fp32_pte"] = latency_ms(PteModel(float_path), x1, runs=run.latency_runs)
    report.add("latency", lat)

    sidecar = {"artifact": int8_path.name, "model": info.to_dict(), "config": config.to_dict(), "target": run.target,
               "calibration_digest": report.sections.get("calibration", {}).get("digest"),
               "eval_digest": accuracy["digest"], "preset": info.preset.to_dict(), "classes": list(info.classes),
               "versions": library_versions()}
    write_json(int8_path.with_suffix(".pte.json"), sidecar)
    report.write(out_dir)
    return report


def gate_failures(run: RunConfig, *, delegated: float, parity: float, drop: float, outside: dict) -> list[str]:
    """The quality gates of a run: delegated ratio, artifact parity and (when asked) the accuracy drop."""
    failures = []
    if delegated < run.min_delegated:
        failures.append(f"only {delegated:.2%} of INT8 ops are delegated to XNNPACK (< --min-delegated "
                        f"{run.min_delegated}); outside the delegate: {outside}")
    if parity < run.min_parity:
        failures.append(f"the reloaded .pte agrees with the INT8 model on only {parity}% of images "
                        f"(< --min-parity {run.min_parity}%)")
    if run.max_drop is not None and drop > run.max_drop:
        failures.append(f"top-1 drop {drop:.3f} pp is larger than --max-drop {run.max_drop}")
    return failures


def summary_table(report: Report) -> str:
    """The human table printed at the end of a run."""
    s = report.sections
    acc, par, prog, lat = s["accuracy"], s["parity"], s["programs"], s["latency"]
    rows = [("float (fp32 graph)", f"{acc['float_top1']:.2f}", "", f"{prog.get('fp32', {}).get('bytes', 0) / 1024:,.0f}",
             f"{lat.get('fp32_pte', {}).get('median_ms', float('nan')):.2f}", ""),
            ("int8 .pte (XNNPACK)", f"{acc['int8_pte_top1']:.2f}", f"{acc['top1_drop_pp']:.2f}",
             f"{prog['int8']['bytes'] / 1024:,.0f}", f"{lat['int8_pte']['median_ms']:.2f}",
             f"{prog['int8']['delegation']['ratio']:.2%}")]
    table = format_table(rows, ("artifact", "top-1 %", "drop pp", "size KiB", "latency ms", "delegated"))
    worst = ", ".join(f"{r['module'] or r['node']} {r['sqnr_db']:.1f} dB" for r in s.get("layer_sqnr_worst5", [])[:3])
    lines = [table,
             f"eval: {acc['images']} images; float vs INT8 .pte top-1 agreement {acc['agreement_float_vs_int8_pte']:.2f}%; "
             f".pte vs INT8 module agreement {par['agreement_pte_vs_module']:.2f}% (max |logit diff| {par['max_abs_logit_diff']:.2g})",
             f"latency: batch 1, {lat['threads']} thread(s), {lat['host']}",
             f"worst layers (SQNR): {worst}"]
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"FAILED: {f}" for f in report.failures]
    return "\n".join(lines)
