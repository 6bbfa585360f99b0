"""The PTQ road, stage by stage: prepare -> calibrate -> convert -> lower -> write -> reload -> compare -> report.

``quantize`` is the short way (a float model and real calibration images in, an INT8 graph out);
``run_ptq`` is the whole job the CLI runs. ``export_verify_report`` is shared with QAT.
"""
from __future__ import annotations

import copy
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
    for fmt in run.formats:
        target.check(config, fmt)
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
    if "pte" in run.formats:
        q = quantize(model, calib_set, resolution=info.resolution, config=config, target=run.target, progress=progress)
        report.add("calibration", {**calib_set.to_dict(), **q.calibration.to_dict(),
                                   "digest": samples_digest(calib_set.dataset)})
        if q.calibration.skipped:
            report.warn(f"{q.calibration.skipped} unreadable calibration images were skipped")
        report.add("quantization", {**q.graph.to_dict(), "seconds": q.seconds,
                                    "bias_correction": q.bias_correction.to_dict() if q.bias_correction else None})
        requested = _output_layers(q.int8) if config.float_logits else set()
        unexpected = [op for op in q.graph.float_ops if op.split(" ")[0] not in requested]
        if unexpected:
            report.warn(f"{len(unexpected)} ops stay in float: {', '.join(unexpected[:5])}")
        export_verify_report(model, q.int8, info, eval_set, out_dir, report, config=config, run=run, progress=progress)
    if "torchscript" in run.formats:
        torchscript_report(model, info, eval_set, out_dir, report, config=config, run=run, calib_set=calib_set,
                           progress=progress)
    report.write(out_dir)
    return report


def torchscript_report(model: nn.Module, info: ModelInfo, eval_set: ImageFolderDataset, out_dir: Path,
                       report: Report, *, config: QuantConfig, run: RunConfig, calib_set: CalibrationSet | None = None,
                       qmodel: nn.Module | None = None, progress: bool = False) -> None:
    """Build (or take ``qmodel``), write, reload in fresh processes and measure the TorchScript artifacts;
    add them to ``report`` with their gates (parity of .pt and .ptl, and the drop when asked)."""
    from .mobile.torchscript import export_torchscript

    ts = export_torchscript(model, info, calib_set, eval_set, out_dir, config=config, target=run.target, relu6=run.relu6,
                            eval_batch_size=run.eval_batch_size, latency_runs=run.latency_runs, progress=progress,
                            qmodel=qmodel)
    report.add("torchscript", ts)
    unused = [flag for flag, on in (("--float-logits", config.float_logits),
                                    ("--bias-correction", config.bias_correction)) if on]
    if unused:
        ts["warnings"].append(f"{' and '.join(unused)} apply to the .pte only; the eager engine's TorchScript "
                              f"artifact is quantized without them")
    for w in ts["warnings"]:
        report.warn(f"torchscript: {w}")
    for kind, par in ts["parity"].items():
        if par["agreement"] < run.min_parity:
            report.fail(f"the reloaded .{kind} agrees with the in-process INT8 model on only {par['agreement']}% of "
                        f"images (< --min-parity {run.min_parity}%)")
    drop = ts["accuracy"]["top1_drop_pp"]
    if run.max_drop is not None and drop > run.max_drop:
        report.fail(f"TorchScript top-1 drop {drop:.3f} pp is larger than --max-drop {run.max_drop}")


def run_qat(model: nn.Module, info: ModelInfo, *, data: Path, out_dir: Path, config: QuantConfig = QuantConfig(),
            qat: QATConfig = QATConfig(), run: RunConfig = RunConfig(), resume: Path | None = None,
            progress: bool = False, command: str = "qat", on_step=None) -> Report | None:
    """The whole `mbquant qat` job: prepare_qat -> range init -> fine-tune (resumable, DDP under torchrun) ->
    convert -> the same export, verification and report as PTQ. Returns None on ranks other than 0."""
    from . import distributed, finetune

    if config.bias_correction:
        raise ConfigError("--bias-correction is a post-training fix; QAT learns the correction itself: drop the flag")
    if len(run.formats) != 1:
        raise ConfigError(f"QAT trains one model for one engine, got formats {list(run.formats)}; run `mbquant qat` "
                          f"once with --format pte and once with --format torchscript")
    fmt = run.formats[0]
    get_target(run.target).check(config, fmt)
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
        qg = _qat_model(model, info, config, run)
        qg.module.to(dist.device)
        if qat.init_ranges and resume is None:
            seen = qg.init_ranges(b[0].to(dist.device) for b in calib_set.loader(config.batch_size) if b is not None)
            report.add("calibration", {**calib_set.to_dict(), "samples": seen, "digest": samples_digest(calib_set.dataset),
                                       "use": "initial fake-quantize ranges"})
        result, warnings = finetune.fit_qat(
            qg, info, train_set, eval_set, config=qat, quant=config, float_digest=float_digest,
            dist=dist, out_dir=out_dir if dist.is_main else None, resume=checkpoint,
            eval_batch_size=run.eval_batch_size, progress=progress, on_step=on_step,
            teacher=copy.deepcopy(model).eval() if qat.distill > 0 else None)
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return None
    for w in warnings:
        report.warn(w)
    qg.module.to("cpu")
    report.add("qat", {**result.to_dict(), "train_images_available": len(train_set)})
    if fmt == "pte":
        int8 = qg.convert()
        report.add("quantization", summarize(int8).to_dict())
        export_verify_report(model, int8, info, eval_set, out_dir, report, config=config, run=run, progress=progress)
    else:
        torchscript_report(model, info, eval_set, out_dir, report, config=config, run=run, qmodel=qg.convert(),
                           progress=progress)
    report.write(out_dir)
    return report


