"""Every private torch/torchao/ExecuTorch API mbquant uses is reached through mbquant.compat, and each has a probe
that exercises the behaviour mbquant relies on; an upgrade that moves one fails here, naming the package and its
version, instead of silently changing what mbquant computes."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from mbquant import compat

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("probe", compat.PROBES, ids=[p.api for p in compat.PROBES])
def test_each_private_api_still_behaves_as_relied_on(probe):
    assert compat.run_probe(probe) is None


def test_a_failing_probe_names_the_package_version_and_the_fix():
    broken = compat.Probe("something._renamed", "torch", lambda: (_ for _ in ()).throw(AttributeError("gone")))
    msg = compat.run_probe(broken)
    assert re.match(r"torch \d+\.\d+\.\d+.*: something._renamed no longer works as mbquant relies on it "
                    r"\(AttributeError: gone\); mbquant pins torch==2.14.1", msg)


def test_the_percentile_observer_really_uses_its_percentile():
    """If the hook stopped being called, the percentile observer would silently be a histogram observer."""
    import torch
    from torchao.quantization.pt2e import HistogramObserver

    from mbquant.calibrate.observers import percentile_observer

    x = torch.cat([torch.linspace(0, 1, 100_000), torch.tensor([50.0])])
    hist, pct = HistogramObserver(dtype=torch.int8, quant_min=-128, quant_max=127), \
        percentile_observer(HistogramObserver)(percentile=99.9, dtype=torch.int8, quant_min=-128, quant_max=127)
    hist(x), pct(x)
    assert pct.calculate_qparams()[0] < hist.calculate_qparams()[0] / 5     # the outlier is clipped


THIRD_PARTY = ("torch", "torchao", "executorch")


def _private_uses(path: Path) -> list[str]:
    """Imports of private third-party modules or names, and attribute chains rooted in torch/torchao/executorch
    that reach a private name (``torch.jit.mobile._load...``), found in the code (not in strings)."""
    import ast

    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
            private = [a.name for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in node.module.split(".")) or private:
                out.append(f"{path}:{node.lineno}: from {node.module} import {', '.join(private) or '...'}")
        elif isinstance(node, ast.Import):
            out += [f"{path}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] in THIRD_PARTY and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in THIRD_PARTY and not node.attr.startswith("_native_batch_norm"):
                out.append(f"{path}:{node.lineno}: .{node.attr}")
    return out


def test_no_private_third_party_api_outside_compat():
    """No module but mbquant/compat.py imports or reaches a private torch/torchao/ExecuTorch name (aten op names such
    as ``aten._native_batch_norm_legit_no_training`` are the op registry, not Python API)."""
    hits = [h for p in sorted((REPO / "mbquant").rglob("*.py")) if p.name != "compat.py" for h in _private_uses(p)]
    assert hits == [], "\n".join(hits)
    assert _private_uses(REPO / "mbquant" / "compat.py")        # the check finds them where they are


@pytest.mark.slow   # 20 s; an equivalence check of a time-only memo (make test-slow)
def test_pattern_graphs_exported_once_give_the_same_int8_graph_and_rng(calib32, monkeypatch):
    """The memo of torchao's pattern export changes nothing but time: the same INT8 graph, weights and outputs as
    exporting every pattern each time, and the global RNG stream left where it was (QAT and tests draw from it)."""
    import contextlib

    import torch

    from mbquant.models import create
    from tests.conftest import quantize_pt2e

    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    outs = []
    for cached in (False, True, True):
        if not cached:
            monkeypatch.setattr(compat, "pattern_graphs_once", contextlib.nullcontext)
        else:
            monkeypatch.undo()
        torch.manual_seed(0)
        int8 = quantize_pt2e(model, 32, calib32, observer="minmax").int8
        outs.append((int8.code, int8.state_dict(), torch.get_rng_state()))
    (code0, sd0, rng0), *rest = outs
    for code, sd, rng in rest:
        assert code == code0 and sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd0)
        assert torch.equal(rng, rng0)
    name = compat.PATTERN_EXPORT
    import torchao.quantization.pt2e.utils as utils
    assert not hasattr(getattr(utils, name), "__wrapped__")      # restored after each quantization
