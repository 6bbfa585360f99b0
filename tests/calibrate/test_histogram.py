"""The counted histogram (``mbquant.calibrate.histogram``): torch.histc's counts, and the observers' state and
ranges unchanged on a real model."""
import copy
from pathlib import Path

import pytest
import torch

from mbquant import calibrate
from mbquant.calibrate import histogram
from mbquant.calibrate.histogram import CountedHistogram, histc
from mbquant.calibrate.observers import PercentileRange
from mbquant.config import QuantConfig
from mbquant.mobile import table
from mbquant.models import create
from mbquant.quant.export import FloatModel


def _cases():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(3, 8, 20, 20, generator=g) * 2
    yield "post-relu6 (many zeros, many at the top edge)", (torch.randn(4, 16, 12, 12, generator=g) * 4).clamp(0, 6)
    yield "every bin edge and the last one", torch.linspace(-3, 5, 2048 * 4 + 1)
    yield "more than one thread's share", torch.randn((1 << 17) * 3 + 123, generator=g).exp()
    yield "one value below the rest", torch.cat([torch.full((50,), 7.0), torch.tensor([-1e-3])])
    yield "tiny", torch.tensor([0.25, 0.5, 0.75])
    yield "a range so narrow that width / 2048 is subnormal", torch.rand(5000, generator=g) * 1e-36
    yield "one bin's run (the sub-histograms interleave it)", torch.cat([torch.zeros(70_001), torch.rand(333, generator=g)])


@pytest.mark.parametrize("bins", [2048, 100, 3, 10_000])   # 10,000: indices past int16
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_counts_are_torch_histc_s(case, bins):
    _, x = case
    lo, hi = torch.aminmax(x)
    ours = histc(x, bins, lo, hi)
    assert ours.dtype == torch.float32 and ours.shape == (bins,)
    assert torch.equal(ours, torch.histc(x, bins, min=float(lo), max=float(hi)))
    assert float(ours.sum()) == x.numel()


def test_a_range_wider_than_the_values_and_the_edge_cases_torch_histc_decides():
    x = torch.rand(1000)
    assert torch.equal(histc(x, 2048, torch.tensor(-2.0), torch.tensor(3.0)), torch.histc(x, 2048, -2.0, 3.0))
    same = torch.full((10,), 0.5)                    # no width: torch.histc's own rule widens it
    assert torch.equal(histc(same, 2048, 0.5, 0.5), torch.histc(same, 2048, 0.5, 0.5))
    x64 = x.double()                                 # not float32: torch.histc itself
    assert torch.equal(histc(x64, 16, 0.0, 1.0), torch.histc(x64, 16, 0.0, 1.0))
    with pytest.raises(RuntimeError, match="not finite"):
        histc(x, 16, 0.0, float("nan"))              # as torch.histc says it


def test_values_outside_the_range_are_refused_not_miscounted():
    for outside in (9.0, 2.0000002, -1.0, -1e-6):
        with pytest.raises(ValueError, match=r"outside the histogram's range \[0.0, 2.0\]"):
            histc(torch.tensor([0.0, 2.0, outside]), 4, 0.0, 2.0)


def test_a_bin_past_float32_s_exact_counts_is_counted():
    """torch.histc's CPU kernel counts in float32 per thread and stops at 2 ** 24; the counted histogram counts in
    int64 and rounds the total once."""
    x = torch.zeros(2 ** 24 + 4)
    assert float(histc(x, 8, 0.0, 1.0)[0]) == 2 ** 24 + 4


