"""The QAT loop: resume equivalence after a kill mid-epoch, checkpoint checks, schedule, CLI errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbquant.cli import main
from mbquant.config import QATConfig, QuantConfig
from mbquant.data.contract import spec_of
from mbquant.data.dataset import load_folder
from mbquant.errors import ConfigError, DataError
from mbquant.finetune import CHECKPOINT_NAME, fit_qat, load_qat_checkpoint, state_digest
from mbquant.mobile import table
from mbquant.models import ModelInfo, load_checkpoint
from tests.quant.test_qat import prepare_qat

QUANT = table.resolve(QuantConfig(recipe="qat", num_calib=32), table.get_spec("pte-xnnpack"), qat=True)
CFG = QATConfig(epochs=2, batch_size=16, lr=0.005, freeze_bn_after=1, freeze_observers_after=1, seed=3, distill=0.0)


class Killed(Exception):
    pass


def _run(tiny_ckpt, out: Path, *, kill_at=None, resume: bool = False):
    root, ck = tiny_ckpt
    model, info = load_checkpoint(ck)
    qg = prepare_qat(model, info.resolution, QUANT)
    ds = load_folder(root / "train", spec_of(info.preset), train=True)
    val = load_folder(root / "val", info.preset)
    checkpoint = None
    if resume:
        checkpoint = load_qat_checkpoint(out, info=info, float_digest=state_digest(model), quant=QUANT, config=CFG)
    else:
        qg.init_ranges(torch.stack([load_folder(root / "train", info.preset)[i][0] for i in range(32)]).split(16))

    def on_step(epoch: int, step: int) -> None:
        if (epoch, step) == kill_at:
            raise Killed

    result, warnings = fit_qat(qg, info, ds, val, config=CFG, quant=QUANT, float_digest=state_digest(model),
                               out_dir=out, resume=checkpoint, on_step=on_step, reference=model)
    return result, warnings, qg


@pytest.fixture(scope="module")
def straight(tiny_ckpt, tmp_path_factory):
    return _run(tiny_ckpt, tmp_path_factory.mktemp("straight"))


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_run(tiny_ckpt, straight, tmp_path):
    with pytest.raises(Killed):
        _run(tiny_ckpt, tmp_path, kill_at=(1, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # atomic: no temp file left
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    resumed, warnings, qg = _run(tiny_ckpt, tmp_path, resume=True)
    ref, _, ref_qg = straight
    assert resumed.resumed_from_epoch == 1 and warnings == []
    assert _strip(resumed.history) == _strip(ref.history)
    ours, theirs = qg.module.state_dict(), ref_qg.module.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    final = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert final["epoch"] == 2 and final["history"][-1]["val_top1"] == ref.history[-1]["val_top1"]


def test_history_records_the_schedule_and_reduced_metrics(straight):
    result, _, qg = straight
    h = result.history
    assert [r["epoch"] for r in h] == [1, 2]
    assert [r["bn_frozen"] for r in h] == [False, True] and [r["observers_frozen"] for r in h] == [False, True]
    assert h[0]["train_images"] == 320 and h[0]["val_images"] == 100  # 400 images less 80 held out, batches of 16
    assert qg.bn_frozen and qg.observers_frozen and h[1]["lr"] < h[0]["lr"]


def test_keep_best_chooses_on_held_out_images_and_ends_in_the_kept_state(straight):
    """keep="best": a fifth of the training folder is held out (never trained on); the start and every epoch are
    measured on it, the first best is kept (the start wins ties), and the model ends in exactly that state."""
    result, _, qg = straight
    scores = [result.start_agreement] + [row["held_out_agreement"] for row in result.history]
    assert result.held_out_images == 80 and all(0 <= a <= 100 for a in scores)
    assert result.selected_epoch == scores.index(max(scores))
    best = torch.load(result.checkpoint, weights_only=True)["best"]
    assert best["epoch"] == result.selected_epoch and best["start_agreement"] == result.start_agreement
    state = qg.module.state_dict()
    assert state.keys() == best["state_dict"].keys()
    assert all(torch.equal(state[k], best["state_dict"][k]) for k in state)


def test_held_out_images_are_a_seeded_draw_the_training_never_sees(tiny_ckpt):
    from mbquant.finetune import split_training

    root, _ = tiny_ckpt
    ds = load_folder(root / "train", spec_of(load_checkpoint(tiny_ckpt[1])[1].preset), train=True)
    train, held = split_training(ds, QATConfig(select_images=50, max_train_samples=200, seed=1))
    trained = {ds.samples[i].path for i in train.indices}
    assert len(held) == 50 and len(trained) == 200 and not trained & {s.path for s in held.samples}
    assert held.train is False and ds.train is True              # measured as evaluated: no augmentation
    again = split_training(ds, QATConfig(select_images=50, max_train_samples=200, seed=1))[1]
    assert [s.path for s in again.samples] == [s.path for s in held.samples]
    assert split_training(ds, QATConfig(keep="last"))[1] is None
    with pytest.raises(DataError, match=r"has 400 images: too few to hold out 390 .* --keep last"):
        split_training(ds, QATConfig(select_images=390, batch_size=16))
    # the calibration images (the start's ranges and bias correction) are never held out; still trained on
    calib = [s.path for s in held.samples[:20]] + [ds.samples[i].path for i in train.indices[:5]]
    train2, held2 = split_training(ds, QATConfig(select_images=50, max_train_samples=200, seed=1), calib)
    assert len(held2) == 50 and not {s.path.resolve() for s in held2.samples} & {p.resolve() for p in calib}
    assert [s.path for s in held2.samples[:30]] == [s.path for s in held.samples[20:]]    # the same draw, skipping
    assert not {ds.samples[i].path for i in train2.indices} & {s.path for s in held2.samples}
    with pytest.raises(DataError, match=r"has 380 images besides the calibration images: too few to hold out 390"):
        split_training(ds, QATConfig(select_images=390, batch_size=8), calib[:20])


def test_resume_rejects_another_model_other_weights_and_other_flags(tiny_ckpt, straight):
    ck_dir = Path(straight[0].checkpoint).parent
    model, info = load_checkpoint(tiny_ckpt[1])
    digest = state_digest(model)
    other = ModelInfo("mobilenet_v2", info.num_classes, 0.35, info.preset, info.classes)
    with pytest.raises(ConfigError, match=r"QAT checkpoint of mobilenet_v1 \(width 0.25, 32x32.*this run is mobilenet_v2"):
        load_qat_checkpoint(ck_dir, info=other, float_digest=digest, quant=QUANT, config=CFG)
    with pytest.raises(ConfigError, match="other float weights"):
        load_qat_checkpoint(ck_dir, info=info, float_digest="0" * 16, quant=QUANT, config=CFG)
    with pytest.raises(ConfigError, match="granularity"):
        load_qat_checkpoint(ck_dir, info=info, float_digest=digest, quant=QUANT.replace(granularity="per-tensor"),
                            config=CFG)
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        load_qat_checkpoint(ck_dir, info=info, float_digest=digest, quant=QUANT, config=QATConfig(**{**CFG.to_dict(), "epochs": 1}))
    with pytest.raises(ConfigError, match="not an mbquant QAT checkpoint"):
        load_qat_checkpoint(tiny_ckpt[1], info=info, float_digest=digest, quant=QUANT, config=CFG)
    with pytest.raises(ConfigError, match="has no qat_last.pt"):
        load_qat_checkpoint(ck_dir / "nope.pt", info=info, float_digest=digest, quant=QUANT, config=CFG)


def test_cli_bad_input_fails_clearly_before_any_work(tiny_ckpt, straight, tmp_path, capsys):
    root, ck = tiny_ckpt
    base = ["qat", "mobilenet_v1", "--data", str(root), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base) == 2
    assert "pass --weights" in capsys.readouterr().err
    assert main([*base, "--weights", str(ck), "--epochs", "0"]) == 2
    assert "--epochs 0 is invalid; pass a value in [1, 100000]" in capsys.readouterr().err
    assert main([*base, "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    v2 = ["qat", "mobilenet_v2", "--weights", "mobilenet_v2_w0.35_r64_fmnist", "--data", str(root), "--quiet"]
    assert main([*v2, "--out", str(tmp_path / "o"), "--resume", straight[0].checkpoint]) == 2
    assert "QAT checkpoint of mobilenet_v1" in capsys.readouterr().err
    assert main([*base, "--weights", str(ck), "--format", "pte,torchscript"]) == 2
    assert "QAT trains one model for one engine" in capsys.readouterr().err
    assert main([*base, "--weights", str(ck), "--freeze-bn-after", "-1"]) == 2
    assert "freeze_bn_after (a number of epochs, or never) -1 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_distillation_loss_mixes_labels_and_the_float_teacher():
    from mbquant.train import TrainLoss

    teacher = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    same = teacher(x).detach()
    ce = torch.nn.functional.cross_entropy(same, y)
    assert torch.isclose(TrainLoss(None, 0.0, 1.0)(same, x, y), ce)
    assert float(TrainLoss(teacher, 1.0, 2.0)(same, x, y)) == pytest.approx(0.0, abs=1e-6)  # matches the teacher
    assert torch.isclose(TrainLoss(teacher, 0.5, 1.0)(same, x, y), 0.5 * ce, atol=1e-6)
    far = torch.zeros(8, 3, requires_grad=True)
    TrainLoss(teacher, 1.0, 1.0)(far, x, y).backward()
    assert torch.equal(far.grad.argmin(1), same.argmax(1))  # the step moves toward the teacher's top class
    with pytest.raises(ConfigError, match=r"distill weight 1.5 is out of range \[0.0, 1.0\]"):
        QATConfig(distill=1.5)


def test_qat_torchscript_trains_the_eager_engine_and_verifies_pt_ptl(tiny_ckpt, tmp_path, capsys):
    import json

    root, ck = tiny_ckpt
    out = tmp_path / "ts"
    rc = main(["qat", "mobilenet_v1", "--weights", str(ck), "--data", str(root), "--epochs", "1", "--batch-size", "16",
               "--num-calib", "32", "--format", "torchscript", "--latency-runs", "2", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["qat"]["history"][0]["train_images"] == 320     # 400 less the 80 held out to choose the state
    arts = {a["file"]: a for a in rep["artifacts"]}
    assert sorted(arts) == ["mobilenet_v1_w0.25_r32_int8.pt", "mobilenet_v1_w0.25_r32_int8.ptl"]
    assert all(a["backend"] == "ts-qnnpack" and a["parity"]["agreement"] >= 99 for a in arts.values())
    assert rep["backends"]["ts-qnnpack"]["engine"] == "qnnpack" and (out / CHECKPOINT_NAME).exists()
    # the post-training INT8 model of the same checkpoint, measured on the same images, and the verdict said
    v = rep["versus_ptq"]["ts-qnnpack"]
    a = arts["mobilenet_v1_w0.25_r32_int8.pt"]
    assert v["images"] == a["images"] == 100 and v["ptq_config"]["recipe"] == "best"
    assert v["qat"]["agreement_float"] == a["reference_agreement_float"]
    d = v["qat_minus_ptq"]["agreement"]
    assert d["diff_pp"] == pytest.approx(v["qat"]["agreement_float"] - v["ptq"]["agreement_float"], abs=1e-3)
    assert v["qat_worse"] is (d["ci95_pp"][1] < 0)         # significantly fewer images, not a tie within noise
    said = rep["warnings"] if v["qat_worse"] else rep["notes"]
    assert any("post-training quantization of the same checkpoint" in line for line in said)
    assert rep["backends"]["ts-qnnpack"]["calibration"]["observer"] == "histogram"   # the recipe's ranges
