"""Empirical bias correction of a converted INT8 graph (Nagel et al. 2019, as in NNCF's PTQ), in bounded memory.

Quantizing weights and inputs shifts the mean of each conv/linear output channel. mbquant measures that shift on
the calibration images, E[y_int8] - E[y_float], and subtracts it from the layer's float bias (or moves its INT32
bias on its grid; the backend requantizes the bias when it lowers the graph). Layers are corrected in graph order
and each correction sees the already-corrected layers before it. The float means are the reference's: the float graph
with BN folded exactly as ``prepare_pt2e`` folds it (same node names). The pipeline records them while calibration
runs the prepared graph over the same images (:class:`ReferenceMeans`: the prepared graph computes the reference's
layer outputs, its observers pass values through), so bias correction makes no float pass of its own; given no
means, :func:`correct_biases` makes that pass itself (same numbers).

How it runs, so that memory does not grow with the number of calibration images: :func:`mbquant.quant.layerwalk.walk`
evaluates the graph segment by segment, one batch in memory at a time, and shows each corrected layer's output on
every batch before its bias is corrected. The arithmetic is the same, batch for batch, as correcting with every
activation of every batch in memory, so the biases are the same.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.fx import GraphModule, Node

from ..errors import QuantizationError
from .layerwalk import Batches, attr as _attr, source, walk
from .ops import DEQUANTIZE_OPS, LINEAR_OPS, weighted_layers


@dataclass
class BiasCorrectionResult:
    layers_corrected: int
    skipped_no_bias: list[str] = field(default_factory=list)
    max_abs_shift: float = 0.0
    samples: int = 0
    stored_bytes: int = 0            # the largest set of tensors kept between segments (in files)
    reference: str = "own pass"      # where the float means came from: "own pass" or "calibration pass"
    shifts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)   # layer -> the shift subtracted

    def to_dict(self) -> dict:
        return {"layers_corrected": self.layers_corrected, "skipped_no_bias": self.skipped_no_bias,
                "max_abs_shift": round(self.max_abs_shift, 6), "samples": self.samples,
                "stored_bytes": self.stored_bytes, "reference": self.reference}


def folded_reference(float_gm: GraphModule) -> GraphModule:
    """A copy of the float exported graph with BN folded into the convs (node names as in the prepared graph)."""
    from ..compat import fuse_conv_bn

    ref = copy.deepcopy(float_gm)
    fuse_conv_bn(ref)
    ref.recompile()
    return ref


def channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(0, 2, 3)) if t.dim() == 4 else t.reshape(-1, t.shape[-1]).mean(0)


class _Recorder(torch.fx.Interpreter):
    """Runs a graph on one batch and adds the per-channel output sums of the nodes ``names`` over its first
    ``take`` images to ``sums``."""

    def __init__(self, gm: GraphModule, names: set[str], sums: dict[str, torch.Tensor], take: int):
        super().__init__(gm)
        self.names, self.sums, self.take = names, sums, take

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            part = out.detach()[:self.take]
            self.sums[n.name] = self.sums.get(n.name, 0) + channel_mean(part) * part.shape[0]
        return out


def node_means(gm: GraphModule, names: set[str], batches: Batches | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel output means of the nodes ``names`` over ``batches`` (one streaming pass)."""
    sums: dict[str, torch.Tensor] = {}
    total = 0
    with torch.no_grad():
        for x in source(batches)():
            _Recorder(gm, names, sums, int(x.shape[0])).run(x)
            total += int(x.shape[0])
    return {k: v / total for k, v in sums.items()}


class ReferenceMeans:
    """The reference's per-channel conv/linear output means, recorded while calibration runs the prepared graph.

    An instance is the forward calibration calls on each batch (``calibrate.run(..., forward=means)``): it runs
    ``prepared`` (observers and all) and adds up its weighted layers' outputs over the first ``limit`` images (bias
    correction reads that many; None: all). The prepared graph folds BN as :func:`folded_reference` does and its
    observers return their input, so these are the means :func:`node_means` gives on the reference."""

    def __init__(self, prepared: GraphModule, limit: int | None = None):
        if not isinstance(prepared, GraphModule):
            raise QuantizationError(f"bias correction needs a PT2E graph to calibrate; got {type(prepared).__name__}")
        self.prepared, self.limit = prepared, limit
        self.names = {n.name for n in weighted_layers(prepared)}
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> Any:
        take = int(x.shape[0]) if self.limit is None else min(int(x.shape[0]), self.limit - self.seen)
        if take <= 0:
            return self.prepared(x)
        out = _Recorder(self.prepared, self.names, self.sums, take).run(x)
        self.seen += take
        return out

    def means(self) -> dict[str, torch.Tensor]:
        if not self.seen:
            raise QuantizationError("bias correction: calibration recorded no float means (no images were run)")
        return {k: v / self.seen for k, v in self.sums.items()}


