"""PTQ vs QAT side by side on a shipped checkpoint, per weight granularity: prints a table, writes JSON.

    python benchmarks/qat_vs_ptq.py [--weights mobilenet_v2_w0.35_r64_fmnist] [--epochs 3]
                                    [--max-train-samples 20000] [--granularities per-tensor,per-channel]

PTQ calibrates on 512 seeded stratified images of data/train (ReLU6 fused, histogram observer, INT8 logits:
``--ptq-recipe`` picks another); QAT starts from ranges calibrated on the same images and fine-tunes with the
`mbquant qat` defaults. Every row is measured on data/val (float, INT8 PT2E module, reloaded INT8 .pte).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from _common import REPO, job, summary
from mbquant.config import QATConfig, QuantConfig, RunConfig
from mbquant.data.dataset import load_folder
from mbquant.pipeline import Finetune
from mbquant.report import format_table, host, library_versions
from mbquant.models import resolve_model

PTQ_RECIPES = {"relu6": dict(recipe="stock", fuse_relu6=True), "best": dict(), "stock": dict(recipe="stock"),
               "best+equalize": dict(equalize=True), "equalize+bias-correction": dict(recipe="stock", fuse_relu6=True,
                                                                                       equalize=True, bias_correction=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default="mobilenet_v2_w0.35_r64_fmnist")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--granularities", default="per-tensor,per-channel")
    ap.add_argument("--methods", default="ptq,qat")
    ap.add_argument("--ptq-recipe", choices=list(PTQ_RECIPES), default="relu6")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=QATConfig().lr)
    ap.add_argument("--max-train-samples", type=int, default=20000)
    ap.add_argument("--distill", type=float, default=QATConfig().distill,
                    help="QAT distillation weight (0: labels only; default: mbquant qat's)")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qat_vs_ptq.json")
    ap.add_argument("--append", action="store_true", help="add these rows to the results already in --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = resolve_model(args.model, args.weights)
    run = RunConfig(eval_limit=args.eval_limit, float_program=False, latency_runs=5)
    qat = QATConfig(epochs=args.epochs, lr=args.lr, max_train_samples=args.max_train_samples, distill=args.distill)
    rows, results = [], {}
    if args.append and args.out.exists():
        results = json.loads(args.out.read_text())["results"]
    for gran in args.granularities.split(","):
        for method in args.methods.split(","):
            name = f"{method} {gran}" + (f" distill {args.distill:g}" if method == "qat" and args.distill else "") \
                + (f" {args.ptq_recipe}" if method == "ptq" and args.ptq_recipe != "relu6" else "")
            if method == "ptq":
                rep = job(model, info, args.data, config=QuantConfig(granularity=gran, **PTQ_RECIPES[args.ptq_recipe]),
                          run=run, command=name)
            else:
                train = load_folder(args.data / "train", info.preset, train=True, expected_classes=list(info.classes))
                rep = job(model, info, args.data, config=QuantConfig(recipe="qat", granularity=gran), run=run,
                          finetune=Finetune(qat, train), command=name, progress=True)
            results[name] = r = {**summary(rep), "history": rep.get("qat", {}).get("history")}
            rows.append((name, f"{r['float_top1']:.2f}", f"{r['top1']:.2f}", f"{r['drop_pp']:.2f}",
                         f"{r['agreement_float']:.2f}", f"{r['parity']:.2f}", f"{r['delegated']:.0%}",
                         f"{r['wall_seconds']:.0f}"))
            print(f"[{name}] {rows[-1]}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": info.to_dict(), "results": results, "host": host(),
                                            "versions": library_versions(), "threads": args.threads}, indent=2) + "\n")
    header = ("run", "float top-1", "int8 .pte top-1", "drop pp", "agree float~pte %", "agree pte~module %",
              "delegated", "seconds")
    print(f"\n{info.name} w{info.width_mult:g} {info.resolution}x{info.resolution} ({info.weights}); eval on data/val "
          f"({results[next(iter(results))]['images']} images); QAT {qat.epochs} epochs on "
          f"{qat.max_train_samples or 'all'} training images\n")
    print(format_table(rows, header))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
