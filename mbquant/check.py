"""Accuracy-drop regression checks users put in their CI: ``mbquant check``, ``mbquant baseline write`` and
:mod:`mbquant.testing` all use :func:`measure` and :func:`judge`.

An artifact (any backend's file with its sidecar, or an app bundle) is opened from its file by its own backend (the
table says which, from the sidecar or the bundle's manifest) and run on a labelled folder, preprocessed by the
contract it was measured with, on the same seeded, class-stratified slice ``mbquant ptq --eval-limit`` evaluates;
optionally the float model runs on the same inputs. A Cortex-M program is executed from its bytes with the host
reference of its kernels, like in the run that wrote it.

The verdict compares with the float model (drop, agreement) and/or a stored baseline, and says how much of a
difference is noise: with n images and d discordant pairs (one model right, the other wrong) the paired (McNemar)
interval of a drop is exact (conditional binomial); ``strict_ci`` applies ``max_drop`` to its upper end. Nothing
here writes a baseline except :func:`write_baseline`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import check_decode_workers
from .distributed import Dist
from .errors import ConfigError, DataError
from .records import VERDICT, Baseline, PreprocessSpec, RunReport, Sidecar, check_tolerance, paths
from .stats import MIN_IMAGES, chance_message, indistinguishable_from_chance

Z95 = 1.96


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
    artifact_sha256: str | None = None
    float_correct: int | None = None
    labels: list[int] = field(default_factory=list, repr=False)
    baseline: dict[str, Any] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("labels")
        return {"format": VERDICT, **d, "ok": self.ok}

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
        lines += [f"  note       {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Source:
    """An artifact opened from its file: its predictor, its contract and classes, and what it came from."""

    predictor: Callable[[torch.Tensor], torch.Tensor]
    spec: PreprocessSpec
    classes: list[str]
    description: str
    model: Any                       # ModelInfo of the float model it was quantized from
    program: Path                    # the file that was run
    close: Callable[[], None] = lambda: None


def _path(artifact: Path | str) -> Path:
    path = Path(artifact)
    if not path.is_dir() and not path.is_file():
        raise DataError(f"'{path}' is neither an artifact file nor a bundle folder; pass a file written by mbquant "
                        f"(with its sidecar) or a folder written by `mbquant bundle`")
    return path


def open_artifact(path: Path) -> _Source:
    """A bundle folder, or an artifact file with its sidecar, opened by its backend from the file."""
    from .mobile import table

    if path.is_dir():
        from .mobile.bundle import open_bundle

        bundle, pred = open_bundle(path)
        side = Sidecar.read(bundle.sidecar_path)
        return _Source(pred, bundle.spec, bundle.labels, f"app bundle, {bundle.manifest.backend}", side.model,
                       bundle.program, pred.close)
    side = Sidecar.of(path)
    if side.backend not in table.BACKENDS:
        raise ConfigError(f"'{path}' is a {side.backend!r} artifact, a backend this mbquant does not have; supported: "
                          f"{', '.join(table.BACKENDS)}")
    pred = table.load(side.backend).open(path, side)
    classes = list(side.classes) or [str(i) for i in range(side.model.num_classes)]
    return _Source(pred, side.preprocess, classes, f"{side.backend}, {side.model.describe()}", side.model, path,
                   pred.close)


def _float_module(float_model: nn.Module | str | Path | None, model) -> nn.Module | None:
    """The float model to compare with; a checkpoint other than the one the artifact was quantized from is an error
    (the drop would measure two different models)."""
    if float_model is None or isinstance(float_model, nn.Module):
        return None if float_model is None else float_model.eval()
    from .models.load import resolve_model

    module, info = resolve_model(model.name, str(float_model))
    _same_weights(info.weights_sha256, model, float_model)
    return module.eval()


def _same_weights(sha: str | None, model, given) -> None:
    if sha and model.weights_sha256 and sha != model.weights_sha256:
        raise ConfigError(f"--float-weights '{given}' is not the checkpoint the artifact was quantized from "
                          f"('{model.weights}', sha256 {model.weights_sha256[:12]}...); compare with the float model "
                          f"it came from")


def measure(artifact: Path | str, data: Path | str, *, float_model: nn.Module | str | Path | None = None,
            limit: int | None = None, dist: Dist | None = None, workers: int = 0) -> Verdict:
    """``artifact``'s top-1 (and, with ``float_model``, its paired drop and agreement) on ``data``: the whole
    folder, or the seeded class-stratified slice of ``limit`` images. With an active ``dist`` (torchrun) each
    rank runs its shard and every rank gets the verdict of all images; ``workers`` processes decode the images."""
    from .data.dataset import eval_set
    from .data.folders import files_digest
    from .evaluate import compare_dataset
    from .atomic import sha256_file

    path = _path(artifact)
    src = open_artifact(path)
    try:
        ds = eval_set(Path(data), src.spec, classes=src.classes, limit=limit)
        predictors = {"artifact": src.predictor}
        fl = _float_module(float_model, src.model)
        if fl is not None:
            predictors["float"] = fl
        cmp = compare_dataset(predictors, ds, 100, dist=dist, workers=workers)
    finally:
        src.close()
    if cmp.count == 0 or not cmp.labelled:
        raise DataError(f"no readable labelled images in '{data}'; pass a labelled ImageFolder of the model's classes")
    readable = ds.readable_samples()
    v = Verdict(str(artifact), src.description, str(data), cmp.count,
                files_digest((s.path, s.label) for s in readable), round(cmp.top1("artifact"), 3),
                artifact_sha256=sha256_file(src.program))
    if fl is not None:
        p = cmp.paired_accuracy("float", "artifact")
        _fill_drop(v, round(cmp.top1("float"), 3), p.to_dict(exact=True), round(cmp.agree("float", "artifact"), 3))
        v.float_correct, v.labels = int(cmp.correct("float").sum()), cmp.labels.tolist()
    return v


def _fill_drop(v: Verdict, float_top1: float, paired: dict, agreement: float) -> None:
    v.float_top1, v.drop_pp, v.agreement = float_top1, paired["diff_pp"], agreement
    v.drop_ci95, v.discordant = tuple(paired["ci95_pp"]), (paired["only_a"], paired["only_b"])


def report_verdict(run_dir: Path | str, file: str) -> Verdict:
    """A verdict with the numbers the run in ``run_dir`` measured for its artifact ``file`` (the run opened that
    file with its backend): how mbquant's own baselines are judged without measuring twice."""
    run_dir = Path(run_dir)
    report = RunReport.read(run_dir / paths.REPORT)
    entry = report.artifact(file)
    if entry is None or not entry.drop_paired:
        raise DataError(f"'{run_dir / paths.REPORT}' holds no paired measurement of '{file}'; run it again")
    v = Verdict(str(run_dir / file), f"{entry.backend}, {report.model.describe()}", report.data.eval_root,
                entry.images, report.data.eval_digest, entry.top1, measured_by=f"its run ({entry.runtime})",
                artifact_sha256=entry.sha256)
    _fill_drop(v, report.float.top1, entry.drop_paired, entry.agreement_float)
    return v




