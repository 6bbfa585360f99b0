"""Sweeps over a finished PTQ run: accuracy and agreement against the number of calibration images, and across
recipe variants, measured the way the run measured (its model, backend, calibration folder, evaluation images).

Each point quantizes the float model again (prepare -> calibrate -> convert [-> bias correction]) and evaluates the
backend's in-process INT8 model next to the float model on the run's evaluation images; nothing is lowered or
written (the run itself verified that its artifact computes what its INT8 model computes). The variants a backend
can be swept over are its table row's (``sweep_variants``, ``sweep_default``). Results are
:class:`~mbquant.records.Sweep` records kept beside the run, drawn by :mod:`mbquant.plot`.
"""
from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, DataError
from .records import RunReport, Sweep, paths

DEFAULT_COUNTS = (32, 64, 128, 256, 512, 1024, 2048)


class RunContext:
    """What a sweep needs from a PTQ run folder: its model, backend, configs, calibration root and eval images."""

    def __init__(self, run_dir: Path | str):
        from .config import QuantConfig, RunConfig
        from .data.contract import spec_of
        from .data.dataset import eval_set, samples_digest
        from .mobile import table
        from .models.load import resolve_model

        self.run_dir = Path(run_dir)
        self._calibration: dict[tuple[int, int], Any] = {}
        self.report = rep = RunReport.read(self.run_dir / paths.REPORT)
        if rep.qat is not None:
            raise ConfigError(f"'{self.run_dir}' is a QAT run; calibration and recipe sweeps measure PTQ, so run "
                              f"them on a `mbquant ptq` run folder of the same model")
        if not rep.backends:
            raise DataError(f"'{self.run_dir}' holds no backend; sweep a run folder `mbquant ptq` wrote")
        self.model, self.info = resolve_model(rep.model.name, rep.model.weights)
        if self.info.weights_sha256 != rep.model.weights_sha256:
            raise DataError(f"'{rep.model.weights}' is no longer the checkpoint this run quantized (sha256 differs); "
                            f"sweep a run of the checkpoint as it is now")
        self.config = QuantConfig.from_dict(rep.config)
        self.run = RunConfig.from_dict(rep.run)
        self.spec = table.get_spec(next(iter(rep.backends)))
        self.calib_root = Path(rep.data.calibration["root"])
        self.spec_contract = spec_of(self.info.preset)
        self.eval_set = eval_set(Path(rep.data.eval_root), self.spec_contract, classes=self.info.classes,
                                 limit=self.run.eval_limit, seed=self.config.seed)
        if samples_digest(self.eval_set) != rep.data.eval_digest:
            raise DataError(f"the evaluation images under '{rep.data.eval_root}' are not those the run measured "
                            f"(digest differs); sweep where the run's data is")

    @property
    def calibration_available(self) -> int:
        return int(self.report.data.calibration["available"])

    @functools.cached_property
    def float_model(self):
        """The run's float model, exported once for every point of a sweep."""
        from .quant.export import FloatModel

        return FloatModel(self.model, self.info.resolution)

    @functools.cached_property
    def float_outcomes(self):
        """The float model's predictions on the run's images: the same for every point, so measured once."""
        from .data.dataset import make_loader
        from .evaluate import compare
        from .mobile.backend import ModulePredictor

        return compare({"float": ModulePredictor(self.float_model.graph, "float")},
                       make_loader(self.eval_set, self.run.eval_batch_size, workers=self.run.decode_workers))

    def calibration(self, num_calib: int, seed: int):
        """The calibration subset of that size and seed, decoded once per sweep (recipes share one)."""
        from . import calibrate

        if (num_calib, seed) not in self._calibration:
            self._calibration[num_calib, seed] = calibrate.from_folder(
                self.calib_root, self.spec_contract, num_calib, seed=seed, expected_classes=list(self.info.classes))
        return self._calibration[num_calib, seed]

    def measure(self, config) -> dict[str, Any]:
        """Quantize with ``config`` and evaluate the INT8 model next to the float model on the run's images."""
        import torch

        from .data.dataset import make_loader
        from .evaluate import compare
        from .mobile import table
        from .pipeline import quantize_with

        t = time.perf_counter()
        resolved = table.resolve(config, self.spec)
        backend = table.load(self.spec, self.run)
        calib = self.calibration(resolved.num_calib, resolved.seed)
        q = quantize_with(backend, self.float_model, resolved, calib)
        fl = self.float_outcomes
        int8 = compare({"int8": backend.reference(q.int8)},
                       make_loader(self.eval_set, self.run.eval_batch_size, workers=self.run.decode_workers))
        if not torch.equal(int8.labels, fl.labels):
            raise DataError(f"the images under '{self.report.data.eval_root}' changed during the sweep (another set "
                            f"was read for this point); sweep again when the data stays put")
        cmp = replace(fl, preds={**fl.preds, **int8.preds})
        drop = cmp.paired_accuracy("float", "int8").to_dict(exact=True)
        return {"config": resolved.to_dict(), "calibration_images": calib.used, "images": cmp.count,
                "float_top1": round(cmp.top1("float"), 3), "top1": round(cmp.top1("int8"), 3),
                "drop_pp": drop["diff_pp"], "drop_ci95": drop["ci95_pp"],
                "agreement": round(cmp.agree("float", "int8"), 3), "seconds": round(time.perf_counter() - t, 1)}


