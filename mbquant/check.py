"""Accuracy-drop regression checks users put in their CI: ``mbquant check``, ``mbquant baseline write`` and
:mod:`mbquant.testing` all use :func:`measure` and :func:`judge`.

An artifact (a ``.pte``, ``.pt`` or ``.ptl`` with its sidecar, or an app bundle) is run by its runtime on a
labelled folder, preprocessed as its sidecar (or the bundle's ``preprocess.json``) says, on the same seeded,
class-stratified slice ``mbquant ptq --eval-limit`` evaluates; optionally the float model runs on the same inputs.
A Cortex-M program's kernels run only on the device: its numbers are those the run that wrote it measured with the
host reference of those kernels (``report.json`` beside it), taken only when that run evaluated the same images.

The verdict compares with the float model (drop, agreement) and/or a stored baseline, and says how much of a
difference is noise: with n images and d discordant pairs (one model right, the other wrong) the paired (McNemar)
standard error of a drop is about sqrt(d)/n; ``strict_ci`` applies ``max_drop`` to the upper end of the 95 %
interval instead of the point estimate. Nothing here writes a baseline except :func:`write_baseline`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ._io import write_json
from .errors import ConfigError, DataError

Z95 = 1.96
BASELINE_FORMAT = "mbquant-baseline/1"
FROM_REPORT = ("pte-cortex-m",)       # backends whose kernels this host cannot run; their run measured them


@dataclass
class Verdict:
    """What a check measured and decided; ``text()`` is the readable verdict the CLI prints and asserts raise."""

    artifact: str
    description: str
    data: str
    images: int
    eval_digest: str
    top1: float
    measured_by: str = "this check"
    float_top1: float | None = None
    drop_pp: float | None = None
    drop_ci95: tuple[float, float] | None = None
    discordant: tuple[int, int] | None = None       # images only the float model gets right, only the artifact
    agreement: float | None = None
    baseline: dict[str, Any] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def text(self) -> str:
        lines = [f"mbquant check: {'PASSED' if self.ok else 'FAILED'}",
                 f"  artifact   {self.artifact} ({self.description}), on {self.images:,} images of {self.data}"
                 + ("" if self.measured_by == "this check" else f", as measured by {self.measured_by}"),
                 f"  top-1      {self.top1:.2f} %"]
        if self.float_top1 is not None:
            lo, hi = self.drop_ci95
            lines[-1] += (f" (float model {self.float_top1:.2f} %): drop {self.drop_pp:.2f} pp, 95 % CI [{lo:.2f}, "
                          f"{hi:.2f}] (paired: {self.discordant[0]} images only the float model gets right, "
                          f"{self.discordant[1]} only the artifact)")
            lines.append(f"  agreement  {self.agreement:.2f} % of images get the float model's top-1")
        for c in self.checks:
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'}       {c['what']}")
        return "\n".join(lines)


@dataclass
class _Source:
    """An artifact ready to measure: its predictor and how the check's images become its inputs."""

    predictor: Callable[[torch.Tensor], torch.Tensor]
    select: Callable[[Path, int | None], tuple[Iterable, list[tuple[Path, int]]]]   # -> (batches, (path, label)s)
    description: str
    model: dict[str, Any]
    close: Callable[[], None] = lambda: None


def _read_sidecar(path: Path) -> dict:
    side = Path(f"{path}.json")
    if not side.is_file():
        raise DataError(f"'{path}' has no sidecar '{side.name}' (mbquant writes one beside every artifact); it says how "
                        f"images are preprocessed, so the artifact cannot be checked without it")
    try:
        return json.loads(side.read_text())
    except ValueError as exc:
        raise DataError(f"sidecar '{side}' is not valid JSON ({exc}); write the artifact again") from exc


def _model_info(sidecar: dict):
    from .data import Preset
    from .models import ModelInfo

    m = sidecar["model"]
    return ModelInfo(m["name"], m["num_classes"], m["width_mult"], Preset.from_dict(sidecar["preset"]),
                     tuple(sidecar["classes"]))


def _eval_selection(data: Path, info, limit: int | None):
    from .pipeline import load_eval_set

    ds = load_eval_set(Path(data), info, limit)
    return ds, [(s.path, s.label) for s in ds.samples]


def _sidecar_select(sidecar: dict):
    from .data import make_loader

    info = _model_info(sidecar)

    def select(data: Path, limit: int | None):
        ds, items = _eval_selection(data, info, limit)
        return make_loader(ds, 100), items
    return select


