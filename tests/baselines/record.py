"""Measure every flow of :mod:`tests.baselines.flows` and write its baseline files (the only writer; `make baselines`).

    python -m tests.baselines.record [--images 2000 10000] [--flows KEY ...] [--data data]
    python -m tests.baselines.record --table     # the recorded baselines as README's markdown table

Each flow runs three times on the 2,000-image slice (as recorded, the same again, and with PyTorch's native float
convolutions instead of oneDNN's) and once on all 10,000 images (its run-to-run and native-convolution spreads are
those measured on the slice, in pp: the same rate of flipped images gives the same pp, and the rule doubles it); the
tolerance is computed from those spreads and the artifact-vs-INT8-model difference of the recorded run
(:func:`tests.baselines.flows.tolerance`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mbquant.check import baseline_record, report_verdict
from mbquant.cli import main as cli

from .flows import FLOWS, SIZES, Flow, tolerance


def _run(flow: Flow, data: Path, out: Path, images: int, onednn: bool) -> tuple[dict, float]:
    t0 = time.perf_counter()
    with torch.backends.mkldnn.flags(enabled=onednn):
        rc = cli(flow.argv(data, out, images, threads=2))
    if not (out / "report.json").is_file():
        raise SystemExit(f"{flow.key} ({images} images, oneDNN {onednn}) failed with exit code {rc} and no report")
    rep = json.loads((out / "report.json").read_text())
    if rc != 0:
        raise SystemExit(f"{flow.key} ({images} images, oneDNN {onednn}) failed: {rep.get('failures')}")
    return next(a for a in rep["artifacts"] if a["file"] == flow.artifact), time.perf_counter() - t0


def _spread(a: dict, b: dict) -> float:
    return round(max(abs(a["top1"] - b["top1"]), abs(a["agreement_float"] - b["agreement_float"])), 3)


def record(flow: Flow, data: Path, images: int, work: Path, run_to_run: dict[str, float]) -> dict:
    runs = {}
    for name, onednn in (("a", True), ("again", True), ("native_conv", False)):
        if name != "a" and images != SIZES[0]:
            continue
        runs[name], seconds = _run(flow, data, work / f"{flow.key}.{images}.{name}", images, onednn)
        print(f"  {flow.key} {images} {name}: top-1 {runs[name]['top1']} agreement {runs[name]['agreement_float']} "
              f"({seconds:.0f} s)", flush=True)
    a = runs["a"]
    if images == SIZES[0]:
        run_to_run[flow.key] = {"run to run": _spread(a, runs["again"]),
                                "native vs oneDNN float convolutions": _spread(a, runs["native_conv"])}
    on = "" if images == SIZES[0] else f" (on {SIZES[0]:,})"
    spreads = {**{k + on: v for k, v in run_to_run[flow.key].items()},
               "artifact vs its INT8 model": round(max(abs(a["top1"] - a["reference_top1"]),
                                                       abs(a["agreement_float"] - a["reference_agreement_float"])), 3)}
    tol, why = tolerance(spreads, images)
    out = work / f"{flow.key}.{images}.a"
    v = report_verdict(out, flow.artifact)
    v = dataclasses.replace(v, measured_by=v.measured_by.replace(f"{out}/", ""))   # no temporary paths in the file
    argv = ["mbquant", *flow.argv(Path("data"), Path("<out>"), images)]
    rec = baseline_record(v, tolerance=tol, why=why, limit=None if images >= 10000 else images, flow=flow.flow,
                          checkpoint=flow.checkpoint, command=" ".join(argv), spreads_pp=spreads)
    rec.write(flow.baseline_path(images))
    return rec.document()


def table() -> str:
    """The baselines as the markdown table README shows (`python -m tests.baselines.record --table`)."""
    rows = ["| flow | checkpoint | images | top-1 % | drop pp (95 % CI) | agreement % | run to run | native conv "
            "| artifact vs INT8 model | tolerance pp |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for images in SIZES:
        for flow in FLOWS.values():
            b = flow.baseline(images)
            sp = list(b["spreads_pp"].values())
            lo, hi = b["drop_ci95"]
            rows.append(f"| {flow.flow} | {flow.checkpoint} | {images:,} | {b['top1']:.2f} | {b['drop_pp']:.2f} "
                        f"[{lo:.2f}, {hi:.2f}] | {b['agreement']:.2f} | " + " | ".join(f"{v:.2f}" for v in sp)
                        + f" | {b['tolerance_pp']:.2f} |")
    hosts = sorted({FLOWS[k].baseline(n)["host"] for k in FLOWS for n in SIZES})
    return "\n".join(rows) + f"\n\nRecorded on {', '.join(hosts)}; spreads in pp (the larger of the top-1 and " \
        "agreement differences).\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--images", type=int, nargs="+", default=list(SIZES), choices=SIZES)
    ap.add_argument("--flows", nargs="+", default=list(FLOWS), choices=list(FLOWS))
    ap.add_argument("--table", action="store_true", help="print the recorded baselines as a markdown table and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(), end="")
        return 0
    work = Path(tempfile.mkdtemp(prefix="mbquant-baselines-"))
    run_to_run: dict[str, float] = {}
    try:
        for images in sorted(args.images):
            for key in args.flows:
                if images != SIZES[0] and key not in run_to_run:
                    sp = FLOWS[key].baseline(SIZES[0])["spreads_pp"]
                    run_to_run[key] = {k: sp[k] for k in ("run to run", "native vs oneDNN float convolutions")}
                rec = record(FLOWS[key], args.data, images, work, run_to_run)
                print(f"{key} {images}: top-1 {rec['top1']} drop {rec['drop_pp']} agreement {rec['agreement']} "
                      f"tolerance {rec['tolerance_pp']} pp", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
