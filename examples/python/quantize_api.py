"""Use mbquant from Python: the one-call shortcut, then the artifact written and checked with its runtime.

    .venv/bin/python examples/python/quantize_api.py [data]

Needs the prepared Fashion-MNIST folder (`make data` or `mbquant data fashion-mnist data`).
"""
import sys
import tempfile
from pathlib import Path

import torch

import mbquant
from mbquant.data.dataset import eval_set, make_loader
from mbquant.evaluate import compare
from mbquant.mobile import table

data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
torch.set_num_threads(2)

# 1. a float model and its metadata (preset, classes) from a shipped checkpoint
model, info = mbquant.create_with_info("mobilenet_v2", weights="mobilenet_v2_w0.35_r64_fmnist")

# 2. prepare -> calibrate on 256 seeded, class-stratified real images -> convert (-> bias correction): the best
#    measured recipe for the XNNPACK backend unless the config says otherwise
q = mbquant.quantize(model, data / "train", info=info, config=mbquant.QuantConfig(num_calib=256))
print(f"calibrated on {q.calibration.samples} images with {q.config.observer} observers; "
      f"{q.bias_correction.layers_corrected} biases corrected; stages {q.seconds}")

# 3. the backend writes the program atomically and opens it from the file with the ExecuTorch runtime
backend = table.load("pte-xnnpack")
with tempfile.TemporaryDirectory() as tmp:
    (written,) = backend.write(q.int8, Path(tmp) / "model_int8", resolution=info.resolution)
    pte = backend.open(written.path, None)
    val = eval_set(data / "val", info.preset, classes=info.classes, limit=1000)
    res = compare({"float": model, "int8_pte": pte}, make_loader(val, 100))
    print(f"{written.bytes / 1024:.0f} KiB, {written.delegated:.1%} delegated; on {res.count} val images: "
          f"float {res.top1('float'):.2f}%, INT8 .pte {res.top1('int8_pte'):.2f}%, "
          f"agreement {res.agree('float', 'int8_pte'):.2f}%")
