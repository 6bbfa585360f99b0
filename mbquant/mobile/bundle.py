"""The app bundle: everything an app needs to run a verified INT8 program, and nothing else.

    model<suffix>        the INT8 program (e.g. model.pte for pte-xnnpack)
    model<suffix>.json   its sidecar (what the program is; its backend reads it to open the program)
    labels.txt           one class name per line, in output order
    preprocess.json      the preprocessing contract (mbquant.data.contract): size, colour, resize, mean/std, layout
    report.json          the report of the run that made and verified it
    bundle.json          the manifest: backend, program, sha256 of every file, input shape, class count, source run
    README.md            what the files are and how an app uses them

Which backends' programs a bundle can carry is their row's ``bundle`` flag. :func:`write_bundle` makes one from a
finished run folder: the run's artifact must be the very file the run verified (sha256), the staged bundle is read
back and its program opened by its backend (input shape and output count checked against the contract and the
labels) before the folder is published (staged, renamed when complete). :func:`read_bundle` checks a bundle's
files and records without torch (the reference client and the app use that); :func:`open_bundle` also opens the
program with its backend.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import RunFolder
from ..atomic import sha256_file
from ..errors import ConfigError, DataError, VerificationError
from ..records import BundleManifest, PreprocessSpec, RecordError, RunReport, Sidecar, labels_text, paths, read_labels
from . import table

if TYPE_CHECKING:
    from .backend import Predictor

README = """# mbquant app bundle

- `{program}`: INT8 program for {backend} ({runtime}; {file}, {bytes:,} bytes), made by `{command}`.
- `{program}.json`: the program's sidecar (how it was made; what its backend needs to open it).
- `labels.txt`: {classes} class names, one per line, in the order of the model's outputs.
- `preprocess.json`: how an image becomes the input tensor {shape} (float32, NCHW): {color} colour, resize
  `{resize}`, then (pixel / 255 - mean) / std with mean {mean} and std {std}.
- `report.json`: how it was made and what was measured: top-1 {top1} % on {images} images ({drop} pp below the
  float model), {agreement} % agreement with the float model, checked with the program's own runtime.
- `bundle.json`: the manifest (backend, sha256 of every file); `mbquant check` and the reference client refuse a
  bundle whose files do not match it.

An app loads the program with its runtime, applies `preprocess.json`, runs `forward` and reads the logits (softmax
for probabilities). `examples/android/` in mbquant is such an app for ExecuTorch programs.
"""


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: BundleManifest
    spec: PreprocessSpec
    labels: list[str]
    report: RunReport

    @property
    def program(self) -> Path:
        return self.root / self.manifest.program

    @property
    def sidecar_path(self) -> Path:
        return paths.sidecar(self.program)

    @property
    def artifact(self):
        """The run's measurement of the program this bundle carries."""
        return self.report.artifact(self.manifest.source_artifact)


def bundled_artifact(report: RunReport, run_dir: Path):
    """The run's artifact a bundle carries: the first one whose backend's row allows bundles."""
    able = [a for a in report.artifacts if a.backend in table.BACKENDS and table.BACKENDS[a.backend].bundle]
    if not able:
        having = ", ".join(s.name for s in table.BACKENDS.values() if s.bundle)
        raise ConfigError(f"the run in '{run_dir}' has no artifact an app bundle can carry (its backends: "
                          f"{', '.join(sorted({a.backend for a in report.artifacts})) or 'none'}; bundles carry "
                          f"programs of: {having}); run `mbquant ptq ... --target phone --format pte`")
    return able[0]


def write_bundle(run_dir: Path | str, out: Path | str, *, overwrite: bool = False) -> Path:
    """A verified bundle in ``out`` from the verified run in ``run_dir`` (published only when complete and
    checked; an earlier bundle in ``out`` is replaced only then, and only with ``overwrite``)."""
    run_dir, out = Path(run_dir), Path(out)
    report = RunReport.read(run_dir / paths.REPORT)
    if not report.ok:
        raise VerificationError(f"the run in '{run_dir}' failed its checks ({'; '.join(report.failures)[:300]}); only "
                                f"verified runs are bundled")
    art = bundled_artifact(report, run_dir)
    src = run_dir / art.file
    sidecar = Sidecar.of(src)
    if not src.is_file():
        raise DataError(f"'{src}', the artifact the run verified, is missing; bundle a complete run folder")
    digest = sha256_file(src)
    recorded = art.sha256 or sidecar.sha256
    if recorded is None:
        raise RecordError(f"the run in '{run_dir}' records no sha256 of '{art.file}' (written by an older mbquant), so "
                          f"the file cannot be shown to be the one it verified; run `mbquant ptq` again")
    if digest != recorded:
        raise VerificationError(f"'{src}' is not the file the run verified (sha256 {digest[:12]}..., the run measured "
                                f"{recorded[:12]}...): it was replaced or damaged after the run; bundle only what was "
                                f"verified (run `mbquant ptq` again)")
    spec = table.get_spec(art.backend)
    program = paths.bundle_program(Path(art.file).suffix)
    labels = list(report.model.classes) or [str(i) for i in range(report.model.num_classes)]
    with RunFolder(out, overwrite=overwrite, kind=BundleManifest.KIND) as folder:
        stage = folder.staging
        shutil.copyfile(src, stage / program)
        shutil.copyfile(paths.sidecar(src), paths.sidecar(stage / program))
        (stage / paths.LABELS).write_text(labels_text(labels))
        sidecar.preprocess.write(stage / paths.PREPROCESS)
        shutil.copyfile(run_dir / paths.REPORT, stage / paths.REPORT)
        pre = sidecar.preprocess
        (stage / paths.BUNDLE_README).write_text(README.format(
            program=program, backend=spec.name, runtime=spec.runtime, file=art.file, bytes=art.bytes,
            command=report.command, classes=len(labels), shape=pre.shape, color=pre.color, resize=pre.policy,
            mean=list(pre.mean), std=list(pre.std), top1=art.top1, images=art.images, drop=art.drop_pp,
            agreement=art.agreement_float))
        files = {p.name: sha256_file(p) for p in sorted(stage.iterdir())}
        BundleManifest(spec.name, program, files, tuple(pre.shape), len(labels), str(run_dir.resolve()), art.file,
                       time.strftime("%Y-%m-%d")).write(stage / paths.BUNDLE_MANIFEST)
        predictor = open_bundle(stage)[1]       # verified from the staged files before anything is published
        predictor.close()
        folder.publish()
    return out


