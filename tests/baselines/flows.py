"""mbquant's own accuracy baselines: one flow per shipped checkpoint and target, run by its CLI on real
Fashion-MNIST, and the baseline files (`mbquant baseline` format) its results are checked against.

    python -m tests.baselines.record [--images 2000|10000 ...]     # measure and (re)write them: `make baselines`

`make test` checks the 2,000-image slice (the seeded, class-stratified one `--eval-limit 2000` selects), `make
test-slow` all 10,000 val images. Each baseline's tolerance comes from spreads measured when it was recorded (see
:func:`tolerance`), and says so next to it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (2000, 10000)


@dataclass(frozen=True)
class Flow:
    checkpoint: str
    flow: str                 # ptq-phone | torchscript | ptq-mcu | qat
    command: str              # ptq | qat
    model: str
    args: tuple[str, ...]     # besides data, --eval-limit, --out and --threads
    artifact: str             # the checked file in the run folder

    @property
    def key(self) -> str:
        return f"{self.checkpoint}.{self.flow}"

    def argv(self, data: Path, out: Path, images: int, threads: int | None = None) -> list[str]:
        where = (["--data", str(data)] if self.command == "qat" else
                 ["--calib", str(data / "train"), "--eval", str(data / "val")])
        return [self.command, self.model, "--weights", self.checkpoint, *where, *self.args,
                *(["--eval-limit", str(images)] if images < 10000 else []), "--out", str(out), "--quiet",
                *(["--threads", str(threads)] if threads else [])]

    def baseline_path(self, images: int) -> Path:
        return HERE / f"{self.key}.{images}.json"

    def baseline(self, images: int) -> dict:
        return json.loads(self.baseline_path(images).read_text())


V2_05, V2_035, V1_025 = "mobilenet_v2_w0.5_r64_fmnist", "mobilenet_v2_w0.35_r64_fmnist", "mobilenet_v1_w0.25_r96_fmnist"
V3S = "mobilenet_v3_small_w0.5_r64_fmnist"
MCU = ("--target", "mcu", "--int8-input")
FLOWS = {f.key: f for f in (
    Flow(V2_05, "ptq-phone", "ptq", "mobilenet_v2", ("--latency-runs", "5"), "mobilenet_v2_w0.5_r64_int8.pte"),
    Flow(V2_05, "torchscript", "ptq", "mobilenet_v2", ("--format", "torchscript", "--no-float-program",
                                                       "--latency-runs", "3"), "mobilenet_v2_w0.5_r64_int8.pt"),
    Flow(V2_035, "ptq-phone", "ptq", "mobilenet_v2", ("--no-float-program", "--latency-runs", "3"),
         "mobilenet_v2_w0.35_r64_int8.pte"),
    Flow(V1_025, "ptq-mcu", "ptq", "mobilenet_v1", (*MCU, "--flash-kb", "300", "--ram-kb", "64"),
         "mobilenet_v1_w0.25_r96_int8.pte"),
    Flow(V2_035, "ptq-mcu", "ptq", "mobilenet_v2", MCU, "mobilenet_v2_w0.35_r64_int8.pte"),
    Flow(V2_035, "qat", "qat", "mobilenet_v2", ("--epochs", "1", "--max-train-samples", "2000", "--no-float-program",
                                                 "--latency-runs", "3"), "mobilenet_v2_w0.35_r64_int8.pte"),
    Flow(V3S, "ptq-phone", "ptq", "mobilenet_v3_small", ("--no-float-program", "--latency-runs", "3"),
         "mobilenet_v3_small_w0.5_r64_int8.pte"),
    Flow(V3S, "ptq-mcu", "ptq", "mobilenet_v3_small", MCU, "mobilenet_v3_small_w0.5_r64_int8.pte"),
)}


FLOOR_PP, FLOOR_IMAGES = 0.1, 2      # the smallest change a baseline claims to detect


def tolerance(spreads_pp: dict[str, float], images: int) -> tuple[float, str]:
    """Twice the largest measured spread, at least 0.1 pp and two images, rounded up to 0.05 pp, and the sentence
    that says so.

    ``spreads_pp`` holds what was measured when the baseline was recorded: the run repeated (run to run); the run
    with PyTorch's native float convolutions instead of oneDNN's (another order of float sums in calibration,
    training and the float model: what another host's float kernels change); and the artifact against the
    in-process INT8 model it was written from (another kernel family for the same integer model: what another
    host's XNNPACK kernels, AVX2 vs AVX-512 VNNI or NEON, change). The floor covers what none of these reproduces."""
    floor = max(FLOOR_PP, 100.0 * FLOOR_IMAGES / images)
    tol = math.ceil(max(2 * max(spreads_pp.values()), floor) / 0.05 - 1e-9) * 0.05
    parts = ", ".join(f"{k} {v:.2f} pp" for k, v in spreads_pp.items())
    return round(tol, 2), (f"twice the largest spread measured on {images:,} images ({parts}; each the larger of "
                           f"the top-1 and agreement differences), at least {floor:.2f} pp ({FLOOR_PP} pp and "
                           f"{FLOOR_IMAGES} images), rounded up to 0.05 pp")
