"""The one capability table: backends picked by target/format, recipes resolved, unsupported choices refused."""
import pytest

from mbquant.config import QuantConfig
from mbquant.errors import ConfigError
from mbquant.mobile import table


def test_unknown_target_and_format_list_what_is_supported():
    with pytest.raises(ConfigError, match="target 'tpu' is not supported; supported: mcu, phone, x86"):
        table.select("tpu", ("pte",))
    with pytest.raises(ConfigError, match=r"format 'pte' is not supported on target 'x86'; supported: ([a-z-]+, )*torchscript"):
        table.select("x86", ("pte",))
    assert [s.name for s in table.select("phone", ("torchscript", "pte"))] == ["ts-qnnpack", "pte-xnnpack"]


def test_every_recipe_is_valid_for_its_backend():
    for spec in table.BACKENDS.values():
        for recipe in ("best", "stock", "qat"):
            if recipe == "qat" and not spec.qat:
                with pytest.raises(ConfigError, match=f"QAT is not offered for backend '{spec.name}'"):
                    table.resolve(QuantConfig(recipe=recipe), spec, qat=True)
                continue
            cfg = table.resolve(QuantConfig(recipe=recipe), spec, qat=recipe == "qat")
            assert None not in (cfg.observer, cfg.fuse_relu6, cfg.keep_float, cfg.bias_correction, cfg.equalize)


def test_best_recipe_on_the_phone_is_the_measured_one_and_stock_is_the_stock_flow():
    spec = table.get_spec("pte-xnnpack")
    best = table.resolve(QuantConfig(), spec)
    assert (best.observer, best.fuse_relu6, best.keep_float, best.bias_correction) == \
        ("percentile", True, ("logits",), True)
    stock = table.resolve(QuantConfig(recipe="stock"), spec)
    assert (stock.observer, stock.fuse_relu6, stock.keep_float, stock.bias_correction) == ("histogram", False, (), False)
    assert table.resolve(QuantConfig(observer="minmax"), spec).observer == "minmax"   # a flag overrides the recipe


def test_unsupported_choices_are_refused_with_the_backends_that_have_them():
    ts = table.get_spec("ts-qnnpack")
    with pytest.raises(ConfigError, match="--bias-correction is not supported by backend 'ts-qnnpack'; supported by: "
                                          "pte-xnnpack"):
        table.resolve(QuantConfig(bias_correction=True), ts)
    with pytest.raises(ConfigError, match="--keep-float logits: backend 'ts-qnnpack' runs every layer in INT8"):
        table.resolve(QuantConfig(keep_float=("logits",)), ts)
    with pytest.raises(ConfigError, match="QAT learns the correction itself"):
        table.resolve(QuantConfig(bias_correction=True), table.get_spec("pte-xnnpack"), qat=True)
    assert table.resolve(QuantConfig(), ts).bias_correction is False   # each backend has its own recipe values


def test_table_import_stays_light():
    import subprocess
    import sys

    code = "import sys, mbquant.mobile.table, mbquant.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_mcu_row_fixes_what_its_kernels_decide():
    mcu = table.get_spec("pte-cortex-m")
    assert table.select("mcu", ("pte",)) == [mcu]
    best = table.resolve(QuantConfig(), mcu)
    assert (best.equalize, best.bias_correction, best.fuse_relu6, best.observer) == (True, True, True, "histogram")
    with pytest.raises(ConfigError, match="always has fuse-relu6 = True"):
        table.resolve(QuantConfig(fuse_relu6=False), mcu)
    with pytest.raises(ConfigError, match="granularity 'per-tensor' is not supported by backend 'pte-cortex-m'"):
        table.resolve(QuantConfig(granularity="per-tensor"), mcu)


def test_per_tensor_weights_take_their_own_best_recipe():
    """Per-tensor weights on the phone: the best recipe equalizes first (V2 0.35, all val images: drop 1.82 ->
    0.06 pp); an explicit --no-equalize and the stock recipe are left as asked."""
    pte = table.get_spec("pte-xnnpack")
    assert table.resolve(QuantConfig(granularity="per-tensor"), pte).equalize is True
    assert table.resolve(QuantConfig(), pte).equalize is False
    assert table.resolve(QuantConfig(granularity="per-tensor", equalize=False), pte).equalize is False
    assert table.resolve(QuantConfig(granularity="per-tensor", recipe="stock"), pte).equalize is False
    assert table.resolve(QuantConfig(granularity="per-tensor"), table.get_spec("ts-qnnpack")).equalize is False


def test_qat_starts_from_corrected_biases_where_the_backend_corrects_them():
    from mbquant.config import QATConfig

    corrected = [s.name for s in table.BACKENDS.values() if s.qat and s.bias_correction]
    plain = [s.name for s in table.BACKENDS.values() if s.qat and not s.bias_correction]
    assert "pte-xnnpack" in corrected and "pte-cortex-m" in corrected and plain   # the eager TorchScript row
    for name in corrected:
        spec = table.get_spec(name)
        assert table.resolve_qat(QATConfig(), spec).init_biases == "corrected"
        assert table.resolve_qat(QATConfig(init_ranges="off", freeze_observers_after=1), spec).init_biases == "float"   # nothing to correct
        assert table.resolve_qat(QATConfig(init_biases="float"), spec).init_biases == "float"
    for name in plain:
        spec = table.get_spec(name)
        assert table.resolve_qat(QATConfig(), spec).init_biases == "float"
        with pytest.raises(ConfigError, match=f"--init-biases corrected: backend '{name}' has no bias correction"):
            table.resolve_qat(QATConfig(init_biases="corrected"), spec)
