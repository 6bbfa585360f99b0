"""What an agreement figure resolves: how many val images the *float* model itself changes its answer on when every
input value moves by a fraction of one pixel level, next to what INT8 quantization changes.

    python benchmarks/agreement_jitter.py [--checkpoints NAME ...] [--levels 0.07 0.25 0.5 1] [--eval-limit N]

For each shipped checkpoint (default: the phone checkpoint and the MCU V1 0.25) and each shift of ``k`` pixel levels
(one level is 1/255 of the image range: ``k / (255 * std)`` after normalisation), the float model runs on every val
image with the shift added, both signs, and the table counts the images whose top-1 differs from the unshifted float
model's, with the RMS change of the logits. The last rows are the default recipe's INT8 model for each target the
checkpoint ships for (in-process, the graph the artifact is lowered from), against the same float model. Each INT8
row also records its input quantize's scale over one pixel level and its zero point: at 1.0 every 8-bit image maps
to its own integers and the only input error is the integer zero point's uniform shift (0.07 level on these presets).

Prints a table and writes benchmarks/results/agreement_jitter.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from _common import REPO
from mbquant import calibrate, checkpoints
from mbquant.config import QuantConfig
from mbquant.data.dataset import eval_set, make_loader
from mbquant.mobile import table
from mbquant.models import resolve_model
from mbquant.pipeline import quantize
from mbquant.quant.fast_qdq import with_fast_qdq
from mbquant.report import format_table, host, library_versions

RESULTS = REPO / "benchmarks" / "results"
TARGETS = {"mobilenet_v2_w0.5_r64_fmnist": ("phone",), "mobilenet_v1_w0.25_r96_fmnist": ("phone", "mcu")}
_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default


def logits(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def row(kind: str, ref: torch.Tensor, out: torch.Tensor) -> dict:
    flips = int((out.argmax(1) != ref.argmax(1)).sum())
    return {"perturbation": kind, "flips": flips, "agreement": round(100 * (1 - flips / len(ref)), 2),
            "logit_rms_change": round(float((out - ref).pow(2).mean().sqrt()), 4)}


def input_step(int8) -> tuple[float, int]:
    """Scale and zero point of the INT8 graph's first (input) quantize."""
    node = next(n for n in int8.graph.nodes if n.target == _Q)
    return float(node.args[1]), int(node.args[2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--levels", nargs="+", type=float, default=(0.07, 0.25, 0.5, 1.0))
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "agreement_jitter.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, table_rows = {}, []
    for name in args.checkpoints:
        model, info = resolve_model(checkpoints.manifest()["checkpoints"][name]["model"], name)
        model.eval()
        std = info.preset.std[0]
        val = eval_set(args.data / "val", info.preset, classes=info.classes, limit=args.eval_limit)
        x = torch.cat([b[0] for b in make_loader(val, 500)])
        ref = logits(model, x)
        rows = []
        for k in args.levels:
            for sign in (-1, 1):
                rows.append({**row(f"float, input {sign * k:+g} pixel level", ref, logits(model, x + sign * k / (255 * std))),
                             "levels": sign * k})
        calib = calibrate.from_folder(args.data / "train", info.preset, 512, seed=0, expected_classes=list(info.classes))
        for target in TARGETS[name]:
            q = quantize(model, calib, info=info, config=QuantConfig(), backend=table.select(target)[0].name)
            scale, zp = input_step(q.int8)
            r = row(f"INT8 module, {target} default recipe", ref, logits(with_fast_qdq(q.int8), x))
            r["input_scale_over_level"], r["input_zero_point"] = round(scale * 255 * std, 8), zp
            rows.append(r)
        results[name] = {"images": len(x), "rows": rows}
        for r in rows:
            table_rows.append((name, r["perturbation"], str(r["flips"]), f"{r['agreement']:.2f}",
                               f"{r['logit_rms_change']:.4f}"))
        print(f"[{name}] done", flush=True)
    print(f"\nhost {host()['cpu']} {' '.join(host()['isa'])}; {len(x)} val images per row\n")
    print(format_table(table_rows, ("checkpoint", "model and perturbation", "top-1 flips", "agreement %",
                                    "logit RMS change")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "host": host(), "versions": library_versions(),
                                    "threads": args.threads}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
