"""Evaluate every shipped checkpoint on data/val and (re)write mbquant/checkpoints/manifest.json.

    python benchmarks/shipped_checkpoints.py [--write]

The manifest records, for each checkpoint, the exact training command and seed (read from the
checkpoint itself), its file hash, and the float top-1/top-5 measured here on the 10,000 val images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mbquant.checkpoints import HERE  # noqa: E402
from mbquant.data.dataset import load_folder  # noqa: E402
from mbquant.models import count_macs, count_params, file_sha256, load_checkpoint, read_checkpoint_info  # noqa: E402
from mbquant.report import format_table  # noqa: E402
from mbquant.train import evaluate_float  # noqa: E402

ROLES = {"mobilenet_v2_w0.5_r64_fmnist": "phone (default for mobilenet_v2)",
         "mobilenet_v2_w0.35_r64_fmnist": "MCU-class small width",
         "mobilenet_v1_w0.25_r96_fmnist": "MCU-class small width (default for mobilenet_v1)",
         "mobilenet_v3_small_w0.5_r64_fmnist": "hardswish and squeeze-excitation, phone and MCU (default for "
                                               "mobilenet_v3_small)",
         "mobilenet_v2_w1.0_r128_fmnist": "real size: width 1.0 (the reference of benchmarks/scale.py)",
         "mobilenet_v3_large_w0.35_r64_fmnist": "MobileNetV3-Large at a small width, phone and MCU (default for "
                                                "mobilenet_v3_large)"}
DEFAULTS = {"mobilenet_v2": "mobilenet_v2_w0.5_r64_fmnist", "mobilenet_v1": "mobilenet_v1_w0.25_r96_fmnist",
            "mobilenet_v3_small": "mobilenet_v3_small_w0.5_r64_fmnist",
            "mobilenet_v3_large": "mobilenet_v3_large_w0.35_r64_fmnist"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "val")
    ap.add_argument("--write", action="store_true", help="write manifest.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    entries, rows = {}, []
    for path in sorted(HERE.glob("*.pth")):
        meta = read_checkpoint_info(path)
        model, info = load_checkpoint(path)
        res = evaluate_float(model, load_folder(args.data, info.preset, expected_classes=info.classes))
        top1, top5 = res.top1("model"), res.top5("model")
        recipe = meta["recipe"]
        entries[path.stem] = {
            "file": path.name, "role": ROLES.get(path.stem, ""), "model": info.name, "width_mult": info.width_mult,
            "resolution": info.resolution, "classes": list(info.classes), "sha256": file_sha256(path),
            "bytes": path.stat().st_size, "params": count_params(model), "macs": count_macs(model, info.resolution),
            "command": recipe.get("command"), "seed": recipe["train"]["seed"], "epochs": recipe["train"]["epochs"],
            "train_seconds": recipe.get("seconds"), "history": meta["metrics"].get("history"),
            "val_images": res.count, "val_top1": round(top1, 2), "val_top5": round(top5, 2)}
        rows.append((path.stem, f"{info.width_mult:g}", str(info.resolution), f"{count_params(model) / 1e6:.3f}",
                     f"{path.stat().st_size / 1024:,.0f}", f"{top1:.2f}", f"{top5:.2f}"))
    print(format_table(rows, ("checkpoint", "width", "res", "params M", "KiB", "val top-1", "val top-5")))
    if args.write:
        (HERE / "manifest.json").write_text(json.dumps({"checkpoints": entries, "defaults": DEFAULTS}, indent=2) + "\n")
        print(f"wrote {HERE / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
