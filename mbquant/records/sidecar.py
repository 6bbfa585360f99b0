"""``<artifact>.json``, the sidecar beside every artifact: what the file is (backend, runtime, sha256, input
shape), the model it came from, how it was quantized, how images become its input (the contract), the data it was
measured on and what was measured. Apps, ``mbquant check`` and a backend's ``open`` read it.

Format 2 carries the contract and the artifact's sha256; format 1 sidecars (no ``format`` key) carry the preset,
from which the contract is derived, and no sha256.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.info import ModelInfo
from . import paths
from .base import Fields, Record, RecordError
from .model import read_model, read_preset
from .preprocess import PreprocessSpec


@dataclass(frozen=True)
class Sidecar(Record):
    artifact: str
    backend: str
    runtime: str
    model: ModelInfo
    config: dict[str, Any]
    preprocess: PreprocessSpec
    input_shape: tuple[int, ...]
    sha256: str | None = None
    calibration_digest: str | None = None
    eval_digest: str | None = None
    measured: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)

    KIND = "mbquant-sidecar"
    VERSION = 2
    READS = (1, 2)
    WHAT = "artifact sidecar"
    FIX = "keep the sidecar mbquant wrote beside the artifact (or write the artifact again)"

    @classmethod
    def unversioned_v1(cls, data: dict) -> bool:
        return "artifact" in data and "backend" in data

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.classes

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "backend": self.backend, "runtime": self.runtime, "sha256": self.sha256,
                "model": self.model.to_dict(), "config": self.config, "preprocess": self.preprocess.document(),
                "classes": list(self.model.classes), "input_shape": list(self.input_shape),
                "calibration_digest": self.calibration_digest, "eval_digest": self.eval_digest,
                "measured": self.measured, "details": self.details, "versions": self.versions}

    @classmethod
    def from_fields(cls, f: Fields, version: int) -> "Sidecar":
        model = read_model(f.sub("model"))
        if version >= 2:
            pre = PreprocessSpec.parse(f.data.get("preprocess"), f"{f.source}: 'preprocess'")
        else:
            pre = PreprocessSpec.from_preset(read_preset(f.sub("preset")))
        shape = tuple(f.numbers("input_shape", integer=True, positive=True, length=4))
        if list(shape) != pre.shape:
            raise f.error("input_shape", list(shape), f"the contract's input {pre.shape}")
        if list(pre.shape[2:]) != [model.resolution] * 2:
            raise f.error("preprocess", pre.shape, f"the model's {model.resolution}x{model.resolution} input")
        classes = f.strs("classes", optional=True) or list(model.classes)
        if list(classes) != list(model.classes):
            raise f.error("classes", classes, f"the model's classes {list(model.classes)[:4]}")
        measured = f.sub("measured", optional=True)
        if measured is not None:
            measured.int("images", lo=0)
            for k in ("top1", "agreement_float", "parity"):
                measured.number(k, lo=0, hi=100, optional=True)
            measured.number("drop_pp", lo=-100, hi=100, optional=True)
        return cls(f.str("artifact", nonempty=True, max_len=255), f.str("backend", nonempty=True, max_len=100),
                   f.str("runtime"), model, f.json("config"), pre, shape,
                   f.hexdigest("sha256", length=64, optional=True),
                   f.hexdigest("calibration_digest", length=16, optional=True),
                   f.hexdigest("eval_digest", length=16, optional=True),
                   measured.data if measured is not None else None,
                   f.json("details", optional=True, default={}) or {},
                   f.json("versions", optional=True, default={}) or {})

    @classmethod
    def of(cls, artifact: Path | str) -> "Sidecar":
        """The sidecar beside ``artifact``, checked to describe that file."""
        artifact = Path(artifact)
        side = paths.sidecar(artifact)
        if not side.is_file():
            raise RecordError(f"'{artifact}' has no sidecar '{side.name}' (mbquant writes one beside every artifact); "
                              f"it says which backend runs the file and how images are preprocessed, so the artifact "
                              f"cannot be checked without it")
        rec = cls.read(side)
        if rec.artifact != artifact.name:
            raise RecordError(f"sidecar '{side}' describes '{rec.artifact}', not '{artifact.name}'; keep each artifact "
                              f"with its own sidecar (rename both together)")
        return rec
