"""Sweeps over a finished PTQ run: accuracy and agreement against the number of calibration images, and across
recipes, measured the way the run measured (its model, backend, calibration folder, evaluation images).

Each point quantizes the float model again (prepare -> calibrate -> convert [-> bias correction]) and evaluates the
backend's in-process INT8 model next to the float model on the run's evaluation images; nothing is lowered or
written (the run itself verified that its artifact computes what its INT8 model computes). Results are plain
dicts, kept as JSON beside the run (``calibration_sweep.json``, ``recipes.json``) and drawn by :mod:`mbquant.plot`.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

# name -> QuantConfig fields (a recipe and the single choices it is made of); measured in benchmarks/ptq_accuracy.py
RECIPE_VARIANTS: dict[str, dict[str, Any]] = {
    "stock": dict(recipe="stock"),                                                # XNNPACKQuantizer as shipped
    "relu6": dict(recipe="stock", fuse_relu6=True),
    "relu6+percentile": dict(recipe="stock", fuse_relu6=True, observer="percentile"),
    "percentile+fp32-logits": dict(fuse_relu6=False, bias_correction=False),
    "relu6+percentile+fp32-logits": dict(bias_correction=False),
    "best": dict(),                                                               # the default recipe
    "best+equalize": dict(equalize=True),
    "best-histogram": dict(observer="histogram"),
    "relu6+minmax": dict(recipe="stock", fuse_relu6=True, observer="minmax"),
    "per-tensor-stock": dict(recipe="stock", granularity="per-tensor"),
    "per-tensor-relu6": dict(recipe="stock", fuse_relu6=True, granularity="per-tensor"),
    "per-tensor-best": dict(granularity="per-tensor"),
}
DEFAULT_COUNTS = (32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_RECIPES = ("stock", "relu6", "relu6+percentile", "relu6+percentile+fp32-logits", "best", "best+equalize",
                   "per-tensor-stock", "per-tensor-best")


class RunContext:
    """What a sweep needs from a PTQ run folder: its model, backend, configs, calibration root and eval images."""

    def __init__(self, run_dir: Path | str):
        from .config import QuantConfig, RunConfig
        from .mobile import table
        from .pipeline import load_eval_set, samples_digest
        from .resolve import resolve_model

        self.run_dir = Path(run_dir)
        self._calibration: dict[tuple[int, int], Any] = {}
        try:
            self.report = json.loads((self.run_dir / "report.json").read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"'{self.run_dir}' holds no readable report.json ({exc}); pass the folder `mbquant ptq "
                            f"--out` wrote") from exc
        rep = self.report
        if rep.get("qat") is not None:
            raise ConfigError(f"'{self.run_dir}' is a QAT run; calibration and recipe sweeps measure PTQ, so run "
                              f"them on a `mbquant ptq` run folder of the same model")
        self.model, self.info = resolve_model(rep["model"]["name"], rep["model"]["weights"])
        if self.info.weights_sha256 != rep["model"].get("weights_sha256"):
            raise DataError(f"'{rep['model']['weights']}' is no longer the checkpoint this run quantized (sha256 "
                            f"differs); sweep a run of the checkpoint as it is now")
        self.config = QuantConfig.from_dict(rep["config"])
        self.run = RunConfig.from_dict(rep["run"])
        self.spec = table.get_spec(next(iter(rep["backends"])))
        self.calib_root = Path(rep["data"]["calibration"]["root"])
        self.eval_set = load_eval_set(Path(rep["data"]["eval_root"]), self.info, self.run.eval_limit,
                                      seed=self.config.seed)
        if samples_digest(self.eval_set) != rep["data"]["eval_digest"]:
            raise DataError(f"the evaluation images under '{rep['data']['eval_root']}' are not those the run measured "
                            f"(digest differs); sweep where the run's data is")

    @functools.cached_property
    def float_model(self):
        """The run's float model, exported once for every point of a sweep."""
        from .quant.export import FloatModel

        return FloatModel(self.model, self.info.resolution)

    @functools.cached_property
    def float_outcomes(self):
        """The float model's predictions on the run's images: the same for every point, so measured once."""
        from .data import make_loader
        from .evaluate import compare
        from .mobile.backend import ModulePredictor

        return compare({"float": ModulePredictor(self.float_model.graph, "float")},
                       make_loader(self.eval_set, self.run.eval_batch_size))

    def calibration(self, num_calib: int, seed: int):
        """The calibration subset of that size and seed, decoded once per sweep (recipes share one)."""
        from . import calibrate

        if (num_calib, seed) not in self._calibration:
            self._calibration[num_calib, seed] = calibrate.from_folder(
                self.calib_root, self.info.preset, num_calib, seed=seed, expected_classes=list(self.info.classes))
        return self._calibration[num_calib, seed]

    def measure(self, config) -> dict[str, Any]:
        """Quantize with ``config`` and evaluate the INT8 model next to the float model on the run's images."""
        from .data import make_loader
        from .evaluate import compare
        from .mobile import table
        from .pipeline import quantize_with

        import torch

        t = time.perf_counter()
        resolved = table.resolve(config, self.spec)
        backend = table.load(self.spec, self.run)
        q = quantize_with(backend, self.float_model, resolved, self.calibration(resolved.num_calib, resolved.seed))
        fl = self.float_outcomes
        int8 = compare({"int8": backend.reference(q.int8)}, make_loader(self.eval_set, self.run.eval_batch_size))
        if not torch.equal(int8.labels, fl.labels):
            raise DataError(f"the images under '{self.report['data']['eval_root']}' changed during the sweep (another "
                            f"set was read for this point); sweep again when the data stays put")
        cmp = replace(fl, preds={**fl.preds, **int8.preds})
        drop = cmp.paired_accuracy("float", "int8").to_dict()
        return {"config": resolved.to_dict(), "calibration_images": q.calibration.samples, "images": cmp.count,
                "float_top1": round(cmp.top1("float"), 3), "top1": round(cmp.top1("int8"), 3),
                "drop_pp": drop["diff_pp"], "drop_ci95": drop["ci95_pp"],
                "agreement": round(cmp.agree("float", "int8"), 3), "seconds": round(time.perf_counter() - t, 1)}


