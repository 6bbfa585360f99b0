"""``bundle.json``, the app bundle's manifest: which backend's program it holds, the sha256 of every file (so a
bundle whose program or contract was swapped or damaged is refused), the input shape and class count, and the
verified run it was made from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Fields, Record
from .preprocess import MAX_SIDE

MAX_FILES = 16


@dataclass(frozen=True)
class BundleManifest(Record):
    backend: str
    program: str                        # the program's file name in the bundle
    files: dict[str, str]               # file name -> sha256
    input_shape: tuple[int, ...]
    classes: int
    source_run: str
    source_artifact: str
    created: str

    KIND = "mbquant-bundle"
    VERSION = 1
    READS = (1,)
    WHAT = "bundle manifest"
    FIX = "write the bundle again with `mbquant bundle RUN_DIR --out DIR`"

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "program": self.program, "files": dict(self.files),
                "input_shape": list(self.input_shape), "classes": self.classes, "source_run": self.source_run,
                "source_artifact": self.source_artifact, "created": self.created}

    @classmethod
    def from_fields(cls, f: Fields, version: int) -> "BundleManifest":
        files = f.sub("files")
        if not 1 <= len(files.data) <= MAX_FILES:
            raise f.error("files", list(files.data)[:5], f"1 to {MAX_FILES} file names with their sha256")
        digests = {name: files.hexdigest(name, length=64) for name in files.data}
        program = f.str("program", nonempty=True, max_len=255)
        if program not in digests:
            raise f.error("program", program, f"one of the listed files {sorted(digests)}")
        shape = f.numbers("input_shape", integer=True, positive=True, length=4)
        if shape[:2] != [1, 3] or max(shape[2:]) > MAX_SIDE:
            raise f.error("input_shape", shape, f"[1, 3, H, W] with H, W in [1, {MAX_SIDE}]")
        return cls(f.str("backend", nonempty=True, max_len=100), program, digests, tuple(shape),
                   f.int("classes", lo=1, hi=100_000), f.str("source_run"), f.str("source_artifact"),
                   f.str("created", optional=True) or "")
