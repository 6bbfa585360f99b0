"""Accuracy of one or several predictors on the same images, in one pass over the data.

``compare({"float": f, "int8": q}, loader)`` gives each predictor's top-1/top-5, the drop between
them, top-1 agreement between every pair, and the largest logit difference of each pair.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Accuracy:
    top1: float
    top5: float
    count: int

    def to_dict(self) -> dict:
        return {"top1": round(self.top1, 4), "top5": round(self.top5, 4), "count": self.count}


@dataclass
class Comparison:
    """Results of :func:`compare`. Accuracies are percentages; ``labelled`` is False without labels."""

    count: int
    skipped: int
    labelled: bool
    accuracy: dict[str, Accuracy] = field(default_factory=dict)
    agreement: dict[tuple[str, str], float] = field(default_factory=dict)
    max_abs_diff: dict[tuple[str, str], float] = field(default_factory=dict)

    def drop(self, reference: str, other: str) -> float:
        """Top-1 drop in percentage points (positive = ``other`` is worse)."""
        return self.accuracy[reference].top1 - self.accuracy[other].top1

    def agree(self, a: str, b: str) -> float:
        return self.agreement[(a, b)] if (a, b) in self.agreement else self.agreement[(b, a)]

    def diff(self, a: str, b: str) -> float:
        return self.max_abs_diff[(a, b)] if (a, b) in self.max_abs_diff else self.max_abs_diff[(b, a)]

    def to_dict(self) -> dict:
        return {"count": self.count, "skipped": self.skipped, "labelled": self.labelled,
                "accuracy": {k: v.to_dict() for k, v in self.accuracy.items()},
                "agreement": {f"{a}~{b}": round(v, 4) for (a, b), v in self.agreement.items()},
                "max_abs_logit_diff": {f"{a}~{b}": v for (a, b), v in self.max_abs_diff.items()}}


def compare(predictors: Mapping[str, Predictor], batches: Iterable, *, limit: int | None = None,
            progress: bool = False, desc: str = "evaluate") -> Comparison:
    """Run every predictor on every batch ``(images, labels)`` (``None`` batches are skipped)."""
    from tqdm import tqdm

    names = list(predictors)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    top1 = dict.fromkeys(names, 0)
    top5 = dict.fromkeys(names, 0)
    same = dict.fromkeys(pairs, 0)
    maxdiff = dict.fromkeys(pairs, 0.0)
    count = 0
    labelled = True
    skipped_before = getattr(getattr(batches, "dataset", None), "skipped", set())
    n_skip0 = len(skipped_before)
    bar = tqdm(total=limit, disable=not progress, desc=desc, unit="img", leave=False)
    with torch.no_grad():
        for batch in batches:
            if batch is None:
                continue
            x, y = batch
            if limit is not None and count + len(x) > limit:
                x, y = x[: limit - count], y[: limit - count]
            logits = {n: p(x).float() for n, p in predictors.items()}
            preds = {n: v.argmax(1) for n, v in logits.items()}
            if (y < 0).any():
                labelled = False
            else:
                k = min(5, next(iter(logits.values())).shape[1])
                for n, v in logits.items():
                    top1[n] += int((preds[n] == y).sum())
                    top5[n] += int((v.topk(k, 1).indices == y[:, None]).any(1).sum())
            for a, b in pairs:
                same[(a, b)] += int((preds[a] == preds[b]).sum())
                maxdiff[(a, b)] = max(maxdiff[(a, b)], float((logits[a] - logits[b]).abs().max()))
            count += len(x)
            bar.update(len(x))
            if limit is not None and count >= limit:
                break
    bar.close()
    skipped = len(getattr(getattr(batches, "dataset", None), "skipped", set())) - n_skip0
    res = Comparison(count=count, skipped=skipped, labelled=labelled and count > 0)
    if count:
        if res.labelled:
            res.accuracy = {n: Accuracy(100.0 * top1[n] / count, 100.0 * top5[n] / count, count) for n in names}
        res.agreement = {p: 100.0 * same[p] / count for p in pairs}
        res.max_abs_diff = {p: round(maxdiff[p], 6) for p in pairs}
    return res


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; inf when identical)."""
    ref = reference.detach().float()
    noise = (ref - test.detach().float()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# --------------------------------------------------------------------------- per-layer SQNR

def _record(gm, x: torch.Tensor) -> dict[str, torch.Tensor]:
    import torch.fx

    values: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(out, torch.Tensor):
                values[n.name] = out.detach()
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def _float_counterpart(node) -> str:
    """Name of the float node whose value matches ``node`` after BN folding (the BN output when a BN follows)."""
    from .quant.fuse import BN_OPS

    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in BN_OPS:
        bn = users[0]
        gets = [u for u in bn.users if u.op == "call_function" and u.target is operator.getitem]
        return (gets[0] if gets else bn).name
    return node.name


def layer_sqnr(float_gm, int8_gm, x: torch.Tensor) -> list[dict]:
    """SQNR (dB) of every quantized activation in the INT8 graph against the same activation of the float graph.

    An activation is quantized where a compute op's output goes through quantize -> dequantize; that
    dequantized tensor is what the next layer sees. Sorted worst first.
    """
    from .quant.graph import COMPUTE_OPS, DEQUANTIZE_OPS, QUANTIZE_OPS

    fvals, qvals = _record(float_gm, x), _record(int8_gm, x)
    fnodes = {n.name: n for n in float_gm.graph.nodes}
    rows = []
    for n in int8_gm.graph.nodes:
        if n.op != "call_function" or n.target not in COMPUTE_OPS or n.name not in fnodes:
            continue
        qs = [u for u in n.users if u.op == "call_function" and u.target in QUANTIZE_OPS]
        dqs = [d for q in qs for d in q.users if d.op == "call_function" and d.target in DEQUANTIZE_OPS]
        ref = _float_counterpart(fnodes[n.name])
        if not dqs or ref not in fvals or dqs[0].name not in qvals:
            continue
        a, b = fvals[ref], qvals[dqs[0].name]
        if a.shape != b.shape:
            continue
        stack = n.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        rows.append({"node": n.name, "module": module, "op": str(n.target).replace("aten.", ""),
                     "sqnr_db": round(sqnr_db(a, b), 2)})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows
