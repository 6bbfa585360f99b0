"""`mbquant qat --target mcu`: CortexMQuantizer's patterns with fake-quantize specs of the PTQ numerics, trained on a
BN-folded graph, converted and lowered to the same cortex_m:: INT8 kernels, verified like PTQ's program."""
from __future__ import annotations

import json

import pytest
import torch

from mbquant.config import QuantConfig
from mbquant.mobile import table
from mbquant.models import create
from mbquant.quant.export import FloatModel
from mbquant.quant.qat import fake_quants

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_qat_graph_has_no_batch_norm_and_the_cortex_m_numerics():
    torch.manual_seed(0)
    fm = FloatModel(create("mobilenet_v1", num_classes=10, width_mult=0.25), 32)
    spec = table.get_spec("pte-cortex-m")
    backend = table.load(spec)
    qm = backend.prepare_qat(fm, table.resolve(QuantConfig(recipe="qat"), spec, qat=True))
    assert qm.bn_training_ops() == 0 and not any("batch_norm" in str(n.target) for n in qm.module.graph.nodes)
    fqs = fake_quants(qm.module)
    weights = [fq for fq in fqs.values() if fq.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric)]
    acts = [fq for fq in fqs.values() if fq.qscheme == torch.per_tensor_affine]
    assert sum(fq.qscheme == torch.per_channel_symmetric for fq in weights) == 27    # every conv: per-channel
    assert sum(fq.qscheme == torch.per_tensor_symmetric for fq in weights) == 1      # the linear: per-tensor
    assert acts and all((fq.quant_min, fq.quant_max, fq.dtype) == (-128, 127, torch.int8) for fq in acts + weights)


def test_qat_for_the_mcu_writes_a_verified_cortex_m_program(tiny_ckpt, tmp_path):
    from mbquant.cli import main

    root, ck = tiny_ckpt
    out = tmp_path / "run"
    rc = main(["qat", "mobilenet_v1", "--weights", str(ck), "--data", str(root), "--target", "mcu", "--epochs", "1",
               "--max-train-samples", "64", "--batch-size", "32", "--num-calib", "32", "--eval-limit", "100",
               "--int8-input", "--flash-kb", "300", "--ram-kb", "64", "--no-compare-ptq", "--out", str(out), "--quiet"])
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and rep["status"] == "ok", rep["failures"]
    (art,) = rep["artifacts"]
    assert art["backend"] == "pte-cortex-m" and art["details"]["non_int8_ops"] == []
    assert "cortex_m::quantized_conv2d.out" in art["details"]["operators"]
    assert art["details"]["memory"]["ram"]["arena_bytes"] <= 64 * 1024
    assert len(rep["qat"]["history"]) == 1                                       # one epoch, trained
    assert "versus_ptq" not in rep and "ptq_to_compare" not in rep["backends"]["pte-cortex-m"]["seconds"]
    assert (out / (art["file"][: -len(".pte")] + "_pte.h")).is_file()           # the firmware header, as PTQ
