"""Run reports: every stage adds what it did and measured; ends as a table and as JSON."""
from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import write_json


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"mbquant": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "torchao", "executorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Report:
    """Sections of a run, in the order they were added. ``failures`` make the command exit non-zero."""

    command: str
    sections: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, value: Any) -> None:
        self.sections[name] = value.to_dict() if hasattr(value, "to_dict") else value

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"command": self.command, "status": "ok" if self.ok else "failed", "failures": self.failures,
                "warnings": self.warnings, **self.sections, "versions": library_versions()}

    def write(self, out_dir: Path | str, name: str = "report.json") -> Path:
        return write_json(Path(out_dir) / name, self.to_dict())


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])
