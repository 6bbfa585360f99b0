"""The app bundle: everything a phone app needs to run a verified INT8 XNNPACK program, and nothing else.

    model.pte          the INT8 ExecuTorch program (XNNPACK delegate)
    labels.txt         one class name per line, in output order
    preprocess.json    the preprocessing contract (mbquant.mobile.preprocess): size, colour, resize, mean/std, layout
    report.json        the report of the run that made and verified it
    README.md          what the files are and how an app uses them

``write_bundle`` makes it from a finished run folder (with the run-folder protocol: staged, renamed when complete);
``read_bundle`` checks one (files present, the contract valid, labels and output size consistent, the program
loads and its input shape is the contract's) with clear errors. Neither imports torch.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import RunFolder, write_json
from ..errors import ConfigError, DataError, VerificationError
from .preprocess import check_spec, spec_of

FILES = ("model.pte", "labels.txt", "preprocess.json", "report.json", "README.md")
BACKEND = "pte-xnnpack"

README = """# mbquant app bundle

- `model.pte`: INT8 ExecuTorch program, XNNPACK delegate ({file}, {bytes:,} bytes), made by `{command}`.
- `labels.txt`: {classes} class names, one per line, in the order of the model's outputs.
- `preprocess.json`: how an image becomes the input tensor {shape} (float32, NCHW): {color} colour, resize
  `{resize}`, then (pixel / 255 - mean) / std with mean {mean} and std {std}.
- `report.json`: how it was made and what was measured: top-1 {top1} % on {images} images ({drop} pp below the
  float model), {agreement} % agreement with the float model, checked with the ExecuTorch runtime.

An app loads `model.pte` with ExecuTorch's `Module`, applies `preprocess.json`, runs `forward` and reads the
logits (softmax for probabilities). `examples/android/` in mbquant is such an app.
"""


@dataclass(frozen=True)
class Bundle:
    root: Path
    spec: dict[str, Any]
    labels: list[str]
    report: dict[str, Any]

    @property
    def pte(self) -> Path:
        return self.root / "model.pte"

    @property
    def artifact(self) -> dict[str, Any]:
        return next(a for a in self.report["artifacts"] if a["backend"] == BACKEND)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{what} '{path}' is not readable JSON ({exc}); rebuild the bundle with "
                                f"`mbquant bundle RUN_DIR --out DIR`") from exc


def write_bundle(run_dir: Path | str, out: Path | str, *, overwrite: bool = False) -> Path:
    """A bundle in ``out`` from the verified run in ``run_dir`` (its INT8 pte-xnnpack artifact)."""
    run_dir, out = Path(run_dir), Path(out)
    report = _load_json(run_dir / "report.json", "run report") if (run_dir / "report.json").is_file() else None
    if report is None:
        raise DataError(f"'{run_dir}' has no report.json; pass the --out folder of a finished `mbquant ptq`/`qat` run")
    if report.get("status") != "ok":
        raise VerificationError(f"the run in '{run_dir}' failed its checks ({report.get('failures')}); only verified "
                                f"runs are bundled")
    art = next((a for a in report.get("artifacts", []) if a.get("backend") == BACKEND), None)
    if art is None:
        raise ConfigError(f"the run in '{run_dir}' has no {BACKEND} artifact (the phone app runs ExecuTorch/XNNPACK "
                          f"programs); run `mbquant ptq ... --target phone --format pte`")
    sidecar = _load_json(run_dir / f"{art['file']}.json", "artifact sidecar")
    spec = spec_of(sidecar["preset"])
    labels = list(sidecar["classes"])
    with RunFolder(out, overwrite=overwrite) as folder:
        shutil.copyfile(run_dir / art["file"], folder.staging / "model.pte")
        (folder.staging / "labels.txt").write_text("".join(f"{c}\n" for c in labels))
        write_json(folder.staging / "preprocess.json", spec)
        shutil.copyfile(run_dir / "report.json", folder.staging / "report.json")
        (folder.staging / "README.md").write_text(README.format(
            file=art["file"], bytes=art["bytes"], command=report.get("command", "mbquant"), classes=len(labels),
            shape=spec["input"]["shape"], color=spec["color"]["mode"], resize=spec["resize"]["policy"],
            mean=spec["mean"], std=spec["std"], top1=art["top1"], images=art["images"], drop=art["drop_pp"],
            agreement=art["agreement_float"]))
        read_bundle(folder.staging)
        folder.publish()
    return out


def read_bundle(root: Path | str, runner: Any | None = None) -> Bundle:
    """A checked bundle. ``runner`` (a :class:`mbquant.mobile.client.Runner`) loads the program to compare its input
    shape with the contract; without one the program file's header is checked."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"bundle '{root}' is not a folder; pass the folder `mbquant bundle` wrote")
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise VerificationError(f"bundle '{root}' lacks {', '.join(missing)}; rebuild it with `mbquant bundle`")
    spec = _load_json(root / "preprocess.json", "preprocess.json")
    problems = check_spec(spec)
    if problems:
        raise VerificationError(f"bundle '{root}': preprocess.json is invalid: {'; '.join(problems)}")
    labels = [line for line in (root / "labels.txt").read_text().splitlines() if line]
    report = _load_json(root / "report.json", "report.json")
    bundle = Bundle(root, spec, labels, report)
    data = bundle.pte.read_bytes()
    if len(data) < 8 or data[4:6] != b"ET":
        raise VerificationError(f"bundle '{root}': model.pte is not an ExecuTorch program (no 'ET' file identifier)")
    if runner is not None:
        io = runner.describe(bundle.pte)
        if io["input"] != spec["input"]["shape"]:
            raise VerificationError(f"bundle '{root}': model.pte takes input {io['input']} but preprocess.json says "
                                    f"{spec['input']['shape']}; the bundle mixes files of different models")
        if io["output"][-1] != len(labels):
            raise VerificationError(f"bundle '{root}': model.pte has {io['output'][-1]} outputs but labels.txt "
                                    f"{len(labels)} lines")
    return bundle
