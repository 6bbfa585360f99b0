"""What a run measured, as it is built: :class:`Report` collects sections (configs, data, backends' facts, the
float reference and one :class:`~mbquant.records.ArtifactResult` per artifact), warnings (for the user to act on),
notes (what happened) and failures; it is written as the typed :class:`~mbquant.records.RunReport` and printed by
:func:`summary_table`, with no per-backend branches (backends add their own summary lines to their results)."""
from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import ArtifactResult, FloatResult, RunReport, paths

__all__ = ["ArtifactResult", "FloatResult", "Report", "format_table", "host", "library_versions", "summary_table"]


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


def host() -> dict[str, Any]:
    """The CPU the latencies and the accuracies were measured on (XNNPACK picks kernels per ISA)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "asimddp") if f in flags]
    return {"machine": platform.machine(), "cpu": name, "isa": isa}


@dataclass
class Report:
    """Sections of a run, in the order they were added. ``failures`` make the command exit non-zero."""

    command: str
    sections: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    location: Path | None = None    # where the report ended: the run folder, or <out>.failed/report.json

    def add(self, name: str, value: Any) -> None:
        self.sections[name] = value.to_dict() if hasattr(value, "to_dict") else value

    def warn(self, message: str) -> None:
        """Something the user should act on (the message says how)."""
        if message not in self.warnings:
            self.warnings.append(message)

    def note(self, message: str) -> None:
        """Something that happened, worth a line (no action needed)."""
        if message not in self.notes:
            self.notes.append(message)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"command": self.command, "status": "ok" if self.ok else "failed", "failures": self.failures,
                "warnings": self.warnings, "notes": self.notes, **self.sections, "versions": library_versions()}

    def record(self) -> RunReport:
        """The typed record of this report (validated: a writer bug fails here, not in a later reader)."""
        return RunReport.parse({"format": RunReport.format(), **self.to_dict()}, "the run's report")

    def write(self, out_dir: Path | str) -> Path:
        return self.record().write(Path(out_dir) / paths.REPORT)


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def _na(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: RunReport, *, full: bool = True) -> str:
    """The human table printed at the end of a run: the float model, then one row per artifact file, then the
    backends' own lines, the per-layer SQNR, QAT's history, notes, warnings and failures (``full=False``, for
    ``--quiet``: the table and the failures only)."""
    fl, arts = report.float, report.artifacts
    rows = [("float model", _na(fl and fl.top1, ".2f"), "", "", "", _na(fl and fl.bytes and fl.bytes / 1024, ",.0f"),
             _na(((fl and fl.latency) or {}).get("median_ms"), ".2f"), "")]
    for a in arts:
        rows.append((f"{a.file} ({a.backend})", f"{a.top1:.2f}", f"{a.drop_pp:.2f}", f"{a.agreement_float:.2f}",
                     f"{a.parity['agreement']:.2f}", f"{a.bytes / 1024:,.0f}",
                     _na((a.latency or {}).get("median_ms"), ".2f"), _na(a.delegated, ".2%")))
    lines = [format_table(rows, ("artifact", "top-1 %", "drop pp", "agree float %", "parity %", "size KiB",
                                 "latency ms", "delegated"))]
    if not full:
        return "\n".join(lines + [f"FAILED: {f}" for f in report.failures])
    if arts:
        lat = arts[0].latency or {}
        lines.append(f"{arts[0].images} images; 'agree float': same top-1 as the float model; 'parity': same top-1 as "
                     f"the in-process INT8 model the file was written from; latency: batch 1, "
                     f"{lat.get('threads', '-')} thread(s), {report.host.get('cpu', 'this host')} (not a phone)")
    for a in arts:
        lines += list(a.summary)
    for name, b in report.backends.items():
        worst = ", ".join(f"{r['module'] or r['node']} {r['sqnr_db']:.1f} dB" for r in b.get("layer_sqnr_worst5", [])[:3]
                          if isinstance(r.get("sqnr_db"), (int, float)))
        if worst:
            lines.append(f"{name}: worst layers (SQNR): {worst}")
    qat = report.qat
    if qat:
        hist = [(str(r["epoch"]), f"{r['lr']:.5f}", f"{r['train_loss']:.4f}", f"{r['train_top1']:.2f}",
                 f"{r['val_top1']:.2f}", "yes" if r["bn_frozen"] else "", "yes" if r["observers_frozen"] else "")
                for r in qat["history"]]
        lines.append(f"QAT on {qat['world_size']} process(es), {qat['seconds']:.0f} s"
                     + (f", resumed after epoch {qat['resumed_from_epoch']}" if qat["resumed_from_epoch"] else "") + ":\n"
                     + format_table(hist, ("epoch", "lr", "train loss", "train top-1", "val top-1 (fake-quant)",
                                           "BN frozen", "observers frozen")))
    lines += list(report.notes)
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"FAILED: {f}" for f in report.failures]
    return "\n".join(lines)
