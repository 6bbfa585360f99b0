"""A torch-free reference client: a bundle's program run by the C++ ExecuTorch runtime on images preprocessed by the
bundle's own contract (numpy + Pillow), on this host or on aarch64 under qemu user-mode emulation.

Images are picked by mbquant's one scanner and slicing rule (:mod:`mbquant.data`): ``--limit N`` is the same
seeded class-stratified slice ``mbquant check --limit N`` and ``--eval-limit N`` evaluate.

The runner (``mbquant/mobile/xnnpack/runner/pte_runner.cpp``) is the runtime API an Android app's native layer
calls, built by ``make arm`` against the executorch wheel's runtime: ``build/host/pte_runner`` for this host and
``build/arm/pte_runner`` cross-built for aarch64 (the aarch64 wheel's libraries). Under emulation it runs with
``QEMU_CPU=cortex-a76``: qemu's default ``max`` CPU advertises SME and XNNPACK then computes wrong results.
Emulated time says nothing about a phone's speed; only the numbers are checked.

    python -m mbquant.mobile.xnnpack.client BUNDLE DATA [--arm] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...data.contract import apply
from ...data.folders import scan_folder
from ...data.images import Unreadable, decode
from ...data.slicing import eval_indices
from ...errors import ConfigError, DataError, MbquantError, VerificationError
from ...stats import top2_margin
from ..bundle import Bundle, read_bundle

BUILD = Path(os.environ.get("MBQUANT_BUILD", Path(__file__).resolve().parents[3] / "build"))
QEMU = ("qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu")


@dataclass(frozen=True)
class Runner:
    """How to run the C++ runner: the binary and, for aarch64, the emulator in front of it."""

    binary: Path
    prefix: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    name: str = "host"

    def _cmd(self, *args: str) -> list[str]:
        if not self.binary.is_file():
            raise ConfigError(f"the {self.name} runner '{self.binary}' is not built; run `make arm` (it installs "
                              f"the cross compiler and qemu, downloads the aarch64 executorch wheel and builds both runners)")
        return [*self.prefix, str(self.binary), *args]

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})
        if proc.returncode != 0:
            raise VerificationError(f"the {self.name} runner failed (exit {proc.returncode}): "
                                    f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        return proc

    def describe(self, pte: Path) -> dict[str, list[int]]:
        out = {}
        for line in self._run("--describe", str(pte), timeout=120).stdout.splitlines():
            kind, _dtype, dims = line.split()
            out[kind] = [int(d) for d in dims.split("x")]
        return out

    def run(self, pte: Path, images: np.ndarray, timeout: float = 3600) -> np.ndarray:
        """Logits (n x classes) of ``images`` (n x 3 x H x W float32), in one process."""
        with tempfile.TemporaryDirectory(prefix="mbquant-runner-") as tmp:
            src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
            with open(src, "wb") as f:
                f.write(b"MBQI" + struct.pack("<4i", *images.shape))
                f.write(np.ascontiguousarray(images, dtype="<f4").tobytes())
            self._run(str(pte), str(src), str(dst), timeout=timeout)
            data = dst.read_bytes()
        if data[:4] != b"MBQO":
            raise VerificationError(f"the {self.name} runner wrote no MBQO output")
        n, k = struct.unpack("<2i", data[4:12])
        return np.frombuffer(data[12:], dtype="<f4").reshape(n, k)


def host_runner(build: Path = BUILD) -> Runner:
    return Runner(build / "host" / "pte_runner", name="host (x86-64)")


def arm_runner(build: Path = BUILD) -> Runner:
    return Runner(build / "arm" / "pte_runner", QEMU, {"QEMU_CPU": "cortex-a76"}, "aarch64 (qemu, cortex-a76)")


def labelled_images(root: Path, classes: list[str], limit: int | None = None) -> list[tuple[Path, int]]:
    """The labelled images of ``root`` for the bundle's classes (mbquant's scanner); with ``limit``, the seeded
    class-stratified slice every ``--limit`` of mbquant evaluates."""
    samples, _ = scan_folder(root, expected_classes=classes)
    items = [(s.path, s.label) for s in samples]
    keep = eval_indices([y for _, y in items], limit)
    return items if keep is None else [items[i] for i in keep]


def inputs(bundle: Bundle, items: list[tuple[Path, int]]) -> tuple[np.ndarray, list[tuple[Path, int]]]:
    """The readable images preprocessed by the bundle's contract, and which images they are."""
    arrays, kept = [], []
    for p, y in items:
        try:
            arrays.append(apply(decode(p), bundle.spec))
            kept.append((p, y))
        except Unreadable:
            continue
    if not arrays:
        raise DataError(f"none of the {len(items)} images is readable; pass a folder of valid images")
    return np.stack(arrays), kept