def _bundle_select(bundle):
    import numpy as np
    from PIL import Image

    from .mobile.client import labelled_images
    from .mobile.preprocess import preprocess
    from .pipeline import eval_indices

    def select(data: Path, limit: int | None):
        items = labelled_images(data, bundle.labels)
        keep = eval_indices([y for _, y in items], limit)     # the slice `mbquant ptq --eval-limit` evaluates
        if keep is not None:
            items = [items[i] for i in keep]

        def batches():
            for i in range(0, len(items), 100):
                chunk = items[i:i + 100]
                x = torch.from_numpy(np.stack([preprocess(Image.open(p), bundle.spec) for p, _ in chunk]))
                yield x, torch.tensor([y for _, y in chunk])
        return batches(), items
    return select


def _open(path: Path) -> _Source:
    """A bundle folder, or a .pte/.pt/.ptl written by mbquant (its sidecar ``<file>.json`` beside it)."""
    if path.is_dir():
        from .mobile.bundle import read_bundle
        from .mobile.xnnpack import PteModel

        bundle = read_bundle(path)
        return _Source(PteModel(bundle.pte), _bundle_select(bundle), "app bundle, pte-xnnpack",
                       bundle.report.get("model", {}))
    sidecar = _read_sidecar(path)
    backend = sidecar.get("backend")
    if backend == "pte-xnnpack":
        from .mobile.xnnpack import PteModel

        pred, close = PteModel(path), (lambda: None)
    elif backend in ("ts-qnnpack", "ts-x86"):
        from .mobile.torchscript import FreshProcessModel

        pred = FreshProcessModel(path, engine=sidecar["details"]["engine"], lite=path.suffix == ".ptl")
        close = pred.close
    else:
        raise ConfigError(f"'{path}' is a {backend!r} artifact, which `mbquant check` cannot run; pass an artifact of "
                          f"pte-xnnpack, ts-qnnpack, ts-x86 or pte-cortex-m")
    m = sidecar["model"]
    return _Source(pred, _sidecar_select(sidecar), f"{backend}, {m['name']} w{m['width_mult']:g} "
                   f"{m['resolution']}x{m['resolution']}", m, close)


def _float_module(float_model: nn.Module | str | Path | None, model: dict) -> nn.Module | None:
    """The float model to compare with; a checkpoint other than the one the artifact was quantized from is an error
    (the drop would measure two different models)."""
    if float_model is None or isinstance(float_model, nn.Module):
        return None if float_model is None else float_model.eval()
    from .resolve import resolve_model

    if not model.get("name"):
        raise ConfigError("the artifact does not say which zoo model it is; pass the float model itself")
    module, info = resolve_model(model["name"], str(float_model))
    _same_weights(info.weights_sha256, model, float_model)
    return module.eval()


def _same_weights(sha: str | None, model: dict, given) -> None:
    if sha and model.get("weights_sha256") and sha != model["weights_sha256"]:
        raise ConfigError(f"--float-weights '{given}' is not the checkpoint the artifact was quantized from "
                          f"('{model.get('weights')}', sha256 {model['weights_sha256'][:12]}...); compare with the "
                          f"float model it came from")


def _path(artifact: Path | str) -> Path:
    path = Path(artifact)
    if not path.is_dir() and not path.is_file():
        raise DataError(f"'{path}' is neither an artifact file nor a bundle folder; pass a .pte/.pt/.ptl written by "
                        f"mbquant or a folder written by `mbquant bundle`")
    return path


def measure(artifact: Path | str, data: Path | str, *, float_model: nn.Module | str | Path | None = None,
            limit: int | None = None) -> Verdict:
    """``artifact``'s top-1 (and, with ``float_model``, its paired drop and agreement) on ``data``: the whole
    folder, or the seeded class-stratified slice of ``limit`` images."""
    from .evaluate import compare
    from .pipeline import files_digest

    path = _path(artifact)
    if path.is_file() and _read_sidecar(path).get("backend") in FROM_REPORT:
        return from_report(path, data, float_model=float_model, limit=limit)
    src = _open(path)
    try:
        batches, items = src.select(Path(data), limit)
        predictors = {"artifact": src.predictor}
        fl = _float_module(float_model, src.model)
        if fl is not None:
            predictors["float"] = fl
        cmp = compare(predictors, batches)
    finally:
        src.close()
    if cmp.count == 0 or not cmp.labelled:
        raise DataError(f"no readable labelled images in '{data}'; pass a labelled ImageFolder of the model's classes")
    v = Verdict(str(artifact), src.description, str(data), cmp.count, files_digest(items),
                round(cmp.top1("artifact"), 3))
    if fl is not None:
        p = cmp.paired_accuracy("float", "artifact")
        _fill_drop(v, round(cmp.top1("float"), 3), p.to_dict(Z95), round(cmp.agree("float", "artifact"), 3))
    return v


