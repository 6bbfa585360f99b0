"""AdaRound for a converted PT2E graph (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"): each layer's INT8 weights are rounded up or down, whichever reproduces the layer's float output
best on the calibration images, instead of to the nearest grid point.

The weights stay on the grid the backend uses (the converted graph's scales, zero points and range are not
touched; only the int8 values change, each by at most one step from the nearest rounding, always inside
[quant_min, quant_max]), so any backend lowering the graph runs them unchanged.

Per layer (in graph order, each layer seeing the layers before it already rounded): the layer's input in the INT8
graph is collected on the calibration images (kept as int8 with its dequantize, when the graph feeds the layer an
int8 tensor), and so is its target, the float model's output of the same layer on the same images (the float graph
with BN folded as ``prepare_pt2e`` folds it, walked in step by :func:`mbquant.quant.layerwalk.walk`), followed by
the ReLU/ReLU6 the layer is fused with. Fitting the float model's output from the INT8 model's input (the paper's
asymmetric reconstruction) lets each layer's rounding absorb part of the error of the layers before it; fitting the
layer's own float output on the same input did not change agreement in measurements (README, "AdaRound"). A soft
rounding ``h(V)`` (the rectified sigmoid) is learned with Adam, minimising the output's squared error plus
``lambda * sum(1 - |2h - 1|^beta)`` (beta annealed from 20 to 2 after a 20 % warm-up), which drives every ``h`` to
0 or 1. The hard rounding is kept only when its output error on all the collected images is below the nearest
rounding's; otherwise the layer keeps nearest rounding, and the result says so.

Bias correction, when asked for as well, runs after this and measures the mean shift that remains; the recipes turn
it off when AdaRound runs (measured: it lowered agreement after AdaRound).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.fx import GraphModule, Node

from ..errors import QuantizationError
from .bias_correction import folded_reference
from .fast_qdq import fast
from .layerwalk import Batches, attr, constants, walk
from .ops import DEQUANTIZE_OPS, _A, _Q, weighted_layers

ZETA, GAMMA = 1.1, -0.1                  # the rectified sigmoid's stretch (paper, section 4)
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2
REG_WEIGHT = 0.01
LR = 1e-2
BATCH = 32

# the activation a layer is fused with, as the out-of-place op the reconstruction differentiates through
_ACTIVATIONS = {_A.relu.default: _A.relu.default, _A.relu_.default: _A.relu.default,
                _A.hardtanh.default: _A.hardtanh.default, _A.hardtanh_.default: _A.hardtanh.default}


@dataclass
class LayerRounding:
    name: str
    error_nearest: float         # output MSE / output mean square, nearest rounding (all collected images)
    error_adaround: float        # the same with the learned rounding
    changed: float               # share of the weights rounded the other way than nearest
    kept: str                    # "adaround" or "nearest" (the learned rounding did not reduce the error)

    def to_dict(self) -> dict:
        return {"layer": self.name, "error_nearest": float(f"{self.error_nearest:.4g}"),
                "error_adaround": float(f"{self.error_adaround:.4g}"), "changed": round(self.changed, 4),
                "kept": self.kept}


@dataclass
class AdaRoundResult:
    layers: list[LayerRounding] = field(default_factory=list)
    skipped_float: list[str] = field(default_factory=list)     # layers whose weights are not INT8
    samples: int = 0
    iterations: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        learned = [r for r in self.layers if r.kept == "adaround"]
        return {"layers_rounded": len(learned), "layers_nearest": len(self.layers) - len(learned),
                "skipped_float": self.skipped_float, "samples": self.samples, "iterations": self.iterations,
                "seconds": round(self.seconds, 2),
                "mean_error_nearest": _mean([r.error_nearest for r in self.layers]),
                "mean_error_adaround": _mean([min(r.error_adaround, r.error_nearest) for r in self.layers]),
                "per_layer": [r.to_dict() for r in self.layers]}


def _mean(xs: list[float]) -> float:
    return float(f"{sum(xs) / len(xs):.4g}") if xs else 0.0


@dataclass
class _Grid:
    """A layer's weight quantization as the converted graph states it."""

    q: torch.Tensor              # the int8 weights (the graph's own tensor: changed in place)
    scale: torch.Tensor          # broadcastable to the weight
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    def dequantize(self, w_int: torch.Tensor) -> torch.Tensor:
        return (w_int - self.zero_point) * self.scale


