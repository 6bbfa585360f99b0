"""One table per shipped checkpoint, in one run on this host: the stock PT2E flow, the default recipe, AdaRound,
the accuracy budget (phone) and QAT, on each target the checkpoint is shipped for.

    python benchmarks/checkpoints.py [--checkpoints NAME ...] [--eval-limit N] [--qat-images 4000|all] [--qat-epochs 1]
                                      [--targets phone mcu] [--flows QAT ...] [--out JSON] [--readme]

Every row is one whole `mbquant ptq`/`qat` job (``mbquant.pipeline.run_job``: calibrate on 512 seeded images of
data/train, write the artifact, reopen it and measure it against the float model on data/val). Columns: top-1 of
the artifact, its drop and agreement with the float model, its parity with the in-process INT8 model, its size
and the job's wall time. The budgeted row is `--max-drop 0.02 --fallback auto` (the fewest blocks kept in fp32
that bring the drop within 0.02 pp on held-out images; backends whose row allows float layers, so the phone only);
a run whose artifact misses the budget says so in the status column. QAT is the default `mbquant qat` for
``--qat-epochs`` epochs on a seeded ``--qat-images`` subset of data/train.

Writes benchmarks/results/checkpoints.json and checkpoints.md; ``--readme`` replaces README's block between
``<!-- bench:checkpoints -->`` markers with checkpoints.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _common import REPO, job, replace_readme_block, small_checkpoints, summary
from mbquant import checkpoints
from mbquant.config import QATConfig, QuantConfig, RunConfig
from mbquant.data.dataset import load_folder
from mbquant.models import resolve_model
from mbquant.pipeline import Finetune
from mbquant.report import host, library_versions

RESULTS = REPO / "benchmarks" / "results"
MARK = "<!-- bench:checkpoints -->"
# the targets each shipped checkpoint is for (its manifest role); the MCU programs take int8 input
MCU = {"mobilenet_v1_w0.25_r96_fmnist", "mobilenet_v2_w0.35_r64_fmnist", "mobilenet_v3_small_w0.5_r64_fmnist",
       "mobilenet_v3_large_w0.35_r64_fmnist"}
BUDGET_PP = 0.02


def flows(target: str) -> dict[str, tuple[QuantConfig, dict, bool]]:
    """name -> (QuantConfig, RunConfig fields, QAT?) of each row for ``target``."""
    rows = {"stock PT2E": (QuantConfig(recipe="stock"), {}, False),
            "default": (QuantConfig(), {}, False),
            "AdaRound": (QuantConfig(adaround=True), {}, False)}
    if target == "phone":
        rows[f"budget {BUDGET_PP:g} pp"] = (QuantConfig(), {"max_drop": BUDGET_PP, "fallback": "auto"}, False)
    rows["QAT"] = (QuantConfig(recipe="qat"), {}, True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=small_checkpoints(), choices=checkpoints.shipped_names())
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--eval-limit", type=int, default=None, help="seeded val subset (default: all 10,000)")
    ap.add_argument("--flows", nargs="+", default=None, help="only these rows (names as in the table)")
    ap.add_argument("--targets", nargs="+", default=("phone", "mcu"), choices=("phone", "mcu"))
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--qat-images", type=_images, default=4000,
                    help="seeded training subset for QAT, or 'all' (every training image not held out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "checkpoints.json")
    ap.add_argument("--readme", action="store_true", help="replace README's checkpoints block with the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    qat = QATConfig(epochs=args.qat_epochs, max_train_samples=args.qat_images)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for name in args.checkpoints:
        entry = checkpoints.manifest()["checkpoints"][name]
        model, info = resolve_model(entry["model"], name)
        train = load_folder(args.data / "train", info.preset, train=True, expected_classes=list(info.classes))
        for target in [t for t in args.targets if t == "phone" or name in MCU]:
            options = {"int8_input": True} if target == "mcu" else {}
            for flow, (config, run_fields, is_qat) in flows(target).items():
                if args.flows and flow not in args.flows:
                    continue
                run = RunConfig(target=target, options=options, eval_limit=args.eval_limit, float_program=False,
                                latency_runs=5, **run_fields)
                rep = job(model, info, args.data, config=config, run=run, command=f"{name} {target} {flow}",
                          finetune=Finetune(qat, train) if is_qat else None)
                r = results.setdefault(name, {}).setdefault(target, {})[flow] = {
                    **summary(rep), "fallback": (rep["backends"][rep["artifacts"][0]["backend"]].get("fallback")
                                                 or {}).get("kept")}
                if is_qat:   # against PTQ of the same checkpoint, and which state QAT kept
                    r["versus_ptq"] = next(iter(rep.get("versus_ptq", {}).values()), None)
                    r["qat"] = {k: rep["qat"].get(k) for k in ("held_out_images", "start_agreement", "selected_epoch")}
                    r["qat"]["held_out_agreement"] = [h.get("held_out_agreement") for h in rep["qat"]["history"]]
                print(f"[{name} {target} {flow}] top-1 {r['top1']:.2f} drop {r['drop_pp']:+.2f} agree "
                      f"{r['agreement_float']:.2f} ({r['wall_seconds']:.0f} s, {r['status']})", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"results": results, "host": host(), "versions": library_versions(),
                                                "threads": args.threads, "qat": qat.to_dict(),
                                                "eval_limit": args.eval_limit}, indent=2) + "\n")
    md = markdown(results, args, host(), time.perf_counter() - start)
    (args.out.with_suffix(".md")).write_text(md)
    print("\n" + md)
    if args.readme:
        replace_readme_block(md, MARK)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _images(text: str) -> int | None:
    """``--qat-images``: a positive count, or ``all`` (None: no subset)."""
    if text == "all":
        return None
    n = int(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--qat-images {text}: use a positive count or 'all'")
    return n


def _runs(targets: dict) -> list[tuple[str, str, dict]]:
    """(target, flow, row) of one checkpoint, in the order they ran."""
    return [(target, flow, r) for target, by_flow in targets.items() for flow, r in by_flow.items()]


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (as the table names it), else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def markdown(results: dict, args, where: dict, seconds: float) -> str:
    images = _runs(next(iter(results.values())))[0][2]["images"]
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {where['cpu']} ({', '.join(where['isa'])}; {args.threads} threads), "
             f"{images:,} val images, 512 calibration images, QAT {args.qat_epochs} epoch(s) on "
             f"{'all' if args.qat_images is None else f'{args.qat_images:,}'} training images; "
             f"`python benchmarks/checkpoints.py` ({seconds / 60:.0f} min) wrote this table and `{_shown(args.out)}`.", ""]
    for name, targets in results.items():
        runs = _runs(targets)
        lines += [f"**{name}** (float top-1 {runs[0][2]['float_top1']:.2f} %)", "",
                  "| target | flow | top-1 % | drop pp | agree float % | parity % | KiB | wall s | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for target, flow, r in runs:
            kept = f" ({len(r['fallback'])} blocks fp32)" if r.get("fallback") is not None else ""
            lines.append(f"| {target} | {flow}{kept} | {r['top1']:.2f} | {r['drop_pp']:+.2f} | {r['agreement_float']:.2f} "
                         f"| {r['parity']:.2f} | {r['bytes'] / 1024:,.0f} | {r['wall_seconds']:.0f} | {r['status']} |")
        lines.append("")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
