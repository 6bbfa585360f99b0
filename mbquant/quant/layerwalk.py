"""A converted graph evaluated layer by layer over the calibration batches, in bounded memory.

Stages that change one layer at a time, each seeing the layers before it already changed (bias correction,
AdaRound), walk the graph here. The visited layers cut the graph into segments. A segment is evaluated batch by
batch (one batch in memory at a time): the previous visited layer again with its changed parameters, the nodes up
to the next visited layer, and then the stage looks at that layer on this batch (its inputs, its output). When
every batch has been seen, the stage changes the layer; the next segment sees the change. Only the tensors a later
segment reads are kept between segments, in the dtype they have (the INT8 graph's activations cross segments as
int8; a dequantize is recomputed where it is used), in files of a temporary folder. Each visited layer is
computed twice in all (measured, then again with its new parameters), every other node once; a stage whose change
is a function of the layer's output (bias correction: the output minus the shift) can have the walk keep the
measured output and patch it instead (``patch=``). Images above 96 px a side are walked channels-last and patched
where the stage can (see :data:`CHANNELS_LAST_ABOVE`). A quantize whose input nothing else reads overwrites that
input's buffer (same numbers; a new activation-sized tensor costs more than the arithmetic).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.fx import GraphModule, Node

from ..errors import QuantizationError
from .fast_qdq import fast, quantize_per_tensor, quantize_per_tensor_
from .ops import DEQUANTIZE_OPS

Batches = Callable[[], Iterable[torch.Tensor]]

# Images larger than this (pixels per side) are walked the fast way: channels-last (convolutions run 1.7-1.9x faster
# on NHWC tensors here, the walk 1.4-1.5x: bias correction at 224 px on 128 images, ResNet-50 19.5 -> 13.8 s,
# MobileNetV2 8.1 -> 5.5 s), and a patched layer is not computed again (see ``walk``'s ``patch``).
# Both change float rounding (inside each convolution; ``conv(x, w, b - s)`` against ``conv(x, w, b) - s``), so the
# corrections change by rounding noise (well inside their own sampling spread); at and below it (every shipped
# checkpoint: 64-96 px) the walk keeps the images' own layout, computes every layer again, and every number it
# gives stays as it was.
CHANNELS_LAST_ABOVE = 96

# The most bytes of one layer's measured outputs a patching walk keeps in memory; a layer whose outputs over the
# stage's images need more is computed again (its numbers are then the recomputing walk's). At 224 px with 128
# images ResNet-50's largest outputs take 411 MB; 512 images would take 1.6 GB.
PATCH_BYTES = 512 * 2 ** 20


def large(x: torch.Tensor) -> bool:
    """Whether ``x`` is a batch of images above :data:`CHANNELS_LAST_ABOVE` pixels a side (walked the fast way)."""
    return x.dim() == 4 and min(x.shape[-2:]) > CHANNELS_LAST_ABOVE


def walk_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the walk keeps it: channels-last for 4-D images above :data:`CHANNELS_LAST_ABOVE` pixels a side."""
    return x.contiguous(memory_format=torch.channels_last) if large(x) else x


def attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def source(batches: "Batches | Iterable[torch.Tensor]") -> Batches:
    """A callable giving a fresh iterator over ``batches`` (a list is kept; a callable is used as it is)."""
    if callable(batches):
        return batches
    kept = list(batches)
    return lambda: iter(kept)


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
class Plan:
    """The graph cut at the visited layers (see the module doc)."""

    syncs: list[Node]                     # visited layers, in graph order
    segments: list[list[Node]]            # per segment: the nodes computed there (a visited layer's real pass first)
    stats: list[Node | None]              # per segment: the layer measured at its end (None for the last)
    consumers: dict[Node, set[int]]       # node -> segments that read it
    home: dict[Node, int]                 # node -> the segment that computes it
    lazy: set[Node]                       # constant nodes and dequantizes: computed where they are used