def _grid(gm: GraphModule, node: Node) -> _Grid | None:
    """The weight grid of a conv/linear node whose weight is ``dequantize(int8 get_attr, ...)``; None otherwise."""
    deq = node.args[1] if len(node.args) > 1 else None
    if not (isinstance(deq, Node) and deq.op == "call_function" and deq.target in DEQUANTIZE_OPS
            and isinstance(deq.args[0], Node) and deq.args[0].op == "get_attr"):
        return None
    q = attr(gm, deq.args[0].target)
    if q.dtype not in (torch.int8, torch.uint8):
        return None

    def const(a: Any) -> torch.Tensor:
        return (attr(gm, a.target) if isinstance(a, Node) else torch.tensor(a)).to(torch.float32)

    if deq.target == _Q.dequantize_per_channel.default:
        axis, qmin, qmax = deq.args[3], deq.args[4], deq.args[5]
        shape = [1] * q.dim()
        shape[axis] = -1
        scale, zp = const(deq.args[1]).reshape(shape), const(deq.args[2]).reshape(shape)
    else:
        scale, zp, qmin, qmax = const(deq.args[1]), const(deq.args[2]), deq.args[3], deq.args[4]
    return _Grid(q, scale, zp, int(qmin), int(qmax))


class _Inputs:
    """One layer's input on the collected images: int8 with its dequantize when the graph feeds it one."""

    def __init__(self, layer: Node):
        a = layer.args[0]
        self.node = a
        self.deq = a if isinstance(a, Node) and a.op == "call_function" and a.target in DEQUANTIZE_OPS and \
            isinstance(a.args[0], Node) and a.args[0].op != "get_attr" else None
        self.parts: list[torch.Tensor] = []
        self.deq_args: list[Any] = []

    def add(self, value) -> None:
        if self.deq is None:
            self.parts.append(value(self.node).detach().clone())
            return
        if not self.parts:
            self.deq_args = [value(a) if isinstance(a, Node) else a for a in self.deq.args[1:]]
        self.parts.append(value(self.deq.args[0]).clone())

    def stacked(self) -> torch.Tensor:
        return torch.cat(self.parts)

    def take(self, raw: torch.Tensor) -> torch.Tensor:
        """The layer's float input for stored rows."""
        if self.deq is None:
            return raw
        return fast(self.deq.target)(raw, *self.deq_args, **self.deq.kwargs)


def adaround(int8: GraphModule, float_gm: GraphModule, batches: Batches | Iterable[torch.Tensor], *,
             iterations: int = 500, seed: int = 0, workdir: Path | None = None,
             progress: bool = False) -> AdaRoundResult:
    """Learn the rounding of every INT8 conv/linear weight of ``int8`` (in place), in graph order, on the
    calibration ``batches``; ``float_gm`` is the exported float graph ``int8`` was converted from."""
    started = time.perf_counter()
    layers = weighted_layers(int8)
    grids = {n: _grid(int8, n) for n in layers}
    result = AdaRoundResult(skipped_float=[n.name for n in layers if grids[n] is None], iterations=iterations)
    rounded = [n for n in layers if grids[n] is not None]
    if not rounded:
        return result
    ref = folded_reference(float_gm)
    ref_nodes = {n.name: n for n in ref.graph.nodes}
    floats: dict[Node, torch.Tensor] = {}
    for n in rounded:
        r = ref_nodes.get(n.name)
        w = r.args[1] if r is not None and len(r.args) > 1 else None
        if not (isinstance(w, Node) and w.op == "get_attr") or attr(ref, w.target).shape != grids[n].q.shape:
            raise QuantizationError(f"AdaRound: layer {n.name} of the INT8 graph has no float weight of the same shape "
                                    f"in the float graph; run without --adaround")
        floats[n] = attr(ref, w.target).detach().to(torch.float32)
        if _distance(floats[n], grids[n]) > 0.5 + 1e-3:
            raise QuantizationError(f"AdaRound: layer {n.name}'s INT8 weights are not the nearest rounding of its float "
                                    f"weights (the graphs do not match); run without --adaround")
    refs = [ref_nodes[n.name] for n in rounded]
    order = {n: i for i, n in enumerate(ref.graph.nodes)}
    if any(order[a] >= order[b] for a, b in zip(refs, refs[1:])):
        raise QuantizationError("AdaRound: the float graph runs the layers in another order than the INT8 graph; "
                                "run without --adaround")
    const = constants(int8)
    for n in rounded:
        varying = [a.name for a in [*n.args[2:], *n.kwargs.values()] if isinstance(a, Node) and a not in const]
        if varying:
            raise QuantizationError(f"AdaRound: argument {varying[0]} of layer {n.name} is not a constant; run "
                                    f"without --adaround")
    ref_of = dict(zip(rounded, refs))
    inputs: dict[Node, _Inputs] = {}
    targets: dict[Node, list[torch.Tensor]] = {}
    rest: dict[Node, tuple[list, dict]] = {}          # a layer's other arguments (bias, stride, ...), as values
    gen = torch.Generator().manual_seed(seed)

    def visit(layer: Node, value) -> None:
        inputs.setdefault(layer, _Inputs(layer)).add(value)
        targets.setdefault(layer, []).append(_activation(layer)(value(ref_of[layer])).clone())
        if layer not in rest:
            resolve = lambda a: value(a) if isinstance(a, Node) else a  # noqa: E731
            rest[layer] = [resolve(a) for a in layer.args[2:]], {k: resolve(a) for k, a in layer.kwargs.items()}

    def done(layer: Node) -> None:
        args, kwargs = rest.pop(layer)
        result.layers.append(_round_layer(layer, grids[layer], floats[layer], inputs.pop(layer),
                                          torch.cat(targets.pop(layer)), args, kwargs, iterations, gen))

    walked = walk(int8, rounded, batches, visit=visit, done=done, reference=(ref, refs), workdir=workdir,
                  progress=progress, desc="AdaRound")
    result.samples = walked.samples
    result.seconds = time.perf_counter() - started
    return result


