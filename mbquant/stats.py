"""The statistics mbquant judges with (torch-free, numpy only): the top-2 logit margin (how close an image is to
flipping), and the paired difference of two models' 0/1 outcomes on the same images with its interval.

With n images and d discordant pairs (one model right, the other wrong), a difference is noise below about
sqrt(d) / n. :class:`PairedDifference` reports the difference in percentage points with its Wald standard error
(what the parity gate tests) and a 95 % interval; ``method="exact"`` gives the exact conditional (McNemar /
Clopper-Pearson) interval, which stays honest on few images (ten images never give [0, 0]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def top2_margin(logits) -> np.ndarray:
    """Top-1 minus top-2 logit per row (inf for a single class); numpy or anything ``np.asarray`` takes."""
    a = np.asarray(logits, dtype=np.float64)
    if a.shape[1] < 2:
        return np.full(a.shape[0], math.inf)
    top2 = np.partition(a, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution by bisection on its regularized incomplete beta function."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion (k successes of n)."""
    if n == 0:
        return 0.0, 1.0
    alpha = 1 - level
    lo = 0.0 if k == 0 else _beta_ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else _beta_ppf(1 - alpha / 2, k + 1, n - k)
    return lo, hi


@dataclass(frozen=True)
class PairedDifference:
    """Paired difference of two 0/1 outcomes on the same n images (a correct - b correct), in percentage
    points, with the Wald standard error of a paired difference of proportions."""

    n: int
    only_a: int      # images where only a is right
    only_b: int      # images where only b is right

    @property
    def diff_pp(self) -> float:
        return 100.0 * (self.only_a - self.only_b) / self.n if self.n else 0.0

    @property
    def se_pp(self) -> float:
        if not self.n:
            return 0.0
        d = self.only_a + self.only_b
        return 100.0 * math.sqrt(max(0.0, d - (self.only_a - self.only_b) ** 2 / self.n)) / self.n

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Wald interval (large samples)."""
        return (self.diff_pp - z * self.se_pp, self.diff_pp + z * self.se_pp)

    def exact_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Exact conditional interval: the discordant pairs split as a binomial (McNemar), its Clopper-Pearson
        interval scaled by d / n. Valid on any number of images; with no discordant pair it is [-r, r] where r is
        the largest share of discordant images the sample cannot rule out."""
        d = self.only_a + self.only_b
        if not self.n:
            return (-100.0, 100.0)
        if d == 0:
            # no discordant image: the discordant share itself is bounded by its exact upper limit
            r = 100.0 * clopper_pearson(0, self.n, level)[1]
            return (-r, r)
        lo, hi = clopper_pearson(self.only_a, d, level)
        scale = 100.0 * d / self.n
        return (scale * (2 * lo - 1), scale * (2 * hi - 1))

    def to_dict(self, z: float = 1.96, *, exact: bool = False) -> dict:
        lo, hi = self.exact_interval() if exact else self.interval(z)
        out = {"images": self.n, "only_a": self.only_a, "only_b": self.only_b, "diff_pp": round(self.diff_pp, 3),
               "se_pp": round(self.se_pp, 3), "ci95_pp": [round(lo, 3), round(hi, 3)]}
        if exact:
            out["method"] = "exact (McNemar, Clopper-Pearson)"
        return out


def paired(a, b) -> PairedDifference:
    """:class:`PairedDifference` of two boolean vectors (same images; numpy or torch)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return PairedDifference(int(a.size), int((a & ~b).sum()), int((b & ~a).sum()))


def clustered_se_pp(a, b, pred_a, pred_b) -> float:
    """Standard error (pp) of mean(a) - mean(b) (two boolean outcomes on the same images) when the images on which
    they differ come in groups whose outcomes move together: each group is the unordered pair of classes the two
    models predict there (one logit offset between two kernel families moves every near-tie between the same two
    classes the same way). Cluster-robust (sandwich) variance with every other image its own cluster; when no two
    discordant images share a pair it equals :attr:`PairedDifference.se_pp`."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = a.size
    if not n:
        return 0.0
    d = a.astype(np.float64) - b.astype(np.float64)
    mean = d.mean()
    pa, pb = np.asarray(pred_a, dtype=np.int64), np.asarray(pred_b, dtype=np.int64)
    k = int(max(pa.max(initial=0), pb.max(initial=0))) + 1
    disc = d != 0
    keys = np.minimum(pa, pb)[disc] * k + np.maximum(pa, pb)[disc]
    _, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=d[disc], minlength=sizes.size)
    var = float(((sums - sizes * mean) ** 2).sum()) + float((n - disc.sum()) * mean ** 2)
    return 100.0 * math.sqrt(var) / n


MIN_IMAGES = 100    # fewer images cannot judge a drop: its 95 % interval spans more than any bound worth setting


def chance_rate(labels) -> float:
    """The accuracy of always guessing the most frequent class of ``labels``."""
    a = np.asarray(labels)
    return float(np.bincount(a).max() / a.size) if a.size else 0.0


def indistinguishable_from_chance(correct: int, labels) -> bool:
    """Whether ``correct`` of the images could be right by guessing: the lower end of the exact 95 % interval of the
    accuracy does not clear the most-frequent-class rate."""
    n = len(labels)
    return n > 0 and clopper_pearson(int(correct), n)[0] <= chance_rate(labels)


def chance_message(top1: float, labels, classes: int) -> str:
    return (f"the float model scores {top1:.2f} % on {len(labels):,} images of {classes} classes, within noise of "
            f"chance ({100 * chance_rate(labels):.1f} % by always guessing the most frequent class), so its accuracy "
            f"drop and agreement mean nothing (a model that predicts nothing loses nothing by quantization); check its "
            f"BatchNorm statistics (`mbquant eval` in eval mode; `mbquant train` recalibrates them), its preprocessing "
            f"(preset, mean/std, resolution) and the labels (class folder names and order)")