def _write(path: Path, record: dict) -> dict:
    from ._io import write_json

    write_json(path, record)
    return record


def _header(ctx: RunContext) -> dict[str, Any]:
    from .report import host

    return {"run": str(ctx.run_dir), "backend": ctx.spec.name, "model": ctx.report["model"],
            "eval_images": len(ctx.eval_set), "eval_digest": ctx.report["data"]["eval_digest"],
            "measured": "the backend's in-process INT8 model (not lowered)", "host": host(),
            "created": time.strftime("%Y-%m-%d")}


def calibration_sweep(run_dir: Path | str, counts: tuple[int, ...] = DEFAULT_COUNTS, *, progress=print) -> dict:
    """The run's config with each number of calibration images; writes ``calibration_sweep.json`` in the run."""
    if not counts or any(int(n) < 1 for n in counts):
        raise ConfigError(f"calibration counts {list(counts)} must be positive integers, e.g. 32,128,512,2048")
    ctx = RunContext(run_dir)
    points = []
    for n in sorted(set(int(c) for c in counts)):
        points.append({"num_calib": n, **ctx.measure(replace(ctx.config, num_calib=n))})
        progress(f"calibration sweep: {n} images -> top-1 {points[-1]['top1']:.2f} %, agreement "
                 f"{points[-1]['agreement']:.2f} % ({points[-1]['seconds']:.0f} s)")
    return _write(ctx.run_dir / "calibration_sweep.json", {**_header(ctx), "points": points})


def recipe_sweep(run_dir: Path | str, names: tuple[str, ...] = DEFAULT_RECIPES, *, progress=print) -> dict:
    """Each named variant of :data:`RECIPE_VARIANTS` with the run's calibration count; writes ``recipes.json``."""
    from .config import QuantConfig

    unknown = [n for n in names if n not in RECIPE_VARIANTS]
    if unknown or not names:
        raise ConfigError(f"unknown recipes {unknown or list(names)}; known: {', '.join(RECIPE_VARIANTS)}")
    ctx = RunContext(run_dir)
    points = []
    for name in names:
        cfg = QuantConfig(num_calib=ctx.config.num_calib, seed=ctx.config.seed, **RECIPE_VARIANTS[name])
        points.append({"recipe": name, **ctx.measure(cfg)})
        progress(f"recipes: {name} -> top-1 {points[-1]['top1']:.2f} %, agreement {points[-1]['agreement']:.2f} % "
                 f"({points[-1]['seconds']:.0f} s)")
    return _write(ctx.run_dir / "recipes.json", {**_header(ctx), "points": points})
