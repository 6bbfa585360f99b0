"""Wall time of `mbquant ptq` with the default recipe (`best`) against `--recipe stock` on the phone checkpoint,
evaluation excluded, in one run (alternating, each measured --repeats times); and the CLI's start-up time.

    python benchmarks/recipe_walltime.py [--repeats 2] [--num-calib 512]

The time of a job without evaluation is the sum of its stages: export, prepare, calibrate (images decoded
here), convert, bias correction, lowering + write, reload. Target (issue 9): best <= 1.5 x stock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import REPO, job
from mbquant.config import QuantConfig, RunConfig
from mbquant.report import format_table, host, library_versions
from mbquant.models import resolve_model


def startup_seconds(runs: int = 5) -> float:
    cli = Path(sys.executable).with_name("mbquant")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([str(cli), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipe_walltime.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = resolve_model("mobilenet_v2", None)
    run = RunConfig(eval_limit=100, float_program=False, latency_runs=1)   # evaluation is not part of the timing
    stages: dict[str, list[dict]] = {"stock": [], "best": []}
    for i in range(args.repeats):
        for recipe in ("stock", "best"):
            rep = job(model, info, args.data, config=QuantConfig(recipe=recipe, num_calib=args.num_calib), run=run)
            stages[recipe].append(rep["backends"]["pte-xnnpack"]["seconds"])
            print(f"[{recipe} #{i + 1}] {stages[recipe][-1]} total {sum(stages[recipe][-1].values()):.1f} s", flush=True)
    totals = {r: statistics.median(sum(s.values()) for s in v) for r, v in stages.items()}
    ratio = totals["best"] / totals["stock"]
    names = sorted({k for v in stages.values() for s in v for k in s})
    rows = [(k, *(f"{statistics.median(s.get(k, 0.0) for s in stages[r]):.2f}" for r in ("stock", "best")))
            for k in names] + [("total", f"{totals['stock']:.2f}", f"{totals['best']:.2f}")]
    startup = startup_seconds()
    print(f"\nmobilenet_v2 phone checkpoint, {args.num_calib} calibration images, {args.threads} threads, median of "
          f"{args.repeats}; host {host()['cpu']} {host()['isa']}\n")
    print(format_table(rows, ("stage (s)", "--recipe stock", "default (best)")))
    print(f"\nbest / stock = {ratio:.2f} (target <= 1.5); `mbquant --help` start-up {startup:.3f} s (target < 1 s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"stages": stages, "totals": totals, "ratio_best_over_stock": round(ratio, 3),
                                    "startup_help_seconds": startup, "num_calib": args.num_calib,
                                    "threads": args.threads, "host": host(), "versions": library_versions()},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
