"""Accuracy-drop regression tests for an INT8 model, in your own project (copy this folder).

    pytest --mbquant-data data/val                     # the whole labelled folder
    pytest --mbquant-data data/val --mbquant-limit 2000

BUNDLE: the folder `mbquant ptq ... --bundle DIR` (or `mbquant bundle`) wrote; FLOAT: the float model it came from
(a checkpoint path or a shipped name); BASELINE: a file `mbquant baseline write` recorded (commit it; nothing
updates it implicitly). Set them with the environment variables below or edit the defaults.
"""
import os
from pathlib import Path

import pytest

from mbquant.testing import assert_accuracy_drop

BUNDLE = Path(os.environ.get("MODEL_BUNDLE", "runs/demo-bundle"))
FLOAT = os.environ.get("FLOAT_WEIGHTS", "mobilenet_v2_w0.5_r64_fmnist")
BASELINE = Path(os.environ.get("MODEL_BASELINE", "baseline.json"))


def test_int8_drop_is_within_half_a_point(mbquant_data, mbquant_limit):
    """The INT8 program loses at most 0.5 pp top-1 against its float model and agrees with it on >= 99 % of images."""
    assert_accuracy_drop(FLOAT, BUNDLE, mbquant_data, max_drop_pp=0.5, min_agreement=99.0, limit=mbquant_limit)


def test_int8_drop_is_within_half_a_point_even_at_the_noise_bound(mbquant_data, mbquant_limit):
    """The same, judged on the upper end of the drop's 95 % confidence interval (paired, McNemar)."""
    assert_accuracy_drop(FLOAT, BUNDLE, mbquant_data, max_drop_pp=0.5, strict_ci=True, limit=mbquant_limit)


@pytest.mark.skipif(not BASELINE.exists(), reason="no baseline.json: record one with `mbquant baseline write`")
def test_int8_accuracy_has_not_regressed_from_the_baseline(mbquant_data):
    """Top-1 (and agreement) no lower than the recorded baseline minus its tolerance, on the images the baseline was
    recorded on (its own --limit)."""
    assert_accuracy_drop(None, BUNDLE, mbquant_data, max_drop_pp=None, baseline=BASELINE)
