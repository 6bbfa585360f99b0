"""Evaluation with the images decoded in worker processes (``--decode-workers N``): images/s, in one run.

    python benchmarks/decode_workers.py [--model mobilenet_v2] [--images 600] [--workers 0,1,2] [--repeats 3]
                                        [--threads N] [--out benchmarks/results/decode_workers.json]

The same ``--images`` val images (class-stratified, seeded), in two forms:
  * ``png``: Fashion-MNIST's files as shipped (28x28 PNG: decoding them is almost free);
  * ``jpeg``: the same images resized to 500x375 and saved as JPEG (quality 90): the size and decode cost of an
    ImageNet val file (the content stays Fashion-MNIST);
each run through ``mbquant.evaluate.compare_dataset`` (the pass every job and ``mbquant check`` make) with the
float model (width 1.0, 224 px, ImageNet preprocessing, seeded random weights: this table is about time), batch 100,
once per worker count, interleaved in a rotating order, the fastest of ``--repeats``. Every worker count must give
the same predictions (checked). Also the decode cost per image in this process, for scale.

Prints a table and writes the JSON (with the host's CPU and ISA).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from _common import REPO
from mbquant.data.dataset import eval_set, load_folder
from mbquant.data.presets import imagenet_preset
from mbquant.evaluate import compare_dataset
from mbquant.models.load import create_with_info
from mbquant.report import format_table, host, library_versions

JPEG_SIZE, JPEG_QUALITY, BATCH = (500, 375), 90, 100


def as_jpeg(src, dst: Path) -> Path:
    """``src``'s images (an ImageFolderDataset) resized to JPEG_SIZE and saved as JPEG under ``dst/<class>/``."""
    for s in src.samples:
        out = dst / src.classes[s.label] / (s.path.stem + ".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(s.path) as im:
            im.convert("RGB").resize(JPEG_SIZE, Image.BICUBIC).save(out, quality=JPEG_QUALITY)
    return dst


def decode_ms(ds) -> float:
    """Decoding and preprocessing one image in this process (ms, mean over the set)."""
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return 1000 * (time.perf_counter() - t) / len(ds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the evaluating process (default: "
                    "torch's choice, one per core: then workers compete with the model for the cores)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode_workers.json")
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, info = create_with_info(args.model, num_classes=10)
    model = model.eval().to(memory_format=torch.channels_last)
    preset = imagenet_preset(args.resolution)
    predictors = {"float": lambda x: model(x.contiguous(memory_format=torch.channels_last))}
    pngs = eval_set(args.data / "val", preset, limit=args.images)
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        jpeg_root = as_jpeg(pngs, Path(tmp) / "jpeg")
        sets = {"png": lambda: eval_set(args.data / "val", preset, limit=args.images),
                "jpeg": lambda: load_folder(jpeg_root, preset)}
        for kind, fresh in sets.items():
            best = {w: float("inf") for w in counts}
            preds = {}
            for r in range(args.repeats):
                for w in counts[r % len(counts):] + counts[:r % len(counts)]:
                    ds = fresh()
                    t = time.perf_counter()
                    cmp = compare_dataset(predictors, ds, BATCH, workers=w)
                    best[w] = min(best[w], time.perf_counter() - t)
                    preds[w] = cmp.preds["float"]
            same = all(torch.equal(preds[w], preds[counts[0]]) for w in counts)
            if not same:
                raise SystemExit(f"{kind}: the worker counts gave different predictions")
            n = cmp.count
            results[kind] = {"images": n, "decode_ms_per_image_here": round(decode_ms(fresh()), 2),
                             "seconds": {str(w): round(best[w], 2) for w in counts},
                             "images_per_s": {str(w): round(n / best[w], 1) for w in counts},
                             "speedup_over_0": {str(w): round(best[counts[0]] / best[w], 2) for w in counts},
                             "same_predictions": same}
            for w in counts:
                rows.append((kind, str(w), f"{n / best[w]:.1f}", f"{best[counts[0]] / best[w]:.2f}",
                             f"{results[kind]['decode_ms_per_image_here']:.2f}"))
            print(f"[{kind}] done", flush=True)
    h = host()
    print(f"\nhost {h['cpu']} {' '.join(h['isa'])}; {args.model} w1.0 at {args.resolution} px, float model, "
          f"{torch.get_num_threads()} threads, batch {BATCH}\n")
    print(format_table(rows, ("images", "decode workers", "images/s", "speed-up over 0 workers",
                              "decode ms/image in one process")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "model": args.model, "resolution": args.resolution,
                                    "threads": torch.get_num_threads(), "host": h, "versions": library_versions()},
                                   indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
