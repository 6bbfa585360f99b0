"""Use mbquant from Python: the stages one by one, and the one-call shortcut.

    .venv/bin/python examples/python/quantize_api.py [data]

Needs the prepared Fashion-MNIST folder (`make data` or `mbquant data fashion-mnist data`).
"""
import sys
import tempfile
from pathlib import Path

import torch

import mbquant
from mbquant import calibrate
from mbquant.data import make_loader
from mbquant.evaluate import compare
from mbquant.mobile import PteModel, lower, write_pte
from mbquant.pipeline import load_eval_set

data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
torch.set_num_threads(2)

# 1. a float model and its metadata (preset, classes) from a shipped checkpoint
model, info = mbquant.create_with_info("mobilenet_v2", weights="mobilenet_v2_w0.35_r64_fmnist")

# 2. 256 real calibration images, seeded and stratified by class
calib = calibrate.from_folder(data / "train", info.preset, 256, seed=0, expected_classes=info.classes)

# 3. prepare -> calibrate -> convert in one call (each stage is public in mbquant.quant.ptq / mbquant.calibrate)
q = mbquant.quantize(model, calib, resolution=info.resolution, config=mbquant.QuantConfig(num_calib=256))
print(f"calibrated on {q.calibration.samples} images; {q.graph.fused_conv_relu6} conv-ReLU6 units fused; "
      f"{q.graph.batch_norm} batch_norm left")

# 4. lower to an XNNPACK program, write it atomically, load it back with the ExecuTorch runtime
with tempfile.TemporaryDirectory() as tmp:
    lowered = lower(q.int8, info.resolution)
    path = write_pte(lowered, Path(tmp) / "model_int8.pte")
    pte = PteModel(path)
    val = load_eval_set(data / "val", info, 1000)
    res = compare({"float": model, "int8_pte": pte}, make_loader(val, 100))
    print(f"{path.stat().st_size / 1024:.0f} KiB, {lowered.delegation.ratio:.1%} delegated; on {res.count} val images: "
          f"float {res.accuracy['float'].top1:.2f}%, INT8 .pte {res.accuracy['int8_pte'].top1:.2f}%, "
          f"agreement {res.agree('float', 'int8_pte'):.2f}%")
