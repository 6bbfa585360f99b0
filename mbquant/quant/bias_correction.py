"""Empirical bias correction of a converted INT8 graph (Nagel et al. 2019, as in NNCF's PTQ), in bounded memory.

Quantizing weights and inputs shifts the mean of each conv/linear output channel. mbquant measures that shift on
the calibration images, E[y_int8] - E[y_float], and subtracts it from the layer's float bias (or moves its INT32
bias on its grid; the backend requantizes the bias when it lowers the graph). Layers are corrected in graph order
and each correction sees the already-corrected layers before it. The float means come from one streaming pass of
the reference: the float graph with BN folded exactly as ``prepare_pt2e`` folds it (same node names).

How it runs, so that memory does not grow with the number of calibration images: the corrected layers cut the
graph into segments. A segment is evaluated batch by batch (one batch in memory at a time): the previous
corrected layer again with its corrected bias, the nodes up to the next corrected layer, and that layer once more
to measure its output's mean over all batches before its bias is corrected. Only the tensors a later segment reads
are kept between segments, in the dtype they have (the INT8 graph's activations cross segments as int8; a
dequantize is recomputed where it is used), in files of a temporary folder. Each layer is computed twice in all,
every other node once; the arithmetic is the same, batch for batch, as correcting with every activation of every
batch in memory, so the biases are the same.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx
from torch.fx import GraphModule, Node

from ..errors import QuantizationError
from .fast_qdq import fast
from .ops import CONV_OPS, DEQUANTIZE_OPS, LINEAR_OPS

Batches = Callable[[], Iterable[torch.Tensor]]


@dataclass
class BiasCorrectionResult:
    layers_corrected: int
    skipped_no_bias: list[str] = field(default_factory=list)
    max_abs_shift: float = 0.0
    samples: int = 0
    stored_bytes: int = 0            # the largest set of tensors kept between segments (in files)

    def to_dict(self) -> dict:
        return {"layers_corrected": self.layers_corrected, "skipped_no_bias": self.skipped_no_bias,
                "max_abs_shift": round(self.max_abs_shift, 6), "samples": self.samples,
                "stored_bytes": self.stored_bytes}


def folded_reference(float_gm: GraphModule) -> GraphModule:
    """A copy of the float exported graph with BN folded into the convs (node names as in the prepared graph)."""
    from ..compat import fuse_conv_bn

    ref = copy.deepcopy(float_gm)
    fuse_conv_bn(ref)
    ref.recompile()
    return ref


def channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(0, 2, 3)) if t.dim() == 4 else t.reshape(-1, t.shape[-1]).mean(0)


def _source(batches: Batches | Iterable[torch.Tensor]) -> Batches:
    if callable(batches):
        return batches
    kept = list(batches)
    return lambda: iter(kept)


def node_means(gm: GraphModule, names: set[str], batches: Batches | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel output means of the nodes ``names`` over ``batches`` (one streaming pass)."""
    sums: dict[str, torch.Tensor] = {}
    total = 0

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                sums[n.name] = sums.get(n.name, 0) + channel_mean(out.detach()) * out.shape[0]
            return out

    with torch.no_grad():
        for x in _source(batches)():
            Rec(gm).run(x)
            total += int(x.shape[0])
    return {k: v / total for k, v in sums.items()}


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _bias_update(gm: GraphModule, bias: Node | None) -> Callable[[torch.Tensor], None] | None:
    """How to subtract a per-channel shift from a layer's bias: a float bias (``get_attr``), or an INT32 bias
    dequantized in the graph (``dequantize(int32 get_attr, scale)``: the shift is rounded onto its grid, as the
    backend's kernel adds it). None when the layer has no bias to correct."""
    if not isinstance(bias, Node):
        return None
    if bias.op == "get_attr" and _attr(gm, bias.target).is_floating_point():
        t = _attr(gm, bias.target)
        return lambda shift: t.sub_(shift.to(t.dtype))
    if bias.op == "call_function" and bias.target in DEQUANTIZE_OPS and isinstance(bias.args[0], Node) \
            and bias.args[0].op == "get_attr":
        q = _attr(gm, bias.args[0].target)
        scale = bias.args[1]
        scale = _attr(gm, scale.target) if isinstance(scale, Node) else torch.tensor(float(scale))
        if q.dtype != torch.int32:
            return None

        def apply(shift: torch.Tensor) -> None:
            step = scale.to(torch.float64).reshape(-1) if scale.numel() > 1 else scale.to(torch.float64)
            q.sub_(torch.round(shift.to(torch.float64) / step).to(torch.int32))

        return apply
    return None


