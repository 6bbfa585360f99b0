"""The TorchScript backends on a shipped checkpoint: ReLU6 handling x weight granularity x engine.

    python benchmarks/torchscript_relu6.py [--weights mobilenet_v2_w0.5_r64_fmnist] [--num-calib 512]
                                           [--eval-limit N] [--variants clamp-pc-qnnpack,...] [--threads 1]

Each variant is the whole job (`mbquant ptq --format torchscript`): the eager engine calibrates on the same
seeded stratified subset of data/train, the .pt and .ptl are written and reloaded in fresh processes (the
.ptl in the lite interpreter) and measured against the float model on data/val.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import chosen_variants, job, summary, variant_args
from mbquant.config import QuantConfig, RunConfig
from mbquant.report import format_table, host, library_versions
from mbquant.models import resolve_model

VARIANTS = {  # name: (ReLU6 fused, granularity, target)
    "clamp-pc-qnnpack": (True, "per-channel", "phone"),
    "separate-pc-qnnpack": (False, "per-channel", "phone"),
    "clamp-pt-qnnpack": (True, "per-tensor", "phone"),
    "separate-pt-qnnpack": (False, "per-tensor", "phone"),
    "clamp-pc-x86": (True, "per-channel", "x86"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variant_args(ap, VARIANTS, out="torchscript_relu6.json", threads=1)
    args = ap.parse_args(argv)
    names = chosen_variants(ap, args, VARIANTS)
    torch.set_num_threads(args.threads)
    model, info = resolve_model(args.model, args.weights)
    results, rows = {}, []
    for name in names:
        fused, gran, target = VARIANTS[name]
        cfg = QuantConfig(num_calib=args.num_calib, fuse_relu6=fused, granularity=gran)
        run = RunConfig(target=target, formats=("torchscript",), eval_limit=args.eval_limit, latency_runs=20)
        rep = job(model, info, args.data, config=cfg, run=run, command=f"benchmark {name}")
        r = results[name] = {"pt": summary(rep, 0), "ptl": summary(rep, 1), "latency": rep["artifacts"][0]["latency"],
                             "weights": rep["backends"][rep["artifacts"][0]["backend"]]["weights"]}
        pt = r["pt"]
        rows.append((name, "clamp" if fused else "separate", gran, rep["artifacts"][0]["backend"], f"{pt['float_top1']:.2f}",
                     f"{pt['top1']:.2f}", f"{pt['drop_pp']:.2f}", f"{pt['agreement_float']:.2f}",
                     f"{pt['parity']:.2f}/{r['ptl']['parity']:.2f}", f"{pt['bytes'] / 1024:,.0f}"))
        print(f"[{name}] done in {pt['wall_seconds']} s", flush=True)
    header = ("variant", "relu6", "weights", "backend", "float top-1", "int8 top-1", "drop pp", "agree float~int8 %",
              "parity .pt/.ptl %", ".pt KiB")
    print(f"\n{info.name} w{info.width_mult:g} {info.resolution}x{info.resolution} ({info.weights}); "
          f"{args.num_calib} calibration images from data/train (seed 0, stratified); eval on data/val "
          f"({results[names[0]]['pt']['images']} images); {args.threads} thread(s)\n")
    print(format_table(rows, header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": info.to_dict(), "num_calib": args.num_calib, "threads": args.threads,
                                    "results": results, "versions": library_versions(), "host": host()}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
