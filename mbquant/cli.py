"""The `mbquant` command line: a thin layer over the Python API. ``build_parser()``, ``main(argv) -> int``.

Building the parser imports nothing heavy (no torch); each subcommand imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import __version__
from .config import CPUS, GRANULARITIES, LOGITS, MODEL_NAMES, OBSERVERS
from .errors import ConfigError, DataError, MbquantError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"zoo model: {', '.join(MODEL_NAMES)}")
    p.add_argument("--weights", help="checkpoint path, shipped checkpoint name, or torchvision weights name "
                                     "(IMAGENET1K_V1, DEFAULT)")
    p.add_argument("--width-mult", type=float, default=None,
                   help="for a plain state dict: the width it was trained with (mbquant checkpoints carry it)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="for a plain state dict: its number of classes (default: read from the classifier)")
    p.add_argument("--preset", choices=["small", "imagenet"], default=None,
                   help="for a plain state dict: how its model was fed (default imagenet)")
    p.add_argument("--resolution", type=int, default=None, help="for a plain state dict: its input size")
    _add_image_args(p)


def _add_image_args(p: argparse.ArgumentParser) -> None:
    from .config import MAX_IMAGE_PIXELS

    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="images with more pixels are skipped and counted (decompression bombs)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--verbose", action="store_true", help="also show third-party log lines on stderr")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="a .pte/.pt/.ptl written by mbquant (with its sidecar) or a bundle folder")
    p.add_argument("--data", type=Path, required=True, help="labelled ImageFolder (e.g. data/val)")
    p.add_argument("--float-weights", default=None, help="the float model (checkpoint path or shipped name) to compare "
                   "with")
    p.add_argument("--limit", type=int, default=None, help="a seeded, class-stratified slice of N images")


def _epochs_or_never(value: str) -> int | None:
    if value == "never":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number of epochs; pass N >= 0 or 'never'") from None


def _split(value: str, cast: Callable[[str], Any] = str) -> tuple:
    """A comma-separated list (blanks dropped), each item through ``cast``."""
    return tuple(cast(v.strip()) for v in value.split(",") if v.strip())


def _names(value: str) -> tuple[str, ...]:
    if value.strip() in ("", "none"):
        return ()
    return _split(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbquant", description="INT8 quantization and verified mobile export for MobileNet-family CNNs: "
        "prepare data, train/evaluate float models, quantize (PTQ or QAT) to ExecuTorch/XNNPACK .pte or TorchScript "
        "artifacts with an accuracy-drop report.")
    parser.add_argument("--version", action="version", version=f"mbquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="prepare a real dataset as an ImageFolder tree")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("dest", type=Path, help="folder to write DEST/train/<class>/*.png and DEST/val/<class>/*.png")
    _add_common(p)

    p = sub.add_parser("train", help="train a float zoo model on an ImageFolder")
    p.add_argument("model", help=f"zoo model: {', '.join(MODEL_NAMES)}")
    p.add_argument("--data", type=Path, required=True, help="folder with train/ and val/ ImageFolders")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--preset", choices=["small", "imagenet"], default="small")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="checkpoint path (default: runs/<model>_w<W>_r<R>.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (when training succeeds)")
    _add_image_args(p)
    _add_common(p)

    p = sub.add_parser("eval", help="top-1/top-5 of a float checkpoint on an ImageFolder")
    _add_model_args(p)
    p.add_argument("--data", type=Path, required=True, help="labelled ImageFolder (e.g. data/val)")
    p.add_argument("--batch-size", type=int, default=256)
    _add_common(p)

    p = sub.add_parser("ptq", help="post-training static INT8 -> verified .pte (and/or TorchScript) + report")
    _add_model_args(p)
    p.add_argument("--calib", type=Path, required=True, help="calibration images: ImageFolder or flat folder")
    p.add_argument("--eval", type=Path, default=None, help="labelled ImageFolder for the accuracy drop "
                   "(default: the calibration folder, with a warning)")
    p.add_argument("--recipe", choices=["best", "stock"], default="best",
                   help="best: the best measured choices for each backend (default); stock: the stock PT2E flow. "
                        "The options below override single choices")
    p.add_argument("--observer", default=None, choices=list(OBSERVERS), help="activation observer (recipe: percentile "
                   "on pte, histogram on torchscript)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --observer percentile")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="correct each layer's bias for the mean shift quantization causes (recipe: on for pte)")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    _add_quant_args(p)
    _add_run_args(p)
    _add_common(p)

    p = sub.add_parser("bundle", help="an app bundle (model.pte, labels.txt, preprocess.json, report.json, README) "
                       "from a verified run folder")
    p.add_argument("run_dir", type=Path, help="the --out folder of a finished `mbquant ptq`/`qat` run")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    _add_common(p)

    p = sub.add_parser("check", help="accuracy-drop regression check of an artifact or bundle on a labelled folder "
                       "(exit 1 on regression): for CI")
    _add_check_args(p)
    p.add_argument("--baseline", type=Path, default=None, help="a baseline.json written by `mbquant baseline write`")
    p.add_argument("--max-drop", type=float, default=None, help="largest top-1 drop vs the float model (pp)")
    p.add_argument("--min-agreement", type=float, default=None, help="smallest top-1 agreement with the float model (%%)")
    p.add_argument("--tolerance", type=float, default=None, help="pp below the baseline still accepted "
                   "(default: the baseline's own)")
    p.add_argument("--strict-ci", action="store_true", help="apply --max-drop to the upper end of the 95 %% CI of the "
                   "drop (paired, McNemar) instead of the point estimate")
    p.add_argument("--out", type=Path, default=None, help="also write the verdict as JSON there")
    _add_common(p)

    p = sub.add_parser("baseline", help="record a baseline for `mbquant check` (only this command writes one)")
    bsub = p.add_subparsers(dest="action", required=True)
    w = bsub.add_parser("write", help="measure an artifact or bundle and write baseline.json")
    _add_check_args(w)
    w.add_argument("--out", type=Path, required=True, help="baseline file to write")
    w.add_argument("--tolerance", type=float, required=True, help="pp below the baseline a later check still accepts: "
                   "state what spread it covers (run-to-run, machine-to-machine)")
    w.add_argument("--why", default="", help="the reason for the tolerance, recorded next to it")
    _add_common(w)

    p = sub.add_parser("report", help="a run's summary; --plot draws its per-layer SQNR and the sweeps as PNG; "
                       "--calibration-sweep and --recipes measure those sweeps first")
    p.add_argument("run_dir", type=Path, help="a folder `mbquant ptq --out` (or qat) wrote")
    p.add_argument("--plot", action="store_true", help="write PNGs (needs matplotlib: pip install 'mbquant[plot]')")
    p.add_argument("--plot-dir", type=Path, default=None, help="where the PNGs go (default RUN_DIR/plots)")
    p.add_argument("--calibration-sweep", default=None, metavar="N[,N...]|default",
                   help="measure top-1 and agreement with each number of calibration images (default: "
                   "32,64,128,256,512,1024,2048); written to RUN_DIR/calibration_sweep.json")
    p.add_argument("--recipes", default=None, metavar="NAME[,NAME...]|default",
                   help="measure each recipe variant with the run's calibration count; written to RUN_DIR/recipes.json")
    _add_common(p)

    p = sub.add_parser("verify-arm", help="run a bundle's program on aarch64 (qemu) and on this host on real images "
                       "preprocessed by the bundle's contract; compare image by image")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help="labelled ImageFolder (e.g. data/val)")
    p.add_argument("--limit", type=int, default=None, help="every k-th image, N in all (default: all)")
    _add_common(p)

    p = sub.add_parser("qat", help="quantization-aware fine-tuning -> verified .pte (or TorchScript) + report "
                       "(resumable; scale out with torchrun --nproc_per_node=N -m mbquant qat ...)")
    _add_model_args(p)
    p.add_argument("--data", type=Path, required=True, help="folder with train/ and val/ ImageFolders")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.005, help="SGD learning rate (cosine decay)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size per process")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--freeze-bn-after", type=_epochs_or_never, default=1, metavar="N|never",
                   help="use BN running statistics after N epochs (default 1)")
    p.add_argument("--freeze-observers-after", type=_epochs_or_never, default=2, metavar="N|never",
                   help="keep every quantization range fixed after N epochs (default 2)")
    p.add_argument("--init-ranges", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ranges calibrated on --num-calib training images (as PTQ)")
    p.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded subset of N images")
    p.add_argument("--distill", type=float, default=0.0, metavar="A",
                   help="weight of distillation from the float model (0: labels only, 1: match the float model)")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--resume", type=Path, default=None, help="qat_last.pt (or the --out folder) of a run to continue")
    _add_quant_args(p)
    _add_run_args(p)
    _add_common(p)
    return parser


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-calib", type=int, default=512, help="calibration samples (not batches)")
    p.add_argument("--granularity", default="per-channel", choices=list(GRANULARITIES), help="weight granularity")
    p.add_argument("--fuse-relu6", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize conv(-BN)-ReLU6 as one unit, after the clamp (recipe: on); off = the stock annotation")
    p.add_argument("--keep-float", type=_names, default=None, metavar="NAME[,NAME]|none",
                   help=f"layers that run in fp32 on their INT8 inputs: module names, or '{LOGITS}' for the layer "
                        f"producing the output (recipe: {LOGITS} on pte)")
    p.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-layer equalization of the float model before quantizing (recipe: on for mcu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (and of training)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .mobile.table import BACKENDS, targets

    p.add_argument("--target", default="phone", help=f"deployment target: {', '.join(targets())}")
    p.add_argument("--format", type=_split, default=("pte",), metavar="pte|torchscript|pte,torchscript",
                   help="artifacts; with --target they pick the backends: "
                        + ", ".join(f"{s.target}+{s.format}={s.name}" for s in BACKENDS.values()))
    p.add_argument("--min-delegated", type=float, default=0.99, help="fail below this delegated-op ratio")
    p.add_argument("--max-drop", type=float, default=None, help="fail when top-1 drops by more (percentage points)")
    p.add_argument("--min-parity", type=float, default=None,
                   help="also fail when an artifact agrees with its INT8 model on fewer than P %% of images")
    p.add_argument("--parity-z", type=float, default=3.0,
                   help="fail when an artifact is worse than its INT8 model by more than Z standard errors")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most N images")
    p.add_argument("--float-program", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the float program for size/latency comparison")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--cpu", default="cortex-m4", choices=list(CPUS), help="--target mcu: the Cortex-M core")
    p.add_argument("--int8-input", action="store_true",
                   help="--target mcu: the program takes the quantized image (scale/zero point in the sidecar)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="fail when an op of an MCU program is not an INT8 kernel (default on)")
    p.add_argument("--flash-kb", type=float, default=None, help="--target mcu: fail when the program is larger")
    p.add_argument("--ram-kb", type=float, default=None,
                   help="--target mcu: fail when the RAM peak (arena: activations, scratch, input/output) is larger")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<model>-<timestamp>/); "
                   "written only when the run succeeds")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder, whole, when this run "
                   "succeeds (it is left untouched when the run fails)")
    p.add_argument("--bundle", type=Path, default=None, help="also write an app bundle of the .pte there (on success)")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """``--threads``: torch's intra-op threads for this command, restored after it."""
    if n is None:
        yield
        return
    from .mobile.backend import torch_threads

    with torch_threads(n):
        yield


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a command like Ctrl-C: staging folders and locks are cleaned up on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_numbers(args: argparse.Namespace) -> None:
    """Numeric flags that no config validates, checked before any work."""
    import math

    for name, lo in (("threads", 1), ("batch_size", 1), ("max_image_pixels", 1), ("num_classes", 1), ("tolerance", 0),
                     ("resolution", 8), ("epochs", 1), ("latency_runs", 1), ("limit", 1)):
        v = getattr(args, name, None)
        if v is not None and v < lo:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {v} is invalid; pass a value >= {lo}")
    w = getattr(args, "width_mult", None)
    if w is not None and not (math.isfinite(w) and 0 < w <= 4):
        raise ConfigError(f"--width-mult {w} is invalid; pass a width multiplier in (0, 4] (e.g. 0.35, 0.5, 1.0)")