def check_runner_io(bundle: Bundle, runner: Runner) -> None:
    """The program as the runner loads it takes the contract's input and gives one output per label."""
    io = runner.describe(bundle.program)
    if io["input"] != bundle.spec.shape:
        raise VerificationError(f"bundle '{bundle.root}': {bundle.manifest.program} takes input {io['input']} but "
                                f"preprocess.json says {bundle.spec.shape}; the bundle mixes files of different models")
    if io["output"][-1] != len(bundle.labels):
        raise VerificationError(f"bundle '{bundle.root}': {bundle.manifest.program} has {io['output'][-1]} outputs but "
                                f"labels.txt {len(bundle.labels)} lines")


def run_bundle(bundle_dir: Path, data: Path, runner: Runner, *, limit: int | None = None) -> dict[str, Any]:
    """The bundle's top-1 on ``data`` with ``runner``, from the bundle alone."""
    bundle = read_bundle(bundle_dir)
    check_runner_io(bundle, runner)
    x, items = inputs(bundle, labelled_images(data, bundle.labels, limit))
    logits = runner.run(bundle.program, x)
    labels = np.asarray([y for _, y in items])
    return {"images": len(items), "top1": round(100.0 * float((logits.argmax(1) == labels).mean()), 3),
            "runner": runner.name, "logits": logits, "labels": labels, "paths": [str(p) for p, _ in items]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--arm", action="store_true", help="run on aarch64 under qemu")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        res = run_bundle(args.bundle, args.data, arm_runner() if args.arm else host_runner(), limit=args.limit)
    except MbquantError as exc:
        print(f"mbquant client: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({k: v for k, v in res.items() if k in ("images", "top1", "runner")}))
    return 0


NEAR_TIE = 1e-3   # a top-2 logit margin this small may flip between two CPUs' float rounding (observed |diff| ~1e-4)


def compare_runners(bundle_dir: Path, data: Path, *, limit: int | None = None, host: Runner | None = None,
                    arm: Runner | None = None, listed: int = 50) -> dict[str, Any]:
    """The bundle's program on this host and on aarch64, on the same preprocessed images, image by image."""
    host, arm = host or host_runner(), arm or arm_runner()
    bundle = read_bundle(bundle_dir)
    check_runner_io(bundle, host)
    x, items = inputs(bundle, labelled_images(data, bundle.labels, limit))
    a, b = host.run(bundle.program, x), arm.run(bundle.program, x)
    labels = np.asarray([y for _, y in items])
    margin = top2_margin(a)
    differ = np.nonzero(a.argmax(1) != b.argmax(1))[0]
    unexplained = [int(i) for i in differ if margin[i] > NEAR_TIE]
    rows = [{"image": str(items[i][0]), "label": bundle.labels[labels[i]], "host": bundle.labels[int(a[i].argmax())],
             "arm": bundle.labels[int(b[i].argmax())], "host_margin": float(margin[i]),
             "host_logits": [round(float(v), 6) for v in a[i]], "arm_logits": [round(float(v), 6) for v in b[i]]}
            for i in differ[:listed]]
    return {"bundle": str(bundle_dir), "images": len(items), "host_runner": host.name, "arm_runner": arm.name,
            "top1_host": round(100.0 * float((a.argmax(1) == labels).mean()), 3),
            "top1_arm": round(100.0 * float((b.argmax(1) == labels).mean()), 3),
            "agreement": round(100.0 * (1 - len(differ) / max(1, len(items))), 3),
            "max_abs_logit_diff": float(np.abs(a - b).max()) if len(items) else 0.0,
            "disagreements": len(differ), "unexplained": len(unexplained), "near_tie_margin": NEAR_TIE,
            "disagreeing_images": rows, "report_top1": bundle.artifact.top1,
            "report_images": bundle.artifact.images}


if __name__ == "__main__":
    sys.exit(main())
