"""Every path rule of the files mbquant writes: names in a run folder, sidecars, the hidden folders a run keeps
beside its ``--out`` (lock, staging, failed, work, old), the bundle's files and the sweep files. Nothing else in
mbquant spells these names."""
from __future__ import annotations

from pathlib import Path

REPORT = "report.json"                       # a run folder's report (also inside a bundle)
SIDECAR_SUFFIX = ".json"                     # <artifact>.json beside every artifact
CALIBRATION_SWEEP = "calibration_sweep.json"
RECIPES = "recipes.json"
SWEEPS = (CALIBRATION_SWEEP, RECIPES)
PLOTS = "plots"                              # a run's default plot folder
QAT_CHECKPOINT = "qat_last.pt"
PLOT_MARKER = ".mbquant-plots"              # a plot folder mbquant created (lists the PNGs it wrote)

# the app bundle
BUNDLE_MANIFEST = "bundle.json"
LABELS = "labels.txt"
PREPROCESS = "preprocess.json"
BUNDLE_README = "README.md"


def bundle_program(suffix: str) -> str:
    """The program's name in a bundle (``model.pte``, ``model.onnx``, ...)."""
    return f"model{suffix}"


def artifact_name(info, precision: str, suffix: str) -> str:
    """``<model>_w<width>_r<resolution>_<precision><suffix>`` of a ModelInfo, e.g. ``mobilenet_v2_w0.5_r64_int8.pte``."""
    return f"{info.name}_w{info.width_mult:g}_r{info.resolution}_{precision}{suffix}"


def sidecar(artifact: Path | str) -> Path:
    return Path(f"{artifact}{SIDECAR_SUFFIX}")


def is_sidecar(path: Path) -> bool:
    return path.name.endswith(SIDECAR_SUFFIX) and path.name not in (REPORT, *SWEEPS, BUNDLE_MANIFEST, PREPROCESS)


class OutPaths:
    """The hidden names a run (or any command that publishes a folder) keeps beside its output ``out``."""

    def __init__(self, out: Path | str):
        self.out = Path(out)

    @property
    def parent(self) -> Path:
        return self.out.parent

    def hidden(self, kind: str, pid: int | None = None) -> Path:
        return self.parent / (f".{self.out.name}.{kind}" + (f"-{pid}" if pid is not None else ""))

    @property
    def lock(self) -> Path:
        return self.hidden("lock")

    def staging(self, pid: int) -> Path:
        return self.hidden("staging", pid)

    def old(self, pid: int) -> Path:
        return self.hidden("old", pid)

    @property
    def work(self) -> Path:
        return self.hidden("work")

    @property
    def failed(self) -> Path:
        return self.parent / f"{self.out.name}.failed"

    def leftovers(self, kind: str) -> list[Path]:
        return sorted(self.parent.glob(f".{self.out.name}.{kind}-*"))


def pid_of(path: Path) -> int | None:
    """The pid in a hidden ``...-<pid>`` name, or None."""
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def run_of_checkpoint(path: Path | str) -> Path:
    """The ``--out`` a QAT checkpoint belongs to: the folder given, the run folder holding it, or the run a killed
    run kept it beside (``.<out>.work/qat_last.pt``)."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return path
    parent = path.parent
    if parent.name.startswith(".") and parent.name.endswith(".work"):
        return parent.parent / parent.name[1:-len(".work")]
    return parent
