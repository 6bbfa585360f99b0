"""Scale-out: `torchrun --nproc_per_node=2 -m mbquant qat`, `... ptq` and `... check` on CPU (gloo), a tiny model and
220 real images; the merge of sharded evaluations."""
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
    # 400 training images less 80 held out to choose the state: 160 per rank, 10 whole batches of 16 -> 320
    assert [r["train_images"] for r in qat["history"]] == [320] and qat["held_out_images"] == 80
    assert all(r["val_images"] == 100 for r in qat["history"])  # every val image counted once over both shards
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["qat_last.pt", "report.json", "mobilenet_v1_w0.25_r32_int8.pte", "mobilenet_v1_w0.25_r32_int8.pte.json"])
    assert report["backends"]["pte-xnnpack"]["batch_norm"] == 0 and report["artifacts"][0]["delegated"] == 1.0
    assert proc.stdout.count('"command"') == 1  # only rank 0 reports


def test_merged_shards_equal_one_pass(small_val):
    """The per-image outcomes of disjoint shards, merged, are those of one pass in dataset order."""
    import torch

    from mbquant.data import small_preset
    from mbquant.data.dataset import load_folder
    from mbquant.evaluate import compare_dataset, merge

    ds = load_folder(small_val, small_preset(32))
    w = torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0))
    preds = {"a": lambda x: x.flatten(1) @ w.T, "b": lambda x: (x.flatten(1) @ w.T).round()}
    whole = compare_dataset(preds, ds, 7)
    parts = []
    for rank in range(3):
        idx = Dist(rank=rank, world=3).shard(len(ds))
        parts.append((idx, compare_dataset(preds, ds.subset(idx), 5)))
    merged = merge(parts)
    assert merged.count == whole.count == len(ds) and torch.equal(merged.labels, whole.labels)
    for n in preds:
        assert torch.equal(merged.preds[n], whole.preds[n]) and torch.equal(merged.margins[n], whole.margins[n])
        assert torch.equal(merged.in_top5[n], whole.in_top5[n])
    assert torch.equal(merged.max_abs_diff[("a", "b")], whole.max_abs_diff[("a", "b")])
    assert merged.paired_accuracy("a", "b") == whole.paired_accuracy("a", "b")
    assert set(whole.seconds) == set(merged.seconds) == {"a", "b"} and all(v >= 0 for v in whole.seconds.values())


def test_ranks_that_built_different_programs_are_refused(tmp_path):
    from types import SimpleNamespace

    from mbquant.errors import VerificationError
    from mbquant.pipeline import same_programs

    class TwoRanks(Dist):
        def gather(self, obj):
            return [obj, ["0" * 64]]

    f = tmp_path / "m_int8.pte"
    f.write_bytes(b"program")
    built = [SimpleNamespace(files=[(SimpleNamespace(path=f), None)])]
    with pytest.raises(VerificationError, match=r"the 2 ranks built different programs \(m_int8.pte\)"):
        same_programs(built, TwoRanks(rank=0, world=2))
    same_programs(built, Dist())                                                 # one process: nothing to compare


@pytest.mark.slow
def test_torchrun_shards_ptq_and_check_evaluation_with_identical_numbers(tiny_ckpt, tmp_path):
    """`torchrun --nproc_per_node=2 -m mbquant ptq` and `... check` give one process's numbers; rank 0 alone writes.
    The two ranks decode their shards in a worker process each (`--decode-workers 1`), the one process in itself."""
    import shutil

    root, ck = tiny_ckpt
    val = tmp_path / "val"
    shutil.copytree(root / "val", val)
    first = sorted(p for p in val.iterdir() if p.is_dir())[0]
    (first / "broken.png").write_bytes(b"not an image")                # an unreadable image lands in one shard
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518"]
    ptq = ["-m", "mbquant", "ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval",
           str(val), "--num-calib", "32", "--no-float-program", "--latency-runs", "2", "--threads", "1", "--json"]

    def run(cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run([sys.executable, *ptq, "--out", str(tmp_path / "one")])
    proc = run([*torchrun, *ptq, "--decode-workers", "1", "--out", str(tmp_path / "two")])
    assert proc.stdout.count('"command"') == 1                                   # only rank 0 reports
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    a1, a2 = one["artifacts"][0], two["artifacts"][0]
    assert a1["images"] == 100 and a1["sha256"] == a2["sha256"]
    for key in ("images", "top1", "top5", "drop_pp", "agreement_float", "drop_paired", "reference_top1",
                "reference_agreement_float", "parity"):
        assert a1[key] == a2[key], key
    assert {k: one["float"][k] for k in ("images", "top1", "top5")} == {k: two["float"][k] for k in ("images", "top1", "top5")}
    assert any("1 unreadable evaluation images" in w for w in two["warnings"])

    pte = tmp_path / "two" / a2["file"]
    proc = run([*torchrun, "-m", "mbquant", "check", str(pte), "--data", str(val), "--float-weights", str(ck),
                "--max-drop", "50", "--json", "--threads", "1", "--decode-workers", "1"])
    verdict = json.loads(proc.stdout)
    assert proc.stdout.count('"artifact"') == 1
    assert (verdict["images"], verdict["top1"], verdict["drop_pp"], verdict["agreement"]) == \
        (a1["images"], a1["top1"], a1["drop_pp"], a1["agreement_float"])
