"""A baseline (``mbquant baseline write``): what an artifact measured on which images, and the tolerance a later
``mbquant check --baseline`` grants, with the reason for it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import Fields, Record, RecordError

MAX_TOLERANCE_PP = 100.0


def check_tolerance(tolerance: Any, flag: str = "--tolerance") -> float:
    import math

    from ..errors import ConfigError

    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or not 0 <= tolerance <= MAX_TOLERANCE_PP:
        raise ConfigError(f"tolerance {tolerance!r} pp is invalid; pass {flag} with a number of percentage points in "
                          f"[0, {MAX_TOLERANCE_PP:g}] (how far below the baseline a later check may be)")
    return float(tolerance)


@dataclass(frozen=True)
class Baseline(Record):
    artifact: str
    artifact_sha256: str | None
    data: str
    limit: int | None
    images: int
    eval_digest: str
    top1: float
    tolerance_pp: float
    tolerance_why: str
    measured_by: str
    host: str
    created: str
    float_top1: float | None = None
    drop_pp: float | None = None
    drop_ci95: tuple[float, float] | None = None
    agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)     # what a recorder adds (spreads, flow, command)

    KIND = "mbquant-baseline"
    VERSION = 2
    READS = (1, 2)
    WHAT = "baseline"
    FIX = "write one with `mbquant baseline write`"

    _KEYS = ("artifact", "artifact_sha256", "data", "limit", "images", "eval_digest", "top1", "float_top1", "drop_pp",
             "drop_ci95", "agreement", "tolerance_pp", "tolerance_why", "measured_by", "host", "created")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._KEYS}
        d["drop_ci95"] = list(self.drop_ci95) if self.drop_ci95 is not None else None
        return {**d, **self.extra}

    @classmethod
    def from_fields(cls, f: Fields, version: int) -> "Baseline":
        pct = dict(lo=0.0, hi=100.0)
        images = f.int("images", lo=1, hi=10 ** 9)
        limit = f.int("limit", lo=1, hi=10 ** 9, optional=True)
        tol = f.number("tolerance_pp", lo=0.0, hi=MAX_TOLERANCE_PP)
        fl = f.number("float_top1", optional=True, **pct)
        ci = f.numbers("drop_ci95", length=2, optional=True)
        if (fl is None) != (f.data.get("agreement") is None):
            raise RecordError(f"{f.source}: 'float_top1' and 'agreement' must both be set or both be null; {f.fix}")
        return cls(f.str("artifact", nonempty=True, max_len=255), f.hexdigest("artifact_sha256", length=64,
                                                                               optional=True),
                   f.str("data"), limit, images, f.hexdigest("eval_digest", length=16), f.number("top1", **pct),
                   tol, f.str("tolerance_why", optional=True) or "", f.str("measured_by", optional=True) or "",
                   f.str("host", optional=True) or "", f.str("created", optional=True) or "", fl,
                   f.number("drop_pp", lo=-100, hi=100, optional=True), tuple(ci) if ci else None,
                   f.number("agreement", optional=True, **pct),
                   {k: f.json(k) for k in f.data if k not in cls._KEYS and k != "format"})