def _qat_model(model: nn.Module, info: ModelInfo, config: QuantConfig, run: RunConfig):
    """The fake-quantized model QAT trains: a PT2E graph for .pte, the eager engine's modules for TorchScript."""
    if run.formats == ("pte",):
        from .quant.qat import prepare_qat

        return prepare_qat(model, info.resolution, config, get_target(run.target))
    from .quant.eager import EagerQat, engine_for

    return EagerQat(model, config, engine_for(run.target), relu6=run.relu6)


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


def _na(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(report: Report) -> str:
    """The human table printed at the end of a run: one row per artifact, then parity, QAT history, warnings."""
    s = report.sections
    rows, lines = [], []
    acc, prog, lat, par = s.get("accuracy"), s.get("programs"), s.get("latency", {}), s.get("parity")
    ts = s.get("torchscript")
    float_top1 = acc["float_top1"] if acc else ts["accuracy"]["float_top1"]
    rows.append(("float (fp32)", f"{float_top1:.2f}", "", _na(prog and prog.get("fp32", {}).get("bytes", None) and
                 prog["fp32"]["bytes"] / 1024, ",.0f"), _na(lat.get("fp32_pte", {}).get("median_ms"), ".2f"), ""))
    if acc:
        rows.append(("int8 .pte (XNNPACK)", f"{acc['int8_pte_top1']:.2f}", f"{acc['top1_drop_pp']:.2f}",
                     f"{prog['int8']['bytes'] / 1024:,.0f}", f"{lat['int8_pte']['median_ms']:.2f}",
                     f"{prog['int8']['delegation']['ratio']:.2%}"))
        lines.append(f".pte: {acc['images']} images; float vs INT8 .pte agreement {acc['agreement_float_vs_int8_pte']:.2f}%; "
                     f".pte vs INT8 module {par['agreement_pte_vs_module']:.2f}% (max |logit diff| "
                     f"{par['max_abs_logit_diff']:.2g}); latency batch 1, {lat['threads']} thread(s), {lat['host']}")
        worst = ", ".join(f"{r['module'] or r['node']} {r['sqnr_db']:.1f} dB" for r in s.get("layer_sqnr_worst5", [])[:3])
        lines.append(f"worst layers (SQNR): {worst}")
    if ts:
        a, p = ts["accuracy"], ts["parity"]
        for kind in ("pt", "ptl"):
            rows.append((f"int8 .{kind} (TorchScript, {ts['engine']})", f"{a['int8_top1']:.2f}", f"{a['top1_drop_pp']:.2f}",
                         f"{ts['artifacts'][kind]['bytes'] / 1024:,.0f}",
                         f"{ts['latency']['median_ms']:.2f}" if kind == "pt" else "", ""))
        lines.append(f"torchscript: {a['images']} images; float vs INT8 agreement {a['agreement_float_vs_int8']:.2f}%; "
                     f"reloaded in a fresh process: .pt {p['pt']['agreement']:.2f}%, .ptl {p['ptl']['agreement']:.2f}% "
                     f"agreement with the in-process INT8 model; weights {ts['granularity']}, ReLU6 {ts['relu6']}")
    table = format_table(rows, ("artifact", "top-1 %", "drop pp", "size KiB", "latency ms", "delegated"))
    qat = s.get("qat")
    if qat:
        hist = [(str(r["epoch"]), f"{r['lr']:.5f}", f"{r['train_loss']:.4f}", f"{r['train_top1']:.2f}",
                 f"{r['val_top1']:.2f}", "yes" if r["bn_frozen"] else "", "yes" if r["observers_frozen"] else "")
                for r in qat["history"]]
        lines.append(f"QAT on {qat['world_size']} process(es), {qat['seconds']:.0f} s"
                     + (f", resumed after epoch {qat['resumed_from_epoch']}" if qat["resumed_from_epoch"] else "") + ":\n"
                     + format_table(hist, ("epoch", "lr", "train loss", "train top-1", "val top-1 (fake-quant)",
                                           "BN frozen", "observers frozen")))
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"FAILED: {f}" for f in report.failures]
    return "\n".join([table, *lines])
