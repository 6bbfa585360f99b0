"""Sweep results kept beside a run (``calibration_sweep.json``, ``recipes.json``): one point per calibration count
or recipe, measured on the run's own evaluation images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models.info import ModelInfo
from .base import Fields, Record, RecordError
from .model import read_model

MAX_POINTS = 1000


def read_point(f: Fields, kind: str) -> dict[str, Any]:
    pct = dict(lo=0.0, hi=100.0)
    point = {"config": f.json("config"), "calibration_images": f.int("calibration_images", lo=0),
             "images": f.int("images", lo=1), "float_top1": f.number("float_top1", **pct),
             "top1": f.number("top1", **pct), "drop_pp": f.number("drop_pp", lo=-100, hi=100),
             "drop_ci95": f.numbers("drop_ci95", length=2), "agreement": f.number("agreement", **pct),
             "seconds": f.number("seconds", lo=0)}
    if kind == "calibration":
        point["num_calib"] = f.int("num_calib", lo=1)
        if point["calibration_images"] > point["num_calib"]:
            raise f.error("calibration_images", point["calibration_images"],
                          f"at most num_calib ({point['num_calib']})")
    else:
        point["recipe"] = f.str("recipe", nonempty=True, max_len=100)
    return point


@dataclass(frozen=True)
class Sweep(Record):
    kind: str                          # calibration | recipes
    run: str
    backend: str
    model: ModelInfo
    eval_images: int
    eval_digest: str
    measured: str
    host: dict[str, Any]
    created: str
    points: tuple[dict[str, Any], ...]

    KIND = "mbquant-sweep"
    VERSION = 2
    READS = (1, 2)
    WHAT = "sweep"
    FIX = "measure it again with `mbquant report RUN --calibration-sweep ...` or `--recipes ...`"

    @classmethod
    def unversioned_v1(cls, data: dict) -> bool:
        return "points" in data and "run" in data

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "run": self.run, "backend": self.backend, "model": self.model.to_dict(),
                "eval_images": self.eval_images, "eval_digest": self.eval_digest, "measured": self.measured,
                "host": self.host, "created": self.created, "points": list(self.points)}

    @classmethod
    def from_fields(cls, f: Fields, version: int) -> "Sweep":
        pts = f.subs("points", max_items=MAX_POINTS)
        kind = f.str("kind", choices=("calibration", "recipes"), optional=True) or \
            ("calibration" if pts and "num_calib" in pts[0].data else "recipes")
        if not pts:
            raise RecordError(f"{f.source}: 'points' is empty; {f.fix}")
        return cls(kind, f.str("run"), f.str("backend", nonempty=True), read_model(f.sub("model")),
                   f.int("eval_images", lo=1), f.hexdigest("eval_digest", length=16), f.str("measured"),
                   f.json("host", optional=True, default={}) or {}, f.str("created", optional=True) or "",
                   tuple(read_point(p, kind) for p in pts))
