"""Latency measurement shared by every backend, the fresh-process TorchScript worker and the benchmarks (torch-free):
wall time of repeated calls, summarised as median and p90."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def times_ms(fn: Callable[[Any], Any], x: Any, runs: int) -> list[float]:
    """Wall time of each of ``runs`` calls ``fn(x)``, in milliseconds."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1000)
    return out


def latency_summary(times: list[float]) -> dict:
    """Median / p90 (ms) of measured call times."""
    times = sorted(times)
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
            "runs": len(times)}


def latency_ms(fn: Callable[[Any], Any], x: Any, *, warmup: int = 3, runs: int = 20, batch: int = 1) -> dict:
    """Median / p90 wall time of ``fn(x)`` in milliseconds, after ``warmup`` calls."""
    times_ms(fn, x, warmup)
    return {**latency_summary(times_ms(fn, x, runs)), "batch": batch}
