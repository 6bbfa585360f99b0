"""The run report (``report.json``): what a ``ptq``/``qat`` run made, measured and decided, with one
:class:`ArtifactResult` per artifact file and the float reference (:class:`FloatResult`).

Format 2 adds the artifacts' sha256, each backend's summary lines and informational notes; format 1 reports
(mbquant before the records module) read with those empty.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..models.info import ModelInfo
from .base import Fields, Record, RecordError
from .model import read_model

MAX_ARTIFACTS = 64
MAX_LINES = 1000


def read_paired(f: Fields) -> dict[str, Any]:
    """A paired difference (:class:`mbquant.evaluate.PairedDifference` as a dict), consistent with itself."""
    n = f.int("images", lo=0, hi=10 ** 9)
    a, b = f.int("only_a", lo=0, hi=n), f.int("only_b", lo=0, hi=n)
    diff = f.number("diff_pp", lo=-100, hi=100)
    if n and abs(diff - 100.0 * (a - b) / n) > 0.01:
        raise f.error("diff_pp", diff, f"100 * (only_a - only_b) / images = {100.0 * (a - b) / n:.3f}")
    out = {"images": n, "only_a": a, "only_b": b, "diff_pp": diff, "se_pp": f.number("se_pp", lo=0, hi=100),
           "ci95_pp": f.numbers("ci95_pp", length=2)}
    if f.has("method"):
        out["method"] = f.str("method")
    return out


@dataclass(frozen=True)
class ArtifactResult:
    """One artifact file, measured with its own runtime on the evaluation images.

    ``top1``/``drop_pp``/``agreement_float`` are the artifact's own (what ships); ``drop_paired`` is the paired
    difference behind ``drop_pp`` (images only the float model gets right, only the artifact; 95 % CI);
    ``reference_*`` are the in-process INT8 model it was written from; ``parity`` compares the two (agreement,
    largest logit difference, flipped images and their margins, and the paired differences the parity gate tests).
    ``summary`` holds the lines its backend adds under the run's table (e.g. an MCU program's memory)."""

    backend: str
    file: str                      # the file's name in the run folder
    bytes: int
    runtime: str
    images: int
    top1: float
    top5: float
    drop_pp: float
    agreement_float: float
    reference_top1: float
    reference_agreement_float: float
    parity: dict[str, Any]
    drop_paired: dict[str, Any] = field(default_factory=dict)
    delegated: float | None = None
    latency: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    summary: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = list(self.summary)
        return d

    @classmethod
    def from_fields(cls, f: Fields) -> "ArtifactResult":
        pct = dict(lo=0.0, hi=100.0)
        images = f.int("images", lo=0, hi=10 ** 9)
        p = f.sub("parity")
        parity = {"agreement": p.number("agreement", **pct), "max_abs_logit_diff": p.number("max_abs_logit_diff", lo=0),
                  "flips": p.json("flips", optional=True, default={}),
                  "top1_reference_minus_artifact": read_paired(p.sub("top1_reference_minus_artifact")),
                  "agreement_float_reference_minus_artifact":
                      read_paired(p.sub("agreement_float_reference_minus_artifact"))}
        paired = f.sub("drop_paired", optional=True)
        return cls(
            backend=f.str("backend", nonempty=True, max_len=100), file=f.str("file", nonempty=True, max_len=255),
            bytes=f.int("bytes", lo=0), runtime=f.str("runtime"), images=images, top1=f.number("top1", **pct),
            top5=f.number("top5", **pct), drop_pp=f.number("drop_pp", lo=-100.0, hi=100.0),
            agreement_float=f.number("agreement_float", **pct), reference_top1=f.number("reference_top1", **pct),
            reference_agreement_float=f.number("reference_agreement_float", **pct), parity=parity,
            drop_paired=read_paired(paired) if paired is not None else {},
            delegated=f.number("delegated", lo=0.0, hi=1.0, optional=True), latency=f.json("latency", optional=True),
            details=f.json("details", optional=True, default={}) or {},
            sha256=f.hexdigest("sha256", length=64, optional=True),
            summary=tuple(f.strs("summary", optional=True, max_items=MAX_LINES) or ()))


@dataclass(frozen=True)
class FloatResult:
    """The float model on the same images, and the fp32 program written for size/latency comparison."""

    images: int
    top1: float
    top5: float
    file: str | None = None        # the fp32 program's name in the run folder
    bytes: int | None = None
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_fields(cls, f: Fields) -> "FloatResult":
        return cls(f.int("images", lo=0, hi=10 ** 9), f.number("top1", lo=0, hi=100), f.number("top5", lo=0, hi=100),
                   f.str("file", optional=True, max_len=255), f.int("bytes", lo=0, optional=True),
                   f.json("latency", optional=True))


@dataclass(frozen=True)
class DataSection:
    """Which images a run calibrated and evaluated on (digests name the exact files)."""

    calibration: dict[str, Any]
    eval_root: str
    eval_images: int
    calibration_digest: str
    eval_digest: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_fields(cls, f: Fields) -> "DataSection":
        c = f.sub("calibration")
        calib = {"root": c.str("root"), "requested": c.int("requested", lo=1), "selected": c.int("selected", lo=0),
                 "available": c.int("available", lo=0), "seed": c.int("seed", lo=0),
                 "stratified": c.bool("stratified"), "labelled": c.bool("labelled", optional=True)}
        return cls(calib, f.str("eval_root"), f.int("eval_images", lo=0, hi=10 ** 9),
                   f.hexdigest("calibration_digest", length=16), f.hexdigest("eval_digest", length=16))


@dataclass(frozen=True)
class RunReport(Record):
    """``report.json`` of a run folder (or ``<out>.failed/report.json``)."""

    command: str
    status: str
    failures: tuple[str, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    model: ModelInfo
    config: dict[str, Any]
    run: dict[str, Any]
    host: dict[str, Any]
    data: DataSection
    backends: dict[str, dict[str, Any]]
    seconds: dict[str, float]
    float: FloatResult | None
    artifacts: tuple[ArtifactResult, ...]
    versions: dict[str, Any]
    qat_config: dict[str, Any] | None = None
    qat: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None
    versus_ptq: dict[str, dict[str, Any]] | None = None     # a QAT run against PTQ of the same checkpoint

    KIND = "mbquant-report"
    VERSION = 2
    READS = (1, 2)
    WHAT = "run report"
    FIX = "pass the --out folder of a finished `mbquant ptq`/`qat` run (run it again with this mbquant if needed)"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def unversioned_v1(cls, data: dict) -> bool:
        return "command" in data and "status" in data

    def artifact(self, file: str) -> ArtifactResult | None:
        return next((a for a in self.artifacts if a.file == file), None)

    def layer_sqnr(self) -> dict[str, list[dict]]:
        return {n: b["layer_sqnr_all"] for n, b in self.backends.items() if b.get("layer_sqnr_all")}

    def to_dict(self) -> dict[str, Any]:
        out = {"command": self.command, "status": self.status, "failures": list(self.failures),
               "warnings": list(self.warnings), "notes": list(self.notes), "model": self.model.to_dict(),
               "config": self.config, "run": self.run}
        if self.qat_config is not None:
            out["qat_config"] = self.qat_config
        out.update(host=self.host, data=self.data.to_dict(), backends=self.backends, seconds=self.seconds)
        if self.resources is not None:
            out["resources"] = self.resources
        out["float"] = self.float.to_dict() if self.float is not None else None
        out["artifacts"] = [a.to_dict() for a in self.artifacts]
        if self.qat is not None:
            out["qat"] = self.qat
        if self.versus_ptq is not None:
            out["versus_ptq"] = self.versus_ptq
        out["versions"] = self.versions
        return out

    @classmethod
    def from_fields(cls, f: Fields, version: int) -> "RunReport":
        status = f.str("status", choices=("ok", "failed"))
        fl = f.sub("float", optional=True)
        arts = f.subs("artifacts", optional=True, max_items=MAX_ARTIFACTS) or []
        if status == "ok" and (fl is None or not arts):
            raise RecordError(f"{f.source}: status is ok but it holds no measured artifact; {f.fix}")
        backends = f.sub("backends", optional=True)
        bks = {}
        if backends is not None:
            for name in backends.data:
                backends.sub(name)                      # each backend's facts are a JSON object
                bks[name] = backends.json(name)
        seconds = f.json("seconds", optional=True, default={}) or {}
        if not isinstance(seconds, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in seconds.values()):
            raise f.error("seconds", seconds, "stage names with non-negative seconds")
        return cls(
            command=f.str("command"), status=status, failures=tuple(f.strs("failures", max_items=MAX_LINES)),
            warnings=tuple(f.strs("warnings", max_items=MAX_LINES)),
            notes=tuple(f.strs("notes", optional=True, max_items=MAX_LINES) or ()),
            model=read_model(f.sub("model")), config=f.json("config"), run=f.json("run"),
            host=f.json("host", optional=True, default={}) or {}, data=DataSection.from_fields(f.sub("data")),
            backends=bks, seconds=seconds, float=FloatResult.from_fields(fl) if fl is not None else None,
            artifacts=tuple(ArtifactResult.from_fields(a) for a in arts),
            versions=f.json("versions", optional=True, default={}) or {},
            qat_config=f.json("qat_config", optional=True), qat=f.json("qat", optional=True),
            resources=f.json("resources", optional=True), versus_ptq=f.json("versus_ptq", optional=True))
