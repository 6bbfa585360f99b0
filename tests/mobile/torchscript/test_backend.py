"""The TorchScript backend: .pt/.ptl written atomically, loaded in a fresh process (.ptl in the lite interpreter)."""
import pytest
import torch

from mbquant.errors import VerificationError
from mbquant.mobile import table
from mbquant.mobile.torchscript import FreshProcessModel, script
from mbquant.models import create
from mbquant.pipeline import quantize_with
from mbquant.quant.export import FloatModel
from tests.mobile.torchscript.test_fuse import nontrivial

RES = 32

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def written(calib32, small_val, tmp_path_factory):
    """mobilenet_v2 w0.35 at 32x32 calibrated on 40 real images, written as .pt and .ptl."""
    torch.manual_seed(0)
    model = nontrivial(create("mobilenet_v2", num_classes=10, width_mult=0.35))
    spec = table.get_spec("ts-qnnpack")
    backend = table.load(spec)
    q = quantize_with(backend, FloatModel(model, RES), table.resolve(calib_config(calib32), spec), calib32)
    out = tmp_path_factory.mktemp("ts")
    with backend.session():
        files = backend.write(q.int8, out / "m_int8", resolution=RES)
    return backend, q.int8, files, out


def calib_config(calib):
    from mbquant.config import QuantConfig

    return QuantConfig(num_calib=calib.requested, batch_size=20)


def test_both_files_are_written_atomically_with_what_the_backend_knows(written):
    backend, _, files, out = written
    assert sorted(p.name for p in out.iterdir()) == ["m_int8.pt", "m_int8.ptl"]  # no temp files left
    pt, ptl = files
    assert pt.bytes == (out / "m_int8.pt").stat().st_size > 10_000
    assert pt.details["engine"] == ptl.details["engine"] == "qnnpack" and pt.details["script_method"] == "script"
    assert ptl.details["loader"] == "torch.jit.mobile._load_for_lite_interpreter"
    assert any("optimize_for_mobile" in n and "XNNPACK" in n for n in pt.details["notes"])  # said, not skipped


def test_reloaded_files_agree_with_the_int8_model_in_a_fresh_process(written, calib32):
    backend, int8, files, _ = written
    x = calib32.images[:34]
    ref = backend.reference(int8)(x)
    for w in files:
        pred = backend.open(w.path, None)
        try:
            assert "fresh process" in pred.runtime
            assert torch.equal(pred(x), ref) and torch.equal(pred(x[:1]), ref[:1])
            lat = pred.latency(x[:1], runs=3, threads=1)
            assert lat["median_ms"] > 0 and lat["runs"] == 3
        finally:
            pred.close()
    lite = backend.open(files[1].path, None)
    assert "lite interpreter" in lite.runtime
    lite.close()


def test_reload_failures_carry_the_subprocess_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(VerificationError, match=r"'.*bad.pt' is not a TorchScript artifact the torch.jit.load can load "
                                                r"\(engine qnnpack\): RuntimeError: PytorchStreamReader failed"):
        FreshProcessModel(bad, engine="qnnpack", lite=False)
    with pytest.raises(VerificationError, match="does not exist"):
        FreshProcessModel(tmp_path / "missing.ptl", engine="qnnpack", lite=True)


def test_a_failed_write_leaves_no_file(tmp_path):
    class Broken:
        def save(self, path):
            open(path, "wb").write(b"partial")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        script.write_pt(Broken(), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
