"""The main job at the size users ship: width 1.0 at 224 px, mbquant's default recipe against `--recipe stock`.

    python benchmarks/scale.py [--models mobilenet_v2,mobilenet_v3_large,resnet50] [--num-calib 512]
                               [--eval-limit 200] [--growth 128,512,2048] [--trained mobilenet_v2_w1.0_r128_fmnist]
                               [--calibration-only | --growth-only] [--one-order] [--out benchmarks/results/scale.json]

Per model (10 classes, ImageNet preprocessing at 224 px; weights: seeded random initialisation with BatchNorm
statistics from 64 real training images, so accuracy figures are chance-level and the job's gates refuse them:
this table is about time and memory, not accuracy), in one run on this host:
  * the float model's own batched forward time per image (batch 32, the job's threads) on 128 of the jobs'
    calibration images (decoded beforehand), measured right before and right after every job (the host drifts);
  * calibration's own cost in a process of its own, on the same decoded images, five times interleaved in a rotating order (the fastest
    of each): the float forward, the default and the stock recipe's prepared graphs (mbquant's counted
    histograms), and the same two graphs counting with torch.histc (the observers as torchao ships them: the
    upstream flow's cost); and whether the counted and torch.histc observers end with the same ranges (a job's calibrate stage also decodes images and starts the process's
    kernels, and the host drifts between jobs: this is the like-for-like figure);
  * `mbquant ptq` with the default recipe and with `--recipe stock` (and, for the first model, the default
    recipe with bias correction on 512 calibration images, as every resolution had before it read fewer above
    96 px: 128 at 224 px), each in its own process: every stage's
    seconds from the report, wall time and the process's own peak RSS (wait4); then the pair again, stock first
    (`--one-order` skips the second pair);
  * ratios in the same run: quantization stages (export ... lower + write) default / stock (each order, and
    pooled over both orders), peak RSS default /
    stock, calibration / the float forward around the same job, and evaluation (the float graph, the INT8 module
    and the INT8 program on every image, decoding included) / the float graph's own time in that same pass
    (the job's report times every model batch by batch);
  * the growth table: the first model, default recipe, `--num-calib` 128 / 512 / 2048: the job's peak RSS (set
    while it evaluates and verifies, not while it reads the calibration set), the peak RSS of the quantization
    stages alone (export ... bias correction, in a process of their own: the memory that could grow with the
    calibration set), bias correction's seconds and the bytes it kept on disk between layers;
  * the trained reference (`--trained`, a shipped width-1.0 checkpoint at its own resolution): default, stock and
    default with bias correction on 512 images, on every val image: real top-1, drop and agreement next to the
    same stage times, peak RSS and images/s.
Writes the JSON (with the host's CPU and ISA) and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import REPO, mbquant_cmd, run_measured
from mbquant import calibrate, checkpoints
from mbquant.calibrate.histogram import CountedHistogram, uncounted
from mbquant.config import QuantConfig
from mbquant.mobile import table as backends
from mbquant.quant.export import FloatModel
from mbquant.data.contract import spec_of
from mbquant.models.load import create_with_info
from mbquant.pipeline import quantize
from mbquant.report import host, library_versions

QUANT_STAGES = ("equalize", "export", "prepare", "calibrate", "convert", "bias_correction", "write", "open")
RESOLUTION, CLASSES, BATCH = 224, 10, 32
TRAINED = "mobilenet_v2_w1.0_r128_fmnist"     # the shipped width-1.0 checkpoint (trained, real accuracy)


def build(name: str, data: Path, path: Path, seed: int = 0):
    """A seeded random model with BN statistics from 64 real training images, saved as a plain state dict."""
    torch.manual_seed(seed)
    model, info = create_with_info(name, num_classes=CLASSES)
    calib = calibrate.from_folder(data / "train", spec_of(info.preset), 64, seed=seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                        # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in calib.batches(BATCH):
            model(x)
    model.eval()
    torch.save(model.state_dict(), path)
    return model, info


def forward_seconds(model, batches: list[torch.Tensor]) -> float:
    """The float model's batched forward over ``batches`` (one full warm-up batch first: the first batch of a
    process allocates its buffers, and a 2-image warm-up left the first model's figure 3x too slow), no_grad.
    Unreachable objects are collected first: the copied graphs that calibration leaves behind in reference cycles
    made ResNet-50's float forward 1.3x slower until a ``gc.collect()`` (8.4 against 6.6 s for 128 images)."""
    gc.collect()
    with torch.no_grad():
        model(batches[0])
        t = time.perf_counter()
        for x in batches:
            model(x)
    return time.perf_counter() - t


