"""What the benchmark scripts share: run the real job (``mbquant.pipeline.run_job``) and summarise its report."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mbquant import calibrate, checkpoints  # noqa: E402
from mbquant.config import QuantConfig, RunConfig  # noqa: E402
from mbquant.data.dataset import eval_set  # noqa: E402
from mbquant.pipeline import Finetune, run_job  # noqa: E402

DEMO_SIZE = 96    # the small shipped checkpoints (64-96 px); larger ones are measured by scale.py


def small_checkpoints() -> list[str]:
    """The shipped checkpoints at demo size (input at most 96 px): the per-checkpoint benchmarks' default. The
    real-size reference (width 1.0) has its own rows in benchmarks/scale.py."""
    return [n for n, e in checkpoints.manifest()["checkpoints"].items() if e["resolution"] <= DEMO_SIZE]


def job(model, info, data: Path, *, config: QuantConfig, run: RunConfig, finetune: Finetune | None = None,
        command: str = "benchmark", calib: Path | None = None, progress: bool = False) -> dict:
    """One whole ``mbquant ptq``/``qat`` job into a temporary folder; returns the report dict (+ wall seconds)."""
    start = time.perf_counter()
    calib_set = calibrate.from_folder(calib or data / "train", info.preset, config.num_calib, seed=config.seed,
                                      expected_classes=list(info.classes) or None)
    images = eval_set(data / "val", info.preset, classes=info.classes, limit=run.eval_limit, seed=config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rep = run_job(model, info, calib=calib_set, eval_set=images, out_dir=Path(tmp) / "run", config=config, run=run,
                      finetune=finetune, command=command, progress=progress).to_dict()
    rep["wall_seconds"] = round(time.perf_counter() - start, 1)
    return rep


def summary(rep: dict, artifact: int = 0) -> dict:
    """The numbers a results table needs from one report (its ``artifact``-th file)."""
    a = rep["artifacts"][artifact]
    b = rep["backends"][a["backend"]]
    return {"float_top1": rep["float"]["top1"], "top1": a["top1"], "drop_pp": a["drop_pp"],
            "agreement_float": a["agreement_float"], "parity": a["parity"]["agreement"],
            "reference_top1": a["reference_top1"], "bytes": a["bytes"], "delegated": a["delegated"],
            "quantize_ops": b.get("quantize"), "config": b["config"], "status": rep["status"],
            "failures": rep["failures"], "images": a["images"], "seconds": b["seconds"],
            "wall_seconds": rep["wall_seconds"]}


def run_measured(cmd: list[str], *, check: bool = True) -> dict:
    """Run ``cmd``; its wall time, exit code, output and its own peak RSS (wait4's rusage of that child only).
    Output goes through temporary files (a pipe could fill up and stall the child before wait4 returns)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if check and code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}):\n{stderr[-2000:]}")
    return {"wall_seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "returncode": code, "stdout": stdout, "stderr": stderr}


def mbquant_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("mbquant")), *args]


def replace_readme_block(md: str, mark: str) -> None:
    """Put ``md`` between README.md's two ``mark`` lines (the table a benchmark wrote)."""
    readme = REPO / "README.md"
    text = readme.read_text()
    if text.count(mark) != 2:
        raise SystemExit(f"README.md needs exactly two {mark} lines around the benchmark table")
    head, _, tail = text.split(mark)
    readme.write_text(f"{head}{mark}\n{md}{mark}{tail}")
    print("updated README.md")


def variant_args(ap, variants: dict, *, out: str, threads: int, checkpoint: bool = True) -> None:
    """The flags every variant benchmark takes: the checkpoint (``--model``/``--weights``, with ``checkpoint``),
    the data, the calibration and evaluation sizes, ``--variants`` (names of ``variants``), threads and the JSON."""
    if checkpoint:
        ap.add_argument("--model", default="mobilenet_v2")
        ap.add_argument("--weights", default=None, help="default: the model's shipped checkpoint")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--variants", default=",".join(variants), help="comma-separated names from: " + ", ".join(variants))
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / out)


def chosen_variants(ap, args, variants: dict) -> list[str]:
    """The ``--variants`` names, each one of ``variants`` (else a usage error listing them)."""
    names = args.variants.split(",")
    unknown = [n for n in names if n not in variants]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(variants)}")
    return names
