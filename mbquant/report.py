"""What a run measured: one frozen :class:`ArtifactResult` per artifact file, the float reference, and the
report (JSON + the human table) built from that list with no per-backend branches."""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class ArtifactResult:
    """One artifact file, measured with its own runtime on the evaluation images.

    ``top1``/``drop_pp``/``agreement_float`` are the artifact's own (what ships); ``drop_paired`` is the paired
    difference behind ``drop_pp`` (images only the float model gets right, only the artifact; 95 % CI);
    ``reference_*`` are the in-process INT8 model it was written from; ``parity`` compares the two (agreement,
    largest logit difference, flipped images and their margins, and the paired differences the parity gate tests)."""

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
    drop_paired: dict[str, Any] = field(default_factory=dict)   # float vs artifact: discordant images, 95 % CI
    delegated: float | None = None
    latency: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass
class Report:
    """Sections of a run, in the order they were added. ``failures`` make the command exit non-zero."""

    command: str
    sections: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    location: Path | None = None    # where the report ended: the run folder, or <out>.failed/report.json

    def add(self, name: str, value: Any) -> None:
        self.sections[name] = value.to_dict() if hasattr(value, "to_dict") else value

    def warn(self, message: str) -> None:
        if message not in self.warnings:
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

    def fmt(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def _na(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(report: dict) -> str:
    """The human table printed at the end of a run: the float model, then one row per artifact file."""
    fl, arts = report.get("float") or {}, report.get("artifacts") or []
    rows = [("float model", _na(fl.get("top1"), ".2f"), "", "", "", _na(fl.get("bytes") and fl["bytes"] / 1024, ",.0f"),
             _na((fl.get("latency") or {}).get("median_ms"), ".2f"), "")]
    for a in arts:
        rows.append((f"{a['file']} ({a['backend']})", f"{a['top1']:.2f}", f"{a['drop_pp']:.2f}",
                     f"{a['agreement_float']:.2f}", f"{a['parity']['agreement']:.2f}", f"{a['bytes'] / 1024:,.0f}",
                     _na((a.get("latency") or {}).get("median_ms"), ".2f"), _na(a.get("delegated"), ".2%")))
    lines = [format_table(rows, ("artifact", "top-1 %", "drop pp", "agree float %", "parity %", "size KiB",
                                 "latency ms", "delegated"))]
    if arts:
        a = arts[0]
        lat = a.get("latency") or {}
        lines.append(f"{a['images']} images; 'agree float': same top-1 as the float model; 'parity': same top-1 as the "
                     f"in-process INT8 model the file was written from; latency: batch 1, {lat.get('threads', '-')} "
                     f"thread(s), {report.get('host', {}).get('cpu', 'this host')} (not a phone)")
    for a in arts:
        mem = (a.get("details") or {}).get("memory")
        if mem:
            f, r = mem["flash"], mem["ram"]
            lines.append(f"{a['file']}: flash {f['program_bytes']:,} B (constants "
                         + ", ".join(f"{k} {v:,} B" for k, v in f["constants_by_dtype"].items())
                         + f"); RAM peak {r['arena_bytes']:,} B planned (input {r['input']['bytes']:,} B "
                         f"{r['input']['dtype']}, scratch up to {(r['scratch_max'] or {}).get('bytes', 0):,} B), set by "
                         f"{r['peak_set_by']}; {(a.get('details') or {}).get('cpu', '')}; accuracy from the host "
                         f"reference kernels, not a device")
    for name, b in (report.get("backends") or {}).items():
        worst = ", ".join(f"{r['module'] or r['node']} {r['sqnr_db']:.1f} dB" for r in b.get("layer_sqnr_worst5", [])[:3])
        if worst:
            lines.append(f"{name}: worst layers (SQNR): {worst}")
    qat = report.get("qat")
    if qat:
        hist = [(str(r["epoch"]), f"{r['lr']:.5f}", f"{r['train_loss']:.4f}", f"{r['train_top1']:.2f}",
                 f"{r['val_top1']:.2f}", "yes" if r["bn_frozen"] else "", "yes" if r["observers_frozen"] else "")
                for r in qat["history"]]
        lines.append(f"QAT on {qat['world_size']} process(es), {qat['seconds']:.0f} s"
                     + (f", resumed after epoch {qat['resumed_from_epoch']}" if qat["resumed_from_epoch"] else "") + ":\n"
                     + format_table(hist, ("epoch", "lr", "train loss", "train top-1", "val top-1 (fake-quant)",
                                           "BN frozen", "observers frozen")))
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    lines += [f"FAILED: {f}" for f in report.get("failures", [])]
    return "\n".join(lines)
