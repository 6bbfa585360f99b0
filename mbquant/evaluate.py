"""Accuracy of several predictors on the same images, in one pass over the data, and the paired statistics
that say how much of a difference between two of them is noise.

``compare({"float": f, "int8": q}, loader)`` keeps, per image, each predictor's top-1 class, whether top-5
holds the label, and its top-2 logit margin, and per pair of predictors the largest logit difference. From
those: accuracy, drop, agreement, and :class:`~mbquant.stats.PairedDifference` (McNemar-style: with n images, a
difference is noise below about sqrt(discordant pairs) / n).
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from .errors import VerificationError
from .stats import PairedDifference, paired, top2_margin

Predictor = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Comparison", "PairedDifference", "compare", "compare_dataset", "layer_sqnr", "merge", "paired", "sqnr_db"]


@dataclass
class Comparison:
    """Results of :func:`compare`: per-image outcomes of every predictor (accuracies are percentages)."""

    count: int
    skipped: int
    labels: torch.Tensor                                  # -1 where unlabelled
    preds: dict[str, torch.Tensor] = field(default_factory=dict)
    in_top5: dict[str, torch.Tensor] = field(default_factory=dict)
    margins: dict[str, torch.Tensor] = field(default_factory=dict)
    max_abs_diff: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)   # each predictor's own time in the pass

    @property
    def labelled(self) -> bool:
        return self.count > 0 and bool((self.labels >= 0).all())

    def correct(self, name: str) -> torch.Tensor:
        return self.preds[name] == self.labels

    def top1(self, name: str) -> float:
        return 100.0 * float(self.correct(name).float().mean()) if self.count else 0.0

    def top5(self, name: str) -> float:
        return 100.0 * float(self.in_top5[name].float().mean()) if self.count else 0.0

    def drop(self, reference: str, other: str) -> float:
        """Top-1 drop in percentage points (positive = ``other`` is worse)."""
        return self.top1(reference) - self.top1(other)

    def agree(self, a: str, b: str) -> float:
        return 100.0 * float((self.preds[a] == self.preds[b]).float().mean()) if self.count else 0.0

    def diff(self, a: str, b: str) -> float:
        d = self.max_abs_diff[(a, b)] if (a, b) in self.max_abs_diff else self.max_abs_diff[(b, a)]
        return round(float(d.max()), 6) if d.numel() else 0.0

    def paired_accuracy(self, a: str, b: str) -> PairedDifference:
        """a's top-1 minus b's, paired on the same images."""
        return paired(self.correct(a), self.correct(b))

    def paired_agreement(self, reference: str, a: str, b: str) -> PairedDifference:
        """a's agreement with ``reference`` minus b's, paired on the same images."""
        return paired(self.preds[a] == self.preds[reference], self.preds[b] == self.preds[reference])


def compare(predictors: Mapping[str, Predictor], batches: Iterable, *, progress: bool = False,
            desc: str = "evaluate") -> Comparison:
    """Run every predictor on every batch ``(images, labels)`` (``None`` batches are skipped)."""
    from tqdm import tqdm

    names = list(predictors)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    preds: dict[str, list] = {n: [] for n in names}
    top5: dict[str, list] = {n: [] for n in names}
    margins: dict[str, list] = {n: [] for n in names}
    diffs: dict[tuple[str, str], list] = {p: [] for p in pairs}
    labels: list[torch.Tensor] = []
    seconds = dict.fromkeys(names, 0.0)
    dataset = getattr(batches, "dataset", None)
    skipped0 = len(getattr(dataset, "skipped", ()))
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, disable=not progress, desc=desc, unit="img", leave=False)
    with torch.no_grad():
        for batch in batches:
            if batch is None:
                continue
            x, y = batch
            logits = {}
            for n, p in predictors.items():           # timed one by one, batch by batch: drift hits all alike
                t = time.perf_counter()
                logits[n] = p(x).float()
                seconds[n] += time.perf_counter() - t
            k = min(5, next(iter(logits.values())).shape[1])
            for n, v in logits.items():
                preds[n].append(v.argmax(1))
                top5[n].append((v.topk(k, 1).indices == y[:, None]).any(1))
                margins[n].append(torch.from_numpy(top2_margin(v.numpy())).float())
            for a, b in pairs:
                diffs[(a, b)].append((logits[a] - logits[b]).abs().amax(1))
            labels.append(y)
            bar.update(len(x))
    bar.close()
    cat = (lambda xs, dtype=torch.long: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype))
    skipped = len(getattr(dataset, "skipped", ())) - skipped0
    return Comparison(count=sum(len(y) for y in labels), skipped=skipped, labels=cat(labels),
                      preds={n: cat(v) for n, v in preds.items()}, in_top5={n: cat(v, torch.bool) for n, v in top5.items()},
                      margins={n: cat(v, torch.float) for n, v in margins.items()},
                      max_abs_diff={p: cat(v, torch.float) for p, v in diffs.items()},
                      seconds={n: round(v, 3) for n, v in seconds.items()})


def merge(parts: list[tuple[list[int], Comparison]]) -> Comparison:
    """One Comparison from several over disjoint shards of a dataset: ``(indices in the dataset of each shard's
    readable images, in the order compared, its Comparison)``; the result is in dataset order."""
    order = torch.tensor([i for idx, _ in parts for i in idx], dtype=torch.long).argsort()
    cmps = [c for _, c in parts]

    def cat(get) -> torch.Tensor:
        return torch.cat([get(c) for c in cmps])[order]

    first = cmps[0]
    return Comparison(count=sum(c.count for c in cmps), skipped=sum(c.skipped for c in cmps),
                      labels=cat(lambda c: c.labels),
                      preds={n: cat(lambda c, n=n: c.preds[n]) for n in first.preds},
                      in_top5={n: cat(lambda c, n=n: c.in_top5[n]) for n in first.in_top5},
                      margins={n: cat(lambda c, n=n: c.margins[n]) for n in first.margins},
                      max_abs_diff={p: cat(lambda c, p=p: c.max_abs_diff[p]) for p in first.max_abs_diff},
                      seconds={n: round(max(c.seconds.get(n, 0.0) for c in cmps), 3) for n in first.seconds})


def compare_dataset(predictors: Mapping[str, Predictor], dataset, batch_size: int, *, dist=None, workers: int = 0,
                    progress: bool = False, desc: str = "evaluate") -> Comparison:
    """:func:`compare` over an :class:`~mbquant.data.dataset.ImageFolderDataset`; with an active ``dist``
    (:class:`~mbquant.distributed.Dist`) each rank runs every ``world``-th image and every rank gets the whole
    Comparison in dataset order (the same numbers as one process); unreadable images of every shard are
    recorded in ``dataset.skipped``. ``workers`` processes decode the images ahead of the models (0: this one)."""
    from .data.dataset import make_loader

    if dist is None or not dist.active:
        return compare(predictors, make_loader(dataset, batch_size, workers=workers), progress=progress, desc=desc)
    idx = dist.shard(len(dataset))
    part = dataset.subset(idx)
    cmp = compare(predictors, make_loader(part, batch_size, workers=workers), progress=progress and dist.is_main,
                  desc=f"{desc} (rank {dist.rank} of {dist.world})")
    readable = [i for i, s in zip(idx, part.samples) if s.path not in part.skipped]
    if len(readable) != cmp.count:
        raise VerificationError(f"rank {dist.rank}: {cmp.count} images were compared but {len(readable)} of its "
                                f"shard are readable; the shard's per-image results cannot be placed")
    parts = dist.gather((readable, cmp, dict(part.skipped)))
    for _, _, skipped in parts:
        dataset.skipped.update(skipped)
    return merge([(r, c) for r, c, _ in parts])


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
    from .quant.ops import BN_OPS

    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in BN_OPS:
        bn = users[0]
        gets = [u for u in bn.users if u.op == "call_function" and u.target is operator.getitem]
        return (gets[0] if gets else bn).name
    return node.name


def layer_sqnr(float_gm, int8_gm, x: torch.Tensor) -> list[dict]:
    """SQNR (dB) of every quantized activation in the INT8 graph against the same activation of the float graph.

    An activation is quantized where a compute op's output goes through quantize -> dequantize; that
    dequantized tensor is what the next layer sees. Sorted worst first; ``index`` is the graph order.
    """
    from .quant.fast_qdq import with_fast_qdq
    from .quant.ops import COMPUTE_OPS, DEQUANTIZE_OPS, QUANTIZE_OPS, module_path

    fvals, qvals = _record(float_gm, x), _record(with_fast_qdq(int8_gm), x)
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
        rows.append({"node": n.name, "module": module_path(n), "op": str(n.target).replace("aten.", ""),
                     "sqnr_db": round(sqnr_db(a, b), 2), "index": len(rows)})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows
