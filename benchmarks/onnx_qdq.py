"""The onnx-qdq backend beside the phone's .pte, on the shipped phone checkpoint: one `mbquant ptq --format pte,onnx`
job (the default recipe of each backend, 512 calibration images, data/val), plus the fp32 ONNX model exported from
the same float graph. Accuracy of each artifact, file sizes, latency (batch 1, 1 and 2 threads) of the INT8 and
fp32 ONNX models under ONNX Runtime and of the INT8 and fp32 .pte under ExecuTorch + XNNPACK; and what the QDQ
graph holds. Then the recipe's choices measured on ONNX Runtime's kernels (each variant a whole `--format onnx`
job: the .onnx file itself against the float model), which is how the row's ``best`` was chosen. Prints tables,
writes benchmarks/results/onnx_qdq.json.

    python benchmarks/onnx_qdq.py [--eval-limit N] [--runs 200] [--recipes stock,relu6,...|none]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _common import REPO, job, summary
from mbquant.cli import main as cli
from mbquant.config import QuantConfig, RunConfig
from mbquant.mobile import table
from mbquant.mobile.onnx.qdq import OrtModel, export_onnx
from mbquant.mobile.xnnpack.runtime import PteModel
from mbquant.models import resolve_model
from mbquant.quant.export import FloatModel
from mbquant.report import host, library_versions

CHECKPOINT = "mobilenet_v2_w0.5_r64_fmnist"
RECIPES = ("stock", "relu6", "relu6+percentile", "relu6+percentile+fp32-logits", "best", "best+equalize")


def recipes(model, info, data: Path, names, eval_limit) -> dict:
    """Each variant of the row as a whole `--format onnx` job; the .onnx file's own figures."""
    spec = table.get_spec("onnx-qdq")
    out = {}
    for name in names:
        rep = job(model, info, data, config=QuantConfig(num_calib=512, **spec.sweep_variants[name]),
                  run=RunConfig(formats=("onnx",), eval_limit=eval_limit, float_program=False, latency_runs=5))
        out[name] = summary(rep)
        s = out[name]
        print(f"  {name:30} top-1 {s['top1']:6.2f} %  drop {s['drop_pp']:5.2f} pp  agreement {s['agreement_float']:6.2f} %"
              f"  parity {s['parity']:6.2f} %  ({s['wall_seconds']:.0f} s)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--eval-limit", type=int, default=None, help="val images (default: all 10,000)")
    ap.add_argument("--runs", type=int, default=200, help="timed calls per latency figure")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="variants to measure on ONNX Runtime, or none")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "onnx_qdq.json")
    args = ap.parse_args(argv)
    model, info = resolve_model("mobilenet_v2", CHECKPOINT)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        argv_ = ["ptq", "mobilenet_v2", "--calib", str(args.data / "train"), "--eval", str(args.data / "val"),
                 "--format", "pte,onnx", "--out", str(run), "--quiet"]
        if args.eval_limit:
            argv_ += ["--eval-limit", str(args.eval_limit)]
        if cli(argv_) != 0:
            raise SystemExit("the ptq job failed; see its message above")
        rep = json.loads((run / "report.json").read_text())
        arts = {a["backend"]: a for a in rep["artifacts"]}
        fp32_onnx = Path(tmp) / "fp32.onnx"
        fp32_facts = export_onnx(FloatModel(model, info.resolution).graph, info.resolution, fp32_onnx)
        files = {"INT8 .onnx (ONNX Runtime)": (OrtModel(run / arts["onnx-qdq"]["file"]), run / arts["onnx-qdq"]["file"]),
                 "fp32 .onnx (ONNX Runtime)": (OrtModel(fp32_onnx), fp32_onnx),
                 "INT8 .pte (XNNPACK)": (PteModel(run / arts["pte-xnnpack"]["file"]), run / arts["pte-xnnpack"]["file"]),
                 "fp32 .pte (XNNPACK)": (PteModel(run / rep["float"]["file"]), run / rep["float"]["file"])}
        x = torch.zeros(1, 3, info.resolution, info.resolution)
        rows = {}
        for name, (pred, path) in files.items():
            rows[name] = {"bytes": path.stat().st_size,
                          "latency_1t": pred.latency(x, args.runs, 1), "latency_2t": pred.latency(x, args.runs, 2)}
            pred.close()
        for backend, name in (("onnx-qdq", "INT8 .onnx (ONNX Runtime)"), ("pte-xnnpack", "INT8 .pte (XNNPACK)")):
            a = arts[backend]
            rows[name].update(top1=a["top1"], drop_pp=a["drop_pp"], agreement_float=a["agreement_float"],
                              parity=a["parity"]["agreement"], images=a["images"], config=rep["backends"][backend]["config"])
        result = {"checkpoint": CHECKPOINT, "float_top1": rep["float"]["top1"], "host": host(),
                  "libraries": library_versions(), "onnx_graph": arts["onnx-qdq"]["details"],
                  "fp32_onnx_graph": fp32_facts, "rows": rows}
    print(f"{CHECKPOINT}: float top-1 {rep['float']['top1']:.2f} % on {arts['onnx-qdq']['images']} val images; "
          f"{result['host'].get('cpu', '')}")
    print(f"{'artifact':28} {'top-1 %':>8} {'drop pp':>8} {'agree %':>8} {'parity %':>9} {'KiB':>7} "
          f"{'ms 1t':>7} {'ms 2t':>7}")
    for name, r in rows.items():
        acc = (f"{r['top1']:8.2f} {r['drop_pp']:8.2f} {r['agreement_float']:8.2f} {r['parity']:9.2f}" if "top1" in r
               else f"{'-':>8} {'-':>8} {'-':>8} {'-':>9}")
        print(f"{name:28} {acc} {r['bytes'] / 1024:7.0f} {r['latency_1t']['median_ms']:7.3f} "
              f"{r['latency_2t']['median_ms']:7.3f}")
    ops = result["onnx_graph"]["ops"]
    print("INT8 ONNX graph: " + ", ".join(f"{v} {k}" for k, v in ops.items()) + f" (opset {result['onnx_graph']['opset']})")
    names = [] if args.recipes == "none" else args.recipes.split(",")
    if names:
        print(f"recipes on ONNX Runtime (the .onnx file vs the float model, {arts['onnx-qdq']['images']} images):")
        result["recipes"] = recipes(model, info, args.data, names, args.eval_limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
