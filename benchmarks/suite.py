"""The benchmark suite (`make bench`): every shipped checkpoint, mbquant against the stock PT2E flow, in one run.

    python benchmarks/suite.py [--checkpoints NAME ...] [--eval-images 1000] [--latency-runs 200] [--readme]

Per checkpoint, on this host (its CPU name and ISA features are recorded):
  * `mbquant ptq` (default recipe, 512 calibration images, .pte + its fp32 .pte) and the stock PT2E flow
    (`benchmarks/stock_pt2e.py`: export, XNNPACKQuantizer, the same 512 real images, convert, lower), each in its own
    process: stage times, peak RSS (the process's own, from wait4), calibration throughput, top-1 on the same
    evaluation images; the ratios mbquant / stock;
  * artifact sizes: float checkpoint, fp32 .pte, INT8 .pte, INT8 TorchScript (.pt, `--format torchscript`);
  * host latency (median, p90; batch 1) of the fp32 .pte, the INT8 .pte and the INT8 TorchScript at 1 and 2
    threads, interleaved in rounds so drift hits all alike;
  * the Cortex-M program (`--target mcu --int8-input`, Cortex-M4): flash and RAM.
Writes benchmarks/results/suite.json and suite.md; with --readme, replaces README's block between
`<!-- bench:suite -->` markers with suite.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import REPO, mbquant_cmd, replace_readme_block, run_measured, small_checkpoints
from mbquant import calibrate, checkpoints
from mbquant._quiet import filtered_stderr
from mbquant.mobile.backend import torch_threads
from mbquant.timing import latency_summary, times_ms
from mbquant.mobile.torchscript.engine import quantized_engine
from mbquant.mobile.xnnpack import PteModel
from mbquant.mobile.xnnpack.runtime import runtime_threads
from mbquant.models import read_checkpoint_info
from mbquant.data.dataset import eval_set
from mbquant.report import host, library_versions
from mbquant.models import resolve_model

RESULTS = REPO / "benchmarks" / "results"
MARK = "<!-- bench:suite -->"
STAGES = ("export", "prepare", "calibrate", "bias_correction", "convert", "lower")


def latencies(fp32: Path, int8: Path, ts: Path, x: torch.Tensor, runs: int, rounds: int = 5) -> dict:
    """median / p90 (ms) per model and thread count, from ``rounds`` interleaved blocks of ``runs / rounds``."""
    ts_module = torch.jit.load(str(ts))
    models = {"fp32 .pte": ("pte", PteModel(fp32)), "INT8 .pte": ("pte", PteModel(int8)),
              "INT8 TorchScript": ("ts", ts_module)}
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, (kind, fn) in models.items():
            for threads in (1, 2):
                if kind == "pte":
                    with runtime_threads(threads):
                        fn(x)                                   # reload after a threadpool reset; warm-up
                        block = times_ms(fn, x, runs // rounds)
                else:
                    with torch_threads(threads), quantized_engine("qnnpack"):
                        times_ms(fn, x, 3)
                        block = times_ms(fn, x, runs // rounds)
                samples.setdefault((name, threads), []).extend(block)
    out = {}
    for (name, threads), t in samples.items():
        out.setdefault(name, {})[f"{threads}"] = latency_summary(t)
    return out


def bench_checkpoint(name: str, data: Path, work: Path, args) -> dict:
    entry = checkpoints.manifest()["checkpoints"][name]
    model_name, ckpt = entry["model"], checkpoints.resolve_shipped(name)
    _, info = resolve_model(model_name, name)
    where = ["--weights", name, "--calib", str(data / "train"), "--eval", str(data / "val"), "--threads",
             str(args.threads), "--quiet"]
    common = [*where, "--eval-limit", str(args.eval_images)]
    print(f"[{name}] mbquant ptq", flush=True)
    mbq = run_measured(mbquant_cmd("ptq", model_name, *common, "--latency-runs", "1", "--out", str(work / "pte")))
    rep = json.loads((work / "pte" / "report.json").read_text())
    (art,) = rep["artifacts"]
    sec = {**rep["backends"]["pte-xnnpack"]["seconds"], **rep["seconds"]}
    sec["lower"] = sec.pop("write")

    print(f"[{name}] stock PT2E", flush=True)
    calib = calibrate.from_folder(data / "train", info.preset, 512, seed=0, expected_classes=list(info.classes))
    ev = eval_set(data / "val", info.preset, classes=info.classes, limit=args.eval_images)
    images = {"calibration": [str(s.path) for s in calib.dataset.samples],
              "eval": [[str(s.path), s.label] for s in ev.samples]}
    (work / "images.json").write_text(json.dumps(images))
    stock_run = run_measured([sys.executable, str(REPO / "benchmarks" / "stock_pt2e.py"), "--checkpoint", str(ckpt),
                              "--images", str(work / "images.json"), "--out", str(work / "stock.pte"),
                              "--result", str(work / "stock.json"), "--threads", str(args.threads)])
    stock = json.loads((work / "stock.json").read_text())

    print(f"[{name}] TorchScript and Cortex-M", flush=True)
    run_measured(mbquant_cmd("ptq", model_name, *common, "--format", "torchscript", "--no-float-program",
                             "--latency-runs", "1", "--out", str(work / "ts")))
    mcu_run = run_measured(mbquant_cmd("ptq", model_name, *where, "--eval-limit", "100", "--target", "mcu",
                                       "--int8-input", "--out", str(work / "mcu")))
    mcu = json.loads((work / "mcu" / "report.json").read_text())["artifacts"][0]["details"]["memory"]

    print(f"[{name}] latency", flush=True)
    x = torch.stack([ev[i][0] for i in range(1)])
    files = {k: next((work / d).glob(g)) for k, d, g in (("fp32", "pte", "*_fp32.pte"), ("int8", "pte", "*_int8.pte"),
                                                          ("ts", "ts", "*_int8.pt"))}
    lat = latencies(files["fp32"], files["int8"], files["ts"], x, args.latency_runs)

    ours = {k: sec.get(k, 0.0) for k in STAGES}
    theirs = {k: stock["seconds"].get(k, 0.0) for k in STAGES}
    return {
        "checkpoint": name, "model": model_name, "width_mult": info.width_mult, "resolution": info.resolution,
        "sizes": {"float_checkpoint": ckpt.stat().st_size, "fp32_pte": files["fp32"].stat().st_size,
                  "int8_pte": files["int8"].stat().st_size, "int8_torchscript": files["ts"].stat().st_size,
                  "stock_int8_pte": stock["bytes"],
                  "ratio_fp32_over_int8_pte": round(files["fp32"].stat().st_size / files["int8"].stat().st_size, 2)},
        "latency": lat,
        "mcu": {"cpu": "cortex-m4", "flash_bytes": mcu["flash"]["program_bytes"], "ram_bytes": mcu["ram"]["arena_bytes"],
                "wall_seconds": mcu_run["wall_seconds"]},
        "ptq": {
            "mbquant": {"seconds": ours, "total_seconds": round(sum(ours.values()), 2),
                        "equalize_seconds": sec.get("equalize", 0.0), "float_program_seconds": sec.get("float_program"),
                        "verify_seconds": sec.get("verify"), "reload_seconds": sec.get("load"),
                        "diagnose_seconds": sec.get("diagnose"),
                        "wall_seconds": mbq["wall_seconds"], "peak_rss_mb": mbq["peak_rss_mb"],
                        "calibration_images_per_s": round(512 / sec["calibrate"], 1),
                        "top1": art["top1"], "float_top1": rep["float"]["top1"], "images": art["images"],
                        "bytes": art["bytes"]},
            "stock": {"seconds": theirs, "total_seconds": round(sum(theirs.values()), 2),
                      "eval_seconds": stock["eval_seconds"], "wall_seconds": stock_run["wall_seconds"],
                      "peak_rss_mb": stock_run["peak_rss_mb"],
                      "calibration_images_per_s": round(512 / stock["seconds"]["calibrate"], 1),
                      "top1": stock["top1"], "images": stock["images"], "bytes": stock["bytes"]},
            "ratios": {"stages_total": round(sum(ours.values()) / sum(theirs.values()), 2),
                       "peak_rss": round(mbq["peak_rss_mb"] / stock_run["peak_rss_mb"], 2),
                       "calibration_throughput": round(theirs["calibrate"] / ours["calibrate"], 2)},
        },
    }


def _kb(n: int) -> str:
    return f"{n / 1024:,.0f}"


def markdown(res: dict) -> str:
    h = res["host"]
    lines = [f"Measured {res['date']} on {h['cpu']} ({h['machine']}; {', '.join(h['isa']) or 'no AVX2'}), "
             f"{res['threads']} threads for the PTQ jobs; torch {res['versions'].get('torch')}, executorch "
             f"{res['versions'].get('executorch')}. `make bench` (`benchmarks/suite.py`) wrote this table and "
             f"`benchmarks/results/suite.json`.", "",
             "**Sizes (KiB) and the Cortex-M4 program** (int8 input)", "",
             "| checkpoint | float .pth | fp32 .pte | INT8 .pte | fp32/INT8 | INT8 TorchScript | stock INT8 .pte | "
             "MCU flash | MCU RAM |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["checkpoints"]:
        s, m = r["sizes"], r["mcu"]
        lines.append(f"| {r['checkpoint']} | {_kb(s['float_checkpoint'])} | {_kb(s['fp32_pte'])} | "
                     f"{_kb(s['int8_pte'])} | {s['ratio_fp32_over_int8_pte']:.2f}x | {_kb(s['int8_torchscript'])} | "
                     f"{_kb(s['stock_int8_pte'])} | {_kb(m['flash_bytes'])} | {_kb(m['ram_bytes'])} |")
    lines += ["", "**Host latency, batch 1, ms: median / p90** (1 thread | 2 threads)", "",
              "| checkpoint | fp32 .pte | INT8 .pte | INT8 TorchScript (qnnpack) |", "|---|---:|---:|---:|"]
    for r in res["checkpoints"]:
        cells = []
        for k in ("fp32 .pte", "INT8 .pte", "INT8 TorchScript"):
            a, b = r["latency"][k]["1"], r["latency"][k]["2"]
            cells.append(f"{a['median_ms']:.3f} / {a['p90_ms']:.3f} \\| {b['median_ms']:.3f} / {b['p90_ms']:.3f}")
        lines.append(f"| {r['checkpoint']} | " + " | ".join(cells) + " |")
    lines += ["", f"**PTQ, mbquant (default recipe) vs the stock PT2E flow**: seconds per stage, same 512 calibration "
              f"images, top-1 of the .pte on the same {res['eval_images']:,} val images", "",
              "| checkpoint | flow | " + " | ".join(STAGES) + " | total | ratio | verify | peak RSS MB | calib img/s "
              "| top-1 (float) |", "|---|---|" + "---:|" * (len(STAGES) + 6)]
    for r in res["checkpoints"]:
        p = r["ptq"]
        for flow in ("stock", "mbquant"):
            f = p[flow]
            ratio = "1.00" if flow == "stock" else f"{p['ratios']['stages_total']:.2f}"
            verify = f"{f['verify_seconds']:.1f}" if flow == "mbquant" else "none"
            top1 = f"{f['top1']:.2f}" + (f" ({f['float_top1']:.2f})" if flow == "mbquant" else "")
            lines.append(f"| {r['checkpoint']} | {flow} | " + " | ".join(f"{f['seconds'][k]:.2f}" for k in STAGES)
                         + f" | {f['total_seconds']:.1f} | {ratio} | {verify} | {f['peak_rss_mb']:.0f} | "
                           f"{f['calibration_images_per_s']:.0f} | {top1} |")
    lines += ["", "`lower` is to_edge_transform_and_lower + serialization; mbquant's peak RSS is its whole command "
              "(also the fp32 .pte, evaluation of both and verification), the stock script's is its flow plus "
              "its own evaluation. `verify` (mbquant only): the .pte reloaded and run by ExecuTorch's runtime on "
              "the evaluation images next to the float and INT8 models, with latency and the parity gate."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--checkpoints", nargs="+", default=small_checkpoints())
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "suite.json")
    ap.add_argument("--readme", action="store_true", help=f"replace README.md's {MARK} block with the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with filtered_stderr(), tempfile.TemporaryDirectory(prefix="mbquant-bench-") as tmp:
        for name in args.checkpoints:
            work = Path(tmp) / name
            work.mkdir()
            rows.append(bench_checkpoint(name, args.data, work, args))
    res = {"date": time.strftime("%Y-%m-%d"), "host": host(), "versions": library_versions(), "threads": args.threads,
           "eval_images": args.eval_images, "latency_runs": args.latency_runs, "checkpoints": rows,
           "checkpoint_recipes": {n: read_checkpoint_info(checkpoints.resolve_shipped(n))["recipe"].get("command")
                                  for n in args.checkpoints}}
    md = markdown(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if args.readme:
        replace_readme_block(md, MARK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