def constants(gm: GraphModule) -> set[Node]:
    """The nodes whose value does not depend on the input (parameters and what is computed from them alone)."""
    const: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or (n.op in ("call_function", "call_module") and n.all_input_nodes and
                                  all(a in const for a in n.all_input_nodes)):
            const.add(n)
    return const


def plan(gm: GraphModule, syncs: list[Node]) -> Plan:
    const = constants(gm)
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
    return Plan(syncs, segments, stats, consumers, home, lazy)


@dataclass
class Walked:
    samples: int                  # images seen per pass
    batches: int
    stored_bytes: int             # the largest set of tensors kept between segments (in files)


Value = Callable[[Node], Any]


class _Track:
    """One graph being walked: its cut, and per batch the values of the current segment."""

    def __init__(self, gm: GraphModule, layers: list[Node], store: BatchStore, desc: str):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise QuantizationError(f"{desc}: layer-by-layer stages run single-input graphs; this one has "
                                    f"{len(placeholders)} inputs")
        self.gm, self.input, self.store = gm, placeholders[0], store
        self.cut = plan(gm, layers)
        self.patched: dict[Node, Callable[[torch.Tensor], torch.Tensor]] = {}   # layer -> its patch (see walk)
        self.measured: dict[Node, list[torch.Tensor]] = {}                    # layer -> its output per batch

    def segment(self, s: int, b: int) -> dict[Node, Any]:
        env: dict[Node, Any] = {}
        for n in self.cut.segments[s]:
            if n in self.patched:                       # the layer as measured, patched: not computed again
                env[n] = self.patched[n](self.measured[n][b])
            else:
                env[n] = _evaluate(self.gm, n, env, self.store, b, self.cut)
            if any(c != s for c in self.cut.consumers[n]):
                self.store.put(n, env[n])
        return env

    def value(self, node: Node, env: dict[Node, Any], b: int) -> Any:
        return _value(self.gm, node, env, self.store, b, self.cut)

    def release(self, s: int) -> None:
        """Drop what no segment after ``s`` reads (a patched layer's measured output once its segment has run)."""
        for n in [n for n in self.cut.consumers if n in self.store and max(self.cut.consumers[n], default=-1) <= s]:
            self.store.drop(n)
        for n in [n for n in self.patched if self.cut.home[n] <= s]:
            del self.patched[n], self.measured[n]


def walk(gm: GraphModule, layers: list[Node], batches: "Batches | Iterable[torch.Tensor]", *,
         visit: Callable[[Node, Value], None], done: Callable[[Node], None],
         reference: tuple[GraphModule, list[Node]] | None = None, workdir: Path | None = None,
         progress: bool = False, desc: str = "layers",
         patch: Callable[[Node], Callable[[torch.Tensor], torch.Tensor]] | None = None) -> Walked:
    """Walk ``gm`` over ``batches`` (each read once, into the store) with the ``layers`` as segment ends, in graph
    order. For each layer and each batch, ``visit(layer, value)`` is called, where ``value(node)`` is any node's
    value on that batch (the layer's inputs, the layer itself); then ``done(layer)`` once, when every batch has
    been visited: the stage changes the layer's parameters there, before the rest of the graph runs.

    ``reference``: a second graph and its layers, one per layer of ``gm`` in the same order (the float graph the
    INT8 one was converted from), walked in step on the same images: ``value`` also answers for its nodes.

    ``patch``: for a stage whose change to a layer is a function of the layer's output (called after ``done``:
    ``patch(layer)(measured_output)`` is the changed layer's output, to float rounding; it may overwrite the
    measured output, which the walk does not read again). Images above
    :data:`CHANNELS_LAST_ABOVE` then keep each batch's measured output in memory (one layer's at a time, at most
    :data:`PATCH_BYTES`: a layer with more is computed again) and the next segment starts from the patched output
    instead of computing the layer again; smaller images compute it again, so their numbers do not depend on
    ``patch``."""
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="mbquant-walk-", dir=workdir) as tmp, torch.no_grad():
        store = BatchStore(Path(tmp))
        tracks = [_Track(gm, layers, store, desc)]
        if reference is not None:
            if len(reference[1]) != len(layers):
                raise QuantizationError(f"{desc}: the reference graph has {len(reference[1])} layers to walk in step "
                                        f"with {len(layers)}; the graphs do not match")
            tracks.append(_Track(reference[0], reference[1], store, desc))
        n_batches = samples = 0
        fast = False
        for x in source(batches)():
            fast = fast or large(x)
            x = walk_layout(x)
            for t in tracks:
                store.put(t.input, x)
            n_batches += 1
            samples += int(x.shape[0])
        if n_batches == 0:
            raise QuantizationError(f"{desc} needs calibration images; none were given")
        main = tracks[0]
        bar = tqdm(total=len(main.cut.segments), disable=not progress, desc=desc, unit="layer", leave=False)
        for s in range(len(main.cut.segments)):
            stat = main.cut.stats[s]
            keep = stat is not None and patch is not None and fast
            for b in range(n_batches):
                envs = {t.gm.graph: (t, t.segment(s, b)) for t in tracks}
                if stat is not None:
                    visit(stat, lambda node, envs=envs, b=b: _lookup(envs, node, b))
                if keep:
                    kept = main.measured.setdefault(stat, [])
                    kept.append(_lookup(envs, stat, b))
                    if sum(t.numel() * t.element_size() for t in kept) > PATCH_BYTES:
                        del main.measured[stat]             # over the budget: computed again in the next segment
                        keep = False
            if stat is not None:
                done(stat)
            if keep:
                main.patched[stat] = patch(stat)
            for t in tracks:
                t.release(s)
            bar.update(1)
        bar.close()
    gm.recompile()
    return Walked(samples, n_batches, store.peak)


