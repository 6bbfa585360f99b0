import pytest

from mbquant.config import QuantConfig
from mbquant.errors import ConfigError
from mbquant.quant.targets import get_target


def test_unknown_target_lists_supported():
    with pytest.raises(ConfigError, match="target 'tpu' is not supported; supported: phone"):
        get_target("tpu")


def test_capability_table_checks_format():
    with pytest.raises(ConfigError, match="format 'onnx' is not supported on target 'phone'; supported: pte"):
        get_target("phone").check(QuantConfig(), "onnx")
    get_target("phone").check(QuantConfig(granularity="per-tensor"), "pte")