def _record(ctx: RunContext, kind: str, points: list[dict]) -> Sweep:
    from .report import host

    return Sweep(kind, str(ctx.run_dir), ctx.spec.name, ctx.report.model, len(ctx.eval_set),
                 ctx.report.data.eval_digest, "the backend's in-process INT8 model (not lowered)", host(),
                 time.strftime("%Y-%m-%d"), tuple(points))


def calibration_sweep(run_dir: Path | str, counts: tuple[int, ...] = DEFAULT_COUNTS, *,
                      progress: Callable[[str], None] = print) -> Sweep:
    """The run's config with each number of calibration images; writes ``calibration_sweep.json`` in the run. A
    count larger than the calibration folder holds is refused before any work (the default counts stop there)."""
    if not counts or any(isinstance(n, bool) or int(n) < 1 for n in counts):
        raise ConfigError(f"calibration counts {list(counts)} must be positive integers, e.g. 32,128,512,2048")
    ctx = RunContext(run_dir)
    have = ctx.calibration_available
    asked = sorted(set(int(c) for c in counts))
    if counts is DEFAULT_COUNTS:
        asked = [n for n in asked if n <= have] or [have]
    elif asked[-1] > have:
        raise ConfigError(f"--calibration-sweep {asked[-1]}: the run's calibration folder '{ctx.calib_root}' holds "
                          f"{have} images; pass counts up to {have}")
    points = []
    for n in asked:
        points.append({"num_calib": n, **ctx.measure(replace(ctx.config, num_calib=n))})
        progress(f"calibration sweep: {n} images -> top-1 {points[-1]['top1']:.2f} %, agreement "
                 f"{points[-1]['agreement']:.2f} % ({points[-1]['seconds']:.0f} s)")
    rec = _record(ctx, "calibration", points)
    rec.write(ctx.run_dir / paths.CALIBRATION_SWEEP)
    return rec


def recipe_sweep(run_dir: Path | str, names: tuple[str, ...] | None = None, *,
                 progress: Callable[[str], None] = print) -> Sweep:
    """Each named variant of the run's backend (its row's ``sweep_variants``; None: its ``sweep_default``) with the
    run's calibration count; writes ``recipes.json``."""
    from .config import QuantConfig

    ctx = RunContext(run_dir)
    variants = ctx.spec.sweep_variants
    names = tuple(names) if names is not None else ctx.spec.sweep_default
    unknown = [n for n in names if n not in variants]
    if unknown or not names:
        raise ConfigError(f"unknown recipes {unknown or list(names)} for backend '{ctx.spec.name}'; known: "
                          f"{', '.join(variants) or 'none'}")
    points = []
    for name in names:
        cfg = QuantConfig(num_calib=ctx.config.num_calib, seed=ctx.config.seed, **variants[name])
        points.append({"recipe": name, **ctx.measure(cfg)})
        progress(f"recipes: {name} -> top-1 {points[-1]['top1']:.2f} %, agreement {points[-1]['agreement']:.2f} % "
                 f"({points[-1]['seconds']:.0f} s)")
    rec = _record(ctx, "recipes", points)
    rec.write(ctx.run_dir / paths.RECIPES)
    return rec
