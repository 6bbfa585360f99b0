"""``pte-xnnpack``: PT2E INT8 -> ExecuTorch program with the XNNPACK delegate (ARM phones).

pte.py (the Backend), quantizer.py (composed quantizer), lower.py (lowering, delegation, atomic write; import
``lower`` from there: the package attribute is the submodule),
runtime.py (PteModel, runtime threads), client.py (the torch-free reference client and the host/ARM C++ runners),
runner/pte_runner.cpp. This module imports nothing heavy, so the torch-free client can live in this folder.
"""
from __future__ import annotations

import importlib
from typing import Any

_API = {"XnnpackBackend": "pte", "PteModel": "runtime", "runtime_threads": "runtime", "Delegation": "lower",
        "Lowered": "lower", "delegation_of": "lower", "write_pte": "lower",
        "build_quantizer": "quantizer"}

__all__ = ["backend", *_API]


def backend(spec, options):
    """The row's backend object (the table calls this)."""
    from .pte import XnnpackBackend

    return XnnpackBackend(spec, options)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'mbquant.mobile.xnnpack' has no attribute '{name}'")