def _fill_drop(v: Verdict, float_top1: float, paired: dict, agreement: float) -> None:
    v.float_top1, v.drop_pp, v.agreement = float_top1, paired["diff_pp"], agreement
    v.drop_ci95, v.discordant = tuple(paired["ci95_pp"]), (paired["only_a"], paired["only_b"])


def from_report(artifact: Path | str, data: Path | str | None = None, *,
                float_model: nn.Module | str | Path | None = None, limit: int | None = None) -> Verdict:
    """The verdict's numbers as the run that wrote ``artifact`` measured them (``report.json`` in its folder). With
    ``data``, the run must have evaluated exactly the images a check of ``data`` (and ``limit``) selects."""
    from .pipeline import files_digest

    path = Path(artifact)
    rep_path = path.parent / "report.json"
    try:
        report = json.loads(rep_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"'{path}' runs only on its device, so its accuracy is the one its run measured, and that "
                        f"run's report '{rep_path}' is not readable ({exc}); keep report.json beside the artifact")
    entry = next((a for a in report.get("artifacts", []) if a["file"] == path.name), None)
    if entry is None or not entry.get("drop_paired"):
        raise DataError(f"'{rep_path}' holds no paired measurement of '{path.name}'; write it again with this "
                        f"mbquant version")
    digest = report["data"]["eval_digest"]
    if data is not None:
        _, items = _eval_selection(Path(data), _model_info(_read_sidecar(path)), limit)
        if files_digest(items) != digest:
            raise DataError(f"the run that wrote '{path.name}' evaluated {entry['images']:,} images of "
                            f"'{report['data']['eval_root']}' (digest {digest}), not the {len(items):,} images this "
                            f"check selects from '{data}'; run it again with --eval {data}"
                            + (f" --eval-limit {limit}" if limit else "") + " (its kernels run only on the device)")
    if isinstance(float_model, (str, Path)):
        from .resolve import resolve_model

        _same_weights(resolve_model(report["model"]["name"], str(float_model))[1].weights_sha256, report["model"],
                      float_model)
    m = report["model"]
    v = Verdict(str(artifact), f"{entry['backend']}, {m['name']} w{m['width_mult']:g} {m['resolution']}x"
                f"{m['resolution']}", str(data or report["data"]["eval_root"]), entry["images"], digest, entry["top1"],
                measured_by=f"its run ({rep_path}; {entry['runtime']})")
    _fill_drop(v, report["float"]["top1"], entry["drop_paired"], entry["agreement_float"])
    return v


def judge(v: Verdict, *, baseline: dict | Path | str | None = None, max_drop: float | None = None,
          min_agreement: float | None = None, tolerance: float | None = None, strict_ci: bool = False) -> Verdict:
    """Apply the checks to a measured verdict (see the module doc); ``tolerance`` (pp) overrides the baseline's."""
    if isinstance(baseline, (str, Path)):
        baseline = read_baseline(baseline)
    _require_checks(max_drop, min_agreement, baseline, has_float=v.float_top1 is not None)
    if max_drop is not None:
        used = v.drop_ci95[1] if strict_ci else v.drop_pp
        what = "upper end of the 95 % CI of the drop" if strict_ci else "drop"
        v.checks.append({"ok": used <= max_drop, "what": f"{what} {used:.2f} pp <= --max-drop {max_drop:g} pp"
                         + ("" if used <= max_drop else f" (the artifact loses {used - max_drop:.2f} pp more)")})
    if min_agreement is not None:
        v.checks.append({"ok": v.agreement >= min_agreement,
                         "what": f"agreement {v.agreement:.2f} % >= --min-agreement {min_agreement:g} %"})
    if baseline is not None:
        _against_baseline(v, baseline, tolerance)
    return v


def _require_checks(max_drop: float | None, min_agreement: float | None, baseline: dict | None, *,
                    has_float: bool) -> None:
    """A check asks for something, and what it asks can be measured."""
    if (max_drop is not None or min_agreement is not None) and not has_float:
        raise ConfigError("--max-drop and --min-agreement compare with the float model; pass --float-weights "
                          "(a checkpoint or shipped name), or check against a --baseline")
    if max_drop is None and min_agreement is None and baseline is None:
        raise ConfigError("nothing to check: pass --max-drop and/or --min-agreement with --float-weights, or a "
                          "--baseline")


