"""PTQ vs QAT side by side on a shipped checkpoint, per weight granularity: prints a table, writes JSON.

    python benchmarks/qat_vs_ptq.py [--weights mobilenet_v2_w0.35_r64_fmnist] [--epochs 3]
                                    [--max-train-samples 20000] [--granularities per-tensor,per-channel]

PTQ calibrates on 512 seeded stratified images of data/train (histogram observer, the `mbquant ptq`
defaults); QAT starts from ranges calibrated on the same images and fine-tunes with the `mbquant qat`
defaults. Every row is measured on data/val (float, INT8 PT2E module, reloaded INT8 .pte) in one process.
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

from mbquant.config import QATConfig, QuantConfig, RunConfig  # noqa: E402
from mbquant.pipeline import run_ptq, run_qat  # noqa: E402
from mbquant.report import format_table, library_versions  # noqa: E402
from mbquant.resolve import resolve_model  # noqa: E402


def _record(rep: dict, seconds: float) -> dict:
    return {"config": rep["config"], "qat_config": rep.get("qat_config"), "accuracy": rep["accuracy"],
            "parity": rep["parity"], "delegated": rep["programs"]["int8"]["delegation"]["ratio"],
            "bytes": rep["programs"]["int8"]["bytes"], "status": rep["status"], "failures": rep.get("failures"),
            "history": rep.get("qat", {}).get("history"), "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default="mobilenet_v2_w0.35_r64_fmnist")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--granularities", default="per-tensor,per-channel")
    ap.add_argument("--methods", default="ptq,qat")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=QATConfig().lr)
    ap.add_argument("--max-train-samples", type=int, default=20000)
    ap.add_argument("--distill", type=float, default=0.0, help="QAT distillation weight (0: labels only)")
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
            name = f"{method} {gran}" + (f" distill {args.distill:g}" if method == "qat" and args.distill else "")
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                if method == "ptq":
                    rep = run_ptq(model, info, calib=args.data / "train", eval_dir=args.data / "val", out_dir=Path(tmp),
                                  config=QuantConfig(granularity=gran), run=run, command=name).to_dict()
                else:
                    rep = run_qat(model, info, data=args.data, out_dir=Path(tmp), run=run, qat=qat, progress=True,
                                  config=QuantConfig(granularity=gran, observer="moving-average"),
                                  command=name).to_dict()
            results[name] = r = _record(rep, time.perf_counter() - start)
            acc = r["accuracy"]
            rows.append((name, f"{acc['float_top1']:.2f}", f"{acc['int8_pte_top1']:.2f}", f"{acc['top1_drop_pp']:.2f}",
                         f"{acc['agreement_float_vs_int8_pte']:.2f}", f"{r['parity']['agreement_pte_vs_module']:.2f}",
                         f"{r['delegated']:.0%}", f"{r['seconds']:.0f}"))
            print(f"[{name}] {rows[-1]}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": info.to_dict(), "results": results,
                                            "versions": library_versions(), "threads": args.threads}, indent=2))
    header = ("run", "float top-1", "int8 .pte top-1", "drop pp", "agree float~pte %", "agree pte~module %",
              "delegated", "seconds")
    print(f"\n{info.name} w{info.width_mult:g} {info.resolution}x{info.resolution} ({info.weights}); eval on data/val "
          f"({results[next(iter(results))]['accuracy']['images']} images); QAT {qat.epochs} epochs on "
          f"{qat.max_train_samples or 'all'} training images\n")
    print(format_table(rows, header))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
