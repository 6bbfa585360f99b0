"""Configs: frozen, validated at the edge (finite numbers in range), JSON round trips."""
import json
import math

import pytest

from mbquant.config import QATConfig, QuantConfig, RunConfig, TrainConfig
from mbquant.errors import ConfigError


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(recipe="stock", keep_float=("classifier.1",),
                                                            observer="minmax", bias_correction=False),
                                 RunConfig(formats=("pte", "torchscript"), max_drop=0.5), QATConfig(distill=1.0),
                                 TrainConfig(max_train_samples=10)])
def test_round_trip_through_json(cfg):
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("make,match", [
    (lambda: RunConfig(max_drop=math.nan), r"max_drop \(percentage points\) must be a number, got nan"),
    (lambda: RunConfig(min_parity=101), r"min_parity \(%\) 101 is out of range \[0.0, 100.0\]"),
    (lambda: QuantConfig(percentile=math.inf), "percentile must be a number, got inf"),
    (lambda: QuantConfig(num_calib=True), r"num_calib \(calibration samples\) must be an integer"),
    (lambda: QuantConfig(keep_float="logits"), "keep_float must be a list of layer names"),
    (lambda: QuantConfig(bias_correction_images=0), r"bias_correction_images .*0.*--bias-correction-images"),
    (lambda: QuantConfig(recipe="fast"), "recipe 'fast' is not supported; choose one of: best, stock, qat"),
    (lambda: TrainConfig(weight_decay=math.nan), "weight_decay must be a number, got nan"),
    (lambda: TrainConfig(lr=0), r"learning rate 0 is out of range \(0.0, 10.0\]"),
    (lambda: QATConfig(freeze_bn_after=-1), r"freeze_bn_after .* -1 is out of range"),
    (lambda: QATConfig(init_ranges=True), r"QAT range initialisation \(--init-ranges\) 'True' is not supported; "
                                          r"choose one of: recipe, minmax, off"),
    (lambda: QATConfig(init_ranges="off", freeze_observers_after=0), r"--init-ranges off with --freeze-observers-after 0: no range would ever "
                                           r"be measured; pass --init-ranges recipe"),
    (lambda: QATConfig(init_biases="ptq"), r"QAT bias initialisation \(--init-biases\) 'ptq' is not supported; "
                                           r"choose one of: corrected, float"),
    (lambda: QATConfig(init_biases="corrected", init_ranges="off", freeze_observers_after=1), r"--init-biases corrected with --init-ranges off: "
                                                                    r".*pass --init-ranges recipe .* or --init-biases float"),
    (lambda: QATConfig(keep="first"), r"QAT state kept \(--keep\) 'first' is not supported; choose one of: best, last"),
    (lambda: QATConfig(select_images=0), r"select_images \(held-out images\) .*0.*--select-images"),
    (lambda: QATConfig(keep="last", select_images=100), r"--select-images 100 with --keep last: .*drop one of them"),
])
def test_bad_values_name_the_value_and_the_fix(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match=r"unknown QuantConfig keys \['float_logits'\]"):
        QuantConfig.from_dict({"float_logits": True})
