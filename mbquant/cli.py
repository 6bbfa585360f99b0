"""The `mbquant` command line: a thin layer over the Python API. ``main(argv) -> int``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .config import GRANULARITIES, OBSERVERS
from .errors import ConfigError, MbquantError


def _add_model_args(p: argparse.ArgumentParser, weights_required: bool = False) -> None:
    from .models import available_models

    p.add_argument("model", help=f"zoo model: {', '.join(available_models())}")
    p.add_argument("--weights", required=weights_required,
                   help="checkpoint path, shipped checkpoint name, or torchvision weights name (IMAGENET1K_V1, DEFAULT)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbquant", description="INT8 quantization and verified mobile export for MobileNet-family CNNs: "
        "prepare data, train/evaluate float models, and run post-training quantization to an ExecuTorch/XNNPACK .pte "
        "with an accuracy-drop report.")
    parser.add_argument("--version", action="version", version=f"mbquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="prepare a real dataset as an ImageFolder tree")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("dest", type=Path, help="folder to write DEST/train/<class>/*.png and DEST/val/<class>/*.png")
    _add_common(p)

    p = sub.add_parser("train", help="train a float zoo model on an ImageFolder")
    _add_model_args(p)
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
    _add_common(p)

    p = sub.add_parser("eval", help="top-1/top-5 of a float checkpoint on an ImageFolder")
    _add_model_args(p)
    p.add_argument("--data", type=Path, required=True, help="labelled ImageFolder (e.g. data/val)")
    p.add_argument("--batch-size", type=int, default=256)
    _add_common(p)

    p = sub.add_parser("ptq", help="post-training static INT8 -> verified ExecuTorch/XNNPACK .pte + report")
    _add_model_args(p)
    p.add_argument("--calib", type=Path, required=True, help="calibration images: ImageFolder or flat folder")
    p.add_argument("--eval", type=Path, default=None, help="labelled ImageFolder for the accuracy drop "
                   "(default: the calibration folder, with a warning)")
    p.add_argument("--observer", default="histogram", choices=list(OBSERVERS))
    p.add_argument("--percentile", type=float, default=99.99, help="for --observer percentile")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=False,
                   help="correct each layer's bias for the mean shift quantization causes (calibration images)")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    _add_quant_args(p)
    _add_run_args(p)
    _add_common(p)

    p = sub.add_parser("qat", help="quantization-aware fine-tuning -> verified ExecuTorch/XNNPACK .pte + report "
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


def _epochs_or_never(value: str) -> int | None:
    if value == "never":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number of epochs; pass N >= 0 or 'never'") from None


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-calib", type=int, default=512, help="calibration samples (not batches)")
    p.add_argument("--granularity", default="per-channel", choices=list(GRANULARITIES), help="weight granularity")
    p.add_argument("--fuse-relu6", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize conv(-BN)-ReLU6 as one unit (output range clamped to [0, 6])")
    p.add_argument("--float-logits", action=argparse.BooleanOptionalAction, default=False,
                   help="run the classifier layer in fp32 on INT8 features (logits not rounded to INT8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (and of training)")


def _formats(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .config import RELU6_MODES
    from .quant.targets import TARGETS

    p.add_argument("--target", default="phone", help=f"deployment target: {', '.join(TARGETS)}")
    p.add_argument("--format", type=_formats, default=("pte",), metavar="pte|torchscript|pte,torchscript",
                   help="artifacts: ExecuTorch .pte (XNNPACK) and/or TorchScript .pt + .ptl (legacy eager engine: "
                        "qnnpack for phone, x86 for x86)")
    p.add_argument("--relu6", default="clamp", choices=list(RELU6_MODES),
                   help="TorchScript only: fuse conv-BN-ReLU6 with the clamp in the quantized output (clamp) or "
                        "keep ReLU6 as its own quantized op (separate)")
    p.add_argument("--min-delegated", type=float, default=0.99, help="fail below this delegated-op ratio")
    p.add_argument("--max-drop", type=float, default=None, help="fail when top-1 drops by more (percentage points)")
    p.add_argument("--min-parity", type=float, default=99.0, help="fail when .pte vs INT8 agreement is lower (%%)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most N images")
    p.add_argument("--float-program", action=argparse.BooleanOptionalAction, default=True,
                   help="also lower the float model for size/latency comparison")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<model>-<timestamp>/)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args) or 0) if hasattr(args, "handler") else _dispatch(args)
    except MbquantError as exc:
        print(f"mbquant {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mbquant {args.command}: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    return {"data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval, "ptq": _cmd_ptq, "qat": _cmd_qat}[args.command](args)


def _emit(args: argparse.Namespace, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload, indent=2))
    elif not args.quiet:
        print("\n".join(lines))


def _cmd_data(args: argparse.Namespace) -> int:
    from .data import prepare_fashion_mnist

    res = prepare_fashion_mnist(args.dest, progress=not (args.quiet or args.json))
    _emit(args, res, [f"fashion-mnist ready in {res['root']}: train {res['train']} images, val {res['val']} images, "
                      f"{len(res['classes'])} classes ({', '.join(res['classes'])})"])
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .data import load_folder, make_preset
    from .models import ModelInfo, create, save_checkpoint
    from .train import fit

    if args.width_mult <= 0:
        raise ConfigError(f"--width-mult {args.width_mult} must be positive (e.g. 0.35, 0.5, 1.0)")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      seed=args.seed, max_train_samples=args.max_train_samples)
    preset = make_preset(args.preset, args.resolution)
    import torch

    torch.manual_seed(cfg.seed)
    train_set = load_folder(args.data / "train", preset, train=True, cache=True)
    val_set = load_folder(args.data / "val", preset, expected_classes=train_set.classes)
    model = create(args.model, num_classes=len(train_set.classes), width_mult=args.width_mult)
    rho = args.resolution / 224 if args.model == "mobilenet_v1" else 1.0
    info = ModelInfo(args.model, len(train_set.classes), args.width_mult, preset, tuple(train_set.classes))
    result = fit(model, info, train_set, val_set, cfg, progress=not (args.quiet or args.json))
    out = args.out or Path("runs") / f"{args.model}_w{args.width_mult:g}_r{args.resolution}.pth"
    command = "mbquant " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("mbquant") else None
    recipe = {"train": cfg.to_dict(), "data": str(args.data), "train_samples": len(train_set),
              "seconds": result.seconds, "command": command}
    save_checkpoint(model, info, out, recipe=recipe, metrics={"history": result.history}, rho=rho)
    _emit(args, {"checkpoint": str(out), "history": result.history},
          [f"saved {out} (val top-1 {result.final.get('val_top1')}% after {cfg.epochs} epochs, {result.seconds:.0f} s)"])
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_folder
    from .models import count_macs, count_params
    from .resolve import resolve_model
    from .train import evaluate_float

    model, info = resolve_model(args.model, args.weights)
    ds = load_folder(args.data, info.preset, expected_classes=info.classes or None)
    res = evaluate_float(model, ds, args.batch_size, progress=not (args.quiet or args.json))
    if not res.labelled:
        raise ConfigError(f"'{args.data}' has no class subfolders; eval needs a labelled ImageFolder")
    acc = res.accuracy["model"]
    params, macs = count_params(model), count_macs(model, info.resolution)
    payload = {"model": info.to_dict(), "data": str(args.data), "images": res.count, "skipped": res.skipped,
               "top1": round(acc.top1, 2), "top5": round(acc.top5, 2), "params": params, "macs": macs}
    _emit(args, payload, [
        f"{info.name} (width {info.width_mult:g}, {info.resolution}x{info.resolution}, {info.num_classes} classes) "
        f"from {info.weights}",
        f"  params {params / 1e6:.3f} M, MACs {macs / 1e6:.2f} M",
        f"  {args.data}: {res.count} images" + (f" ({res.skipped} unreadable skipped)" if res.skipped else ""),
        f"  top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%"])
    return 0


def _run_config(args: argparse.Namespace):
    from .config import RunConfig

    return RunConfig(target=args.target, formats=args.format, relu6=args.relu6, min_delegated=args.min_delegated,
                     max_drop=args.max_drop,
                     min_parity=args.min_parity, eval_limit=args.eval_limit, latency_runs=args.latency_runs,
                     float_program=args.float_program)


def _finish(args: argparse.Namespace, report, out: Path) -> int:
    from .pipeline import summary_table

    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        print(summary_table(report))
        print(f"artifacts and report.json in {out}")
    if not report.ok:
        for f in report.failures:
            print(f"mbquant {args.command}: error: {f}", file=sys.stderr)
        return 1
    return 0


def _announce(args: argparse.Namespace, info) -> None:
    if not (args.quiet or args.json):
        print(f"{info.name} (width {info.width_mult:g}, {info.resolution}x{info.resolution}) from {info.weights}")


def _cmd_ptq(args: argparse.Namespace) -> int:
    from .config import QuantConfig
    from .pipeline import default_out_dir, run_ptq
    from .resolve import resolve_model

    config = QuantConfig(observer=args.observer, granularity=args.granularity, num_calib=args.num_calib,
                         seed=args.seed, batch_size=args.batch_size, fuse_relu6=args.fuse_relu6,
                         percentile=args.percentile, float_logits=args.float_logits,
                         bias_correction=args.bias_correction)
    run = _run_config(args)
    model, info = resolve_model(args.model, args.weights)
    out = args.out or default_out_dir(args.model)
    _announce(args, info)
    report = run_ptq(model, info, calib=args.calib, eval_dir=args.eval, out_dir=out, config=config, run=run,
                     progress=not (args.quiet or args.json), command="mbquant " + " ".join(["ptq", *sys.argv[2:]]))
    return _finish(args, report, out)


def _cmd_qat(args: argparse.Namespace) -> int:
    from .checkpoints import shipped_names
    from .config import QATConfig, QuantConfig
    from .pipeline import default_out_dir, run_qat
    from .resolve import resolve_model

    if args.weights is None:
        raise ConfigError(f"qat fine-tunes a trained float model: pass --weights (a checkpoint path or a shipped "
                          f"name: {', '.join(shipped_names())}); train one with `mbquant train`")
    config = QuantConfig(observer="moving-average", granularity=args.granularity, num_calib=args.num_calib,
                         seed=args.seed, fuse_relu6=args.fuse_relu6, float_logits=args.float_logits)
    qat = QATConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, freeze_bn_after=args.freeze_bn_after,
                    freeze_observers_after=args.freeze_observers_after, init_ranges=args.init_ranges,
                    seed=args.seed, max_train_samples=args.max_train_samples, distill=args.distill,
                    distill_temperature=args.distill_temperature)
    run = _run_config(args)
    model, info = resolve_model(args.model, args.weights)
    out = args.out or (Path(args.resume).parent if args.resume and Path(args.resume).is_file() else args.resume) \
        or default_out_dir(args.model)
    _announce(args, info)
    report = run_qat(model, info, data=args.data, out_dir=Path(out), config=config, qat=qat, run=run,
                     resume=args.resume, progress=not (args.quiet or args.json),
                     command="mbquant " + " ".join(["qat", *sys.argv[2:]]))
    if report is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    return _finish(args, report, Path(out))
