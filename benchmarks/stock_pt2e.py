"""The stock PT2E flow, as ExecuTorch's and torchao's documentation show it, timed stage by stage: the baseline of
mbquant's overhead and gains in `benchmarks/suite.py` (which runs it in its own process, for its peak RSS).

    python benchmarks/stock_pt2e.py --checkpoint X.pth --images images.json --out model.pte --result result.json

torch.export -> XNNPACKQuantizer (symmetric, per-channel weights) -> prepare_pt2e -> real calibration -> convert_pt2e
-> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte; then the .pte's top-1 on the evaluation images with
ExecuTorch's runtime. No fusion of ReLU6, no bias correction, no float classifier, no verification. ``images.json``
(written by the suite) lists the calibration and evaluation images mbquant used, so both flows see the same images;
they are decoded here with torchvision as the checkpoint's preset says (grayscale to 3 channels, resize, normalize).
Only the float model is built with mbquant (MobileNetV1 is not in torchvision); nothing else of mbquant runs.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T


def _timed(seconds: dict, stage: str, fn):
    t = time.perf_counter()
    out = fn()
    seconds[stage] = round(time.perf_counter() - t, 3)
    return out


def _batches(paths: list[str], transform, batch: int):
    for i in range(0, len(paths), batch):
        yield torch.stack([transform(Image.open(p)) for p in paths[i:i + batch]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True, help='{"calibration": [...], "eval": [[path, label], ...]}')
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mbquant.models import load_checkpoint       # the float model only

    model, info = load_checkpoint(args.checkpoint)
    p = info.preset
    if p.kind != "small":
        raise SystemExit(f"{args.checkpoint}: this script decodes the 'small' preset (grayscale images) only")
    transform = T.Compose([T.Grayscale(num_output_channels=3), T.Resize((p.resolution, p.resolution), antialias=True),
                           T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(p.mean), list(p.std))])
    images = json.loads(args.images.read_text())
    x = torch.zeros(1, 3, p.resolution, p.resolution)
    seconds: dict[str, float] = {}
    ready = time.perf_counter() - t_start

    batch = torch.export.Dim("batch", min=1, max=1024)             # calibrate in batches, lower for batch 1
    m = _timed(seconds, "export", lambda: torch.export.export(model.eval(), (x.repeat(2, 1, 1, 1),),
                                                                        dynamic_shapes=({0: batch},)).module())
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    m = _timed(seconds, "prepare", lambda: prepare_pt2e(m, quantizer))

    def calibrate():
        with torch.no_grad():
            for b in _batches(images["calibration"], transform, 32):
                m(b)
    _timed(seconds, "calibrate", calibrate)
    m = _timed(seconds, "convert", lambda: convert_pt2e(m))

    def lower():
        et = to_edge_transform_and_lower(torch.export.export(m, (x,)),
                                         partitioner=[XnnpackPartitioner()]).to_executorch()
        args.out.write_bytes(et.buffer)
    _timed(seconds, "lower", lower)

    t = time.perf_counter()
    method = Runtime.get().load_program(args.out).load_method("forward")
    correct = 0
    paths, labels = [e[0] for e in images["eval"]], [e[1] for e in images["eval"]]
    seen = 0
    for b in _batches(paths, transform, 1):
        correct += int(method.execute([b])[0].argmax(1).item() == labels[seen])
        seen += 1
    eval_seconds = time.perf_counter() - t
    args.result.write_text(json.dumps({
        "seconds": seconds, "total_seconds": round(sum(seconds.values()), 3), "setup_seconds": round(ready, 3),
        "eval_seconds": round(eval_seconds, 3), "calibration_images": len(images["calibration"]),
        "images": seen, "top1": round(100.0 * correct / seen, 3), "bytes": args.out.stat().st_size,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
