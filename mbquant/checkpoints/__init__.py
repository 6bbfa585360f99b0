"""Float checkpoints shipped with mbquant (trained with `mbquant train` on Fashion-MNIST).

``manifest.json`` beside this file records, for each, the exact command, seed and measured accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def manifest() -> dict:
    path = HERE / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"checkpoints": {}, "defaults": {}}


def shipped_names() -> list[str]:
    return list(manifest()["checkpoints"])


def resolve_shipped(name: str) -> Path | None:
    """The path of a shipped checkpoint given its name (``mobilenet_v2_w0.5_r64_fmnist``), else None."""
    entry = manifest()["checkpoints"].get(name)
    return HERE / entry["file"] if entry else None


def default_for(model: str) -> str | None:
    """The shipped checkpoint used when ``model`` is named without ``--weights``."""
    return manifest()["defaults"].get(model)