def main(argv: Sequence[str] | None = None) -> int:
    from ._quiet import filtered_stderr

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        with filtered_stderr(not args.verbose), _sigterm_interrupts():
            _check_numbers(args)
            with _threads(args.threads):
                return COMMANDS[args.command](args)
    except MbquantError as exc:
        print(f"mbquant {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mbquant {args.command}: interrupted (an output folder is only ever written complete)", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an input nobody foresaw: one clear line, the traceback on request
        if args.debug:
            raise
        print(f"mbquant {args.command}: internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}; "
              f"rerun with --debug for the traceback and report it", file=sys.stderr)
        return 3


def _command(args: argparse.Namespace) -> str:
    return "mbquant " + shlex.join(args.argv)


def _emit(args: argparse.Namespace, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload, indent=2))
    elif not args.quiet:
        print("\n".join(lines))


def _cmd_data(args: argparse.Namespace) -> int:
    from .fashion_mnist import prepare_fashion_mnist

    res = prepare_fashion_mnist(args.dest, progress=not (args.quiet or args.json))
    _emit(args, res, [f"fashion-mnist ready in {res['root']}: train {res['train']} images, val {res['val']} images, "
                      f"{len(res['classes'])} classes ({', '.join(res['classes'])})"])
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ._io import check_new_file
    from .config import TrainConfig
    from .data import load_folder, preset_from_data
    from .models import ModelInfo, create, save_checkpoint
    from .train import fit

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      seed=args.seed, max_train_samples=args.max_train_samples)
    out = check_new_file(args.out or Path("runs") / f"{args.model}_w{args.width_mult:g}_r{args.resolution}.pth",
                         overwrite=args.overwrite, what="checkpoint", flag="--out")
    preset, train_set = preset_from_data(args.preset, args.resolution, args.data / "train",
                                         max_pixels=args.max_image_pixels)
    val_set = load_folder(args.data / "val", preset, expected_classes=train_set.classes,
                          max_pixels=args.max_image_pixels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the initial weights
        model = create(args.model, num_classes=len(train_set.classes), width_mult=args.width_mult)
    rho = args.resolution / 224 if args.model == "mobilenet_v1" else 1.0
    info = ModelInfo(args.model, len(train_set.classes), args.width_mult, preset, tuple(train_set.classes))
    result = fit(model, train_set, val_set, cfg, progress=not (args.quiet or args.json))
    recipe = {"train": cfg.to_dict(), "data": str(args.data), "train_samples": len(train_set),
              "seconds": result.seconds, "command": _command(args)}
    save_checkpoint(model, info, out, recipe=recipe, metrics={"history": result.history}, rho=rho)
    _emit(args, {"checkpoint": str(out), "history": result.history},
          [f"saved {out} (val top-1 {result.final.get('val_top1')}% after {cfg.epochs} epochs, {result.seconds:.0f} s)"])
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_folder
    from .models import count_macs, count_params
    from .resolve import resolve_model
    from .train import evaluate_float

    model, info = _model(args)
    ds = load_folder(args.data, info.preset, expected_classes=info.classes or None, max_pixels=args.max_image_pixels)
    res = evaluate_float(model, ds, args.batch_size, progress=not (args.quiet or args.json))
    if res.count == 0:
        raise ConfigError(f"none of the {len(ds)} images in '{args.data}' is readable ({_skipped(ds)}); pass a folder "
                          f"of valid images")
    params, macs = count_params(model), count_macs(model, info.resolution)
    payload = {"model": info.to_dict(), "data": str(args.data), "images": res.count, "skipped": res.skipped,
               "top1": round(res.top1("model"), 2), "top5": round(res.top5("model"), 2), "params": params, "macs": macs}
    _emit(args, payload, [
        f"{info.name} (width {info.width_mult:g}, {info.resolution}x{info.resolution}, {info.num_classes} classes) "
        f"from {info.weights}",
        f"  params {params / 1e6:.3f} M, MACs {macs / 1e6:.2f} M",
        f"  {args.data}: {res.count} images" + (f" ({res.skipped} unreadable skipped: {_skipped(ds)})"
                                                if res.skipped else ""),
        f"  top-1 {payload['top1']:.2f}%  top-5 {payload['top5']:.2f}%"])
    return 0


def _model(args: argparse.Namespace):
    from .resolve import resolve_model

    return resolve_model(args.model, args.weights, width_mult=args.width_mult, num_classes=args.num_classes,
                         preset=args.preset, resolution=args.resolution)


def _skipped(ds) -> str:
    first = next(iter(ds.skipped.items()), None)
    return f"first: {first[0].name}: {first[1]}" if first else "none skipped"


def _run_config(args: argparse.Namespace):
    from .config import RunConfig

    return RunConfig(target=args.target, formats=args.format, min_delegated=args.min_delegated, max_drop=args.max_drop,
                     min_parity=args.min_parity, parity_z=args.parity_z, eval_limit=args.eval_limit,
                     latency_runs=args.latency_runs, float_program=args.float_program, cpu=args.cpu,
                     int8_input=args.int8_input, strict=args.strict, flash_kb=args.flash_kb, ram_kb=args.ram_kb)


def _finish(args: argparse.Namespace, report) -> int:
    from ._io import strict
    from .report import summary_table

    if report.ok and args.bundle is not None:
        from .mobile.bundle import write_bundle

        write_bundle(report.location, args.bundle, overwrite=args.overwrite)
        report.warnings.append(f"app bundle written to {args.bundle}")
    rep = report.to_dict()
    if args.json:
        print(json.dumps(strict(rep), indent=2, allow_nan=False))
    elif not args.quiet:
        print(summary_table(rep))
        if report.ok:
            print(f"artifacts and report.json in {report.location}")
    for f in report.failures:
        print(f"mbquant {args.command}: error: {f}", file=sys.stderr)
    if not report.ok:
        print(f"mbquant {args.command}: no artifact was kept; the report is in {report.location}", file=sys.stderr)
    return 0 if report.ok else 1


def _announce(args: argparse.Namespace, info) -> None:
    if not (args.quiet or args.json):
        print(f"{info.name} (width {info.width_mult:g}, {info.resolution}x{info.resolution}) from {info.weights}")


def _cmd_ptq(args: argparse.Namespace) -> int:
    from .config import QuantConfig
    from .pipeline import calibration_set, default_out_dir, load_eval_set, run_job

    config = QuantConfig(recipe=args.recipe, observer=args.observer, granularity=args.granularity,
                         num_calib=args.num_calib, seed=args.seed, batch_size=args.batch_size,
                         fuse_relu6=args.fuse_relu6, keep_float=args.keep_float, percentile=args.percentile,
                         bias_correction=args.bias_correction, equalize=args.equalize)
    run = _run_config(args)
    model, info = _model(args)
    out = args.out or default_out_dir(args.model)
    _check_out(out, args.overwrite)
    calib = calibration_set(args.calib, info, config, max_pixels=args.max_image_pixels)
    warnings = _calib_warnings(calib)
    if args.eval is None:
        if not calib.dataset.labelled:
            raise ConfigError(f"calibration folder '{args.calib}' has no labels, so it cannot measure accuracy; "
                              f"pass --eval with a labelled folder (one subfolder per class)")
        warnings.append(f"evaluating on the calibration folder '{args.calib}'; pass --eval with held-out images "
                        f"for an unbiased accuracy drop")
    eval_set = load_eval_set(args.eval or args.calib, info, run.eval_limit, seed=config.seed,
                             max_pixels=args.max_image_pixels)
    _announce(args, info)
    report = run_job(model, info, calib=calib, eval_set=eval_set, out_dir=out, config=config, run=run,
                     progress=not (args.quiet or args.json), command=_command(args), warnings=tuple(warnings),
                     overwrite=args.overwrite)
    return _finish(args, report)


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` problems are found before any work (the run re-checks them under its lock)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; pass a folder path for the run's artifacts")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out '{out}' already exists (an earlier run?); pass --overwrite to replace it when this "
                          f"run succeeds, or another --out")


def _calib_warnings(calib) -> list[str]:
    if calib.requested > calib.available:
        return [f"--num-calib {calib.requested} asks for more images than '{calib.root}' has; calibrating on all "
                f"{calib.available}"]
    return []


def _cmd_qat(args: argparse.Namespace) -> int:
    from .checkpoints import shipped_names
    from .config import QATConfig, QuantConfig
    from .data import load_folder
    from .finetune import load_qat_checkpoint, state_digest
    from .mobile import table
    from .pipeline import Finetune, calibration_set, default_out_dir, load_eval_set, run_job

    if args.weights is None:
        raise ConfigError(f"qat fine-tunes a trained float model: pass --weights (a checkpoint path or a shipped "
                          f"name: {', '.join(shipped_names())}); train one with `mbquant train`")
    config = QuantConfig(recipe="qat", granularity=args.granularity, num_calib=args.num_calib, seed=args.seed,
                         fuse_relu6=args.fuse_relu6, keep_float=args.keep_float, equalize=args.equalize)
    qat = QATConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, freeze_bn_after=args.freeze_bn_after,
                    freeze_observers_after=args.freeze_observers_after, init_ranges=args.init_ranges,
                    seed=args.seed, max_train_samples=args.max_train_samples, distill=args.distill,
                    distill_temperature=args.distill_temperature)
    run = _run_config(args)
    specs = table.select(run.target, run.formats)
    if len(specs) != 1:
        raise ConfigError(f"QAT trains one model for one engine, got formats {list(run.formats)}; run `mbquant qat` "
                          f"once with --format pte and once with --format torchscript")
    resolved = table.resolve(config, specs[0], qat=True)
    model, info = _model(args)
    resume = None
    if args.resume is not None:  # checked before any work: another model, other weights or flags fail here
        resume = load_qat_checkpoint(args.resume, info=info, float_digest=state_digest(model), quant=resolved,
                                     config=qat)
    out = Path(args.out or (_run_of(args.resume) if args.resume else default_out_dir(args.model)))
    if resume is None:
        _check_out(out, args.overwrite)
    mp = args.max_image_pixels
    classes = list(info.classes) or None
    train_set = load_folder(args.data / "train", info.preset, train=True, expected_classes=classes, max_pixels=mp)
    eval_set = load_eval_set(args.data / "val", info, run.eval_limit, seed=config.seed, max_pixels=mp)
    calib = calibration_set(args.data / "train", info, config, max_pixels=mp)
    _announce(args, info)
    report = run_job(model, info, calib=calib, eval_set=eval_set, out_dir=out, config=config, run=run,
                     finetune=Finetune(qat, train_set, resume), progress=not (args.quiet or args.json),
                     command=_command(args), warnings=tuple(_calib_warnings(calib)), overwrite=args.overwrite)
    if report is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    return _finish(args, report)


def _run_of(resume: Path) -> Path:
    """The --out a resumed QAT run continues: the folder given, or the run the checkpoint belongs to."""
    resume = Path(resume)
    if resume.is_dir() or not resume.exists():
        return resume
    parent = resume.parent
    if parent.name.startswith(".") and parent.name.endswith(".work"):  # kept beside a killed run's --out
        return parent.parent / parent.name[1:-len(".work")]
    return parent


def _cmd_bundle(args: argparse.Namespace) -> int:
    from .mobile.bundle import read_bundle, write_bundle
    from .mobile.client import host_runner

    out = write_bundle(args.run_dir, args.out, overwrite=args.overwrite)
    runner = host_runner()
    bundle = read_bundle(out, runner if runner.binary.is_file() else None)
    _emit(args, {"bundle": str(out), "labels": len(bundle.labels), "input": bundle.spec["input"]["shape"]},
          [f"bundle written to {out}: model.pte, labels.txt ({len(bundle.labels)} classes), preprocess.json "
           f"(input {bundle.spec['input']['shape']}), report.json, README.md"])
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from ._io import strict, write_json
    from .check import check

    v = check(args.artifact, args.data, float_model=args.float_weights, baseline=args.baseline, max_drop=args.max_drop,
              min_agreement=args.min_agreement, tolerance=args.tolerance, strict_ci=args.strict_ci, limit=args.limit)
    if args.out is not None:
        write_json(args.out, v.to_dict())
    if args.json:
        print(json.dumps(strict(v.to_dict()), indent=2))
    elif not args.quiet or not v.ok:
        print(v.text(), file=sys.stdout if v.ok else sys.stderr)
    return 0 if v.ok else 1


def _cmd_baseline(args: argparse.Namespace) -> int:
    from .check import write_baseline

    rec = write_baseline(args.artifact, args.data, args.out, tolerance=args.tolerance, float_model=args.float_weights,
                         limit=args.limit, why=args.why)
    _emit(args, rec, [f"baseline written to {args.out}: top-1 {rec['top1']:.2f} % on {rec['images']:,} images"
                      + (f", agreement {rec['agreement']:.2f} %" if rec["agreement"] is not None else "")
                      + f"; tolerance {rec['tolerance_pp']:g} pp"])
    return 0


def _cmd_verify_arm(args: argparse.Namespace) -> int:
    from .mobile.client import compare_runners

    res = compare_runners(args.bundle, args.data, limit=args.limit)
    lines = [f"{res['images']} images preprocessed by the bundle's contract; {res['host_runner']}: top-1 "
             f"{res['top1_host']:.2f} %, {res['arm_runner']}: top-1 {res['top1_arm']:.2f} %; same prediction on "
             f"{res['agreement']:.2f} % (max |logit difference| {res['max_abs_logit_diff']:.2g}); the report measured "
             f"{res['report_top1']:.2f} % on {res['report_images']} images",
             "emulated CPU: this checks the numbers on ARM, not a phone's speed"]
    for r in res["disagreeing_images"]:
        lines.append(f"  differs: {r['image']} ({r['label']}): host {r['host']} (margin {r['host_margin']:.2g}) "
                     f"{r['host_logits']}, arm {r['arm']} {r['arm_logits']}")
    _emit(args, res, lines)
    if res["unexplained"]:
        print(f"mbquant verify-arm: error: {res['unexplained']} images get another prediction on ARM although the "
              f"host's top-2 margin is above {res['near_tie_margin']} (listed above)", file=sys.stderr)
        return 1
    return 0


def _csv(value: str, default: tuple, cast=str, flag: str = "") -> tuple:
    if value == "default":
        return default
    try:
        out = _split(value, cast)
    except ValueError:
        out = ()
    if not out:
        raise ConfigError(f"{flag} {value!r} is not a comma-separated list; pass e.g. {','.join(map(str, default[:3]))}")
    return out


def _cmd_report(args: argparse.Namespace) -> int:
    from . import sweep
    from .report import summary_table

    run_dir = args.run_dir
    rep_path = run_dir / "report.json"
    if not rep_path.is_file():
        raise DataError(f"'{run_dir}' holds no report.json; pass a folder `mbquant ptq --out` wrote (a failed run's "
                        f"report is in '<out>.failed/')")
    try:
        rep = json.loads(rep_path.read_text())
    except ValueError as exc:
        raise DataError(f"'{rep_path}' is not valid JSON ({exc})") from exc
    say = (lambda m: None) if args.quiet or args.json else print
    if args.plot:
        from .plot import pyplot

        pyplot()                        # a missing matplotlib is reported before any sweep runs
    if args.calibration_sweep is not None:
        counts = _csv(args.calibration_sweep, sweep.DEFAULT_COUNTS, int, "--calibration-sweep")
        sweep.calibration_sweep(run_dir, counts, progress=say)
    if args.recipes is not None:
        sweep.recipe_sweep(run_dir, _csv(args.recipes, sweep.DEFAULT_RECIPES, str, "--recipes"), progress=say)
    written = []
    if args.plot:
        from . import plot

        out = args.plot_dir or run_dir / "plots"
        if any(b.get("layer_sqnr_all") for b in rep.get("backends", {}).values()):
            written.append(plot.layer_sqnr(rep, out / "layer_sqnr.png"))
        for name, draw in (("calibration_sweep", plot.calibration), ("recipes", plot.recipes)):
            if (run_dir / f"{name}.json").is_file():
                written.append(draw(json.loads((run_dir / f"{name}.json").read_text()), out / f"{name}.png"))
        if not written:
            raise DataError(f"nothing to plot in '{run_dir}': its report has no per-layer SQNR and no sweep was "
                            f"measured; pass --calibration-sweep default and/or --recipes default")
    _emit(args, {"report": rep, "plots": [str(p) for p in written]},
          [summary_table(rep), *(f"plot written to {p}" for p in written)])
    return 0


COMMANDS = {"data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval, "ptq": _cmd_ptq, "qat": _cmd_qat,
            "bundle": _cmd_bundle, "verify-arm": _cmd_verify_arm, "check": _cmd_check, "baseline": _cmd_baseline,
            "report": _cmd_report}