def _bias_update(gm: GraphModule, bias: Node | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How to subtract a per-channel shift from a layer's bias, returning what was subtracted: a float bias
    (``get_attr``), or an INT32 bias dequantized in the graph (``dequantize(int32 get_attr, scale)``: the shift is
    rounded onto its grid, as the backend's kernel adds it). None when the layer has no bias to correct."""
    if not isinstance(bias, Node):
        return None
    if bias.op == "get_attr" and _attr(gm, bias.target).is_floating_point():
        t = _attr(gm, bias.target)

        def subtract(shift: torch.Tensor) -> torch.Tensor:
            delta = shift.to(t.dtype)
            t.sub_(delta)
            return delta

        return subtract
    if bias.op == "call_function" and bias.target in DEQUANTIZE_OPS and isinstance(bias.args[0], Node) \
            and bias.args[0].op == "get_attr":
        q = _attr(gm, bias.args[0].target)
        scale = bias.args[1]
        scale = _attr(gm, scale.target) if isinstance(scale, Node) else torch.tensor(float(scale))
        if q.dtype != torch.int32:
            return None

        def apply(shift: torch.Tensor) -> torch.Tensor:
            step = scale.to(torch.float64).reshape(-1) if scale.numel() > 1 else scale.to(torch.float64)
            steps = torch.round(shift.to(torch.float64) / step)
            q.sub_(steps.to(torch.int32))
            return (steps * step).to(torch.float32)

        return apply
    return None


def _out_channels(node: Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[1]) if isinstance(val, torch.Tensor) and val.dim() >= 2 else None


def _pair_by_order(layers: list[Node], ref_layers: list[Node]) -> dict[str, str]:
    """INT8 layer name -> float layer name, the i-th conv/linear with the i-th (same kind, same output channels)."""
    if len(layers) != len(ref_layers):
        raise QuantizationError(f"bias correction: the INT8 graph has {len(layers)} conv/linear layers and the float "
                                f"graph {len(ref_layers)}; they cannot be paired by order")
    for a, b in zip(layers, ref_layers):
        if (a.target in LINEAR_OPS) != (b.target in LINEAR_OPS) or _out_channels(a) != _out_channels(b):
            raise QuantizationError(f"bias correction: INT8 layer {a.name} ({_out_channels(a)} channels) does not "
                                    f"match float layer {b.name} ({_out_channels(b)}) at the same position")
    return {a.name: b.name for a, b in zip(layers, ref_layers)}


def correct_biases(int8: GraphModule, float_gm: GraphModule, batches: Batches | Iterable[torch.Tensor], *,
                   reference: ReferenceMeans | None = None, workdir: Path | None = None,
                   progress: bool = False, pair: str = "name") -> BiasCorrectionResult:
    """Correct the biases of ``int8`` in place, in graph order, on the calibration ``batches`` (a list, or a callable
    returning a fresh iterator over them: each is read twice, never held together). ``reference``: the float
    means calibration recorded over the same images; without it the reference makes its own pass over
    ``batches`` first. ``pair``: how an INT8 layer finds its float counterpart: by node name (``"name"``: a graph
    converted from ``prepare_pt2e``) or by position among the conv/linear layers (``"order"``: a graph converted
    from ``prepare_qat_pt2e``, whose folding renames the convs; the output channel counts must match)."""
    batches = source(batches)
    layers = weighted_layers(int8)
    if reference is None:
        ref = folded_reference(float_gm)
        known = {n.name for n in ref.graph.nodes}
    else:
        float_means = reference.means()
        known = set(float_means)
    if pair == "order":
        if reference is not None:
            raise QuantizationError("bias correction: pair='order' takes the float means from its own pass; "
                                    "drop reference=")
        names = _pair_by_order(layers, weighted_layers(ref))
    elif pair == "name":
        names = {n.name: n.name for n in layers}
    else:
        raise QuantizationError(f"bias correction: pair must be 'name' or 'order', got {pair!r}")
    missing = sorted(n.name for n in layers if names.get(n.name) not in known)
    if missing:
        raise QuantizationError(f"bias correction: {len(missing)} layers of the INT8 graph have no float counterpart "
                                f"(first: {missing[0]}); run without bias correction")
    updates = {n: _bias_update(int8, n.args[2] if len(n.args) > 2 else None) for n in layers}
    syncs = [n for n in layers if updates[n] is not None]
    result = BiasCorrectionResult(0, skipped_no_bias=[n.name for n in layers if updates[n] is None],
                                  reference="own pass" if reference is None else "calibration pass")
    if reference is None:
        float_means = node_means(ref, {names[n.name] for n in syncs}, batches)
    sums: dict[Node, Any] = {}
    counts: dict[Node, int] = {}
    subtracted: dict[Node, torch.Tensor] = {}

    def visit(layer: Node, value) -> None:
        out = value(layer)
        sums[layer] = sums.get(layer, 0) + channel_mean(out) * out.shape[0]
        counts[layer] = counts.get(layer, 0) + int(out.shape[0])

    def done(layer: Node) -> None:
        seen = counts.pop(layer)
        if reference is not None and seen != reference.seen:
            raise QuantizationError(f"bias correction reads {seen} images but calibration recorded the float means "
                                    f"over {reference.seen}; record them with the same image limit")
        shift = sums.pop(layer) / seen - float_means[names[layer.name]]
        subtracted[layer] = updates[layer](shift)
        result.shifts[layer.name] = shift
        result.layers_corrected += 1
        result.max_abs_shift = max(result.max_abs_shift, float(shift.abs().max()))

    def patch(layer: Node) -> Callable[[torch.Tensor], torch.Tensor]:
        """The corrected layer's output from its output as measured (in its buffer: the walk reads it once): the
        bias moved by what was subtracted."""
        delta = subtracted.pop(layer)
        return lambda out: out.sub_(delta.reshape(-1, *[1] * (out.dim() - 2)).to(out.dtype))

    walked = walk(int8, syncs, batches, visit=visit, done=done, workdir=workdir, progress=progress,
                  desc="bias correction", patch=patch)
    result.samples, result.stored_bytes = walked.samples, walked.stored_bytes
    return result
