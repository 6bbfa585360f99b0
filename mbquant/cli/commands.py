"""The commands: each turns its parsed flags into configs and chains library calls, then prints the result.
No library logic lives here; each command imports what it needs when it runs (``--help`` stays torch-free)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError


def command_line(args: argparse.Namespace) -> str:
    return "mbquant " + shlex.join(args.argv)


def emit(args: argparse.Namespace, payload: dict, lines: list[str]) -> None:
    """The command's result: JSON with --json, else its lines (nothing with --quiet)."""
    if args.json:
        from ..atomic import strict

        print(json.dumps(strict(payload), indent=2, allow_nan=False))
    elif not args.quiet:
        print("\n".join(lines))


def _progress(args: argparse.Namespace) -> bool:
    return not (args.quiet or args.json)


def _model(args: argparse.Namespace):
    from ..models.load import resolve_model

    return resolve_model(args.model, args.weights, width_mult=args.width_mult, num_classes=args.num_classes,
                         preset=args.preset, resolution=args.resolution)


def _run_config(args: argparse.Namespace):
    from ..config import RunConfig

    options = {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    return RunConfig(target=args.target, formats=args.format, backends=args.backend, options=options,
                     max_drop=args.max_drop, min_parity=args.min_parity, parity_z=args.parity_z,
                     eval_limit=args.eval_limit, decode_workers=args.decode_workers, latency_runs=args.latency_runs,
                     float_program=args.float_program, fallback=args.fallback, fallback_images=args.fallback_images)


def cmd_data(args: argparse.Namespace) -> int:
    from ..data.fashion_mnist import prepare_fashion_mnist

    res = prepare_fashion_mnist(args.dest, progress=_progress(args))
    emit(args, res, [f"fashion-mnist ready in {res['root']}: train {res['train']} images, val {res['val']} images, "
                     f"{len(res['classes'])} classes ({', '.join(res['classes'])})"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .._io import check_new_file
    from ..config import TrainConfig
    from ..train import train_checkpoint

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      seed=args.seed, max_train_samples=args.max_train_samples, bn_recalibration=args.bn_recalibration,
                      max_eval_gap_pp=args.max_eval_gap)
    out = check_new_file(args.out or Path("runs") / f"{args.model}_w{args.width_mult:g}_r{args.resolution}.pth",
                         overwrite=args.overwrite, what="checkpoint", flag="--out",
                         inputs={"--data train/": args.data / "train", "--data val/": args.data / "val"})
    done = train_checkpoint(args.model, args.data, out, cfg, width_mult=args.width_mult, resolution=args.resolution,
                            preset=args.preset, max_pixels=args.max_image_pixels, command=command_line(args),
                            progress=_progress(args))
    r = done.result
    emit(args, {"checkpoint": str(out), "history": r.history},
         [f"saved {out} (val top-1 {r.final_val_top1 if r.final_val_top1 is not None else r.final.get('val_top1')}% "
          f"after {cfg.epochs} epochs and BatchNorm recalibration on {r.bn_recalibration_images} training images; "
          f"eval mode on those images {r.eval_train_top1}%, {r.seconds:.0f} s)"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data.contract import spec_of
    from ..data.dataset import load_folder
    from ..models.zoo import count_macs, count_params
    from ..train import evaluate_float

    model, info = _model(args)
    ds = load_folder(args.data, spec_of(info.preset), expected_classes=info.classes or None,
                     max_pixels=args.max_image_pixels)
    res = evaluate_float(model, ds, args.batch_size, progress=_progress(args), workers=args.decode_workers)
    if res.count == 0:
        raise ConfigError(f"none of the {len(ds)} images in '{args.data}' is readable ({_skipped(ds)}); pass a folder "
                          f"of valid images")
    params, macs = count_params(model), count_macs(model, info.resolution)
    payload = {"model": info.to_dict(), "data": str(args.data), "images": res.count, "skipped": res.skipped,
               "top1": round(res.top1("model"), 2), "top5": round(res.top5("model"), 2), "params": params, "macs": macs}
    emit(args, payload, [
        f"{info.name} (width {info.width_mult:g}, {info.resolution}x{info.resolution}, {info.num_classes} classes) "
        f"from {info.weights}",
        f"  params {params / 1e6:.3f} M, MACs {macs / 1e6:.2f} M",
        f"  {args.data}: {res.count} images" + (f" ({res.skipped} unreadable skipped: {_skipped(ds)})"
                                                if res.skipped else ""),
        f"  top-1 {payload['top1']:.2f}%  top-5 {payload['top5']:.2f}%"])
    return 0


def _skipped(ds) -> str:
    first = next(iter(ds.skipped.items()), None)
    return f"first: {first[0].name}: {first[1]}" if first else "none skipped"


def _finish(args: argparse.Namespace, report) -> int:
    from ..report import summary_table

    if report.ok and args.bundle is not None:
        from ..mobile.bundle import write_bundle

        write_bundle(report.location, args.bundle, overwrite=args.overwrite)
        report.note(f"app bundle written to {args.bundle}")
    rec = report.record()
    if args.json:
        emit(args, rec.document(), [])
    else:
        print(summary_table(rec, full=not args.quiet))
        if report.ok and not args.quiet:
            print(f"artifacts and report.json in {report.location}")
    for f in report.failures:
        print(f"mbquant {args.command}: error: {f}", file=sys.stderr)
    if not report.ok:
        print(f"mbquant {args.command}: no artifact was kept; the report is in {report.location}", file=sys.stderr)
    return 0 if report.ok else 1


def _announce(args: argparse.Namespace, info) -> None:
    if _progress(args):
        print(f"{info.name} (width {info.width_mult:g}, {info.resolution}x{info.resolution}) from {info.weights}")


def _calib_warnings(calib) -> list[str]:
    if calib.requested > calib.available:
        return [f"--num-calib {calib.requested} asks for more images than '{calib.root}' has; calibrated on all "
                f"{calib.available}: pass --num-calib {calib.available} or add images"]
    return []


def _outputs(args: argparse.Namespace, out: Path, inputs: dict[str, Path]) -> None:
    """``--out`` and ``--bundle``: never an input, never each other, refused before any work."""
    from .._io import check_outputs

    outs = {"--out": out}
    if getattr(args, "bundle", None) is not None:
        outs["--bundle"] = args.bundle
    check_outputs(outs, inputs)


def cmd_ptq(args: argparse.Namespace) -> int:
    from ..calibrate import calibration_set
    from ..config import QuantConfig
    from ..data.contract import spec_of
    from ..data.dataset import eval_set
    from ..pipeline import check_run, default_out_dir, run_job

    config = QuantConfig(recipe=args.recipe, observer=args.observer, granularity=args.granularity,
                         num_calib=args.num_calib, seed=args.seed, batch_size=args.batch_size,
                         fuse_relu6=args.fuse_relu6, keep_float=args.keep_float, percentile=args.percentile,
                         bias_correction=args.bias_correction, equalize=args.equalize,
                         bias_correction_images=args.bias_correction_images, adaround=args.adaround,
                         adaround_images=args.adaround_images, adaround_iterations=args.adaround_iterations)
    run = _run_config(args)
    check_run(config, run)
    out = args.out if args.out is not None else default_out_dir(args.model)
    _outputs(args, out, {"--calib": args.calib, **({"--eval": args.eval} if args.eval else {}),
                         **({"--weights": Path(args.weights)} if args.weights and Path(args.weights).exists() else {})})
    model, info = _model(args)
    calib = calibration_set(args.calib, info, config, max_pixels=args.max_image_pixels)
    warnings = _calib_warnings(calib)
    if args.eval is None:
        if not calib.dataset.labelled:
            raise ConfigError(f"calibration folder '{args.calib}' has no labels, so it cannot measure accuracy; "
                              f"pass --eval with a labelled folder (one subfolder per class)")
        warnings.append(f"evaluating on the calibration folder '{args.calib}': pass --eval with held-out images "
                        f"for an unbiased accuracy drop")
    images = eval_set(args.eval or args.calib, spec_of(info.preset), classes=info.classes, limit=run.eval_limit,
                      seed=config.seed, max_pixels=args.max_image_pixels)
    _announce(args, info)
    report = run_job(model, info, calib=calib, eval_set=images, out_dir=out, config=config, run=run,
                     progress=_progress(args), command=command_line(args), warnings=tuple(warnings),
                     overwrite=args.overwrite)
    if report is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    return _finish(args, report)


def cmd_qat(args: argparse.Namespace) -> int:
    from ..calibrate import calibration_set
    from ..checkpoints import shipped_names
    from ..config import QATConfig, QuantConfig
    from ..data.contract import spec_of
    from ..data.dataset import eval_set, load_folder
    from ..finetune import load_qat_checkpoint, state_digest
    from ..mobile import table
    from ..pipeline import Finetune, check_run, default_out_dir, run_job
    from ..records.paths import run_of_checkpoint

    if args.weights is None:
        raise ConfigError(f"qat fine-tunes a trained float model: pass --weights (a checkpoint path or a shipped "
                          f"name: {', '.join(shipped_names())}); train one with `mbquant train`")
    config = QuantConfig(recipe="qat", granularity=args.granularity, num_calib=args.num_calib, seed=args.seed,
                         fuse_relu6=args.fuse_relu6, keep_float=args.keep_float, equalize=args.equalize)
    qat = QATConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, freeze_bn_after=args.freeze_bn_after,
                    freeze_observers_after=args.freeze_observers_after, init_ranges=args.init_ranges,
                    seed=args.seed, max_train_samples=args.max_train_samples, distill=args.distill,
                    distill_temperature=args.distill_temperature, compare_ptq=args.compare_ptq,
                    init_biases=args.init_biases, keep=args.keep, select_images=args.select_images)
    run = _run_config(args)
    (spec,) = check_run(config, run, qat=True)
    resolved, qat = table.resolve(config, spec, qat=True), table.resolve_qat(qat, spec)
    out = Path(args.out or (run_of_checkpoint(args.resume) if args.resume else default_out_dir(args.model)))
    if args.resume is None:
        _outputs(args, out, {"--data train/": args.data / "train", "--data val/": args.data / "val",
                             **({"--weights": Path(args.weights)}
                                                      if Path(args.weights).exists() else {})})
    model, info = _model(args)
    resume = None
    if args.resume is not None:  # checked before any work: another model, other weights or flags fail here
        resume = load_qat_checkpoint(args.resume, info=info, float_digest=state_digest(model), quant=resolved,
                                     config=qat)
    mp, pre = args.max_image_pixels, spec_of(info.preset)
    train_set = load_folder(args.data / "train", pre, train=True, expected_classes=list(info.classes) or None,
                            max_pixels=mp)
    images = eval_set(args.data / "val", pre, classes=info.classes, limit=run.eval_limit, seed=config.seed,
                      max_pixels=mp)
    calib = calibration_set(args.data / "train", info, config, max_pixels=mp)
    _announce(args, info)
    report = run_job(model, info, calib=calib, eval_set=images, out_dir=out, config=config, run=run,
                     finetune=Finetune(qat, train_set, resume), progress=_progress(args),
                     command=command_line(args), warnings=tuple(_calib_warnings(calib)), overwrite=args.overwrite)
    if report is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    return _finish(args, report)


def cmd_bundle(args: argparse.Namespace) -> int:
    from .._io import check_outputs
    from ..mobile.bundle import read_bundle, write_bundle

    check_outputs({"--out": args.out}, {"RUN_DIR": args.run_dir})
    out = write_bundle(args.run_dir, args.out, overwrite=args.overwrite)
    bundle = read_bundle(out)
    emit(args, {"bundle": str(out), "backend": bundle.manifest.backend, "labels": len(bundle.labels),
                "input": bundle.spec.shape},
         [f"bundle written to {out}: {bundle.manifest.program} ({bundle.manifest.backend}), labels.txt "
          f"({len(bundle.labels)} classes), preprocess.json (input {bundle.spec.shape}), report.json, bundle.json, "
          f"README.md"])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .._io import check_outputs, write_record_file
    from ..check import check
    from ..records import VERDICT

    if args.out is not None:
        check_outputs({"--out": args.out}, {"ARTIFACT": args.artifact, "--data": args.data,
                                            **({"--baseline": args.baseline} if args.baseline else {})},
                      kind=VERDICT.rsplit("/", 1)[0], overwrite=args.overwrite)
    from .. import distributed

    dist = distributed.from_env()       # under torchrun: every rank evaluates its shard, rank 0 writes and prints
    try:
        v = check(args.artifact, args.data, float_model=args.float_weights, baseline=args.baseline,
                  max_drop=args.max_drop, min_agreement=args.min_agreement, tolerance=args.tolerance,
                  strict_ci=args.strict_ci, limit=args.limit, dist=dist, workers=args.decode_workers)
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return 0 if v.ok else 1
    if args.out is not None:
        write_record_file(args.out, v.to_dict(), kind=VERDICT.rsplit("/", 1)[0], overwrite=args.overwrite)
    if args.json:
        emit(args, v.to_dict(), [])
    elif not args.quiet or not v.ok:
        print(v.text(), file=sys.stdout if v.ok else sys.stderr)
    return 0 if v.ok else 1


def cmd_baseline(args: argparse.Namespace) -> int:
    from .._io import check_outputs
    from ..check import write_baseline
    from ..records import Baseline

    check_outputs({"--out": args.out}, {"ARTIFACT": args.artifact, "--data": args.data}, kind=Baseline.KIND,
                  overwrite=args.overwrite)
    rec = write_baseline(args.artifact, args.data, args.out, tolerance=args.tolerance, float_model=args.float_weights,
                         limit=args.limit, why=args.why, overwrite=args.overwrite, workers=args.decode_workers)
    emit(args, rec.document(), [f"baseline written to {args.out}: top-1 {rec.top1:.2f} % on {rec.images:,} images"
                                + (f", agreement {rec.agreement:.2f} %" if rec.agreement is not None else "")
                                + f"; tolerance {rec.tolerance_pp:g} pp"])
    return 0


def cmd_verify_arm(args: argparse.Namespace) -> int:
    from ..mobile.bundle import verify_on_arm

    res = verify_on_arm(args.bundle, args.data, limit=args.limit)
    lines = [f"{res['images']} images preprocessed by the bundle's contract; {res['host_runner']}: top-1 "
             f"{res['top1_host']:.2f} %, {res['arm_runner']}: top-1 {res['top1_arm']:.2f} %; same prediction on "
             f"{res['agreement']:.2f} % (max |logit difference| {res['max_abs_logit_diff']:.2g}); the report measured "
             f"{res['report_top1']:.2f} % on {res['report_images']} images",
             "emulated CPU: this checks the numbers on ARM, not a phone's speed"]
    for r in res["disagreeing_images"]:
        lines.append(f"  differs: {r['image']} ({r['label']}): host {r['host']} (margin {r['host_margin']:.2g}) "
                     f"{r['host_logits']}, arm {r['arm']} {r['arm_logits']}")
    emit(args, res, lines)
    if res["unexplained"]:
        print(f"mbquant verify-arm: error: {res['unexplained']} images get another prediction on ARM although the "
              f"host's top-2 margin is above {res['near_tie_margin']} (listed above)", file=sys.stderr)
        return 1
    return 0


def _csv(value: str, flag: str, cast=str) -> tuple | None:
    """A comma list, or None for ``default``."""
    from .parser import split

    if value == "default":
        return None
    try:
        out = split(value, cast)
    except ValueError:
        out = ()
    if not out:
        raise ConfigError(f"{flag} {value!r} is not a comma-separated list; pass e.g. 32,128,512 or default")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from .. import sweep
    from ..records import RunReport, Sweep, paths
    from ..report import summary_table

    run_dir = args.run_dir
    rep = RunReport.read(run_dir / paths.REPORT)
    say = (lambda m: None) if args.quiet or args.json else print
    plot_dir = args.plot_dir or run_dir / paths.PLOTS
    if args.plot:
        from .._io import check_plot_dir
        from ..plot import pyplot

        pyplot()                        # a missing matplotlib is reported before any sweep runs
        check_plot_dir(plot_dir, run_dir)
    if args.calibration_sweep is not None:
        counts = _csv(args.calibration_sweep, "--calibration-sweep", int)
        sweep.calibration_sweep(run_dir, counts if counts is not None else sweep.DEFAULT_COUNTS, progress=say)
    if args.recipes is not None:
        sweep.recipe_sweep(run_dir, _csv(args.recipes, "--recipes"), progress=say)
    written = []
    if args.plot:
        from .. import plot
        from .._io import PlotFolder

        with PlotFolder(plot_dir) as folder:
            if rep.layer_sqnr():
                written.append(plot.layer_sqnr(rep, folder.path("layer_sqnr.png")))
            for name, draw in ((paths.CALIBRATION_SWEEP, plot.calibration), (paths.RECIPES, plot.recipes)):
                if (run_dir / name).is_file():
                    written.append(draw(Sweep.read(run_dir / name), folder.path(name.replace(".json", ".png"))))
            if not written:
                raise ConfigError(f"nothing to plot in '{run_dir}': its report has no per-layer SQNR and no sweep was "
                                  f"measured; pass --calibration-sweep default and/or --recipes default")
    emit(args, {"report": rep.document(), "plots": [str(p) for p in written]},
         [summary_table(rep), *(f"plot written to {p}" for p in written)])
    return 0


COMMANDS = {"data": cmd_data, "train": cmd_train, "eval": cmd_eval, "ptq": cmd_ptq, "qat": cmd_qat,
            "bundle": cmd_bundle, "verify-arm": cmd_verify_arm, "check": cmd_check, "baseline": cmd_baseline,
            "report": cmd_report}
