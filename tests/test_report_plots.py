"""`mbquant report RUN_DIR`: the summary, the sweeps (calibration images, recipes) and the PNG plots."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from mbquant import sweep
from mbquant.cli import main
from mbquant.errors import ConfigError
from mbquant.records import Sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> bool:
    import matplotlib.image

    return path.read_bytes()[:8] == PNG and matplotlib.image.imread(path).shape[0] > 100


@pytest.fixture(scope="module")
def swept(degraded_run, tmp_path_factory):
    """A copy of the broken-quantization run (200 val images) with both sweeps measured on it."""
    pytest.importorskip("matplotlib")
    run = tmp_path_factory.mktemp("swept") / "run"
    shutil.copytree(degraded_run[0], run)
    lines = []
    cal = sweep.calibration_sweep(run, (16, 64), progress=lines.append)
    rec = sweep.recipe_sweep(run, ("per-tensor-stock", "per-tensor-best"), progress=lines.append)
    return run, cal, rec, lines


@pytest.fixture
def plain(phone_run, tmp_path):
    """A copy of the default recipe's phone run (no sweeps measured): what the refusals need, in make test."""
    run = tmp_path / "plain"
    shutil.copytree(phone_run[0], run)
    return run


@pytest.mark.slow
def test_calibration_sweep_measures_each_count_on_the_runs_images(swept, degraded_run):
    run, cal, _, lines = swept
    assert [p["num_calib"] for p in cal.points] == [16, 64]
    assert [p["calibration_images"] for p in cal.points] == [16, 64]
    assert all(p["images"] == 200 and p["config"]["granularity"] == "per-tensor" for p in cal.points)
    assert cal.eval_digest == degraded_run[1]["data"]["eval_digest"] and cal.kind == "calibration"
    assert Sweep.read(run / "calibration_sweep.json") == cal
    assert lines[0].startswith("calibration sweep: 16 images -> top-1")


@pytest.mark.slow
def test_recipe_sweep_shows_what_the_default_recipe_repairs(swept):
    """Per-tensor weights: the stock recipe loses tens of points, the default recipe's choices (ReLU6 fused,
    percentile ranges, fp32 classifier, bias correction) bring it back within a few."""
    _, _, rec, _ = swept
    stock, best = rec.points
    assert stock["recipe"] == "per-tensor-stock" and best["recipe"] == "per-tensor-best"
    assert stock["drop_pp"] > 10 and best["drop_pp"] < stock["drop_pp"] / 3
    assert best["config"]["bias_correction"] and best["config"]["keep_float"] == ["logits"]


@pytest.mark.slow
def test_report_plot_writes_the_three_pngs(swept, tmp_path, capsys):
    run = swept[0]
    assert main(["report", str(run), "--plot", "--plot-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == [".mbquant-plots", "calibration_sweep.png", "layer_sqnr.png", "recipes.png"]   # + its marker
    assert all(_png_ok(tmp_path / "plots" / n) for n in names[1:])
    assert "float model" in out and "plot written to" in out


def test_report_without_matplotlib_says_how_to_get_it_before_any_work(plain, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    run = plain
    rc = main(["report", str(run), "--plot", "--calibration-sweep", "32"])
    err = capsys.readouterr().err
    assert rc != 0 and "pip install 'mbquant[plot]'" in err
    assert not (run / "calibration_sweep.json").exists() and not (run / "plots").exists()


def test_report_and_sweep_errors_name_the_fix(flow_runs, tmp_path, capsys):
    qat_dir, _ = flow_runs.get("mobilenet_v2_w0.35_r64_fmnist.qat")
    with pytest.raises(ConfigError, match="is a QAT run; calibration and recipe sweeps measure PTQ"):
        sweep.calibration_sweep(qat_dir, (32,))
    assert main(["report", str(tmp_path)]) != 0
    assert "run report '" in capsys.readouterr().err
    assert main(["report", str(qat_dir), "--calibration-sweep", "a,b"]) != 0
    assert "--calibration-sweep 'a,b' is not a comma-separated list" in capsys.readouterr().err


def test_sweep_counts_and_recipes_that_cannot_be_met_are_refused(plain):
    """Issue 19: a count larger than the calibration folder is an error before any work (never plotted as if
    used); unknown variants name the backend's own list."""
    run = plain
    import json as _json

    rep = _json.loads((run / "report.json").read_text())
    have = rep["data"]["calibration"]["available"]
    with pytest.raises(ConfigError, match=f"holds {have} images; pass counts up to {have}"):
        sweep.calibration_sweep(run, (have + 1,))
    with pytest.raises(ConfigError, match="unknown recipes \\['no-such'\\] for backend 'pte-xnnpack'; known: stock"):
        sweep.recipe_sweep(run, ("no-such",))


def test_report_plot_never_overwrites_the_users_files(plain, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "layer_sqnr.png").write_bytes(b"my own picture")
    assert main(["report", str(plain), "--plot", "--plot-dir", str(mine)]) == 2
    assert "holds files mbquant did not write" in capsys.readouterr().err
    assert (mine / "layer_sqnr.png").read_bytes() == b"my own picture"
    again = tmp_path / "ours"
    assert main(["report", str(plain), "--plot", "--plot-dir", str(again), "--quiet"]) == 0
    assert main(["report", str(plain), "--plot", "--plot-dir", str(again), "--quiet"]) == 0   # its own: replaced