def test_default_calibration_gives_the_uncounted_observers_ranges(calib32):
    """A real model's default (percentile) observers, calibrated side by side with copies whose class is the plain
    torchao percentile observer: every histogram, range and qparam is the same."""
    spec = table.get_spec("pte-xnnpack")
    cfg = table.resolve(QuantConfig(num_calib=40, batch_size=8), spec)
    prepared = table.load(spec).prepare(FloatModel(create("mobilenet_v2", num_classes=10, width_mult=0.35), 32), cfg)
    plain = copy.deepcopy(prepared)
    swapped = 0
    for m in calibrate.observers_of(plain).values():
        if isinstance(m, CountedHistogram):
            m.__class__, swapped = histogram.uncounted(type(m)), swapped + 1
            assert isinstance(m, PercentileRange) and not isinstance(m, CountedHistogram)
    assert swapped > 40
    calibrate.run(prepared, calib32, batch_size=8)
    calibrate.run(plain, calib32, batch_size=8)
    ours, theirs = calibrate.observers_of(prepared), calibrate.observers_of(plain)
    for name, obs in ours.items():
        if isinstance(obs, CountedHistogram):
            assert torch.equal(obs.histogram, theirs[name].histogram), name
            assert obs.calculate_qparams() == theirs[name].calculate_qparams(), name


@pytest.fixture
def threads():
    """Set torch's thread count for one test (the count splits its work by it) and restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_counts_do_not_depend_on_the_number_of_threads(threads):
    """Each thread counts a share into its own histograms; the integer totals are the same for any split, the
    shares' seams and a run of one bin across them included."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.zeros(100_003), torch.randn(400_001, generator=g).relu() * 3, torch.full((7,), 5.0)])
    lo, hi = torch.aminmax(x)
    reference = torch.histc(x, 2048, min=float(lo), max=float(hi))
    for n in (1, 2, 3, 8):
        threads(n)
        assert torch.equal(histc(x, 2048, lo, hi), reference), n
        assert torch.equal(histc(x, 100, lo, hi), torch.histc(x, 100, min=float(lo), max=float(hi))), n


def test_channels_last_and_strided_activations_are_counted_whole():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 24, 30, 30, generator=g)
    for view in (x.to(memory_format=torch.channels_last), x[:, ::2], x.transpose(2, 3)):
        lo, hi = torch.aminmax(view)
        assert torch.equal(histc(view, 2048, lo, hi), torch.histc(view, 2048, min=float(lo), max=float(hi)))


def test_the_compiled_count_refuses_what_it_cannot_count():
    """A value outside the range or not a number is never cast to a bin: the count says how many there were and
    the batch is refused. Buffers of the wrong size or type are refused before anything is read."""
    with pytest.raises(ValueError, match=r"2 values outside the histogram's range \[0.0, 2.0\]"):
        histogram._count(torch.tensor([0.0, 2.5, 1.0, -0.5]), 4, 0.0, 2.0)
    with pytest.raises(ValueError, match="1 values outside"):
        histogram._count(torch.tensor([0.0, float("nan"), 1.0]), 4, 0.0, 2.0)
    native = histogram._native
    x, out = torch.rand(10).numpy(), torch.zeros(5, dtype=torch.int64).numpy()
    assert native.count(x, out, 0.0, 0.25, 1.0, True, 4, 2) == 0 and out.sum() == 10
    with pytest.raises(ValueError, match="out must hold bins \\+ 1 = 9 int64 counts, got 40 bytes"):
        native.count(x, out, 0.0, 0.125, 1.0, True, 8, 1)
    with pytest.raises(ValueError, match="bins must be in"):
        native.count(x, out, 0.0, 0.25, 1.0, True, 0, 1)
    with pytest.raises(ValueError, match="float32 values"):
        native.count(bytes(6), out, 0.0, 0.25, 1.0, True, 4, 1)
    with pytest.raises(TypeError):                       # read-only counts
        native.count(x, bytes(40), 0.0, 0.25, 1.0, True, 4, 1)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mapped libraries (Linux)")
def test_the_count_shares_torch_s_openmp_runtime():
    """The compiled count runs on an OpenMP team: it must be torch's (one libgomp in the process). A second
    runtime's threads would compete with torch's workers, which spin on their cores after every op."""
    assert histogram._native is not None
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libiomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes
