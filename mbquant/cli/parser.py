"""The command line's parser, torch-free: ``mbquant --help`` imports nothing heavy. Flags map one to one onto the
configs; each backend's own flags come from its row of the capability table (:mod:`mbquant.mobile.table`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..config import GRANULARITIES, INIT_BIASES, INIT_RANGES, KEEP, LOGITS, OBSERVERS, SELECT_IMAGES, QATConfig
from ..data.images import MAX_IMAGE_PIXELS
from ..data.presets import PRESET_KINDS
from ..models.info import MODEL_NAMES


QAT_DEFAULTS = QATConfig()   # the flags' defaults are the config's


def path(value: str) -> Path:
    """A path argument; an empty one is a usage error (``Path("")`` would silently mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; pass a file or folder name")
    return Path(value)


def split(value: str, cast: Callable[[str], Any] = str) -> tuple:
    """A comma-separated list (blanks dropped), each item through ``cast``."""
    return tuple(cast(v.strip()) for v in value.split(",") if v.strip())


def names(value: str) -> tuple[str, ...]:
    if value.strip() in ("", "none"):
        return ()
    return split(value)


def epochs_or_never(value: str) -> int | None:
    if value == "never":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number of epochs; pass N >= 0 or 'never'") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"zoo model: {', '.join(MODEL_NAMES)}")
    p.add_argument("--weights", help="checkpoint path, torchvision's weight file (e.g. mobilenet_v2-b0353104.pth), a "
                                     "shipped checkpoint name, or a torchvision weights name (IMAGENET1K_V1, DEFAULT)")
    p.add_argument("--width-mult", type=float, default=None,
                   help="for a plain state dict: the width it was trained with (mbquant checkpoints carry it)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="for a plain state dict: its number of classes (default: read from the classifier)")
    p.add_argument("--preset", choices=list(PRESET_KINDS), default=None,
                   help="for a plain state dict: how its model was fed (default imagenet)")
    p.add_argument("--resolution", type=int, default=None, help="for a plain state dict: its input size")
    _add_image_args(p)


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="images with more pixels are skipped and counted (decompression bombs)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="only errors and the final table (no progress, no notes)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--verbose", action="store_true", help="also show third-party log lines on stderr")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")


def _add_decode_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode-workers", type=int, default=0, metavar="N",
                   help="processes that decode and preprocess the evaluation images ahead of the models (default 0: "
                        "this process; the same images in the same order, so the same numbers)")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=path, help="an artifact written by mbquant (with its sidecar) or a bundle folder")
    p.add_argument("--data", type=path, required=True, help="labelled ImageFolder (e.g. data/val)")
    p.add_argument("--float-weights", default=None, help="the float model (checkpoint path or shipped name) to compare "
                   "with")
    p.add_argument("--limit", type=int, default=None, help="a seeded, class-stratified slice of N images")
    _add_decode_workers(p)


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-calib", type=int, default=512, help="calibration samples (not batches)")
    p.add_argument("--granularity", default="per-channel", choices=list(GRANULARITIES), help="weight granularity")
    p.add_argument("--fuse-relu6", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize conv(-BN)-ReLU6 as one unit, after the clamp (recipe: on); off = the stock annotation")
    p.add_argument("--keep-float", type=names, default=None, metavar="NAME[,NAME]|none",
                   help=f"layers that run in fp32 on their INT8 inputs: module names, or '{LOGITS}' for the layer "
                        f"producing the output (recipe: {LOGITS} on pte)")
    p.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-layer equalization of the float model before quantizing (recipe: on for mcu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (and of training)")


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    """Each backend's own options, as its table row declares them (the value reaches RunConfig.options)."""
    from ..mobile import table

    for opt in table.options():
        owners = ", ".join(table.declared_by(opt.name))
        help_text = f"{opt.help} [{owners}]"
        dest = f"opt_{opt.name}"
        if opt.kind == "choice":
            p.add_argument(opt.flag, dest=dest, default=None, choices=list(opt.choices),
                           help=f"{help_text} (default {opt.default})")
        elif opt.kind == "flag":
            p.add_argument(opt.flag, dest=dest, action="store_const", const=True, default=None, help=help_text)
        elif opt.kind == "switch":
            p.add_argument(opt.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(opt.flag, dest=dest, type=float, default=None, metavar=opt.metavar,
                           help=help_text + (f" (default {opt.default})" if opt.default is not None else ""))


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from ..mobile.table import BACKENDS, formats, targets

    p.add_argument("--target", default=None, help=f"deployment target: {', '.join(targets())} (default phone)")
    p.add_argument("--format", type=split, default=("pte",), metavar="|".join(formats()) + "[,...]",
                   help="artifacts; with --target they pick each pair's default backend: "
                        + ", ".join(f"{'|'.join(s.targets)}+{s.format}={s.name}" for s in BACKENDS.values()
                                    if s.default))
    p.add_argument("--backend", type=split, default=(), metavar="NAME[,NAME]",
                   help=f"pick backends by name instead of --target/--format: {', '.join(BACKENDS)}")
    p.add_argument("--max-drop", type=float, default=None, help="fail when top-1 drops by more (percentage points)")
    p.add_argument("--fallback", choices=["none", "auto"], default="none",
                   help="auto: keep the fewest blocks in fp32 that bring the drop within --max-drop, searched on held-out "
                        "images of the calibration folder, then confirmed on the artifact (backends with float layers)")
    p.add_argument("--fallback-images", type=int, default=2000, metavar="N",
                   help="held-out calibration-folder images the --fallback search measures the drop on")
    p.add_argument("--min-parity", type=float, default=None,
                   help="also fail when an artifact agrees with its INT8 model on fewer than P %% of images")
    p.add_argument("--parity-z", type=float, default=3.0,
                   help="fail when an artifact is worse than its INT8 model by more than Z standard errors")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on a seeded, stratified slice of N images")
    _add_decode_workers(p)
    p.add_argument("--float-program", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the float program for size/latency comparison")
    p.add_argument("--latency-runs", type=int, default=20)
    _add_backend_options(p)
    p.add_argument("--out", type=path, default=None, help="output folder (default runs/<model>-<timestamp>/); "
                   "written only when the run succeeds")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out, whole, when this run "
                   "succeeds (it is left untouched when the run fails)")
    p.add_argument("--bundle", type=path, default=None, help="also write an app bundle of the run's program there "
                   "(when the run succeeds)")


def build_parser() -> argparse.ArgumentParser:
    from ..mobile import table

    parser = argparse.ArgumentParser(
        prog="mbquant", description="INT8 quantization and verified mobile export for MobileNet-family CNNs: "
        "prepare data, train/evaluate float models, quantize (PTQ or QAT) to verified artifacts for phones, MCUs and "
        "servers (ExecuTorch .pte, TorchScript) with an accuracy-drop report.")
    parser.add_argument("--version", action="version", version=f"mbquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="prepare a real dataset as an ImageFolder tree")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("dest", type=path, help="folder to write DEST/train/<class>/*.png and DEST/val/<class>/*.png")
    _add_common(p)

    p = sub.add_parser("train", help="train a float zoo model on an ImageFolder")
    p.add_argument("model", help=f"zoo model: {', '.join(MODEL_NAMES)}")
    p.add_argument("--data", type=path, required=True, help="folder with train/ and val/ ImageFolders")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--preset", choices=list(PRESET_KINDS), default="small")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--bn-recalibration", type=int, default=2048, metavar="N",
                   help="re-estimate BatchNorm statistics on N training images after training (0: skip)")
    p.add_argument("--max-eval-gap", type=float, default=20.0, metavar="PP",
                   help="refuse to write a model whose eval-mode top-1 on training images is more than PP points "
                        "below its training top-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=path, default=None, help="checkpoint path (default: runs/<model>_w<W>_r<R>.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (when training succeeds)")
    _add_image_args(p)
    _add_common(p)

    p = sub.add_parser("eval", help="top-1/top-5 of a float checkpoint on an ImageFolder")
    _add_model_args(p)
    p.add_argument("--data", type=path, required=True, help="labelled ImageFolder (e.g. data/val)")
    p.add_argument("--batch-size", type=int, default=256)
    _add_decode_workers(p)
    _add_common(p)

    p = sub.add_parser("ptq", help="post-training static INT8 -> verified artifacts + report")
    _add_model_args(p)
    p.add_argument("--calib", type=path, required=True, help="calibration images: ImageFolder or flat folder")
    p.add_argument("--eval", type=path, default=None, help="labelled ImageFolder for the accuracy drop "
                   "(default: the calibration folder, with a warning)")
    p.add_argument("--recipe", choices=["best", "stock"], default="best",
                   help="best: the best measured choices for each backend (default); stock: the stock PT2E flow. "
                        "The options below override single choices")
    p.add_argument("--observer", default=None, choices=list(OBSERVERS), help="activation observer (recipe: percentile "
                   "on pte, histogram on torchscript)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --observer percentile")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="correct each layer's bias for the mean shift quantization causes (recipe: on for pte)")
    p.add_argument("--bias-correction-images", type=int, default=None, metavar="N",
                   help="bias correction reads the first N calibration images (default: 512 up to 96 px, as many as hold "
                        "the same pixels above, at least 128: 128 at 224 px; its time grows with N)")
    p.add_argument("--adaround", action=argparse.BooleanOptionalAction, default=None,
                   help="learn each INT8 weight's rounding (up or down) per layer on the calibration images, before bias "
                        "correction (AdaRound; pte and onnx backends; recipe: off)")
    p.add_argument("--adaround-images", type=int, default=None, metavar="N",
                   help="AdaRound learns on the first N calibration images (default: at most 256; memory grows with N)")
    p.add_argument("--adaround-iterations", type=int, default=None, metavar="N",
                   help="AdaRound's optimiser steps per layer (default 500; time grows with N)")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    _add_quant_args(p)
    _add_run_args(p)
    _add_common(p)

    p = sub.add_parser("bundle", help="an app bundle (program, labels.txt, preprocess.json, report.json, manifest, "
                       "README) from a verified run folder")
    p.add_argument("run_dir", type=path, help="the --out folder of a finished `mbquant ptq`/`qat` run")
    p.add_argument("--out", type=path, required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier bundle in --out")
    _add_common(p)

    p = sub.add_parser("check", help="accuracy-drop regression check of an artifact or bundle on a labelled folder "
                       "(exit 1 on regression): for CI")
    _add_check_args(p)
    p.add_argument("--baseline", type=path, default=None, help="a baseline written by `mbquant baseline write`")
    p.add_argument("--max-drop", type=float, default=None, help="largest top-1 drop vs the float model (pp)")
    p.add_argument("--min-agreement", type=float, default=None, help="smallest top-1 agreement with the float model (%%)")
    p.add_argument("--tolerance", type=float, default=None, help="pp below the baseline still accepted "
                   "(default: the baseline's own)")
    p.add_argument("--strict-ci", action="store_true", help="apply --max-drop to the upper end of the 95 %% CI of the "
                   "drop (paired, exact McNemar) instead of the point estimate")
    p.add_argument("--out", type=path, default=None, help="also write the verdict as JSON there (a new file, or an "
                   "earlier verdict with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier verdict file in --out")
    _add_common(p)

    p = sub.add_parser("baseline", help="record a baseline for `mbquant check` (only this command writes one)")
    bsub = p.add_subparsers(dest="action", required=True)
    w = bsub.add_parser("write", help="measure an artifact or bundle and write a baseline file")
    _add_check_args(w)
    w.add_argument("--out", type=path, required=True, help="baseline file to write (a new file, or an earlier baseline "
                   "with --overwrite)")
    w.add_argument("--overwrite", action="store_true", help="replace an earlier baseline in --out")
    w.add_argument("--tolerance", type=float, required=True, help="pp below the baseline a later check still accepts: "
                   "state what spread it covers (run-to-run, machine-to-machine)")
    w.add_argument("--why", default="", help="the reason for the tolerance, recorded next to it")
    _add_common(w)

    p = sub.add_parser("report", help="a run's summary; --plot draws its per-layer SQNR and the sweeps as PNG; "
                       "--calibration-sweep and --recipes measure those sweeps first")
    p.add_argument("run_dir", type=path, help="a folder `mbquant ptq --out` (or qat) wrote")
    p.add_argument("--plot", action="store_true", help="write PNGs (needs matplotlib: pip install 'mbquant[plot]')")
    p.add_argument("--plot-dir", type=path, default=None, help="where the PNGs go (default RUN_DIR/plots): a new "
                   "folder or one mbquant wrote plots to")
    p.add_argument("--calibration-sweep", default=None, metavar="N[,N...]|default",
                   help="measure top-1 and agreement with each number of calibration images (default: "
                   "32,64,128,256,512,1024,2048, up to what the calibration folder holds); written to "
                   "RUN_DIR/calibration_sweep.json")
    p.add_argument("--recipes", default=None, metavar="NAME[,NAME...]|default",
                   help="measure each recipe variant of the run's backend with the run's calibration count; written "
                   "to RUN_DIR/recipes.json")
    _add_common(p)

    p = sub.add_parser("verify-arm", help="run a bundle's program on aarch64 (qemu) and on this host on real images "
                       "preprocessed by the bundle's contract; compare image by image")
    p.add_argument("bundle", type=path)
    p.add_argument("--data", type=path, required=True, help="labelled ImageFolder (e.g. data/val)")
    p.add_argument("--limit", type=int, default=None, help="a seeded, class-stratified slice of N images (the one "
                   "`mbquant check --limit N` measures; default: all)")
    _add_common(p)

    p = sub.add_parser("qat", help="quantization-aware fine-tuning -> verified artifact + report "
                       "(resumable; scale out with torchrun --nproc_per_node=N -m mbquant qat ...)")
    _add_model_args(p)
    p.add_argument("--data", type=path, required=True, help="folder with train/ and val/ ImageFolders")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (cosine decay; default: the backend's: "
                   + ", ".join(f"{s.name} {s.qat_lr:g}" for s in table.BACKENDS.values() if s.qat) + ")")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size per process")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--freeze-bn-after", type=epochs_or_never, default=QAT_DEFAULTS.freeze_bn_after, metavar="N|never",
                   help=f"use BN running statistics after N epochs (default {QAT_DEFAULTS.freeze_bn_after})")
    p.add_argument("--freeze-observers-after", type=epochs_or_never, default=QAT_DEFAULTS.freeze_observers_after,
                   metavar="N|never", help=f"keep every quantization range fixed after N epochs (default "
                                           f"{QAT_DEFAULTS.freeze_observers_after})")
    p.add_argument("--init-ranges", choices=INIT_RANGES, default=QAT_DEFAULTS.init_ranges,
                   help="where the ranges start, measured on --num-calib training images: recipe (the backend's PTQ "
                        "observer: where PTQ starts; default), minmax (mean of per-batch min/max), off (first batch)")
    p.add_argument("--no-init-ranges", dest="init_ranges", action="store_const", const="off",
                   help="the same as --init-ranges off")
    p.add_argument("--init-biases", choices=INIT_BIASES, default=None,
                   help="where the biases start: corrected (the starting INT8 model bias-corrected on the --num-calib "
                        "images, as PTQ's recipe does; default where the backend has bias correction) or float")
    p.add_argument("--keep", choices=KEEP, default=QAT_DEFAULTS.keep,
                   help="which state becomes the INT8 model: best (the start or an epoch's end, whichever agrees with "
                        "the float model on the most held-out training images; default) or last (the last epoch's)")
    p.add_argument("--select-images", type=int, default=None, metavar="N",
                   help=f"--keep best: hold out N images of the training folder, never trained on and none of them a "
                        f"calibration image (default: a fifth of the folder, at most {SELECT_IMAGES})")
    p.add_argument("--compare-ptq", action=argparse.BooleanOptionalAction, default=QAT_DEFAULTS.compare_ptq,
                   help="also quantize post-training (the backend's default recipe, same flags) and report on the same "
                        "images whether QAT beat it (default on)")
    p.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded subset of N images")
    p.add_argument("--distill", type=float, default=QAT_DEFAULTS.distill, metavar="A",
                   help=f"weight of distillation from the float model (0: labels only, 1: match the float model; "
                        f"default {QAT_DEFAULTS.distill:g})")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--resume", type=path, default=None, help="qat_last.pt (or the --out folder) of a run to continue")
    _add_quant_args(p)
    _add_run_args(p)
    _add_common(p)
    return parser