def check(artifact: Path | str, data: Path | str, *, float_model: nn.Module | str | Path | None = None,
          baseline: dict | Path | str | None = None, max_drop: float | None = None,
          min_agreement: float | None = None, tolerance: float | None = None, strict_ci: bool = False,
          limit: int | None = None) -> Verdict:
    """:func:`measure` then :func:`judge`; with a baseline, on the images it was recorded on (its ``limit``)."""
    if isinstance(baseline, (str, Path)):
        baseline = read_baseline(baseline)
    if baseline is not None and limit is None:
        limit = baseline.get("limit")
    # before the measurement: a request that cannot be judged fails before any image is run
    _require_checks(max_drop, min_agreement, baseline, has_float=float_model is not None or _from_report(artifact))
    v = measure(artifact, data, float_model=float_model, limit=limit)
    return judge(v, baseline=baseline, max_drop=max_drop, min_agreement=min_agreement, tolerance=tolerance,
                 strict_ci=strict_ci)


def _from_report(artifact: Path | str) -> bool:
    path = Path(artifact)
    return path.is_file() and Path(f"{path}.json").is_file() and _read_sidecar(path).get("backend") in FROM_REPORT


def _against_baseline(v: Verdict, baseline: dict, tolerance: float | None) -> None:
    tol = baseline["tolerance_pp"] if tolerance is None else tolerance
    v.baseline = {**baseline, "tolerance_used_pp": tol}
    if baseline["eval_digest"] != v.eval_digest:
        raise DataError(f"the baseline was recorded on {baseline['images']:,} images of '{baseline['data']}' (digest "
                        f"{baseline['eval_digest']}), this check saw {v.images:,} images of '{v.data}' (digest "
                        f"{v.eval_digest}); check on the same data and --limit as `mbquant baseline write`")
    v.checks.append({"ok": v.top1 >= baseline["top1"] - tol,
                     "what": f"top-1 {v.top1:.2f} % >= baseline {baseline['top1']:.2f} % - tolerance {tol:g} pp "
                             f"(recorded {baseline['created']} on {baseline['host']})"
                             + ("" if v.top1 >= baseline["top1"] - tol else
                                f" (the artifact is {baseline['top1'] - tol - v.top1:.2f} pp below)")})
    if baseline.get("agreement") is not None and v.agreement is not None:
        v.checks.append({"ok": v.agreement >= baseline["agreement"] - tol,
                         "what": f"agreement {v.agreement:.2f} % >= baseline {baseline['agreement']:.2f} % - "
                                 f"tolerance {tol:g} pp"})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def baseline_record(v: Verdict, *, tolerance: float, why: str = "", limit: int | None = None,
                    **extra: Any) -> dict:
    """A baseline (the format :func:`read_baseline` reads) from a measured verdict; ``extra`` keys are kept."""
    from .report import host

    if tolerance < 0:
        raise ConfigError(f"tolerance {tolerance} pp is negative; pass 0 or more (pp below the baseline accepted)")
    art = Path(v.artifact)
    h = host()
    return {"format": BASELINE_FORMAT, "artifact": art.name,
            "artifact_sha256": _sha256(art / "model.pte" if art.is_dir() else art), "data": v.data, "limit": limit,
            "images": v.images, "eval_digest": v.eval_digest, "top1": v.top1, "float_top1": v.float_top1,
            "drop_pp": v.drop_pp, "drop_ci95": v.drop_ci95, "agreement": v.agreement, "tolerance_pp": tolerance,
            "tolerance_why": why, "measured_by": v.measured_by, "host": f"{h['cpu']} {' '.join(h['isa'])}",
            "created": time.strftime("%Y-%m-%d"), **extra}


def write_baseline(artifact: Path | str, data: Path | str, out: Path | str, *, tolerance: float,
                   float_model: nn.Module | str | Path | None = None, limit: int | None = None,
                   why: str = "") -> dict:
    """Measure and record a baseline (the only function that writes one)."""
    rec = baseline_record(measure(artifact, data, float_model=float_model, limit=limit), tolerance=tolerance,
                          why=why, limit=limit)
    write_json(Path(out), rec)
    return rec


def read_baseline(path: Path | str) -> dict:
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"baseline '{path}' is not readable JSON ({exc}); write one with `mbquant baseline write`") from exc
    if not isinstance(rec, dict) or rec.get("format") != BASELINE_FORMAT:
        raise DataError(f"'{path}' is not an mbquant baseline (format "
                        f"{rec.get('format') if isinstance(rec, dict) else None!r}); write one with "
                        f"`mbquant baseline write`")
    return rec
