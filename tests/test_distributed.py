"""Scale-out: `torchrun --nproc_per_node=2 -m mbquant qat` on CPU (gloo), a tiny model and 220 real images."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mbquant.distributed import Dist, from_env


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = from_env()
    assert d == Dist() and d.is_main and not d.active
    assert d.all_sum([1.0, 2.0]) == [1.0, 2.0] and d.shard(5) == [0, 1, 2, 3, 4]
    assert Dist(rank=1, world=2).shard(5) == [1, 3]


@pytest.mark.slow
def test_torchrun_two_processes_reduce_metrics_and_only_rank0_writes(tiny_ckpt, tmp_path):
    root, ck = tiny_ckpt
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "mbquant", "qat", "mobilenet_v1", "--weights", str(ck), "--data", str(root), "--epochs", "1",
           "--batch-size", "16", "--num-calib", "32", "--no-float-program", "--latency-runs", "2",
           "--out", str(out), "--json", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    qat = report["qat"]
    assert qat["world_size"] == 2 and qat["backend"] == "gloo"
    # 120 training images: 60 per rank, 3 whole batches of 16 each -> 96 images per epoch over both ranks
    assert [r["train_images"] for r in qat["history"]] == [96]
    assert all(r["val_images"] == 100 for r in qat["history"])  # every val image counted once over both shards
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["qat_last.pt", "report.json", "mobilenet_v1_w0.25_r32_int8.pte", "mobilenet_v1_w0.25_r32_int8.pte.json"])
    assert report["backends"]["pte-xnnpack"]["batch_norm"] == 0 and report["artifacts"][0]["delegated"] == 1.0
    assert proc.stdout.count('"command"') == 1  # only rank 0 reports
