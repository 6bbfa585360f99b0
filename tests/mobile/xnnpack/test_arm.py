"""The phone checkpoint's program on aarch64 (the C++ runtime from the aarch64 executorch wheel, under
qemu-aarch64-static with QEMU_CPU=cortex-a76) against this host, image by image, on real images preprocessed by the
bundle's own contract."""
from __future__ import annotations

import pytest

from mbquant.mobile.xnnpack.client import compare_runners


def _check(res: dict, images: int) -> None:
    assert res["images"] == images
    assert res["unexplained"] == 0, res["disagreeing_images"]   # any disagreement is listed with both logits
    assert res["agreement"] >= 99.9 and res["max_abs_logit_diff"] < 1e-2
    assert abs(res["top1_host"] - res["top1_arm"]) <= 100.0 * res["disagreements"] / images


def test_arm_predictions_equal_the_host_on_500_images(phone_bundle, fmnist):
    _check(compare_runners(phone_bundle, fmnist / "val", limit=500), 500)


@pytest.mark.slow
def test_arm_predictions_equal_the_host_on_all_val_images(phone_bundle, fmnist):
    _check(compare_runners(phone_bundle, fmnist / "val"), 10000)
