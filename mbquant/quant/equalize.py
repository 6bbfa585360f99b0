"""Cross-layer equalization of a float model (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"), a stage every backend can use before it quantizes.

For consecutive convs ``conv1 -> act -> conv2`` (the depthwise-separable and inverted-residual blocks), output
channel i of conv1 is divided by s_i and input channel i of conv2 multiplied by s_i, with
s_i = sqrt(r1_i / r2_i) (r: the channel's largest absolute weight), so that both layers' channel ranges
become alike; a per-tensor (or per-channel) INT8 grid then wastes fewer codes on small channels. The float
function is unchanged as long as the activation commutes with the scaling: ReLU and the identity do for any
s > 0; **ReLU6 does not** (``clamp(y / s, 0, 6) != clamp(y, 0, 6) / s`` once y reaches 6 or 6 s).

What mbquant does with ReLU6 (the choice this module makes): a channel is equalized only where the clamp at 6
stays inactive before and after the scaling, measured on the calibration images with a safety margin
``margin``: with m_i the channel's largest pre-activation there, the channel is left alone (s_i = 1) when
``margin * m_i > 6`` (its clamp is active or nearly so), and otherwise s_i is kept at least ``margin * m_i / 6``
so the rescaled channel stays under 6 / margin. On inputs whose activations stay within ``margin`` times what
calibration saw, the equalized model computes the same function (tested: max |difference| of the logits on
real images < 1e-4). BatchNorm is folded into its conv first (it is folded anyway when quantizing).
The scaling is iterated (``iterations``), since a depthwise conv sits in two pairs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from ..errors import QuantizationError

ACTIVATIONS = {nn.ReLU: None, nn.ReLU6: 6.0, nn.Identity: None}


@dataclass
class EqualizationResult:
    pairs: int = 0
    channels_scaled: int = 0
    channels_kept_for_relu6: int = 0
    max_scale: float = 1.0
    min_scale: float = 1.0
    max_abs_logit_change: float = 0.0
    pair_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"pairs": self.pairs, "channels_scaled": self.channels_scaled,
                "channels_kept_for_relu6": self.channels_kept_for_relu6, "max_scale": round(self.max_scale, 4),
                "min_scale": round(self.min_scale, 4), "max_abs_logit_change": self.max_abs_logit_change,
                "pairs_equalized": self.pair_names}


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval) with every BatchNorm2d that directly follows a Conv2d inside a Sequential
    folded into that conv (the BatchNorm becomes nn.Identity)."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
                seq._modules[a] = nn.utils.fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model


@dataclass
class _Pair:
    name: str
    conv1: nn.Conv2d
    conv2: nn.Conv2d
    clamp: float | None       # the activation's upper clamp (ReLU6: 6), None when scale-equivariant


def find_pairs(model: nn.Module) -> list[_Pair]:
    """conv1 -> [ReLU | ReLU6 | Identity]* -> conv2 chains where each tensor has one user (no residual branch)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise QuantizationError(f"cross-layer equalization needs an fx-traceable model; {type(model).__name__} is not "
                                f"({type(exc).__name__}: {str(exc)[:120]}); run without --equalize") from exc
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(mods[node.target]) is not nn.Conv2d:
            continue
        cur, clamp = node, None
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op != "call_module":
                break
            m = mods[nxt.target]
            if type(m) is nn.Conv2d:
                c1, c2 = mods[node.target], m
                if c1.out_channels == c2.in_channels and c2.groups in (1, c2.in_channels) and c1.bias is not None:
                    pairs.append(_Pair(f"{node.target} -> {nxt.target}", c1, c2, clamp))
                break
            if type(m) not in ACTIVATIONS:
                break
            if ACTIVATIONS[type(m)] is not None:
                clamp = ACTIVATIONS[type(m)]
            cur = nxt
    return pairs


def _out_ranges(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(1)


def _in_ranges(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach().abs()
    if conv.groups == conv.in_channels and conv.groups > 1:   # depthwise: input channel i feeds filter(s) of group i
        return w.flatten(1).amax(1).view(conv.groups, -1).amax(1)
    return w.transpose(0, 1).flatten(1).amax(1)


def _channel_maxima(model: nn.Module, convs: list[nn.Conv2d], batches) -> dict[int, torch.Tensor]:
    maxima: dict[int, torch.Tensor] = {}

    def hook(m, _inp, out):
        v = out.detach().amax(dim=(0, 2, 3))
        maxima[id(m)] = torch.maximum(maxima[id(m)], v) if id(m) in maxima else v

    handles = [c.register_forward_hook(hook) for c in convs]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return maxima


def _scale(pair: _Pair, s: torch.Tensor) -> None:
    with torch.no_grad():
        pair.conv1.weight.div_(s.view(-1, 1, 1, 1))
        pair.conv1.bias.div_(s)
        c2 = pair.conv2
        if c2.groups == c2.in_channels and c2.groups > 1:
            c2.weight.mul_(s.repeat_interleave(c2.out_channels // c2.groups).view(-1, 1, 1, 1))
        else:
            c2.weight.mul_(s.view(1, -1, 1, 1))


def equalize(model: nn.Module, batches, *, iterations: int = 4,
             margin: float = 1.5) -> tuple[nn.Module, EqualizationResult]:
    """An equalized copy of ``model`` (BN folded) and what was done; ``batches`` are real calibration images (a
    list, or a callable giving a fresh pass over them: they are read twice, never held together)."""
    source = batches if callable(batches) else (lambda kept=list(batches): iter(kept))
    if next(iter(source()), None) is None:
        raise QuantizationError("cross-layer equalization needs calibration images (for the ReLU6 bound); none given")
    eq = fold_batchnorm(model)
    pairs = find_pairs(eq)
    result = EqualizationResult(pairs=len(pairs), pair_names=[p.name for p in pairs])
    maxima = _channel_maxima(eq, [p.conv1 for p in pairs], source())
    total = {id(p): torch.ones(p.conv1.out_channels) for p in pairs}
    for _ in range(iterations):
        for p in pairs:
            r1, r2 = _out_ranges(p.conv1), _in_ranges(p.conv2)
            s = torch.sqrt(r1 / r2.clamp(min=1e-12)).where((r1 > 0) & (r2 > 0), torch.ones_like(r1))
            if p.clamp is not None:
                m = maxima[id(p.conv1)]
                active = margin * m > p.clamp
                s = torch.where(active, torch.ones_like(s), torch.maximum(s, margin * m / p.clamp))
            s = s.clamp(1e-3, 1e3)
            _scale(p, s)
            maxima[id(p.conv1)] = maxima[id(p.conv1)] / s
            total[id(p)] *= s
    scales = torch.cat(list(total.values())) if total else torch.ones(1)
    result.channels_scaled = int((scales != 1).sum())
    result.channels_kept_for_relu6 = int(sum(int((t == 1).sum()) for p, t in zip(pairs, total.values())
                                             if p.clamp is not None))
    result.max_scale, result.min_scale = float(scales.max()), float(scales.min())
    with torch.no_grad():
        diff = max(float((model.eval()(x) - eq(x)).abs().max()) for x in source())
    result.max_abs_logit_change = round(diff, 7)
    if not math.isfinite(diff) or diff > 1e-3:
        raise QuantizationError(f"cross-layer equalization changed the float model's logits by {diff:.2g} on the "
                                f"calibration images (more than 1e-3); run without --equalize")
    return eq, result
