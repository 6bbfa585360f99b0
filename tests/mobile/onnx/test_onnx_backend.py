"""The ``onnx-qdq`` backend: a QDQ ONNX model written, checked, opened from its file by ONNX Runtime and measured
like every other artifact (parity against the INT8 module, sidecar, check, bundle refusal), and a clear refusal
when the optional extra is missing."""
from __future__ import annotations

import json

import pytest

from mbquant.cli import main
from mbquant.mobile import table
from tests.conftest import needs

pytestmark = pytest.mark.usefixtures("one_thread")


def _have_onnx() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def onnx_run(tiny_ckpt, tmp_path_factory):
    needs("onnx", _have_onnx(), "pip install -e '.[onnx]'")
    root, ck = tiny_ckpt
    out = tmp_path_factory.mktemp("onnx") / "run"
    rc = main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--eval", str(root / "val"),
               "--num-calib", "32", "--format", "pte,onnx", "--latency-runs", "2", "--no-float-program", "--out", str(out),
               "--quiet"])
    assert rc == 0
    return root, ck, out


@pytest.mark.slow   # the dynamo ONNX export and a .pte in one run: 40 s
def test_pte_and_onnx_are_written_verified_and_reported_in_one_run(onnx_run):
    import onnx

    root, ck, out = onnx_run
    rep = json.loads((out / "report.json").read_text())
    arts = {a["backend"]: a for a in rep["artifacts"]}
    assert set(arts) == {"pte-xnnpack", "onnx-qdq"}
    a = arts["onnx-qdq"]
    assert a["file"].endswith("_int8.onnx") and a["runtime"].startswith("ONNX Runtime") and a["images"] == 100
    assert a["details"]["opset"] == 21 and a["latency"]["median_ms"] > 0
    # the graph is QDQ: every conv is fed by DequantizeLinear, BN folded, ReLU6 as Clip
    model = onnx.load(str(out / a["file"]))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 27 and ops.count("QuantizeLinear") > 20
    assert "Clip" in ops or "Relu" in ops
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(produced.get(n.input[0]) == "DequantizeLinear" and produced.get(n.input[1]) == "DequantizeLinear"
               for n in convs)
    # parity with the INT8 module it was written from: ORT's fused INT8 kernels round differently from the module's
    # float arithmetic, which flips low-margin images of this tiny model; the paired parity gate judged it (status ok)
    assert a["parity"]["agreement"] >= 90.0 and rep["status"] == "ok" and not rep["failures"]
    side = json.loads((out / f"{a['file']}.json").read_text())
    assert side["backend"] == "onnx-qdq" and side["sha256"] == a["sha256"]
    assert any("QDQ graph" in line for line in a["summary"])


@pytest.mark.slow   # the dynamo ONNX export and a .pte in one run: 40 s
def test_check_reproduces_the_reports_onnx_figures(onnx_run, capsys):
    root, ck, out = onnx_run
    (model,) = out.glob("*_int8.onnx")
    rep = json.loads((out / "report.json").read_text())
    a = next(a for a in rep["artifacts"] if a["backend"] == "onnx-qdq")
    assert main(["check", str(model), "--data", str(root / "val"), "--float-weights", str(ck), "--max-drop", "50",
                 "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["top1"] == a["top1"] and verdict["images"] == a["images"]


@pytest.mark.slow   # the dynamo ONNX export and a .pte in one run: 40 s
def test_a_truncated_onnx_file_fails_check(onnx_run, tmp_path, capsys):
    import shutil

    root, ck, out = onnx_run
    (model,) = out.glob("*_int8.onnx")
    bad = tmp_path / model.name
    shutil.copy(model, bad)
    shutil.copy(out / f"{model.name}.json", tmp_path / f"{model.name}.json")
    bad.write_bytes(bad.read_bytes()[:1000])
    assert main(["check", str(bad), "--data", str(root / "val"), "--float-weights", str(ck), "--max-drop", "1"]) != 0
    assert "ONNX Runtime could not load" in capsys.readouterr().err


def test_without_the_extra_the_format_is_refused_before_any_work(tiny_ckpt, tmp_path, monkeypatch, capsys):
    root, ck = tiny_ckpt
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    rc = main(["ptq", "mobilenet_v1", "--weights", str(ck), "--calib", str(root / "train"), "--format", "onnx",
               "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 2 and not (tmp_path / "r").exists()
    err = capsys.readouterr().err
    assert "backend 'onnx-qdq' needs onnxruntime" in err and "pip install 'mbquant[onnx]'" in err


def test_the_row_declares_what_the_backend_can_do():
    spec = table.get_spec("onnx-qdq")
    assert spec.format == "onnx" and "phone" in spec.targets and "x86" in spec.targets and spec.suffixes == (".onnx",)
    assert spec.requires == ("onnx", "onnxscript", "onnxruntime") and not spec.bundle
