"""The MCU target on the shipped small-width checkpoints: accuracy of the Cortex-M program itself (host
reference kernels) for plain PTQ, equalization, bias correction and both, on data/val; and flash/RAM per CPU,
with a float and an int8 input. Prints tables, writes JSON.

    python benchmarks/mcu.py [--eval-limit N] [--models mobilenet_v1_w0.25_r96_fmnist,...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from _common import chosen_variants, job, summary, variant_args
from mbquant import calibrate
from mbquant.config import QuantConfig, RunConfig
from mbquant.mobile.table import CPUS
from mbquant.mobile import table
from mbquant.pipeline import quantize_with
from mbquant.quant.export import FloatModel
from mbquant.report import format_table, host, library_versions
from mbquant.models import resolve_model

VARIANTS = {  # MCU recipe "stock" = CortexMQuantizer as shipped (histogram, ReLU6 folded into the kernels)
    "plain PTQ": dict(recipe="stock"),
    "equalization": dict(recipe="stock", equalize=True),
    "bias correction": dict(recipe="stock", bias_correction=True),
    "equalization + bias correction (best)": dict(),
    "equalization + AdaRound": dict(adaround=True),      # the best recipe with --adaround (bias correction off)
}
MODELS = {"mobilenet_v1_w0.25_r96_fmnist": "mobilenet_v1", "mobilenet_v2_w0.35_r64_fmnist": "mobilenet_v2"}


def memory_per_cpu(model, info, data: Path, num_calib: int) -> dict:
    """The best variant's program for every CPU, float and int8 input (accuracy does not depend on the CPU)."""
    spec = table.get_spec("pte-cortex-m")
    calib = calibrate.from_folder(data / "train", info.preset, num_calib, seed=0, expected_classes=list(info.classes))
    q = quantize_with(table.load(spec), FloatModel(model, info.resolution),
                      table.resolve(QuantConfig(num_calib=num_calib), spec), calib)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cpu in CPUS:
            for int8_input in (False, True):
                backend = table.load(spec, RunConfig(target="mcu", options={"cpu": cpu, "int8_input": int8_input}))
                (w,) = backend.write(q.int8, Path(tmp) / f"{cpu}_{int8_input}", resolution=info.resolution)
                mem = w.details["memory"]
                out[f"{cpu}{' int8-input' if int8_input else ''}"] = {
                    "flash_bytes": mem["flash"]["program_bytes"], "constants": mem["flash"]["constants_by_dtype"],
                    "ram_peak_bytes": mem["ram"]["arena_bytes"], "input_bytes": mem["ram"]["input"]["bytes"],
                    "scratch_max_bytes": (mem["ram"]["scratch_max"] or {}).get("bytes", 0),
                    "peak_set_by": mem["ram"]["peak_set_by"], "non_int8_ops": w.details["non_int8_ops"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variant_args(ap, VARIANTS, out="mcu.json", threads=2, checkpoint=False)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-CPU flash/RAM table")
    args = ap.parse_args(argv)
    chosen = chosen_variants(ap, args, VARIANTS)
    torch.set_num_threads(args.threads)
    results = {}
    for weights in args.models.split(","):
        model, info = resolve_model(MODELS[weights], weights)
        rows, acc = [], {}
        for name in chosen:
            cfg = VARIANTS[name]
            rep = job(model, info, args.data, config=QuantConfig(num_calib=args.num_calib, **cfg),
                      run=RunConfig(target="mcu", eval_limit=args.eval_limit, options={"int8_input": True}), command=name)
            r = acc[name] = summary(rep)
            rows.append((name, f"{r['float_top1']:.2f}", f"{r['top1']:.2f}", f"{r['drop_pp']:.2f}",
                         f"{r['agreement_float']:.2f}", f"{r['parity']:.2f}"))
            print(f"[{weights} {name}] {rows[-1]}", flush=True)
        mem = {} if args.no_memory else memory_per_cpu(model, info, args.data, args.num_calib)
        results[weights] = {"accuracy": acc, "memory": mem}
        print(f"\n{weights}: the Cortex-M program's own accuracy (host reference kernels), "
              f"{acc[next(iter(acc))]['images']} val images\n")
        print(format_table(rows, ("variant", "float top-1", "MCU program top-1", "drop pp", "agree float %",
                                  "agree PT2E module %")))
        print()
        if mem:
            print(format_table([(k, f"{v['flash_bytes']:,}", f"{v['ram_peak_bytes']:,}", f"{v['input_bytes']:,}",
                                 f"{v['scratch_max_bytes']:,}") for k, v in mem.items()],
                               ("CPU", "flash B", "RAM peak B", "input B", "largest scratch B")))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "num_calib": args.num_calib, "host": host(),
                                        "versions": library_versions()}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
