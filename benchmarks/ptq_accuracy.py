"""PTQ recipes and single choices on a shipped checkpoint, measured on real data: prints a table, writes JSON.

    python benchmarks/ptq_accuracy.py [--weights mobilenet_v2_w0.5_r64_fmnist] [--num-calib 512]
                                      [--eval-limit N] [--variants best,stock,...]

Each variant calibrates on a seeded stratified subset of data/train and is evaluated (float, the INT8
PT2E module and the reloaded INT8 .pte) on data/val. All variants run in one process on one machine.
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
from mbquant.mobile import table

VARIANTS = table.get_spec("pte-xnnpack").sweep_variants   # name: QuantConfig fields, as `mbquant report --recipes`
QUANT_STAGES = ("equalize", "export", "prepare", "calibrate", "convert", "adaround", "bias_correction")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variant_args(ap, VARIANTS, out="ptq_accuracy.json", threads=2)
    args = ap.parse_args(argv)
    names = chosen_variants(ap, args, VARIANTS)
    torch.set_num_threads(args.threads)
    model, info = resolve_model(args.model, args.weights)
    rows, results = [], {}
    run = RunConfig(eval_limit=args.eval_limit, float_program=False, latency_runs=20)
    for name in names:
        cfg = QuantConfig(num_calib=args.num_calib, **VARIANTS[name])
        r = results[name] = summary(job(model, info, args.data, config=cfg, run=run, command=f"benchmark {name}"))
        c = r["config"]
        rows.append((name + (" (eq)" if c["equalize"] else ""), "yes" if c["fuse_relu6"] else "no", c["observer"],
                     ",".join(c["keep_float"]) or "-",
                     "yes" if c["bias_correction"] else "no", "yes" if c.get("adaround") else "no", c["granularity"], f"{r['top1']:.2f}", f"{r['drop_pp']:.2f}",
                     f"{r['agreement_float']:.2f}", f"{r['parity']:.2f}", str(r["quantize_ops"]),
                     f"{sum(r['seconds'].get(k, 0.0) for k in QUANT_STAGES):.0f}"))
        print(f"[{name}] done in {r['wall_seconds']} s: {rows[-1]}", flush=True)
    header = ("variant", "ReLU6 fused", "observer", "fp32", "bias corr.", "AdaRound", "weights", "INT8 .pte top-1", "drop pp",
              "agree float~pte %", "agree pte~module %", "quantize ops", "quantization s")
    print(f"\n{info.name} w{info.width_mult:g} {info.resolution}x{info.resolution} ({info.weights}); float top-1 "
          f"{results[names[0]]['float_top1']:.2f} %; {args.num_calib} calibration images from data/train; eval on "
          f"data/val ({results[names[0]]['images']} images); host {host()['cpu']} {host()['isa']}\n")
    print(format_table(rows, header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": info.to_dict(), "num_calib": args.num_calib, "results": results,
                                    "versions": library_versions(), "host": host()}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
