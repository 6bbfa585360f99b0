"""PTQ variants on a shipped checkpoint, measured on real data: prints a table and writes JSON.

    python benchmarks/ptq_accuracy.py [--weights mobilenet_v2_w0.5_r64_fmnist] [--num-calib 512]
                                      [--eval-limit N] [--variants default,stock,...]

Each variant calibrates on a seeded stratified subset of data/train and is evaluated (float, the INT8
PT2E module and the reloaded INT8 .pte) on data/val. All variants run in one process on one machine.
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

from mbquant.config import QuantConfig, RunConfig  # noqa: E402
from mbquant.pipeline import run_ptq  # noqa: E402
from mbquant.report import format_table, library_versions  # noqa: E402
from mbquant.resolve import resolve_model  # noqa: E402

VARIANTS = {
    "stock": dict(fuse_relu6=False),                       # the stock XNNPACKQuantizer annotation
    "default": dict(),                                     # ReLU6 fused, histogram observer, per-channel
    "percentile": dict(observer="percentile"),
    "minmax": dict(observer="minmax"),
    "moving-average": dict(observer="moving-average"),
    "recommended": dict(observer="percentile", float_logits=True),
    "recommended-stock-relu6": dict(observer="percentile", float_logits=True, fuse_relu6=False),
    "recommended+bias-corr": dict(observer="percentile", float_logits=True, bias_correction=True),
    "histogram+float-logits": dict(float_logits=True),
    "histogram+float-logits+bias-corr": dict(float_logits=True, bias_correction=True),
    "per-tensor-stock": dict(granularity="per-tensor", fuse_relu6=False),
    "per-tensor": dict(granularity="per-tensor"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default=None, help="default: the model's shipped checkpoint")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=Path, default=None, help="calibration folder (default DATA/train)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ptq_accuracy.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = resolve_model(args.model, args.weights)
    rows, results = [], {}
    for name in args.variants.split(","):
        cfg = QuantConfig(num_calib=args.num_calib, **VARIANTS[name])
        run = RunConfig(eval_limit=args.eval_limit, float_program=False, latency_runs=50)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rep = run_ptq(model, info, calib=args.calib or args.data / "train", eval_dir=args.data / "val", out_dir=Path(tmp),
                          config=cfg, run=run, command=f"benchmark {name}").to_dict()
        acc, par = rep["accuracy"], rep["parity"]
        results[name] = {"config": cfg.to_dict(), "accuracy": acc, "parity": par,
                         "quantize": rep["quantization"], "bytes": rep["programs"]["int8"]["bytes"],
                         "latency_ms": rep["latency"]["int8_pte"]["median_ms"], "status": rep["status"],
                         "worst_layers": rep["layer_sqnr_worst5"], "seconds": round(time.perf_counter() - start, 1)}
        rows.append((name, f"{acc['float_top1']:.2f}", f"{acc['int8_pte_top1']:.2f}", f"{acc['top1_drop_pp']:.2f}",
                     f"{acc['agreement_float_vs_int8_pte']:.2f}", f"{par['agreement_pte_vs_module']:.2f}",
                     str(rep["quantization"]["quantize"]), f"{results[name]['bytes'] / 1024:,.0f}"))
        print(f"[{name}] done in {results[name]['seconds']} s", flush=True)
    header = ("variant", "float top-1", "int8 .pte top-1", "drop pp", "agree float~pte %", "agree pte~module %",
              "quantize ops", ".pte KiB")
    print(f"\n{info.name} w{info.width_mult:g} {info.resolution}x{info.resolution} ({info.weights}); "
          f"{args.num_calib} calibration images from data/train; eval on data/val "
          f"({results[next(iter(results))]['accuracy']['images']} images)\n")
    print(format_table(rows, header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": info.to_dict(), "num_calib": args.num_calib, "results": results,
                                    "versions": library_versions(), "host": "x86-64 CPU"}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
