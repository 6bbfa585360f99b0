"""AdaRound's cost at the size users ship: MobileNetV2 width 1.0 at 224 px (seeded random weights: cost only), the
phone backend's best recipe with --adaround. Each point runs in its own process (its own peak RSS); the per-step
and per-image costs come from pairs of points measured in this run. Prints a table, writes JSON.

    python benchmarks/adaround_cost.py [--points 10x32,30x32,10x128]    # STEPSxIMAGES
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import REPO, run_measured
from mbquant.report import format_table, host, library_versions


def point(steps: int, images: int, data: Path) -> None:
    """One quantization with AdaRound (this process); prints its stage seconds as JSON."""
    import torch

    from mbquant import calibrate
    from mbquant.config import QuantConfig
    from mbquant.data.contract import spec_of
    from mbquant.data.presets import imagenet_preset
    from mbquant.mobile import table
    from mbquant.models import create
    from mbquant.pipeline import quantize_with
    from mbquant.quant.export import FloatModel

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = create("mobilenet_v2", num_classes=10, width_mult=1.0).eval()
    spec = table.get_spec("pte-xnnpack")
    calib = calibrate.from_folder(data / "train", spec_of(imagenet_preset(224)), images, seed=0)
    cfg = table.resolve(QuantConfig(num_calib=images, adaround=True, adaround_iterations=steps,
                                    adaround_images=images), spec)
    q = quantize_with(table.load(spec), FloatModel(model, 224), cfg, calib)
    print(json.dumps({"seconds": q.seconds, "layers": len(q.adaround.layers)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="10x32,30x32,10x128")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "adaround_cost.json")
    args = ap.parse_args(argv)
    if args.point:
        steps, images = map(int, args.point.split("x"))
        point(steps, images, args.data)
        return 0
    rows, results = [], {}
    for p in args.points.split(","):
        m = run_measured([sys.executable, __file__, "--point", p, "--data", str(args.data)])
        out = json.loads(m["stdout"].strip().splitlines()[-1])
        results[p] = {"adaround_seconds": out["seconds"]["adaround"], "peak_rss_mb": m["peak_rss_mb"],
                      "layers": out["layers"], "seconds": out["seconds"]}
        rows.append((p, f"{out['seconds']['adaround']:.1f}", f"{m['peak_rss_mb']:.0f}"))
        print(f"[{p}] {rows[-1]}", flush=True)
    derived = {}
    pts = {tuple(map(int, k.split("x"))): v for k, v in results.items()}
    same_images = [(a, b) for a in pts for b in pts if a[1] == b[1] and a[0] < b[0]]
    same_steps = [(a, b) for a in pts for b in pts if a[0] == b[0] and a[1] < b[1]]
    if same_images:
        a, b = same_images[0]
        derived["seconds_per_step"] = round((pts[b]["adaround_seconds"] - pts[a]["adaround_seconds"]) / (b[0] - a[0]), 3)
    if same_steps:
        a, b = same_steps[0]
        derived["mb_per_image"] = round((pts[b]["peak_rss_mb"] - pts[a]["peak_rss_mb"]) / (b[1] - a[1]), 2)
        derived["seconds_per_image"] = round((pts[b]["adaround_seconds"] - pts[a]["adaround_seconds"]) / (b[1] - a[1]), 3)
    if {"seconds_per_step", "seconds_per_image"} <= set(derived):
        derived["default_estimate_seconds"] = round(500 * derived["seconds_per_step"] + 256 * derived["seconds_per_image"])
    print("\nMobileNetV2 width 1.0, 224 px, random weights (cost only), pte-xnnpack best + --adaround; "
          f"host {host()['cpu']} {host()['isa']}\n")
    print(format_table(rows, ("steps x images", "AdaRound s", "peak RSS MB")))
    print("\n" + ", ".join(f"{k} {v}" for k, v in derived.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"points": results, "derived": derived, "host": host(),
                                    "versions": library_versions(), "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
