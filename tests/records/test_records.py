"""Every file mbquant reads is a typed record whose reader validates it: NaN, wrong types, missing keys and absurd
sizes are refused with a message naming the file, the key and the fix; format-1 files still read (or say why not);
every record round-trips through its writer."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from mbquant.records import (Baseline, BundleManifest, PreprocessSpec, RecordError, RunReport, Sidecar, Sweep, kind_of,
                             read_labels)

MODEL = {"name": "mobilenet_v2", "num_classes": 3, "width_mult": 0.5, "resolution": 64,
         "preset": {"kind": "small", "resolution": 64, "mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3], "resize": 64},
         "classes": ["a", "b", "c"], "weights": "w.pth", "weights_sha256": "0" * 64}
PAIRED = {"images": 100, "only_a": 2, "only_b": 1, "diff_pp": 1.0, "se_pp": 1.7, "ci95_pp": [-2.0, 4.0]}
PREPROCESS = {"format": "mbquant-preprocess/1",
              "input": {"shape": [1, 3, 64, 64], "layout": "NCHW", "dtype": "float32", "channel_order": "RGB"},
              "color": {"mode": "grayscale"}, "resize": {"policy": "stretch", "size": [64, 64]},
              "scale": 1 / 255, "mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}
ARTIFACT = {"backend": "pte-xnnpack", "file": "m_int8.pte", "bytes": 1000, "runtime": "rt", "images": 100,
            "top1": 90.0, "top5": 99.0, "drop_pp": 1.0, "agreement_float": 98.0, "reference_top1": 90.0,
            "reference_agreement_float": 98.0,
            "parity": {"agreement": 99.0, "max_abs_logit_diff": 0.5, "flips": {"count": 1},
                       "top1_reference_minus_artifact": PAIRED, "agreement_float_reference_minus_artifact": PAIRED},
            "drop_paired": PAIRED, "delegated": 1.0, "latency": None, "details": {}, "sha256": "a" * 64, "summary": []}
REPORT = {"format": "mbquant-report/2", "command": "mbquant ptq mobilenet_v2", "status": "ok", "failures": [],
          "warnings": [], "notes": [], "model": MODEL, "config": {"recipe": "best"}, "run": {"target": "phone"},
          "host": {"cpu": "x"},
          "data": {"calibration": {"root": "d", "requested": 8, "selected": 8, "available": 9, "seed": 0,
                                   "stratified": True, "labelled": True},
                   "eval_root": "v", "eval_images": 100, "calibration_digest": "0" * 16, "eval_digest": "1" * 16},
          "backends": {"pte-xnnpack": {"layer_sqnr_all": []}}, "seconds": {"calibrate": 1.0},
          "float": {"images": 100, "top1": 91.0, "top5": 99.0}, "artifacts": [ARTIFACT], "versions": {}}
SIDECAR = {"format": "mbquant-sidecar/2", "artifact": "m_int8.pte", "backend": "pte-xnnpack", "runtime": "rt",
           "sha256": "a" * 64, "model": MODEL, "config": {}, "preprocess": PREPROCESS, "classes": ["a", "b", "c"],
           "input_shape": [1, 3, 64, 64], "calibration_digest": "0" * 16, "eval_digest": "1" * 16,
           "measured": {"images": 100, "top1": 90.0, "drop_pp": 1.0, "agreement_float": 98.0, "parity": 99.0},
           "details": {}, "versions": {}}
BASELINE = {"format": "mbquant-baseline/2", "artifact": "m.pte", "artifact_sha256": "a" * 64, "data": "v",
            "limit": 100, "images": 100, "eval_digest": "1" * 16, "top1": 90.0, "float_top1": 91.0, "drop_pp": 1.0,
            "drop_ci95": [-1.0, 3.0], "agreement": 98.0, "tolerance_pp": 0.3, "tolerance_why": "spreads",
            "measured_by": "this check", "host": "x", "created": "2026-11-30"}
MANIFEST = {"format": "mbquant-bundle/1", "backend": "pte-xnnpack", "program": "model.pte",
            "files": {"model.pte": "a" * 64, "labels.txt": "b" * 64}, "input_shape": [1, 3, 64, 64], "classes": 3,
            "source_run": "r", "source_artifact": "m_int8.pte", "created": "2026-11-30"}
POINT = {"num_calib": 32, "config": {}, "calibration_images": 32, "images": 100, "float_top1": 91.0, "top1": 90.0,
         "drop_pp": 1.0, "drop_ci95": [-1.0, 3.0], "agreement": 98.0, "seconds": 2.0}
SWEEP = {"format": "mbquant-sweep/2", "kind": "calibration", "run": "r", "backend": "pte-xnnpack", "model": MODEL,
         "eval_images": 100, "eval_digest": "1" * 16, "measured": "in-process", "host": {}, "created": "",
         "points": [POINT]}

RECORDS = {"report": (RunReport, REPORT), "sidecar": (Sidecar, SIDECAR), "baseline": (Baseline, BASELINE),
           "manifest": (BundleManifest, MANIFEST), "preprocess": (PreprocessSpec, PREPROCESS), "sweep": (Sweep, SWEEP)}

NAN = float("nan")
# (record, dotted key, value or DELETE) -> the key the message must name
DELETE = object()
CASES = [
    ("report", "artifacts.0.top1", NAN), ("report", "artifacts.0.top1", "90"), ("report", "artifacts.0.top1", 190.0),
    ("report", "artifacts.0.images", 10 ** 12), ("report", "status", DELETE), ("report", "status", "maybe"),
    ("report", "model.num_classes", 10 ** 9), ("report", "model.classes", ["a"]), ("report", "model.preset.std",
                                                                                   [0.3, 0.0, 0.3]),
    ("report", "model.preset.resolution", 10 ** 6), ("report", "data.eval_digest", "zz"),
    ("report", "float", DELETE), ("report", "artifacts.0.parity.top1_reference_minus_artifact.only_a", 500),
    ("report", "artifacts.0.drop_paired.diff_pp", 7.0), ("report", "seconds", {"x": -1}),
    ("report", "warnings", "one string"), ("report", "artifacts", [ARTIFACT] * 65),
    ("sidecar", "backend", DELETE), ("sidecar", "preprocess.mean", [NAN, 0.2, 0.2]),
    ("sidecar", "preprocess.std", [0.3, -1, 0.3]), ("sidecar", "input_shape", [1, 3, 32, 32]),
    ("sidecar", "classes", ["a", "b"]), ("sidecar", "model.width_mult", 400.0), ("sidecar", "sha256", 12),
    ("sidecar", "measured.top1", NAN),
    ("baseline", "tolerance_pp", NAN), ("baseline", "tolerance_pp", -5.0), ("baseline", "top1", "high"),
    ("baseline", "images", 0), ("baseline", "eval_digest", DELETE), ("baseline", "drop_ci95", [1.0]),
    ("baseline", "agreement", None),
    ("manifest", "program", "other.pte"), ("manifest", "files", {}), ("manifest", "input_shape", [1, 3, 9999, 64]),
    ("manifest", "classes", 0), ("manifest", "files.model.pte", "not-hex"),
    ("preprocess", "input.shape", [1, 3, 64]), ("preprocess", "color.mode", "cmyk"), ("preprocess", "mean", [1e9] * 3),
    ("preprocess", "resize.policy", DELETE), ("preprocess", "std", [1, 2, "3"]),
    ("sweep", "points", []), ("sweep", "points.0.calibration_images", 100), ("sweep", "points.0.top1", NAN),
    ("sweep", "eval_images", -1),
]


def _set(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    keys = dotted.split(".")
    if keys[0] == "files" and len(keys) > 2:          # a file name with a dot
        keys = [keys[0], ".".join(keys[1:])]
    obj = doc
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = keys[-1]
    if value is DELETE:
        del obj[last]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value
    return doc


def _write(tmp_path: Path, doc, name: str = "record.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))      # NaN is written as the literal NaN, as a careless writer would
    return path


@pytest.mark.parametrize("name", RECORDS)
def test_every_record_round_trips_through_its_writer(name, tmp_path):
    cls, doc = RECORDS[name]
    rec = cls.read(_write(tmp_path, doc))
    again = cls.read(rec.write(tmp_path / "again.json"))
    assert again == rec and kind_of(tmp_path / "again.json") == cls.KIND


@pytest.mark.parametrize("name,key,value", CASES, ids=[f"{n}:{k}={'missing' if v is DELETE else v!r}"[:60]
                                                       for n, k, v in CASES])
def test_bad_values_are_refused_naming_the_file_and_the_key(name, key, value, tmp_path):
    cls, doc = RECORDS[name]
    path = _write(tmp_path, _set(doc, key, value))
    with pytest.raises(RecordError) as e:
        cls.read(path)
    msg = str(e.value)
    assert str(path) in msg and ";" in msg, msg                       # the file, then the fix
    leaf = key.split(".")[-1] if not key.startswith("files.") else "files"
    has_nan = any(isinstance(v, float) and math.isnan(v) for v in (value if isinstance(value, list) else [value]))
    named = leaf in msg or (has_nan and "NaN is not a JSON number" in msg) or \
        key.split(".")[0] in msg or "status is ok but" in msg or "class count" in msg
    assert named, msg


def test_absurd_files_are_refused_before_parsing(tmp_path):
    big = tmp_path / "huge.json"
    with open(big, "wb") as f:
        f.write(b'{"pad": "')
        f.seek(65 << 20)
        f.write(b'"}')
    with pytest.raises(RecordError, match=r"'.*huge.json' is [\d,]+ bytes, more than any mbquant record"):
        RunReport.read(big)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RecordError, match="is not valid JSON"):
        Baseline.read(tmp_path / "bin.json")
    (tmp_path / "deep.json").write_text(json.dumps(_set(REPORT, "config", json.loads("[" * 40 + "]" * 40))))
    with pytest.raises(RecordError, match="nested deeper than 32 levels"):
        RunReport.read(tmp_path / "deep.json")


def test_other_kinds_and_versions_are_named(tmp_path):
    with pytest.raises(RecordError, match=r"is not a baseline \(format 'mbquant-report/2', expected "
                                          r"mbquant-baseline/2\); write one with `mbquant baseline write`"):
        Baseline.read(_write(tmp_path, REPORT))
    with pytest.raises(RecordError, match=r"has format mbquant-report/9, which this mbquant does not read \(it reads "
                                          r"mbquant-report/1, mbquant-report/2\)"):
        RunReport.read(_write(tmp_path, {**REPORT, "format": "mbquant-report/9"}))
    assert kind_of(_write(tmp_path, [1, 2])) is None and kind_of(tmp_path / "missing.json") is None


def test_format_1_files_still_read(tmp_path):
    """Reports and sidecars written before the records module (no format key; sidecars held the preset)."""
    old = {k: v for k, v in REPORT.items() if k not in ("format", "notes")}
    old["artifacts"] = [{k: v for k, v in ARTIFACT.items() if k not in ("sha256", "summary")}]
    rep = RunReport.read(_write(tmp_path, old))
    assert rep.artifacts[0].sha256 is None and rep.notes == ()
    side = {k: v for k, v in SIDECAR.items() if k not in ("format", "preprocess", "sha256")}
    side["preset"] = MODEL["preset"]
    rec = Sidecar.read(_write(tmp_path, side, "old.pte.json"))
    assert rec.preprocess == PreprocessSpec.read(_write(tmp_path, PREPROCESS, "p.json")) and rec.sha256 is None
    base = {**BASELINE, "format": "mbquant-baseline/1"}
    assert Baseline.read(_write(tmp_path, base)).top1 == 90.0


def test_labels_are_checked(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("a\nb\nc\n")
    assert read_labels(p, expected=3) == ["a", "b", "c"]
    p.write_text("a\nb\n")
    with pytest.raises(RecordError, match="hold 2 class names but the model has 3 outputs"):
        read_labels(p, expected=3)
    p.write_text("a\na\nb\n")
    with pytest.raises(RecordError, match="name 'a' twice"):
        read_labels(p)
    p.write_text("x" * 500 + "\n")
    with pytest.raises(RecordError, match="a class name of 500 characters"):
        read_labels(p)
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(RecordError, match="not UTF-8"):
        read_labels(p)
    p.write_text("\n\n")
    with pytest.raises(RecordError, match="hold no class name"):
        read_labels(p)
