"""Progress of the stages that have no steps to count (lowering, writing a program), and the process's resources.

Stages with steps (calibration batches, bias-correction layers, evaluated images) use tqdm bars with their own
rate and time estimate; :func:`stage` gives the others a line that shows the elapsed time every second and, when
an earlier measurement of the same stage is known, the estimate. :func:`resources` reads the peak memory a run
needs (this process and its finished children).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from typing import Iterator

__all__ = ["resources", "stage"]


@contextlib.contextmanager
def stage(desc: str, *, enabled: bool, estimate_s: float | None = None, every_s: float = 1.0) -> Iterator[None]:
    """A progress line ``desc: 12 s`` (``of ~40 s`` with ``estimate_s``) refreshed every ``every_s`` while the block
    runs, on stderr; nothing when not ``enabled``."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    fmt = "{desc}: {elapsed}" + (f" (about {estimate_s:.0f} s)" if estimate_s else "")
    bar = tqdm(total=None, desc=desc, bar_format=fmt, leave=False, file=sys.stderr)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            bar.refresh()

    ticker = threading.Thread(target=tick, name=f"progress:{desc}", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def _mb(kib: int) -> float:
    return round(kib / 1024, 1)        # ru_maxrss is in KiB on Linux


def resources(started: float | None = None) -> dict:
    """Peak resident memory (MB) of this process and of its finished child processes (TorchScript workers), and
    the CPU seconds used; ``started`` (a ``time.perf_counter()``) adds the wall seconds since then."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"peak_rss_mb": _mb(me.ru_maxrss), "children_peak_rss_mb": _mb(kids.ru_maxrss),
           "cpu_seconds": round(me.ru_utime + me.ru_stime, 1)}
    if started is not None:
        out["wall_seconds"] = round(time.perf_counter() - started, 1)
    return out