def _distance(w: torch.Tensor, g: _Grid) -> float:
    """How far (in steps) the graph's INT8 weights are from the float weights on the grid: at most 0.5 (ties
    either way, float rounding of ``w / scale`` included) when they are a nearest rounding of them."""
    return float(((w / g.scale + g.zero_point).clamp(g.qmin, g.qmax) - g.q.to(torch.float32)).abs().max())


def _activation(layer: Node):
    users = list(layer.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _ACTIVATIONS:
        op, rest = _ACTIVATIONS[users[0].target], users[0].args[1:]
        return lambda y: op(y, *rest)
    return lambda y: y


def _round_layer(layer: Node, g: _Grid, w_float: torch.Tensor, inputs: _Inputs, wanted: torch.Tensor, args: list,
                 kwargs: dict, iterations: int, gen: torch.Generator) -> LayerRounding:
    raw = inputs.stacked()
    n = raw.shape[0]
    act = _activation(layer)

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return act(layer.target(x, w, *args, **kwargs))

    w_div = w_float / g.scale
    floor = torch.floor(w_div)
    rest = (w_div - floor).clamp(0.0, 1.0)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=LR)

    def soft(v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def weights(h: torch.Tensor) -> torch.Tensor:
        return g.dequantize(torch.clamp(floor + h + g.zero_point, g.qmin, g.qmax))

    warm = int(WARMUP * iterations)
    with torch.enable_grad():
        for it in range(iterations):
            idx = torch.randint(0, n, (min(BATCH, n),), generator=gen)
            x = inputs.take(raw[idx])
            with torch.no_grad():
                target = wanted[idx]
            h = soft(v)
            out = run(x, weights(h))
            loss = (out - target).pow(2).sum(1).mean() if out.dim() > 1 else (out - target).pow(2).mean()
            if it >= warm:
                rel = (it - warm) / max(1, iterations - warm)
                beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(rel * math.pi))
                loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        nearest = g.q.to(torch.float32)
        learned = torch.clamp(floor + (v >= 0).to(floor.dtype) + g.zero_point, g.qmin, g.qmax)
        err_n, err_a, energy = 0.0, 0.0, 0.0
        for s in range(0, n, BATCH):
            x = inputs.take(raw[s:s + BATCH])
            target = wanted[s:s + BATCH]
            err_n += float((run(x, g.dequantize(nearest)) - target).pow(2).sum())
            err_a += float((run(x, g.dequantize(learned)) - target).pow(2).sum())
            energy += float(target.pow(2).sum())
        energy = max(energy, 1e-30)
        changed = float((learned != nearest).float().mean())
        kept = "adaround" if err_a < err_n else "nearest"
        g.q.copy_((learned if kept == "adaround" else nearest).to(g.q.dtype))
    return LayerRounding(layer.name, err_n / energy, err_a / energy, changed, kept)