def read_bundle(root: Path | str) -> Bundle:
    """A checked bundle, without torch: every file of the manifest present with its sha256, the contract, labels,
    sidecar and report valid and consistent with each other (input shape, class count)."""
    root = Path(root)
    fix = "write it again with `mbquant bundle RUN_DIR --out DIR`"
    if not root.is_dir():
        raise DataError(f"bundle '{root}' is not a folder; pass the folder `mbquant bundle` wrote")
    if not (root / paths.BUNDLE_MANIFEST).is_file():
        older = (root / "model.pte").is_file() and (root / paths.PREPROCESS).is_file()
        raise VerificationError(f"bundle '{root}' has no {paths.BUNDLE_MANIFEST}"
                                + (" (written by an older mbquant)" if older else "") + f"; {fix}")
    manifest = BundleManifest.read(root / paths.BUNDLE_MANIFEST)
    for name, digest in manifest.files.items():
        p = root / name
        if Path(name).name != name:
            raise VerificationError(f"bundle '{root}': its manifest names '{name}', which is not a file name; {fix}")
        if not p.is_file():
            raise VerificationError(f"bundle '{root}' lacks {name}; {fix}")
        if sha256_file(p) != digest:
            raise VerificationError(f"bundle '{root}': {name} is not the file the bundle was written with (sha256 "
                                    f"differs): it was replaced or damaged; {fix}")
    needed = {manifest.program, paths.sidecar(manifest.program).name, paths.LABELS, paths.PREPROCESS, paths.REPORT}
    missing = sorted(needed - set(manifest.files))
    if missing:
        raise VerificationError(f"bundle '{root}': its manifest lists no {', '.join(missing)}; {fix}")
    spec = PreprocessSpec.read(root / paths.PREPROCESS)
    if list(manifest.input_shape) != spec.shape:
        raise VerificationError(f"bundle '{root}': the manifest says input {list(manifest.input_shape)}, "
                                f"preprocess.json {spec.shape}; the bundle mixes files of different models: {fix}")
    labels = read_labels(root / paths.LABELS, expected=manifest.classes)
    sidecar = Sidecar.read(paths.sidecar(root / manifest.program))
    if sidecar.preprocess != spec:
        raise VerificationError(f"bundle '{root}': preprocess.json is not the contract the program was measured with "
                                f"(its sidecar's); {fix}")
    if sidecar.backend != manifest.backend:
        raise VerificationError(f"bundle '{root}': the manifest says backend {manifest.backend}, the program's sidecar "
                                f"{sidecar.backend}; {fix}")
    report = RunReport.read(root / paths.REPORT)
    if report.model.num_classes != len(labels):
        raise VerificationError(f"bundle '{root}': labels.txt names {len(labels)} classes, the model has "
                                f"{report.model.num_classes}; {fix}")
    bundle = Bundle(root, manifest, spec, labels, report)
    if bundle.artifact is None:
        raise VerificationError(f"bundle '{root}': report.json holds no measurement of "
                                f"'{manifest.source_artifact}'; {fix}")
    return bundle


def open_bundle(root: Path | str) -> tuple[Bundle, "Predictor"]:
    """:func:`read_bundle`, then the program opened by its backend and run once: its input must be the contract's
    and its outputs one per label."""
    import torch

    bundle = read_bundle(root)
    if bundle.manifest.backend not in table.BACKENDS:
        raise ConfigError(f"bundle '{bundle.root}' holds a program of backend '{bundle.manifest.backend}', which this "
                          f"mbquant does not have; supported: {', '.join(table.BACKENDS)}")
    backend = table.load(bundle.manifest.backend)
    predictor = backend.open(bundle.program, Sidecar.read(bundle.sidecar_path))
    try:
        out = predictor(torch.zeros(bundle.spec.shape))
    except Exception as exc:
        predictor.close()
        raise VerificationError(f"bundle '{bundle.root}': {bundle.manifest.program} does not run on an input of "
                                f"{bundle.spec.shape} (preprocess.json): {type(exc).__name__}: {str(exc)[:200]}; the "
                                f"bundle mixes files of different models") from exc
    if out.shape[-1] != len(bundle.labels):
        predictor.close()
        raise VerificationError(f"bundle '{bundle.root}': {bundle.manifest.program} has {out.shape[-1]} outputs but "
                                f"labels.txt {len(bundle.labels)} lines; the bundle mixes files of different models")
    return bundle, predictor


def verify_on_arm(root: Path | str, data: Path, limit: int | None = None) -> dict[str, Any]:
    """The bundle's program on aarch64 (emulated) and on this host, image by image, by its backend's runners."""
    bundle = read_bundle(root)
    return table.load(bundle.manifest.backend).verify_on_arm(bundle, Path(data), limit)
