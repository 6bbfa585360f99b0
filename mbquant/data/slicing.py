"""The one rule that picks a seeded subset of images: calibration subsets, ``--eval-limit``, ``check --limit`` and
``verify-arm --limit`` all select with :func:`stratified_indices` (torch-free: numpy only).

The permutation is the Fisher-Yates shuffle ``torch.randperm`` computes with a generator seeded by
``torch.manual_seed(seed)`` (MT19937, one 32-bit draw per step), reproduced with numpy's MT19937: the selections
mbquant made before this module existed (and the baselines recorded on them) stay the same, and the torch-free
reference client picks the same images as the pipeline. ``tests/data/test_slicing.py`` holds the two equal.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

SEED_LIMIT = 2 ** 32     # MT19937 seeds are 32-bit; torch.manual_seed truncates larger seeds, numpy refuses them


def check_seed(seed: int, flag: str = "--seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        from ..errors import ConfigError

        raise ConfigError(f"seed {seed!r} is out of range [0, {SEED_LIMIT - 1}] (a 32-bit random generator seed); "
                          f"pass {flag} with a value in that range, e.g. {flag} 0")
    return int(seed)


class Shuffler:
    """Permutations from one seeded MT19937 stream, draw for draw what ``torch.randperm(n, generator=g)`` gives
    for consecutive calls on ``g = torch.Generator().manual_seed(seed)``."""

    def __init__(self, seed: int):
        self._rng = np.random.RandomState(check_seed(seed))

    def permutation(self, n: int) -> list[int]:
        out = list(range(n))
        if n < 2:
            return out
        draws = self._rng.randint(0, 2 ** 32, size=n - 1, dtype=np.uint32)
        for i in range(n - 1):
            z = i + int(draws[i]) % (n - i)
            out[i], out[z] = out[z], out[i]
        return out


def shuffled_head(n_items: int, n: int, seed: int) -> list[int]:
    """The first ``n`` of a seeded permutation of ``range(n_items)``, sorted (an unlabelled subset)."""
    return sorted(Shuffler(seed).permutation(n_items)[:n])


def stratified_indices(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` indices spread evenly over classes (round-robin over per-class seeded shuffles, classes in label order),
    sorted."""
    rng = Shuffler(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_class[lab].append(i)
    queues = {c: [idx[j] for j in rng.permutation(len(idx))] for c, idx in sorted(by_class.items())}
    out: list[int] = []
    depth = 0
    while len(out) < n:
        progressed = False
        for c in sorted(queues):
            if depth < len(queues[c]) and len(out) < n:
                out.append(queues[c][depth])
                progressed = True
        if not progressed:
            break
        depth += 1
    return sorted(out)


def eval_indices(labels: Sequence[int], limit: int | None, seed: int = 0) -> list[int] | None:
    """Which labelled images a ``--limit``/``--eval-limit`` of ``limit`` evaluates: a seeded class-stratified
    subset, or None for all of them."""
    if limit is None or limit >= len(labels):
        return None
    return stratified_indices(labels, limit, seed)