def _lookup(envs: dict, node: Node, b: int) -> Any:
    track, env = envs[node.graph]
    return track.value(node, env, b)


def _value(gm: GraphModule, a: Node, env: dict[Node, Any], store: BatchStore, b: int, plan: Plan) -> Any:
    if a in env:
        return env[a]
    if a.op == "get_attr":
        return attr(gm, a.target)
    if a in plan.lazy:
        env[a] = _evaluate(gm, a, env, store, b, plan)
        return env[a]
    if a in store:
        return store.get(a, b)
    env[a] = _evaluate(gm, a, env, store, b, plan)          # a visited layer, from its inputs
    return env[a]


def _last_read(a: Any, env: dict[Node, Any], plan: Plan) -> bool:
    """Whether a quantize of ``a`` may overwrite ``a``'s buffer: ``a`` was computed in this segment for this batch
    (not a constant, not recomputed where used, not read back from the store: a copy went there if a later
    segment reads it), the quantize is its only user, and every other value of the segment that shares its memory
    (the input of an in-place op such as ``hardtanh_``, of a view, of dropout in eval mode) has no user left to
    run (a stage's ``visit`` evaluates its layer after the segment: the layer's inputs keep unrun users)."""
    if not isinstance(a, Node) or a in plan.lazy or len(a.users) != 1 or not isinstance(env.get(a), torch.Tensor):
        return False
    mine = env[a].untyped_storage().data_ptr()
    return all(k is a or not isinstance(v, torch.Tensor) or v.untyped_storage().data_ptr() != mine
               or all(u in env for u in k.users) for k, v in env.items())


def _evaluate(gm: GraphModule, node: Node, env: dict[Node, Any], store: BatchStore, b: int, plan: Plan) -> Any:
    """``node``'s value for batch ``b``: computed from its inputs (this segment's values, the store, constants;
    lazy nodes are computed where they are needed and remembered for the rest of the batch)."""
    fn = fast(node.target) if node.op == "call_function" else gm.get_submodule(node.target)
    if fn is quantize_per_tensor and _last_read(node.args[0], env, plan):
        fn = quantize_per_tensor_
    value = lambda a: _value(gm, a, env, store, b, plan)  # noqa: E731
    return fn(*torch.fx.node.map_arg(node.args, value), **torch.fx.node.map_arg(node.kwargs, value))
