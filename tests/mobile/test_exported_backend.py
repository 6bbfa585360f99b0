"""A new backend is one folder and one row: tests/mobile/exported (torch.export.save/.load) is registered by this
test alone and goes through `ptq`, `check`, `report` (with its own sweep variants) and the baselines machinery, with
its own option, gate and summary line, without any edit in mbquant."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from mbquant.cli import main
from mbquant.errors import ConfigError
from mbquant.mobile import table
from tests.mobile.exported import ROW

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registered():
    table.register(ROW)
    yield ROW
    table.unregister(ROW.name)


@pytest.fixture(scope="module")
def exported_run(registered, tiny_ckpt, tmp_path_factory):
    root, ck = tiny_ckpt
    out = tmp_path_factory.mktemp("exported") / "run"
    rc = main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval", str(root / "val"),
               "--num-calib", "32", "--format", "pt2", "--latency-runs", "1", "--max-program-kb", "10000", "--out",
               str(out), "--quiet"])
    assert rc == 0
    return root, ck, out


def test_ptq_builds_verifies_and_reports_the_new_backend(exported_run, capsys):
    root, ck, out = exported_run
    rep = json.loads((out / "report.json").read_text())
    (art,) = rep["artifacts"]
    assert art["backend"] == "test-exported" and art["file"].endswith(".pt2") and art["images"] == 100
    assert art["runtime"].startswith("torch.export.load") and art["parity"]["agreement"] == 100.0
    assert art["summary"] == [f"{art['file']}: an ExportedProgram of {art['bytes']:,} B (test backend)"]
    assert rep["run"]["options"] == {"max_program_kb": 10000.0}
    assert main(["report", str(out), "--recipes", "default", "--quiet"]) == 0
    assert [p["recipe"] for p in json.loads((out / "recipes.json").read_text())["points"]] == ["stock", "best"]


def test_check_and_baselines_open_the_new_backends_file(exported_run, tmp_path, capsys):
    root, ck, out = exported_run
    (pt2,) = out.glob("*.pt2")
    base = tmp_path / "baseline.json"
    assert main(["baseline", "write", str(pt2), "--data", str(root / "val"), "--float-weights", str(ck),
                 "--tolerance", "0.5", "--out", str(base), "--quiet"]) == 0
    assert main(["check", str(pt2), "--data", str(root / "val"), "--baseline", str(base)]) == 0
    assert "test-exported, mobilenet_v1 w0.25 32x32" in capsys.readouterr().out


def test_its_own_gate_and_option(registered, tiny_ckpt, tmp_path, capsys):
    root, ck = tiny_ckpt
    argv = ["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval", str(root / "val"),
            "--num-calib", "16", "--eval-limit", "100", "--latency-runs", "1", "--quiet", "--out", str(tmp_path / "r")]
    assert main([*argv, "--format", "pt2", "--max-program-kb", "1"]) == 1
    assert re.search(r"B is over --max-program-kb 1", capsys.readouterr().err)
    assert main([*argv, "--max-program-kb", "1"]) == 2          # the phone's pte backend takes no such option
    assert "--max-program-kb applies to backend test-exported, which this run does not build" in \
        capsys.readouterr().err


def test_a_second_default_for_a_pair_is_refused_and_backend_picks_by_name(registered):
    clash = dataclasses.replace(ROW, name="test-clash", format="pte", options=())
    with pytest.raises(ConfigError, match="would both be the default for --target phone --format pte; register "
                                          "'test-clash' with default=False"):
        table.register(clash)
    table.register(dataclasses.replace(clash, default=False))
    try:
        assert [s.name for s in table.select("phone", ("pte",))] == ["pte-xnnpack"]
        assert [s.name for s in table.select(None, (), ("test-clash",))] == ["test-clash"]
        with pytest.raises(ConfigError, match="builds for phone, x86, not --target mcu"):
            table.select("mcu", (), ("test-clash",))
    finally:
        table.unregister("test-clash")
