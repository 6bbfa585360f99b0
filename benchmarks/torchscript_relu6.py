"""Eager INT8 (the TorchScript path) on a shipped checkpoint: ReLU6 handling x weight granularity x engine.

    python benchmarks/torchscript_relu6.py [--weights mobilenet_v2_w0.5_r64_fmnist] [--num-calib 512]
                                           [--eval-limit N] [--variants clamp-pc-qnnpack,...] [--threads 1]

Each variant calibrates the eager model (mbquant.quant.eager) on the same seeded stratified subset of
data/train and is evaluated against the float model on data/val. The first variant is also exported with
``export_torchscript`` (.pt and .ptl reloaded in fresh processes, the .ptl in the lite interpreter) so the
table's INT8 numbers are tied to the artifacts. All variants run in one process on one machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mbquant import calibrate  # noqa: E402
from mbquant.config import QuantConfig  # noqa: E402
from mbquant.data import make_loader  # noqa: E402
from mbquant.evaluate import compare  # noqa: E402
from mbquant.mobile.torchscript import export_torchscript  # noqa: E402
from mbquant.pipeline import load_eval_set  # noqa: E402
from mbquant.quant import eager  # noqa: E402
from mbquant.report import format_table, library_versions  # noqa: E402
from mbquant.resolve import resolve_model  # noqa: E402

VARIANTS = {  # name: (relu6, granularity, engine)
    "clamp-pc-qnnpack": ("clamp", "per-channel", "qnnpack"),
    "separate-pc-qnnpack": ("separate", "per-channel", "qnnpack"),
    "clamp-pt-qnnpack": ("clamp", "per-tensor", "qnnpack"),
    "separate-pt-qnnpack": ("separate", "per-tensor", "qnnpack"),
    "clamp-pc-x86": ("clamp", "per-channel", "x86"),
}


class CachedFloat:
    """The float model's logits, computed on the first pass over the (unshuffled) loader and replayed after."""

    def __init__(self, model):
        self.model, self.cache, self.i = model.eval(), [], 0

    def rewind(self):
        self.i = 0

    def __call__(self, x):
        if self.i == len(self.cache):
            self.cache.append(self.model(x))
        out = self.cache[self.i]
        self.i += 1
        return out


def run_variant(name, model, calib, eval_set, float_pred, args) -> dict:
    relu6, granularity, engine = VARIANTS[name]
    cfg = QuantConfig(num_calib=args.num_calib, granularity=granularity)
    start = time.perf_counter()
    qmodel = eager.quantize_eager(model, calib, cfg, engine=engine, relu6=relu6)
    quant_s = time.perf_counter() - start
    float_pred.rewind()
    with eager.quantized_engine(engine):
        cmp = compare({"float": float_pred, "int8": qmodel}, make_loader(eval_set, 100), desc=name)
    return {"relu6": relu6, "granularity": granularity, "engine": engine, "config": cfg.to_dict(),
            "weights": eager.weight_granularity(qmodel).to_dict(), "images": cmp.count,
            "float_top1": round(cmp.accuracy["float"].top1, 3), "int8_top1": round(cmp.accuracy["int8"].top1, 3),
            "top1_drop_pp": round(cmp.drop("float", "int8"), 3),
            "agreement_float_vs_int8": round(cmp.agree("float", "int8"), 3),
            "quantize_seconds": round(quant_s, 1), "seconds": round(time.perf_counter() - start, 1)}


def export_first(name, model, info, calib, eval_set, args) -> dict:
    relu6, granularity, engine = VARIANTS[name]
    target = {v: k for k, v in eager.ENGINES.items()}[engine]
    with tempfile.TemporaryDirectory() as tmp:
        rep = export_torchscript(model, info, calib, eval_set, Path(tmp), target=target, relu6=relu6,
                                 config=QuantConfig(num_calib=args.num_calib, granularity=granularity))
    for art in rep["artifacts"].values():
        art["path"] = Path(art["path"]).name
    return {"variant": name, **rep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default=None, help="default: the model's shipped checkpoint")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-export", action="store_true", help="skip exporting/reloading the first variant")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "torchscript_relu6.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    model, info = resolve_model(args.model, args.weights)
    calib = calibrate.from_folder(args.data / "train", info.preset, args.num_calib, seed=0,
                                  expected_classes=list(info.classes) or None)
    eval_set = load_eval_set(args.data / "val", info, args.eval_limit)
    float_pred, results, rows = CachedFloat(model), {}, []
    with torch.no_grad():
        for name in names:
            r = results[name] = run_variant(name, model, calib, eval_set, float_pred, args)
            rows.append((name, r["relu6"], r["granularity"], r["engine"], f"{r['float_top1']:.2f}",
                         f"{r['int8_top1']:.2f}", f"{r['top1_drop_pp']:.2f}", f"{r['agreement_float_vs_int8']:.2f}"))
            print(f"[{name}] done in {r['seconds']} s", flush=True)
    exported = None if args.no_export else export_first(names[0], model, info, calib, eval_set, args)
    header = ("variant", "relu6", "weights", "engine", "float top-1", "int8 top-1", "drop pp", "agree float~int8 %")
    print(f"\n{info.name} w{info.width_mult:g} {info.resolution}x{info.resolution} ({info.weights}); "
          f"{args.num_calib} calibration images from data/train (seed 0, stratified); eval on data/val "
          f"({results[names[0]]['images']} images); eager INT8 (torch.ao.quantization), {args.threads} thread(s)\n")
    print(format_table(rows, header))
    if exported:
        p = exported["parity"]
        print(f"\nexported {exported['variant']}: .pt {exported['artifacts']['pt']['bytes'] / 1024:,.0f} KiB, "
              f".ptl {exported['artifacts']['ptl']['bytes'] / 1024:,.0f} KiB; fresh-process parity vs INT8 model: "
              f".pt {p['pt']['agreement']:.2f}% (max |diff| {p['pt']['max_abs_logit_diff']:.2g}), "
              f".ptl {p['ptl']['agreement']:.2f}% (max |diff| {p['ptl']['max_abs_logit_diff']:.2g}); "
              f"drop {exported['accuracy']['top1_drop_pp']:.2f} pp; latency {exported['latency']['median_ms']:.2f} ms "
              f"(batch 1, 1 thread)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": info.to_dict(), "num_calib": args.num_calib, "threads": args.threads,
                                    "results": results, "export": exported, "versions": library_versions(),
                                    "host": "x86-64 CPU"}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