def judge(v: Verdict, *, baseline: Baseline | Path | str | None = None, max_drop: float | None = None,
          min_agreement: float | None = None, tolerance: float | None = None, strict_ci: bool = False) -> Verdict:
    """Apply the checks to a measured verdict (see the module doc); ``tolerance`` (pp) overrides the baseline's."""
    if isinstance(baseline, (str, Path)):
        baseline = read_baseline(baseline)
    check_request(max_drop, min_agreement, baseline, tolerance, has_float=v.float_top1 is not None)
    if v.images < MIN_IMAGES:
        span = f"; the 95 % interval of its drop spans {v.drop_ci95[1] - v.drop_ci95[0]:.0f} pp" if v.drop_ci95 else ""
        raise ConfigError(f"{v.images} readable images cannot judge an accuracy drop (at least {MIN_IMAGES}{span}); "
                          f"check on more images")
    if v.float_top1 is not None and v.float_correct is not None and \
            indistinguishable_from_chance(v.float_correct, v.labels):
        v.checks.append({"ok": False, "what": chance_message(v.float_top1, v.labels, len(set(v.labels)))})
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


def check_request(max_drop: float | None, min_agreement: float | None, baseline: Baseline | None,
                  tolerance: float | None, *, has_float: bool, limit: int | None = None) -> None:
    """A check asks for something, and what it asks can be measured (the same rule before and after measuring)."""
    import math

    for value, flag, hi in ((max_drop, "--max-drop", 100.0), (min_agreement, "--min-agreement", 100.0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0 <= value <= hi):
            raise ConfigError(f"{flag} {value!r} is invalid; pass a number of {'percentage points' if flag == '--max-drop' else 'percent'} in [0, {hi:g}]")
    if tolerance is not None:
        check_tolerance(tolerance)
    if (max_drop is not None or min_agreement is not None) and not has_float:
        raise ConfigError("--max-drop and --min-agreement compare with the float model; pass --float-weights "
                          "(a checkpoint or shipped name), or check against a --baseline")
    if max_drop is None and min_agreement is None and baseline is None:
        raise ConfigError("nothing to check: pass --max-drop and/or --min-agreement with --float-weights, or a "
                          "--baseline")
    check_limit(limit)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < MIN_IMAGES:
        raise ConfigError(f"--limit {limit} is too few images to judge an accuracy drop (at least {MIN_IMAGES}; on 10 "
                          f"images the 95 % interval of a drop spans more than 60 pp); pass --limit {MIN_IMAGES} or "
                          f"more")


def check(artifact: Path | str, data: Path | str, *, float_model: nn.Module | str | Path | None = None,
          baseline: Baseline | Path | str | None = None, max_drop: float | None = None,
          min_agreement: float | None = None, tolerance: float | None = None, strict_ci: bool = False,
          limit: int | None = None, dist: Dist | None = None, workers: int = 0) -> Verdict:
    """:func:`measure` then :func:`judge`; with a baseline, on the images it was recorded on (its ``limit``)."""
    if isinstance(baseline, (str, Path)):
        baseline = read_baseline(baseline)
    if baseline is not None and limit is None:
        limit = baseline.limit
    # before the measurement: a request that cannot be judged fails before any image is run
    check_request(max_drop, min_agreement, baseline, tolerance, has_float=float_model is not None, limit=limit)
    check_decode_workers(workers)
    v = measure(artifact, data, float_model=float_model, limit=limit, dist=dist, workers=workers)
    return judge(v, baseline=baseline, max_drop=max_drop, min_agreement=min_agreement, tolerance=tolerance,
                 strict_ci=strict_ci)


def _against_baseline(v: Verdict, baseline: Baseline, tolerance: float | None) -> None:
    tol = baseline.tolerance_pp if tolerance is None else tolerance
    v.baseline = {**baseline.document(), "tolerance_used_pp": tol}
    if baseline.eval_digest != v.eval_digest:
        raise DataError(f"the baseline was recorded on {baseline.images:,} images of '{baseline.data}' (digest "
                        f"{baseline.eval_digest}), this check saw {v.images:,} images of '{v.data}' (digest "
                        f"{v.eval_digest}); check on the same data and --limit as `mbquant baseline write`")
    if baseline.artifact_sha256 and v.artifact_sha256:
        v.notes.append("the artifact is the very file the baseline was recorded from (same sha256)"
                       if baseline.artifact_sha256 == v.artifact_sha256 else
                       f"the artifact is not the file the baseline was recorded from (sha256 {v.artifact_sha256[:12]}"
                       f"... vs {baseline.artifact_sha256[:12]}...): this checks a rebuilt model against it")
    v.checks.append({"ok": v.top1 >= baseline.top1 - tol,
                     "what": f"top-1 {v.top1:.2f} % >= baseline {baseline.top1:.2f} % - tolerance {tol:g} pp "
                             f"(recorded {baseline.created} on {baseline.host})"
                             + ("" if v.top1 >= baseline.top1 - tol else
                                f" (the artifact is {baseline.top1 - tol - v.top1:.2f} pp below)")})
    if baseline.agreement is not None and v.agreement is not None:
        v.checks.append({"ok": v.agreement >= baseline.agreement - tol,
                         "what": f"agreement {v.agreement:.2f} % >= baseline {baseline.agreement:.2f} % - "
                                 f"tolerance {tol:g} pp"})


def baseline_record(v: Verdict, *, tolerance: float, why: str = "", limit: int | None = None,
                    **extra: Any) -> Baseline:
    """A baseline from a measured verdict; ``extra`` keys are kept."""
    from .report import host

    tolerance = check_tolerance(tolerance)
    h = host()
    return Baseline(Path(v.artifact).name, v.artifact_sha256, v.data, limit, v.images, v.eval_digest, v.top1,
                    tolerance, why, v.measured_by, f"{h['cpu']} {' '.join(h['isa'])}", time.strftime("%Y-%m-%d"),
                    v.float_top1, v.drop_pp, v.drop_ci95, v.agreement, dict(extra))


def write_baseline(artifact: Path | str, data: Path | str, out: Path | str, *, tolerance: float,
                   float_model: nn.Module | str | Path | None = None, limit: int | None = None,
                   why: str = "", overwrite: bool = False, workers: int = 0) -> Baseline:
    """Measure and record a baseline (the only function that writes one). ``out`` is a new file, or an earlier
    baseline with ``overwrite``; never the artifact, the data or anything else."""
    from ._io import check_outputs, write_record_file

    check_tolerance(tolerance)
    check_limit(limit)
    check_decode_workers(workers)
    check_outputs({"--out": Path(out)}, {"ARTIFACT": Path(artifact), "--data": Path(data)}, kind=Baseline.KIND,
                  overwrite=overwrite)
    rec = baseline_record(measure(artifact, data, float_model=float_model, limit=limit, workers=workers),
                          tolerance=tolerance, why=why, limit=limit)
    write_record_file(Path(out), rec.document(), kind=Baseline.KIND, overwrite=overwrite)
    return rec


def read_baseline(path: Path | str) -> Baseline:
    return Baseline.read(path)