def decoded(info, data: Path, num_calib: int, seed: int, images: int = 128) -> list[torch.Tensor]:
    """The first ``images`` of the jobs' calibration images, decoded, in batches of BATCH."""
    return list(calibrate.from_folder(data / "train", spec_of(info.preset), num_calib, seed=seed).source(BATCH, images)())


def float_reference(model, info, data: Path, num_calib: int, seed: int, images: int = 128) -> dict:
    """The float model's forward per image, on the first ``images`` calibration images (decoded beforehand)."""
    t = time.perf_counter()
    batches = decoded(info, data, num_calib, seed, images)
    decode = time.perf_counter() - t
    n = sum(len(b) for b in batches)
    return {"decode_ms_per_image": round(1000 * decode / n, 2), "images": n,
            "forward_ms_per_image": round(1000 * forward_seconds(model, batches) / n, 2), "batches": batches}


def calibration_cost(model, ref: dict, repeats: int = 5) -> dict:
    """Calibration's own cost in one process, next to the float forward over the same decoded images, repeated
    ``repeats`` times interleaved in a rotating order (the fastest of each): the default recipe's prepared graph with mbquant's counted
    histograms, the same graph with torch.histc's (``calibrate.histogram.uncounted``), and the stock recipe's graph.
    Also whether the counted and the uncounted observers end with the same ranges (every observer's qparams)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    spec = backends.select(None)[0]
    backend = backends.load(spec)
    with backend.session():
        graphs = {}
        for recipe in ("best", "stock"):
            graphs[recipe] = backend.prepare(FloatModel(model, RESOLUTION),
                                             backends.resolve(QuantConfig(recipe=recipe), spec))
            move_exported_model_to_eval(graphs[recipe])

        def fresh(recipe: str, counted: bool = True):
            g = copy.deepcopy(graphs[recipe])
            for m in calibrate.observers_of(g).values():
                if not counted and isinstance(m, CountedHistogram):
                    m.__class__ = uncounted(type(m))
            return g

        runs = {"default": lambda: fresh("best"), "default, torch.histc": lambda: fresh("best", counted=False),
                "stock": lambda: fresh("stock"), "stock, torch.histc": lambda: fresh("stock", counted=False)}
        best = {"float": float("inf"), **{k: float("inf") for k in runs}}
        last = {}
        order = ["float", *runs]
        for r in range(repeats):                    # each repeat starts one place later: no variant always first
            for name in order[r % len(order):] + order[:r % len(order)]:
                g = model if name == "float" else runs[name]()
                best[name] = min(best[name], forward_seconds(g, ref["batches"]))
                last[name] = g
        same = all(_same_qparams(last[recipe], last[f"{recipe}, torch.histc"]) for recipe in ("default", "stock"))
    return {"images": ref["images"], "repeats": repeats, "seconds": {k: round(v, 3) for k, v in best.items()},
            "over_float": {k: round(v / best["float"], 2) for k, v in best.items() if k != "float"},
            "same_ranges_as_torch_histc": same}


def _saved(name: str, weights: str):
    """The model :func:`build` saved to ``weights`` (a child process's copy), in eval mode, and its info."""
    model, info = create_with_info(name, num_classes=CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval(), info


def calibration_cost_apart(name: str, weights: Path, data: Path, *, num_calib: int, seed: int) -> dict:
    """:func:`calibration_cost` in a process of its own (the same model from ``weights``, the same decoded images),
    so that the jobs after it start from a lean parent. Run in this process, it slowed the next job: ResNet-50's
    default job right after it calibrated in 53.5 s, 40.8 s right before it and 40.3 s after that (`ptq`, the same
    command each time; this process's own float forward ran 22 % faster once a ``gc.collect()`` had freed the
    copied graphs' cycles)."""
    run = run_measured([sys.executable, str(Path(__file__).resolve()), "--calibration-cost", name, str(weights),
                        str(data), str(num_calib), str(seed)])
    return json.loads(run["stdout"].strip().splitlines()[-1])


def _calibration_cost_child(name: str, weights: str, data: str, num_calib: str, seed: str) -> None:
    """The child of :func:`calibration_cost_apart`: prints the measurement as one JSON line."""
    model, info = _saved(name, weights)
    batches = decoded(info, Path(data), int(num_calib), int(seed))
    print(json.dumps(calibration_cost(model, {"images": sum(len(b) for b in batches), "batches": batches})))


def _same_qparams(a, b) -> bool:
    """Whether two calibrated graphs' observers (by name) give the same qparams, tensor for tensor."""
    qa, qb = ({n: o.calculate_qparams() for n, o in calibrate.observers_of(g).items()} for g in (a, b))
    return qa.keys() == qb.keys() and all(torch.equal(x, y) for n in qa for x, y in zip(qa[n], qb[n]))


def timed_job(model, ref: dict, *args, **kwargs) -> dict:
    """:func:`job` with the float forward measured right before and right after it (the host drifts; the ratio
    of calibration to the float forward uses the mean of the two)."""
    before = forward_seconds(model, ref["batches"])
    out = job(*args, **kwargs)
    after = forward_seconds(model, ref["batches"])
    out["float_forward_ms_per_image"] = round(1000 * (before + after) / 2 / ref["images"], 2)
    out["float_forward_drift"] = round(after / before, 3)
    return out


def job(name: str, weights: Path | str, data: Path, work: Path, *, recipe: str, num_calib: int,
        eval_limit: int | None, seed: int, extra: tuple[str, ...] = ()) -> dict:
    """One `mbquant ptq` in its own process; the report's stage seconds, wall time and peak RSS. ``weights``: a
    plain state dict of this benchmark's 224 px model (a Path), or a shipped checkpoint's name (a str: the
    checkpoint says its width, resolution and classes); ``eval_limit`` None: every val image."""
    shape = ("--num-classes", str(CLASSES), "--preset", "imagenet", "--resolution", str(RESOLUTION)) \
        if isinstance(weights, Path) else ()
    limit = ("--eval-limit", str(eval_limit)) if eval_limit is not None else ()
    tag = weights.stem if isinstance(weights, Path) else weights
    base = out = work / "-".join([name, tag, recipe, str(num_calib), *(a.lstrip("-") for a in extra)])
    for again in range(2, 100):          # a job run again writes a folder of its own (ptq refuses to overwrite one)
        if not (out.exists() or out.with_name(out.name + ".failed").exists()):
            break
        out = base.with_name(f"{base.name}-{again}")
    run = run_measured(mbquant_cmd(
        "ptq", name, "--weights", str(weights), *shape, "--calib", str(data / "train"), "--eval", str(data / "val"),
        "--num-calib", str(num_calib), *limit, "--seed", str(seed), "--recipe", recipe,
        "--quiet", "--out", str(out), *extra), check=False)
    folder = out if (out / "report.json").exists() else out.with_name(out.name + ".failed")
    if not (folder / "report.json").exists():
        raise SystemExit(f"mbquant ptq {name} --recipe {recipe} wrote no report ({run['returncode']}):\n"
                         f"{run['stderr'][-3000:]}")
    rep = json.loads((folder / "report.json").read_text())
    backend = next(iter(rep["backends"].values()))
    stages = {**backend["seconds"], **rep["seconds"]}
    bias = backend.get("bias_correction") or {}
    return {"recipe": recipe, "num_calib": num_calib, "flags": list(extra), "exit_code": run["returncode"],
            "failures": rep.get("failures", []), "wall_seconds": run["wall_seconds"],
            "peak_rss_mb": run["peak_rss_mb"], "stages": stages,
            # wait4's figure is the largest of the job and the children it reaped (its loader workers: forked, so
            # they count the pages they share with it); the report's own two say which one set it
            "job_own_peak_rss_mb": rep.get("resources", {}).get("peak_rss_mb"),
            "job_children_peak_rss_mb": rep.get("resources", {}).get("children_peak_rss_mb"),
            "quant_seconds": round(sum(stages.get(k, 0.0) for k in QUANT_STAGES), 2),
            "calibration_images": backend["calibration"]["samples"],
            "eval_images": rep["artifacts"][0]["images"],
            "bias_correction_samples": bias.get("samples"), "bias_correction_stored_mb":
                round(bias["stored_bytes"] / 2 ** 20, 1) if bias.get("stored_bytes") else None,
            "float_top1": rep["float"]["top1"], "top1": rep["artifacts"][0]["top1"],
            "drop_pp": rep["artifacts"][0]["drop_pp"], "agreement_float": rep["artifacts"][0]["agreement_float"],
            "calibration_images_per_s": round(backend["calibration"]["samples"] / stages["calibrate"], 1),
            "eval_images_per_s": round(rep["artifacts"][0]["images"] / stages["evaluate"], 1)}


def quantization_peak(name: str, weights: Path, data: Path, *, num_calib: int, seed: int) -> dict:
    """The default recipe's quantization stages alone (export, prepare, calibrate on ``num_calib`` images, convert,
    bias correction; no lowering, no evaluation) in a process of their own: its peak RSS (wait4) is the memory of
    the stages that read the calibration set. A job's own peak is set later, while it evaluates and verifies."""
    run = run_measured([sys.executable, str(Path(__file__).resolve()), "--quantize-only", name, str(weights),
                        str(data), str(num_calib), str(seed)])
    return {"peak_rss_mb": run["peak_rss_mb"], "wall_seconds": run["wall_seconds"],
            **json.loads(run["stdout"].strip().splitlines()[-1])}


def _quantize_only(name: str, weights: str, data: str, num_calib: str, seed: str) -> None:
    """The child of :func:`quantization_peak`: prints the stage seconds as one JSON line."""
    model, info = _saved(name, weights)
    calib = calibrate.from_folder(Path(data) / "train", spec_of(info.preset), int(num_calib), seed=int(seed))
    q = quantize(model, calib, info=info, config=QuantConfig(num_calib=int(num_calib), seed=int(seed)))
    print(json.dumps({"num_calib": int(num_calib), "calibration_images": q.calibration.samples,
                      "stages": q.seconds}))


def ratios(default: dict, stock: dict) -> dict:
    """Same-run ratios: default / stock; calibration / the float forward measured around the same job;
    evaluation / the float model's own share of the same evaluation pass (every model on every image)."""
    d, s = default["stages"], stock["stages"]

    def calib(r: dict) -> float:
        return round(r["stages"]["calibrate"] / (r["float_forward_ms_per_image"] * r["calibration_images"] / 1000), 2)

    return {"quant_default_over_stock": round(default["quant_seconds"] / stock["quant_seconds"], 2),
            "rss_default_over_stock": round(default["peak_rss_mb"] / stock["peak_rss_mb"], 2),
            "calibrate_over_forward": calib(default), "stock_calibrate_over_forward": calib(stock),
            "evaluate_over_forward": round(d["evaluate"] / d["evaluate float"], 2),
            "calibration_images_per_s": round(default["calibration_images"] / d["calibrate"], 1),
            "eval_images_per_s": round(default["eval_images"] / d["evaluate"], 1)}


def _recipe(run: dict) -> str:
    return " ".join([run["recipe"], *run["flags"]])


def table(result: dict) -> str:
    lines = [f"host: {result['host'].get('cpu', '?')}; threads {torch.get_num_threads()}"]
    if any(m.get("runs") for m in result["models"]):
        lines += ["| model | recipe | calib imgs | wall s | peak RSS MB | quant s | calibrate s | bias corr. s (imgs) "
                  "| lower+write s | evaluate s | verify s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in result["models"]:
            for r, again in [(r, "") for r in m.get("runs", [])] + [(r, ", again") for r in m.get("again", [])]:
                st = r["stages"]
                lines.append(f"| {m['model']} | {_recipe(r)}{again} | "
                             f"{r['calibration_images']} | {r['wall_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                             f"{r['quant_seconds']:.1f} | {st['calibrate']:.1f} | {st.get('bias_correction', 0):.1f} "
                             f"({r['bias_correction_samples'] or '-'}) | "
                             f"{st.get('write', 0):.1f} | {st['evaluate']:.1f} | {st['verify']:.1f} |")
        lines += ["", "| model | float img/s | quant default/stock | RSS default/stock | calibrate/forward (stock) | "
                  "evaluate/forward | calib img/s | eval img/s |", "|---|---|---|---|---|---|---|---|"]
        for m in (m for m in result["models"] if m.get("runs")):
            r, f = m["ratios"], m["float"]
            both = m.get("quant_default_over_stock_both_orders")
            quant = f"{r['quant_default_over_stock']}" + (
                f"; stock first {m['ratios_stock_first']['quant_default_over_stock']}; both orders {both}" if both else "")
            lines.append(f"| {m['model']} | {1000 / f['forward_ms_per_image']:.1f} | {quant} | "
                         f"{r['rss_default_over_stock']} | {r['calibrate_over_forward']} ({r['stock_calibrate_over_forward']})"
                         f" | {r['evaluate_over_forward']} | {r['calibration_images_per_s']} | {r['eval_images_per_s']} |")
    if any(m.get("calibration") for m in result["models"]):
        lines += ["", "calibration in one process (same decoded images, fastest of the repeats), x the float forward "
                  "(torch.histc: the observers as torchao ships them):",
                  "| model | images | float s | default | default, torch.histc | stock | stock, torch.histc | same ranges |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in result["models"]:
            c = m["calibration"]
            o = c["over_float"]
            lines.append(f"| {m['model']} | {c['images']} | {c['seconds']['float']:.2f} | {o['default']} | "
                         f"{o['default, torch.histc']} | {o['stock']} | {o['stock, torch.histc']} | "
                         f"{'yes' if c['same_ranges_as_torch_histc'] else 'NO'} |")
    if result.get("trained"):
        t = result["trained"]
        lines += ["", f"trained: {t['checkpoint']} (every val image; accuracy is real here)",
                  "| recipe | bias corr. imgs | top-1 % | drop pp | agreement % | quant s | calibrate s | bias corr. s "
                  "| lower+write s | evaluate s | peak RSS MB | calib img/s | eval img/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["runs"]:
            st = r["stages"]
            lines.append(f"| {_recipe(r)} | "
                         f"{r['bias_correction_samples'] or '-'} | {r['top1']:.2f} | {r['drop_pp']:+.2f} | "
                         f"{r['agreement_float']:.2f} | {r['quant_seconds']:.1f} | {st['calibrate']:.1f} | "
                         f"{st.get('bias_correction', 0):.1f} | {st.get('write', 0):.1f} | {st['evaluate']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['calibration_images_per_s']} | {r['eval_images_per_s']} |")
    if result.get("growth"):
        lines += ["", "| --num-calib | job peak RSS MB | quantization stages alone: peak RSS MB | bias corr. s | "
                  "kept on disk MB | job wall s |", "|---|---|---|---|---|---|"]
        for g in result["growth"]:
            q = g.get("quantization_only") or {}
            bias = g.get("stages", q.get("stages", {})).get("bias_correction", 0)
            lines.append(f"| {g['num_calib']} | {g.get('peak_rss_mb', '-')} | {q.get('peak_rss_mb', '-')} | "
                         f"{bias:.1f} | {g.get('bias_correction_stored_mb', '-')} | {g.get('wall_seconds', '-')} |")
        for label, rss in (("job", [g["peak_rss_mb"] for g in result["growth"] if "peak_rss_mb" in g]),
                           ("quantization stages", [g["quantization_only"]["peak_rss_mb"] for g in result["growth"]
                                                    if g.get("quantization_only")])):
            if rss:
                lines.append(f"peak RSS spread across the growth points ({label}): "
                             f"{100 * (max(rss) / min(rss) - 1):.1f} %")
    return "\n".join(lines)


def save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--models", default="mobilenet_v2,mobilenet_v3_large,resnet50")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--growth", default="128,512,2048", help="--num-calib points of the growth table ('' to skip)")
    ap.add_argument("--trained", default=TRAINED, help="a shipped width-1.0 checkpoint measured on every val image "
                    "with its own resolution: default, stock and default with 512 correction images ('' to skip)")
    ap.add_argument("--calibration-only", action="store_true",
                    help="only the in-process calibration table (no jobs, no growth table, no trained reference)")
    ap.add_argument("--growth-only", action="store_true",
                    help="only the growth table's quantization stages (each --growth point in its own process)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize-only", nargs=5, metavar=("MODEL", "WEIGHTS", "DATA", "NUM_CALIB", "SEED"),
                    help=argparse.SUPPRESS)                  # quantization_peak's child process
    ap.add_argument("--calibration-cost", nargs=5, metavar=("MODEL", "WEIGHTS", "DATA", "NUM_CALIB", "SEED"),
                    help=argparse.SUPPRESS)                  # calibration_cost_apart's child process
    ap.add_argument("--one-order", action="store_true",
                    help="run each default/stock pair once, default first (by default it runs again, stock first)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args(argv)
    if args.quantize_only:
        _quantize_only(*args.quantize_only)
        return 0
    if args.calibration_cost:
        _calibration_cost_child(*args.calibration_cost)
        return 0
    names = [n for n in args.models.split(",") if n]
    growth = [int(g) for g in args.growth.split(",") if g]
    result = {"host": host(), "libraries": library_versions(), "resolution": RESOLUTION, "classes": CLASSES,
              "weights": "seeded random initialisation, BN statistics from 64 training images (cost only)",
              "num_calib": args.num_calib, "eval_limit": args.eval_limit, "models": [], "growth": []}
    with tempfile.TemporaryDirectory(prefix="mbquant-scale-") as tmp:
        work = Path(tmp)
        for i, name in enumerate(names):
            weights = work / f"{name}.pth"
            model, info = build(name, args.data, weights, args.seed)
            if args.growth_only:
                for n in growth:
                    q = quantization_peak(name, weights, args.data, num_calib=n, seed=args.seed)
                    result["growth"].append({"num_calib": n, "quantization_only": q})
                    print(f"growth {n}: quantization stages alone: peak RSS {q['peak_rss_mb']} MB", flush=True)
                save(args.out, result)
                break
            ref = float_reference(model, info, args.data, args.num_calib, args.seed)
            cost = calibration_cost_apart(name, weights, args.data, num_calib=args.num_calib, seed=args.seed)
            print(f"{name} calibration in-process: {json.dumps(cost)}", flush=True)
            if args.calibration_only:
                ref.pop("batches")
                result["models"].append({"model": name, "float": ref, "calibration": cost})
                save(args.out, result)
                continue
            common = dict(num_calib=args.num_calib, eval_limit=args.eval_limit, seed=args.seed)
            runs = [timed_job(model, ref, name, weights, args.data, work, recipe="best", **common),
                    timed_job(model, ref, name, weights, args.data, work, recipe="stock", **common)]
            if i == 0:
                runs.append(timed_job(model, ref, name, weights, args.data, work, recipe="best",
                                      extra=("--bias-correction-images", "512"), **common))
            # the pair runs again in the other order and the time ratio pools both orders (when the in-process
            # measurement ran in this process, the first job after it ran slower: see calibration_cost_apart)
            again = [] if args.one_order else [
                timed_job(model, ref, name, weights, args.data, work, recipe=r, **common) for r in ("stock", "best")]
            ref.pop("batches")
            del model
            result["models"].append({"model": name, "float": ref, "calibration": cost, "runs": runs,
                                     "ratios": ratios(runs[0], runs[1])})
            if again:
                m = result["models"][-1]
                m["again"] = again
                m["ratios_stock_first"] = ratios(again[1], again[0])
                m["quant_default_over_stock_both_orders"] = round(
                    (runs[0]["quant_seconds"] + again[1]["quant_seconds"]) /
                    (runs[1]["quant_seconds"] + again[0]["quant_seconds"]), 2)
            print(f"{name}: {json.dumps(result['models'][-1]['ratios'])}", flush=True)
            if i == 0:
                for n in growth:
                    g = runs[0] if n == args.num_calib else job(name, weights, args.data, work, recipe="best",
                                                                  num_calib=n, eval_limit=args.eval_limit, seed=args.seed)
                    g["quantization_only"] = quantization_peak(name, weights, args.data, num_calib=n, seed=args.seed)
                    result["growth"].append(g)
                    print(f"growth {n}: peak RSS {g['peak_rss_mb']} MB (quantization stages alone: "
                          f"{g['quantization_only']['peak_rss_mb']} MB)", flush=True)
            save(args.out, result)                  # after every model: a later failure keeps what was measured
        if args.trained and not (args.calibration_only or args.growth_only):
            common = dict(num_calib=args.num_calib, eval_limit=None, seed=args.seed)
            model = checkpoints.manifest()["checkpoints"][args.trained]["model"]
            runs = [job(model, args.trained, args.data, work, recipe="best", **common),
                    job(model, args.trained, args.data, work, recipe="stock", **common),
                    job(model, args.trained, args.data, work, recipe="best", extra=("--bias-correction-images", "512"),
                        **common)]
            result["trained"] = {"checkpoint": args.trained, "runs": runs,
                                 "quant_default_over_stock": round(runs[0]["quant_seconds"] / runs[1]["quant_seconds"], 2),
                                 "rss_default_over_stock": round(runs[0]["peak_rss_mb"] / runs[1]["peak_rss_mb"], 2)}
            save(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
