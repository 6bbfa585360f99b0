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

**Where the INT8 flips come from** (``--seeds``, for the checkpoint and target each agreement target of issue 20
names: the phone checkpoint on the phone, V1 0.25 on the MCU): for each seeded calibration draw, the default
recipe's INT8 graph is measured as built and with one source of rounding changed at a time, in the same graph:

- *activations exact*: every activation quantize -> dequantize removed (weights and corrected biases INT8's);
- *activations clipped, not rounded*: each activation quantize -> dequantize replaced by a clamp to its float
  range: the observers' clipping without the rounding;
- *weights exact*: every quantized conv/linear given its float weight and bias (BN folded), activations INT8's;
- *activations at b bits* (``--bits``): every activation quantize keeps its range (the observers' ``[lo, hi]``)
  on a grid of ``2^b`` levels instead of 256, zero still exact; weights INT8's. At 8 bits this is the INT8 graph.

Each graph gets the recipe's bias correction made for it (the recipe is built without, then every variant is
corrected on the same calibration images as the recipe corrects on), so that a correction made for one kind of
rounding does not count as error in another.

The INT8 graph of each draw is also run on ``--held-out`` training images that no draw calibrated on: whether a
draw that flips fewer val images also flips fewer elsewhere (a better set of ranges) or was lucky on val.

Each row counts the val images whose top-1 differs from the float model's (mean, min and max over the draws), with
the RMS difference of the logits (the rounding noise that reaches the output).

Prints a table and writes benchmarks/results/agreement_jitter.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from _common import REPO
from mbquant import calibrate, checkpoints
from mbquant.config import QuantConfig, bias_correction_images
from mbquant.data.dataset import eval_set, make_loader
from mbquant.data.slicing import stratified_indices
from mbquant.fallback import units, with_float_weights
from mbquant.mobile import table
from mbquant.models import resolve_model
from mbquant.pipeline import quantize
from mbquant.quant.bias_correction import correct_biases, folded_reference
from mbquant.quant.fast_qdq import with_fast_qdq
from mbquant.report import format_table, host, library_versions

RESULTS = REPO / "benchmarks" / "results"
TARGETS = {"mobilenet_v2_w0.5_r64_fmnist": ("phone",), "mobilenet_v1_w0.25_r96_fmnist": ("phone", "mcu")}
DECOMPOSE = {"mobilenet_v2_w0.5_r64_fmnist": "phone", "mobilenet_v1_w0.25_r96_fmnist": "mcu"}   # issue 20's targets
AS_BUILT = "INT8 (8-bit activations and weights)"
_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQ = torch.ops.quantized_decomposed.dequantize_per_tensor.default


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


def activations_exact(int8, clip: bool = False):
    """A copy of the converted graph with every activation quantize -> dequantize removed (``clip``: replaced by
    a clamp to the quantize's float range, so only the rounding is gone)."""
    gm = copy.deepcopy(int8)
    for n in list(gm.graph.nodes):
        if n.target == _Q:
            x, scale, zp, qmin, qmax, _ = n.args
            if clip:
                with gm.graph.inserting_after(n):
                    x = gm.graph.call_function(torch.clamp, (x, (qmin - zp) * scale, (qmax - zp) * scale))
            for d in list(n.users):
                d.replace_all_uses_with(x)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def activations_at(int8, bits: int):
    """A copy of the converted graph whose activation quantizes keep their float range ``[(qmin - zp) s, (qmax -
    zp) s]`` on ``2^bits`` levels (int32 codes; the zero point rounded to an integer so zero stays exact)."""
    gm = copy.deepcopy(int8)
    top = 2 ** bits - 1
    for n in list(gm.graph.nodes):
        if n.target != _Q:
            continue
        x, scale, zp, qmin, qmax, _ = n.args
        step, zero = scale * (qmax - qmin) / top, round((zp - qmin) * top / (qmax - qmin))
        n.args = (x, step, zero, 0, top, torch.int32)
        for d in list(n.users):
            if d.target != _DQ:
                raise ValueError(f"{d.name} reads quantize {n.name} and is not a per-tensor dequantize")
            d.args = (n, step, zero, 0, top, torch.int32, *d.args[6:])
    gm.recompile()
    return gm


def held_out_images(data: Path, info, calibs, count: int) -> torch.Tensor:
    """``count`` training images (seeded, class-stratified) that none of the calibration draws ``calibs`` holds."""
    used = {s.path for c in calibs for s in c.dataset.samples}
    train = eval_set(data / "train", info.preset, classes=info.classes)
    free = train.subset([i for i, s in enumerate(train.samples) if s.path not in used])
    pick = free.subset(stratified_indices([s.label for s in free.samples], count, 12345))
    return torch.cat([b[0] for b in make_loader(pick, 500)])


def decompose(model, info, data: Path, target: str, seeds, bits, x: torch.Tensor, ref: torch.Tensor,
              held_out: int) -> dict:
    """Flips of the default recipe's INT8 graph with one source of rounding changed at a time (module doc), one
    calibration draw per seed; and the INT8 graph's flips on ``held_out`` training images no draw calibrated on."""
    flips: dict[str, list[int]] = {}
    rms: dict[str, list[float]] = {}
    calibs = [calibrate.from_folder(data / "train", info.preset, 512, seed=seed, expected_classes=list(info.classes))
              for seed in seeds]
    xh = held_out_images(data, info, calibs, held_out) if held_out else None
    ref_h = logits(model, xh) if held_out else None
    held: list[int] = []
    images = bias_correction_images(info.resolution)      # what the recipe's correction reads at this resolution
    for seed, calib in zip(seeds, calibs):
        q = quantize(model, calib, info=info, config=QuantConfig(seed=seed, bias_correction=False),
                     backend=table.select(target)[0].name)
        source = q.source.graph                 # the float model the backend quantized (equalized when it does)
        variants = {AS_BUILT: copy.deepcopy(q.int8),
                    "activations exact, INT8 weights": activations_exact(q.int8),
                    "activations clipped to their ranges, not rounded; INT8 weights": activations_exact(q.int8, True),
                    "weights exact, INT8 activations": with_float_weights(q.int8, folded_reference(source),
                                                                          tuple(units(q.int8)))}
        variants.update({f"activations at {b} bits, INT8 weights": activations_at(q.int8, b) for b in bits})
        for m in variants.values():           # the recipe's bias correction, made for each graph as it now rounds
            correct_biases(m, source, calib.source(q.config.batch_size, images))
        if held_out:
            held.append(row("held out", ref_h, logits(variants[AS_BUILT], xh))["flips"])
        for kind, m in variants.items():
            r = row(kind, ref, logits(m, x))
            flips.setdefault(kind, []).append(r["flips"])
            rms.setdefault(kind, []).append(r["logit_rms_change"])
        print(f"  seed {seed}: " + ", ".join(f"{k.split(',')[0]} {v[-1]}" for k, v in flips.items()), flush=True)
    n = len(x)
    return {"target": target, "seeds": list(seeds), "images": n,
            "held_out": {"images": held_out, "int8_flips": held, "val_int8_flips": flips[AS_BUILT]},
            "rows": [{"variant": k, "flips": v, "mean_flips": round(sum(v) / len(v), 1),
                      "mean_agreement": round(100 * (1 - sum(v) / len(v) / n), 2), "logit_rms_change": rms[k],
                      "mean_logit_rms_change": round(sum(rms[k]) / len(rms[k]), 4)} for k, v in flips.items()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--levels", nargs="+", type=float, default=(0.07, 0.25, 0.5, 1.0))
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--seeds", nargs="*", type=int, default=(0, 1, 2, 3, 4),
                    help="calibration draws for the decomposition (none: skip it)")
    ap.add_argument("--bits", nargs="+", type=int, default=(9, 10, 12))
    ap.add_argument("--held-out", type=int, default=20000,
                    help="training images no calibration draw uses, on which each draw's INT8 graph is also counted "
                         "(0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "agreement_jitter.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, table_rows, decomp_rows = {}, [], []
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
        if args.seeds and name in DECOMPOSE:
            part = decompose(model, info, args.data, DECOMPOSE[name], args.seeds, args.bits, x, ref,
                             args.held_out)
            results[name]["decomposition"] = part
            h = part["held_out"]
            if h["images"]:
                decomp_rows.append((name, part["target"], f"INT8, on {h['images']:,} held-out training images",
                                    f"{sum(h['int8_flips']) / len(h['int8_flips']):g}",
                                    f"{min(h['int8_flips'])}-{max(h['int8_flips'])}",
                                    f"{100 - 100 * sum(h['int8_flips']) / len(h['int8_flips']) / h['images']:.2f}",
                                    "-"))
            for r in part["rows"]:
                decomp_rows.append((name, part["target"], r["variant"], f"{r['mean_flips']:g}",
                                    f"{min(r['flips'])}-{max(r['flips'])}", f"{r['mean_agreement']:.2f}",
                                    f"{r['mean_logit_rms_change']:.4f}"))
        for r in rows:
            table_rows.append((name, r["perturbation"], str(r["flips"]), f"{r['agreement']:.2f}",
                               f"{r['logit_rms_change']:.4f}"))
        print(f"[{name}] done", flush=True)
    print(f"\nhost {host()['cpu']} {' '.join(host()['isa'])}; {len(x)} val images per row\n")
    print(format_table(table_rows, ("checkpoint", "model and perturbation", "top-1 flips", "agreement %",
                                    "logit RMS change")))
    if decomp_rows:
        print(f"\nwhere the flips come from: the default recipe, {len(args.seeds)} calibration draws\n")
        print(format_table(decomp_rows, ("checkpoint", "target", "graph", "top-1 flips, mean", "min-max",
                                         "agreement %, mean", "logit RMS change, mean")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "host": host(), "versions": library_versions(),
                                    "threads": args.threads}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
