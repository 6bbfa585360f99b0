"""PNG plots of a run (``mbquant report RUN_DIR --plot``): per-layer SQNR of its INT8 graph, and, when the sweeps
were measured (:mod:`mbquant.sweep`), accuracy and agreement against the number of calibration images and across
recipes. matplotlib is an optional extra (``pip install 'mbquant[plot]'``)."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error naming the fix."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("plots need matplotlib, which is not installed: pip install 'mbquant[plot]' (or pip "
                          "install matplotlib), then run the command again") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the PNG under a temporary name in the same folder, then rename: never a half-written plot."""
    from .atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        fig.clf()
    return path


def _title(record) -> str:
    return record.model.describe()


def layer_sqnr(report, out: Path) -> Path:
    """One bar per quantized activation, in graph order, per backend of the run (a
    :class:`~mbquant.records.RunReport`); the five worst labelled."""
    plt = pyplot()
    backends = report.layer_sqnr()
    if not backends:
        raise ConfigError("the run's report holds no per-layer SQNR (its backends record none)")
    fig, axes = plt.subplots(len(backends), 1, figsize=(11, 3.2 * len(backends)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], backends.items()):
        in_order = all("index" in r for r in rows)        # reports before the index was recorded: worst first
        rows = sorted(rows, key=lambda r: r["index"]) if in_order else rows
        values = [r["sqnr_db"] if isinstance(r["sqnr_db"], (int, float)) else 99.0 for r in rows]   # "inf": exact
        worst = sorted(range(len(rows)), key=lambda i: values[i])[:5]
        ax.bar(range(len(rows)), values, color=["tab:red" if i in worst else "tab:blue" for i in range(len(rows))])
        for i in worst:
            ax.annotate(rows[i].get("module") or rows[i]["node"], (i, values[i]), rotation=90, fontsize=7,
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(f"{_title(report)}, {name}: INT8 vs float activation, per quantized layer (worst 5 in red)")
        ax.set_xlabel("quantized activation, " + ("graph order" if in_order else "worst first"))
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def calibration(sweep, out: Path) -> Path:
    """Top-1 drop (with its paired 95 % interval) and agreement with the float model against the calibration images
    each point really used (a :class:`~mbquant.records.Sweep`)."""
    plt = pyplot()
    pts = sweep.points
    n = [p["calibration_images"] for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    drop = [p["drop_pp"] for p in pts]
    err = [[p["drop_pp"] - p["drop_ci95"][0] for p in pts], [p["drop_ci95"][1] - p["drop_pp"] for p in pts]]
    a1.errorbar(n, drop, yerr=err, marker="o", capsize=3)
    a1.axhline(0, color="grey", lw=0.8)
    a1.set_ylabel("top-1 drop vs float (pp), 95 % CI")
    a2.plot(n, [p["agreement"] for p in pts], marker="o", color="tab:green")
    a2.set_ylabel("agreement with float top-1 (%)")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("calibration images")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{_title(sweep)}, {sweep.backend}: {sweep.eval_images:,} val images, in-process INT8 model")
    return _save(fig, out)


def recipes(sweep, out: Path) -> Path:
    """Top-1 drop (95 % CI) and agreement per recipe, horizontal bars in the order measured."""
    plt = pyplot()
    pts = sweep.points
    names = [p["recipe"] for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(pts) + 1.6), sharey=True)
    y = list(range(len(pts)))
    err = [[p["drop_pp"] - p["drop_ci95"][0] for p in pts], [p["drop_ci95"][1] - p["drop_pp"] for p in pts]]
    a1.barh(y, [p["drop_pp"] for p in pts], xerr=err, capsize=3, color="tab:blue")
    a1.axvline(0, color="grey", lw=0.8)
    a1.set_xlabel("top-1 drop vs float (pp), 95 % CI")
    a2.barh(y, [p["agreement"] for p in pts], color="tab:green")
    lo = min(p["agreement"] for p in pts)
    a2.set_xlim(max(0.0, lo - 2), 100)
    a2.set_xlabel("agreement with float top-1 (%)")
    a1.set_yticks(y, names)
    a1.invert_yaxis()
    for ax in (a1, a2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{_title(sweep)}, {sweep.backend}: recipes, {pts[0]['calibration_images']} calibration "
                 f"images, {sweep.eval_images:,} val images, in-process INT8 model")
    return _save(fig, out)
