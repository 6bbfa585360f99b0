"""An accuracy budget (``--max-drop PP --fallback auto``): the fewest blocks kept in fp32 that bring the paired
top-1 drop within the budget, on backends whose row allows float layers.

1. **Units** are the model's blocks: the second level of its module names (``features.3``, ``layer2.1``,
   ``classifier.1``), those holding a quantized conv or linear. Kept in float (:mod:`mbquant.quant.keep_float`),
   a block's weights and arithmetic are fp32 and the activations inside it are no longer quantized; its input and
   an output it hands to INT8 ops still are. A single conv kept alone would keep both of its activations
   quantized and gain almost nothing (measured on the phone checkpoint: every conv's weights in fp32 together
   left agreement where it was), so the unit is the block.
2. **Held-out slice**: labelled images of the calibration folder that neither calibration nor evaluation uses
   (seeded, class-stratified): the search never looks at the images that confirm it.
3. **Rank**: each unit is put back in float in one converted graph (the recipe without bias correction, whose
   per-layer corrections would be stale once a block upstream changes), and ranked by how much closer the
   logits come to the float model's (mean squared logit error on the first ``RANK_IMAGES`` of the slice). One
   forward pass of those images per unit; no calibration.
4. **Search** with real probes (the whole recipe with the first k ranked units kept in float: prepare,
   calibrate, convert, bias correction) measured on the slice: k = 0, then 1, 2, 4, ... until a probe meets the
   budget, then bisection between the last that did not and the first that did (the drop is assumed to fall
   as k grows; every probe is reported: the curve of accuracy against units kept).
5. The chosen probe's INT8 model is the one written; the run's ``--max-drop`` gate then confirms the budget on
   the written artifact over the evaluation images.

Cost: one quantization without bias correction, one pass of ``RANK_IMAGES`` per unit, and about
``2 log2(units)`` quantizations plus slice evaluations (at 64 px: seconds each; at 224 px width 1.0: minutes).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node

from .config import QuantConfig
from .data.dataset import ImageFolderDataset, make_loader
from .errors import ConfigError
from .data.slicing import stratified_indices
from .evaluate import compare
from .quant.bias_correction import folded_reference
from .quant.export import FloatModel
from .quant.keep_float import in_layers, resolve_names
from .quant.layerwalk import attr
from .quant.ops import CONV_OPS, DEQUANTIZE_OPS, LINEAR_OPS, QUANTIZE_OPS, module_paths, weighted_layers
from .stats import paired

RANK_IMAGES = 256
MIN_SLICE = 200

__all__ = ["FallbackResult", "held_out", "search", "smallest_meeting", "units", "with_float_units",
           "with_float_weights"]


@dataclass
class FallbackResult:
    """What the search found and what it tried (``curve``: one entry per real probe, in the order run)."""

    budget_pp: float
    images: int
    slice_root: str
    ranking: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    met: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    without: Any = None            # the k = 0 probe (the recipe alone), for its program's size and latency

    def to_dict(self) -> dict[str, Any]:
        kept_params = sum(r["params"] for r in self.ranking if r["unit"] in self.kept)
        return {"budget_pp": self.budget_pp, "images": self.images, "slice_root": self.slice_root,
                "kept": list(self.kept), "met_on_slice": self.met, "units": len(self.ranking),
                "kept_params": kept_params, "weight_bytes_added": 3 * kept_params,
                "ranking": self.ranking, "curve": sorted(self.curve, key=lambda c: c["kept"]),
                "seconds": round(self.seconds, 1), "notes": list(self.notes)}


def _unit(node: Node) -> str:
    paths = [p for p in module_paths(node) if p]
    return paths[1] if len(paths) > 1 else (paths[0] if paths else "")


def units(int8: GraphModule, already: tuple[str, ...] = ()) -> list[str]:
    """The blocks of a converted graph that hold a quantized conv/linear (weight dequantized in the graph) and
    are not among the layers ``already`` kept in float, in graph order."""
    out: list[str] = []
    for n in weighted_layers(int8):
        w = n.args[1] if len(n.args) > 1 else None
        quantized = isinstance(w, Node) and w.op == "call_function" and w.target in DEQUANTIZE_OPS
        u = _unit(n)
        if quantized and u and u not in out and not in_layers(n, already):
            out.append(u)
    return out


def with_float_units(int8: GraphModule, reference: GraphModule, kept: tuple[str, ...]) -> GraphModule:
    """A copy of the converted graph ``int8`` with the blocks ``kept`` in float, as the quantizer would build
    them: their convs/linears take the float weights and biases of ``reference`` (the float graph with BN
    folded, node names as in ``int8``), and a quantize -> dequantize between two ops of the kept blocks is
    removed; quantization at their borders stays."""
    gm = with_float_weights(int8, reference, kept)
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in QUANTIZE_OPS and not in_layers(n, kept) and _internal(n, kept):
            for d in list(n.users):
                d.replace_all_uses_with(n.args[0])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def with_float_weights(int8: GraphModule, reference: GraphModule, kept: tuple[str, ...]) -> GraphModule:
    """A copy of the converted graph ``int8`` whose convs/linears in the blocks ``kept`` take the float weights
    and biases of ``reference`` (the float graph with BN folded, node names as in ``int8``); every activation
    quantize stays where it is."""
    gm = copy.deepcopy(int8)
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    for i, n in enumerate(list(gm.graph.nodes)):
        if n.op != "call_function" or n.target not in CONV_OPS | LINEAR_OPS or not in_layers(n, kept):
            continue
        r = ref_nodes.get(n.name)
        if r is None:
            raise ConfigError(f"--fallback auto: layer {n.name} of the INT8 graph has no float counterpart; run "
                              f"without --fallback or name layers with --keep-float")
        for k in (1, 2):
            src = r.args[k] if len(r.args) > k else None
            if isinstance(src, Node) and src.op == "get_attr" and len(n.args) > k and isinstance(n.args[k], Node):
                name = f"_mbquant_float_{i}_{k}"
                gm.register_buffer(name, attr(reference, src.target).detach().clone())
                with gm.graph.inserting_before(n):
                    n.replace_input_with(n.args[k], gm.graph.get_attr(name))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _internal(q: Node, kept: tuple[str, ...]) -> bool:
    """A quantize of an activation made and read only inside the kept blocks."""
    src = q.args[0]
    if not (isinstance(src, Node) and src.op != "get_attr" and in_layers(src, kept)) or not q.users:
        return False
    return all(d.op == "call_function" and d.target in DEQUANTIZE_OPS and d.users and
               all(u.op != "output" and in_layers(u, kept) for u in d.users) for d in q.users)


def held_out(calib, eval_set: ImageFolderDataset, count: int, seed: int) -> ImageFolderDataset:
    """``count`` labelled images of the calibration folder used neither for calibration nor for evaluation
    (seeded, class-stratified); a ConfigError names the fix when the folder has too few."""
    from .data.folders import scan_folder

    samples, classes = scan_folder(calib.root, allow_unlabeled=True)
    if not classes:
        raise ConfigError(f"--fallback auto measures the drop on labelled images, but the calibration folder "
                          f"'{calib.root}' has no class subfolders; pass --calib a labelled ImageFolder")
    used = {Path(s.path).resolve() for s in calib.dataset.samples} | {Path(s.path).resolve() for s in eval_set.samples}
    free = [s for s in samples if Path(s.path).resolve() not in used]
    if len(free) < min(count, MIN_SLICE):
        raise ConfigError(f"--fallback auto needs at least {min(count, MIN_SLICE)} labelled images of the calibration "
                          f"folder '{calib.root}' that calibration and evaluation do not use, found {len(free)}; pass "
                          f"--eval a different folder, a smaller --num-calib or --eval-limit, or a larger --calib folder")
    idx = stratified_indices([s.label for s in free], min(count, len(free)), seed)
    return ImageFolderDataset([free[i] for i in idx], classes, calib.dataset.spec, max_pixels=calib.dataset.max_pixels)


def smallest_meeting(meets: Callable[[int], bool], n: int) -> int | None:
    """The smallest k in 0..n with ``meets(k)``, assuming it holds from some k on: k = 0, 1, 2, 4, ... (n last),
    then bisection between the last k that failed and the first that held. None when not even n meets."""
    if meets(0):
        return 0
    lo, k = 0, 1
    while True:
        k = min(k, n)
        if meets(k):
            break
        if k == n:
            return None
        lo, k = k, 2 * k
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _logits(predictor: Callable, xs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([predictor(x).float() for x in xs])


def search(quantize: Callable[[QuantConfig], Any], reference: Callable[[GraphModule], Callable], fm: FloatModel,
           config: QuantConfig, slice_set: ImageFolderDataset, *, budget: float, batch_size: int = 100,
           progress: bool = False) -> tuple[Any, FallbackResult]:
    """Run the search (module doc). ``quantize(config)`` quantizes the float model with a resolved config (a
    :class:`~mbquant.pipeline.Quantized`); ``reference(int8)`` is the backend's in-process predictor for a
    converted graph; ``fm`` is the float model (its exported graph gives the float logits). Returns the chosen probe's Quantized (its config
    keeps the chosen blocks in float) and the result."""
    from tqdm import tqdm

    started = time.perf_counter()
    root = str(Path(slice_set.samples[0].path).parents[1]) if slice_set.samples else ""
    result = FallbackResult(budget, 0, root)
    already = config.keep_float or ()

    float_model = fm.graph
    base = quantize(replace(config, bias_correction=False))
    source = base.source if base.source is not None else fm        # the equalized copy when the recipe equalizes
    candidates = units(base.int8, resolve_names(already, fm.module, fm.graph))
    ref = folded_reference(source.graph)
    rank_idx = stratified_indices([s.label for s in slice_set.samples], min(RANK_IMAGES, len(slice_set)), 0)
    xs = [b[0] for b in make_loader(slice_set.subset(rank_idx), 64) if b is not None]
    want = _logits(float_model, xs)
    base_err = float(((_logits(reference(base.int8), xs) - want) ** 2).mean())
    params = {u: sum(int(attr(ref, a.target).numel()) for n in weighted_layers(ref) if in_layers(n, (u,))
                     for a in n.args[1:3] if isinstance(a, Node) and a.op == "get_attr") for u in candidates}
    for u in tqdm(candidates, desc="fallback: rank blocks", disable=not progress, leave=False):
        err = float(((_logits(reference(with_float_units(base.int8, ref, (u,))), xs) - want) ** 2).mean())
        result.ranking.append({"unit": u, "logit_mse": round(err, 6), "gain": round(base_err - err, 6),
                               "params": params[u]})
    result.ranking.sort(key=lambda r: -r["gain"])
    order = [r["unit"] for r in result.ranking]
    del base

    float_preds = None
    probes: dict[int, tuple[Any, dict]] = {}

    def measure(k: int) -> bool:
        nonlocal float_preds
        t = time.perf_counter()
        q = quantize(replace(config, keep_float=tuple(already) + tuple(order[:k])))
        preds = {"probe": reference(q.int8)}
        if float_preds is None:
            preds["float"] = float_model
        cmp = compare(preds, make_loader(slice_set, batch_size), progress=progress, desc=f"fallback: {k} in float")
        if float_preds is None:
            float_preds = (cmp.labels, cmp.preds["float"])
            result.images = cmp.count
        labels, fp = float_preds
        d = paired(fp == labels, cmp.preds["probe"] == labels)
        entry = {"kept": k, "units": order[:k], "drop_pp": round(d.diff_pp, 3), "se_pp": round(d.se_pp, 3),
                 "agreement": round(100.0 * float((cmp.preds["probe"] == fp).float().mean()), 3),
                 "seconds": round(time.perf_counter() - t, 1)}
        entry["meets"] = entry["drop_pp"] <= budget + 1e-9
        result.curve.append(entry)
        probes[k] = (q, entry)
        keep = min((j for j in probes if probes[j][1]["meets"]), default=None)
        for j in probes:        # only the smallest probe that meets (and k = 0) keep their models in memory
            if j not in (keep, 0):
                probes[j] = (None, probes[j][1])
        return entry["meets"]

    k = smallest_meeting(measure, len(order))
    result.met = k is not None
    if k is None:
        k = min(probes, key=lambda j: (probes[j][1]["drop_pp"], j))
        result.notes.append(f"no number of blocks kept in float brought the drop on the slice within {budget:g} pp "
                            f"(all {len(order)}: {probes[len(order)][1]['drop_pp']:.3f} pp); the probe with the "
                            f"lowest drop ({k} blocks) is written and the --max-drop gate judges it")
    se = probes[0][1]["se_pp"]
    if result.images and budget < max(se, 100.0 / result.images):
        result.notes.append(f"--max-drop {budget:g} pp is below what the {result.images}-image slice resolves (one image "
                            f"= {100.0 / result.images:.3f} pp; standard error of the recipe's drop there {se:.3f} pp): "
                            f"which number of blocks meets it is decided by a few images; the --max-drop gate on "
                            f"the written artifact judges the result (more --fallback-images narrow the slice's error)")
    chosen = probes[k][0]
    if chosen is None:
        chosen = quantize(replace(config, keep_float=tuple(already) + tuple(order[:k])))
    result.kept = order[:k]
    result.without = probes[0][0] if k else None
    result.seconds = time.perf_counter() - started
    return chosen, result