class BatchStore:
    """Per-batch tensors kept between segments, in one file per node in a temporary folder (memory holds one batch
    at a time). Strides are kept (a channels-last tensor comes back channels-last) and so is the dtype."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._index: dict[Node, list[tuple[int, int, tuple, torch.dtype, list[int]]]] = {}
        self._files: dict[Node, Any] = {}
        self.bytes = 0
        self.peak = 0

    def put(self, key: Node, t: torch.Tensor) -> None:
        t = t.detach()
        order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))        # physical (dense) order of dims
        physical = t.permute(order).contiguous()
        data = physical.numpy().tobytes() if physical.dtype != torch.bool else physical.to(torch.uint8).numpy().tobytes()
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = open(self.root / f"{len(self._files)}_{key.name}.bin", "w+b")
            self._index[key] = []
        offset = f.seek(0, 2)
        f.write(data)
        self._index[key].append((offset, len(data), tuple(physical.shape), t.dtype, order))
        self.bytes += len(data)
        self.peak = max(self.peak, self.bytes)

    def get(self, key: Node, b: int) -> torch.Tensor:
        offset, size, shape, dtype, order = self._index[key][b]
        f = self._files[key]
        f.flush()
        f.seek(offset)
        raw = bytearray(f.read(size))
        t = torch.frombuffer(raw, dtype=dtype if dtype != torch.bool else torch.uint8) if size else \
            torch.empty(0, dtype=dtype)
        t = t.reshape(shape).permute([order.index(d) for d in range(len(order))])
        return t.to(torch.bool) if dtype == torch.bool else t

    def __contains__(self, key: Node) -> bool:
        return key in self._index

    def drop(self, key: Node) -> None:
        f = self._files.pop(key, None)
        if f is not None:
            path = Path(f.name)
            f.close()
            path.unlink(missing_ok=True)
            self.bytes -= sum(e[1] for e in self._index.pop(key))


@dataclass
class _Plan:
    """The graph cut at the corrected layers (see the module doc)."""

    syncs: list[Node]                     # corrected layers, in graph order
    segments: list[list[Node]]            # per segment: the nodes computed there (a corrected layer's real pass first)
    stats: list[Node | None]              # per segment: the layer measured at its end (None for the last)
    consumers: dict[Node, set[int]]       # node -> segments that read it
    home: dict[Node, int]                 # node -> the segment that computes it
    lazy: set[Node]                       # constant nodes and dequantizes: computed where they are used


def _plan(gm: GraphModule, syncs: list[Node]) -> _Plan:
    const: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or (n.op in ("call_function", "call_module") and n.all_input_nodes and
                                  all(a in const for a in n.all_input_nodes)):
            const.add(n)
    remat = {n for n in gm.graph.nodes if n.op == "call_function" and n.target in DEQUANTIZE_OPS and n not in const}
    lazy = const | remat
    sync_index = {s: i for i, s in enumerate(syncs)}
    home: dict[Node, int] = {}
    seg = 0
    segments: list[list[Node]] = [[]]
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            home[n] = -1
        elif n.op in ("call_function", "call_module") and n not in lazy:
            if n in sync_index:
                seg = sync_index[n] + 1
                segments.append([])
            home[n] = seg
            segments[seg].append(n)
    consumers: dict[Node, set[int]] = {n: set() for n in home}

    def reads(node: Node, where: int) -> None:
        """``node`` is needed in segment ``where``: lazy nodes pass the need on to their inputs."""
        if node in const:
            return
        if node in remat:
            for a in node.all_input_nodes:
                reads(a, where)
            return
        if node in consumers:
            consumers[node].add(where)

    for n in home:
        if n.op == "placeholder":
            continue
        for a in n.all_input_nodes:
            reads(a, home[n])
            if n in sync_index:
                reads(a, home[n] - 1)            # measured at the end of the segment before its own
    stats = [syncs[i] if i < len(syncs) else None for i in range(len(segments))]
    return _Plan(syncs, segments, stats, consumers, home, lazy)


def correct_biases(int8: GraphModule, float_gm: GraphModule, batches: Batches | Iterable[torch.Tensor], *,
                   workdir: Path | None = None, progress: bool = False) -> BiasCorrectionResult:
    """Correct the biases of ``int8`` in place, in graph order, on the calibration ``batches`` (a list, or a callable
    returning a fresh iterator over them: each is read twice, never held together)."""
    from tqdm import tqdm

    source = _source(batches)
    layers = [n for n in int8.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS]
    ref = folded_reference(float_gm)
    missing = sorted({n.name for n in layers} - {n.name for n in ref.graph.nodes})
    if missing:
        raise QuantizationError(f"bias correction: {len(missing)} layers of the INT8 graph have no float counterpart "
                                f"(first: {missing[0]}); run without bias correction")
    updates = {n: _bias_update(int8, n.args[2] if len(n.args) > 2 else None) for n in layers}
    syncs = [n for n in layers if updates[n] is not None]
    result = BiasCorrectionResult(0, skipped_no_bias=[n.name for n in layers if updates[n] is None])
    float_means = node_means(ref, {n.name for n in syncs}, source)
    plan = _plan(int8, syncs)
    placeholders = [n for n in int8.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise QuantizationError(f"bias correction runs single-input graphs; this one has {len(placeholders)} inputs")
    with tempfile.TemporaryDirectory(prefix="mbquant-bias-", dir=workdir) as tmp, torch.no_grad():
        store = BatchStore(Path(tmp))
        n_batches = 0
        for x in source():
            store.put(placeholders[0], x)
            n_batches += 1
            result.samples += int(x.shape[0])
        if n_batches == 0:
            raise QuantizationError("bias correction needs calibration images; none were given")
        bar = tqdm(total=len(plan.segments), disable=not progress, desc="bias correction", unit="layer", leave=False)
        for s, nodes in enumerate(plan.segments):
            stat = plan.stats[s]
            acc: Any = 0
            for b in range(n_batches):
                env: dict[Node, Any] = {}
                for n in nodes:
                    env[n] = _evaluate(int8, n, env, store, b, plan)
                    if any(c != s for c in plan.consumers[n]):
                        store.put(n, env[n])
                if stat is not None:
                    out = _evaluate(int8, stat, env, store, b, plan)
                    acc = acc + channel_mean(out) * out.shape[0]
            if stat is not None:
                shift = acc / result.samples - float_means[stat.name]
                updates[stat](shift)
                result.layers_corrected += 1
                result.max_abs_shift = max(result.max_abs_shift, float(shift.abs().max()))
            for n in [n for n in plan.consumers if n in store and max(plan.consumers[n], default=-1) <= s]:
                store.drop(n)
            bar.update(1)
        bar.close()
        result.stored_bytes = store.peak
    int8.recompile()
    return result


def _evaluate(gm: GraphModule, node: Node, env: dict[Node, Any], store: BatchStore, b: int, plan: _Plan) -> Any:
    """``node``'s value for batch ``b``: computed from its inputs (this segment's values, the store, constants;
    lazy nodes are computed where they are needed and remembered for the rest of the batch)."""
    def value(a: Node) -> Any:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            return _attr(gm, a.target)
        if a in plan.lazy:
            env[a] = _evaluate(gm, a, env, store, b, plan)
            return env[a]
        return store.get(a, b)

    fn = fast(node.target) if node.op == "call_function" else gm.get_submodule(node.target)
    return fn(*torch.fx.node.map_arg(node.args, value), **torch.fx.node.map_arg(node.kwargs, value))
