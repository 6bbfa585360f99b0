"""One records module: every file mbquant writes or reads, typed and versioned, with one writer and one reader
that validates (types, finite numbers, bounded sizes, consistent class lists) and names the file, the key, the
value and the fix. Path rules live in :mod:`.paths`. Torch-free.

    RunReport (report.json)  ArtifactResult, FloatResult     run.py
    Sidecar (<artifact>.json)                                  sidecar.py
    Baseline (mbquant baseline write)                          baseline.py
    BundleManifest (bundle.json)                               bundle.py
    PreprocessSpec (preprocess.json), labels.txt               preprocess.py
    Sweep (calibration_sweep.json, recipes.json)               sweep.py
    Verdict kind (mbquant check --out)                         this module
"""
from __future__ import annotations

from pathlib import Path

from . import paths
from .base import Fields, Record, RecordError, read_json
from .baseline import Baseline, check_tolerance
from .bundle import BundleManifest
from .preprocess import PreprocessSpec, labels_text, read_labels
from .run import ArtifactResult, DataSection, FloatResult, RunReport
from .sidecar import Sidecar
from .sweep import Sweep

VERDICT = "mbquant-verdict/1"   # `mbquant check --out`: written for CI, read back only to recognise it

__all__ = ["ArtifactResult", "Baseline", "BundleManifest", "DataSection", "Fields", "FloatResult", "PreprocessSpec",
           "Record", "RecordError", "RunReport", "Sidecar", "Sweep", "VERDICT", "check_tolerance", "kind_of",
           "labels_text", "paths", "read_json", "read_labels"]


def kind_of(path: Path | str) -> str | None:
    """The record kind (``mbquant-baseline``, ...) of a JSON file mbquant wrote, or None for anything else (a file
    that is not JSON, not an object, or has no mbquant ``format``). Used to recognise an earlier output before
    replacing it."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > (64 << 20):
            return None
        import json

        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    if isinstance(fmt, str) and fmt.startswith("mbquant-") and "/" in fmt:
        return fmt.rsplit("/", 1)[0]
    return None
