"""Empirical bias correction on a trained shipped checkpoint and real calibration images, in one pass."""
import copy
import operator

import pytest
import torch

from mbquant import calibrate
from mbquant.quant.bias_correction import correct_biases, folded_reference, node_means
from mbquant.quant.export import FloatModel
from mbquant.quant.ops import CONV_OPS, LINEAR_OPS
from mbquant.data.contract import spec_of
from mbquant.models import resolve_model
from tests.conftest import quantize_pt2e
from tests.quant.reference_bias_correction import correct_biases_in_memory


_CACHE: dict = {}


def _setup(fmnist, n=64):
    """(float model, a fresh copy of the uncorrected INT8 graph, the calibration batches); quantized once per n."""
    if n not in _CACHE:
        model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
        calib = calibrate.from_folder(fmnist / "train", spec_of(info.preset), n, seed=0, expected_classes=info.classes)
        int8 = quantize_pt2e(model, info.resolution, calib, bias_correction=False).int8
        _CACHE[n] = FloatModel(model, info.resolution), int8, list(calib.batches(32))
    fm, int8, batches = _CACHE[n]
    return fm, copy.deepcopy(int8), batches


def _replayed(int8, float_gm, batches):
    """The definition, layer by layer: replay the whole graph after each correction (quadratic in depth)."""
    ref = folded_reference(float_gm)
    layers = [n.name for n in int8.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS]
    f = node_means(ref, set(layers), batches)
    for name in layers:
        node = next(n for n in int8.graph.nodes if n.name == name)
        bias = operator.attrgetter(node.args[2].target)(int8)
        with torch.no_grad():
            bias.sub_(node_means(int8, {name}, batches)[name] - f[name])
    return int8


def test_bias_correction_removes_the_mean_shift(fmnist):
    fm, int8, batches = _setup(fmnist)
    ref = folded_reference(fm.graph)
    late = "conv2d_51"  # the last 1x1 conv: errors of all earlier layers have accumulated here
    before = (node_means(int8, {late}, batches)[late] - node_means(ref, {late}, batches)[late]).abs().mean()
    res = correct_biases(int8, fm.graph, batches)
    after = (node_means(int8, {late}, batches)[late] - node_means(ref, {late}, batches)[late]).abs().mean()
    assert res.layers_corrected == 53 and res.skipped_no_bias == [] and res.samples == 64  # 52 convs + classifier
    assert res.max_abs_shift > 0
    assert after < 0.5 * before


@pytest.mark.slow
def test_one_pass_equals_the_layer_by_layer_replay(fmnist):
    fm, int8, batches = _setup(fmnist, 32)
    replayed = _replayed(copy.deepcopy(int8), fm.graph, batches)
    correct_biases(int8, fm.graph, batches)
    ours, theirs = int8.state_dict(), replayed.state_dict()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5, rtol=0) for k in ours)
    x = batches[0]
    with torch.no_grad():
        assert torch.allclose(int8(x), replayed(x), atol=1e-4)


def test_bounded_memory_pass_gives_the_in_memory_algorithms_biases_exactly(fmnist):
    """The streaming, segment-by-segment correction (one batch in memory, tensors kept between segments on disk)
    computes exactly what the previous one-pass algorithm (every activation of every batch in memory) computed."""
    fm, int8, batches = _setup(fmnist, 64)
    old = copy.deepcopy(int8)
    res_old = correct_biases_in_memory(old, fm.graph, batches)
    res = correct_biases(int8, fm.graph, batches)
    assert res.layers_corrected == res_old.layers_corrected == 53
    ours, theirs = int8.state_dict(), old.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "biases differ from the in-memory algorithm"
    assert res.max_abs_shift == res_old.max_abs_shift


def test_reference_has_no_batch_norm_and_matches_float(fmnist):
    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    f = FloatModel(model, info.resolution).graph
    ref = folded_reference(f)
    assert not any("batch_norm" in str(n.target) for n in ref.graph.nodes if n.op == "call_function")
    x = torch.randn(2, 3, info.resolution, info.resolution)  # a numerics check of BN folding, not calibration
    with torch.no_grad():
        assert torch.allclose(f(x), ref(x), atol=1e-4)


def test_int32_biases_of_the_mcu_graph_are_corrected_on_their_grid(fmnist):
    """CortexMQuantizer quantizes biases to INT32 in the graph (dequantize(int32, s_in * s_w)); the correction
    moves those integers, and later layers see the corrected values (one pass, no stale bias)."""
    from mbquant.mobile import table
    from mbquant.config import QuantConfig
    from mbquant.pipeline import quantize_with

    model, info = resolve_model("mobilenet_v1", None)
    calib = calibrate.from_folder(fmnist / "train", spec_of(info.preset), 64, seed=0, expected_classes=info.classes)
    spec = table.get_spec("pte-cortex-m")
    cfg = table.resolve(QuantConfig(num_calib=64, bias_correction=False, equalize=False), spec)
    fm = FloatModel(model, info.resolution)
    int8 = quantize_with(table.load(spec), fm, cfg, calib).int8
    batches = list(calib.batches(32))
    ref = folded_reference(fm.graph)
    convs = [n.name for n in int8.graph.nodes if n.op == "call_function" and n.target in CONV_OPS]
    late = convs[-1]
    shift = lambda: (node_means(int8, {late}, batches)[late] - node_means(ref, {late}, batches)[late]).abs().mean()
    before = shift()
    res = correct_biases(int8, fm.graph, batches)
    assert res.layers_corrected == len(convs) + 1 and res.skipped_no_bias == []
    assert shift() < 0.5 * before


def test_means_recorded_while_calibrating_are_the_reference_pass(fmnist):
    """The pipeline takes the float means from the calibration pass (the prepared graph over the same images, the
    first ``limit`` of them: 40 of 64 here, so a batch is cut) instead of a float pass of its own. The means are the
    reference pass's up to float rounding; the walk uses them as it uses its own (the same means in give the same
    biases out); the correction removes the mean shift as well; a mismatch in images is refused.

    (The biases themselves are not compared: a rounding-level change of one mean flips a few INT8 roundings
    downstream, and at 40 images the late layers' corrections move by as much as they are: measured 7e-3 on a
    correction of 1e-2 from means that differ by 5e-7.)"""
    from mbquant.config import QuantConfig
    from mbquant.errors import QuantizationError
    from mbquant.mobile import table
    from mbquant.quant.bias_correction import ReferenceMeans

    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    calib = calibrate.from_folder(fmnist / "train", spec_of(info.preset), 64, seed=0, expected_classes=info.classes)
    spec = table.get_spec("pte-xnnpack")
    cfg = table.resolve(QuantConfig(num_calib=64, bias_correction_images=40), spec)
    backend, fm = table.load(spec), FloatModel(model, info.resolution)
    with backend.session():
        prepared = backend.prepare(fm, cfg)
        recorded = ReferenceMeans(prepared, 40)
        calibrate.run(prepared, calib, forward=recorded)
        int8 = backend.convert(prepared)
    assert recorded.seen == 40
    ref = folded_reference(fm.graph)
    own = node_means(ref, recorded.names, calib.source(32, 40))
    ours = recorded.means()
    assert ours.keys() == own.keys() and len(ours) == 53
    assert all(torch.allclose(ours[k], own[k], rtol=1e-5, atol=1e-6) for k in own)

    class Given:                                 # the reference pass's own means, handed in as recorded ones
        seen = 40
        means = staticmethod(lambda: own)

    late = "conv2d_51"
    shift = lambda g: (node_means(g, {late}, calib.source(32, 40))[late] - own[late]).abs().mean()  # noqa: E731
    separate, given = copy.deepcopy(int8), copy.deepcopy(int8)
    before = shift(int8)
    res_own = correct_biases(separate, fm.graph, calib.source(32, 40))
    correct_biases(given, fm.graph, calib.source(32, 40), reference=Given())
    res = correct_biases(int8, fm.graph, calib.source(32, 40), reference=recorded)
    assert (res.reference, res_own.reference) == ("calibration pass", "own pass")
    assert res.layers_corrected == res_own.layers_corrected == 53
    a, b = given.state_dict(), separate.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert shift(int8) < 0.5 * before and shift(separate) < 0.5 * before

    with pytest.raises(QuantizationError, match=r"reads 64 images but calibration recorded the float means over 40"):
        correct_biases(copy.deepcopy(separate), fm.graph, calib.source(32), reference=recorded)


def test_images_above_96_px_are_walked_channels_last_the_rest_as_they_are():
    from mbquant.quant.layerwalk import walk_layout

    small, large = torch.rand(2, 3, 96, 96), torch.rand(2, 3, 97, 120)
    assert walk_layout(small) is small
    out = walk_layout(large)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, large)


def test_a_channels_last_walk_still_removes_the_mean_shift(fmnist, monkeypatch):
    """The layout large images get (here the 64 px checkpoint counts as large): the walk's batches really are
    channels-last, and the correction does its job."""
    from mbquant.quant import layerwalk

    monkeypatch.setattr(layerwalk, "CHANNELS_LAST_ABOVE", 32)
    layouts = []
    put = layerwalk.BatchStore.put

    def spy(self, key, t):
        if getattr(key, "op", None) == "placeholder":
            layouts.append(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        return put(self, key, t)

    monkeypatch.setattr(layerwalk.BatchStore, "put", spy)
    fm, int8, batches = _setup(fmnist)
    ref = folded_reference(fm.graph)
    late = "conv2d_51"
    before = (node_means(int8, {late}, batches)[late] - node_means(ref, {late}, batches)[late]).abs().mean()
    res = correct_biases(int8, fm.graph, batches)
    after = (node_means(int8, {late}, batches)[late] - node_means(ref, {late}, batches)[late]).abs().mean()
    assert layouts and all(layouts)
    assert res.layers_corrected == 53 and after < 0.5 * before


def _count_layer_runs(monkeypatch) -> dict[str, int]:
    """How many times the walk computes each conv and linear layer (filled as it runs)."""
    from mbquant.quant import layerwalk

    evaluate = layerwalk._evaluate
    runs: dict[str, int] = {}

    def counted(gm, node, *args):
        if node.target in CONV_OPS | LINEAR_OPS:
            runs[node.name] = runs.get(node.name, 0) + 1
        return evaluate(gm, node, *args)

    monkeypatch.setattr(layerwalk, "_evaluate", counted)
    return runs


def test_the_fast_walk_patches_each_corrected_layer_instead_of_computing_it_again(fmnist, monkeypatch):
    """Above 96 px (here 32) a corrected layer's output is its measured output minus the subtracted shift: every
    conv and linear runs once, not twice. ``conv(x, w, b - s)`` and ``conv(x, w, b) - s`` round differently, so
    the shifts are the recomputing walk's to float rounding where no INT8 rounding has flipped yet (the first
    layers); deeper, a flipped rounding moves the means as much as the channels-last layout itself does (up to
    0.008 here, against shifts of up to 0.03), and the correction still removes the mean shift."""
    from mbquant.quant import layerwalk
    import mbquant.quant.bias_correction as bc

    monkeypatch.setattr(layerwalk, "CHANNELS_LAST_ABOVE", 32)
    fm, int8, batches = _setup(fmnist)
    recomputed = copy.deepcopy(int8)
    runs = _count_layer_runs(monkeypatch)
    ref = folded_reference(fm.graph)
    late = "conv2d_51"
    before = (node_means(int8, {late}, batches)[late] - node_means(ref, {late}, batches)[late]).abs().mean()
    runs.clear()
    res = correct_biases(int8, fm.graph, batches)
    assert res.layers_corrected == 53 and set(runs) == set(res.shifts)
    assert set(runs.values()) == {len(batches)}, "a patched layer was computed again"
    after = (node_means(int8, {late}, batches)[late] - node_means(ref, {late}, batches)[late]).abs().mean()
    assert after < 0.5 * before

    walk = layerwalk.walk
    monkeypatch.setattr(bc, "walk", lambda *a, patch=None, **k: walk(*a, **k))
    runs.clear()
    again = correct_biases(recomputed, fm.graph, batches)
    assert set(runs.values()) == {2 * len(batches)}
    first = list(res.shifts)[:8]
    assert all(float((res.shifts[k] - again.shifts[k]).abs().max()) < 2e-5 for k in first)


def test_a_layer_whose_outputs_exceed_the_patch_budget_is_computed_again(fmnist, monkeypatch):
    """The patching walk keeps at most PATCH_BYTES of one layer's outputs: with no budget every layer runs twice
    and the biases are exactly the recomputing walk's (the memory of the walk then does not grow with the images)."""
    from mbquant.quant import layerwalk

    monkeypatch.setattr(layerwalk, "CHANNELS_LAST_ABOVE", 32)
    monkeypatch.setattr(layerwalk, "PATCH_BYTES", 0)
    fm, int8, batches = _setup(fmnist)
    recomputed = copy.deepcopy(int8)
    runs = _count_layer_runs(monkeypatch)
    correct_biases(int8, fm.graph, batches)
    assert set(runs.values()) == {2 * len(batches)}
    import mbquant.quant.bias_correction as bc
    walk = layerwalk.walk
    monkeypatch.setattr(bc, "walk", lambda *a, patch=None, **k: walk(*a, **k))
    correct_biases(recomputed, fm.graph, batches)
    ours, theirs = int8.state_dict(), recomputed.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_quantize_overwrites_its_input_only_when_nothing_else_reads_that_memory():
    """The walk's in-place quantize: a value whose only user is the quantize, or one sharing memory with values
    whose users have all run (``hardtanh_``'s input), may be overwritten; not one another node still reads (the
    base of a view with a user left), not a constant or a value read back from the store."""
    from torch.fx import symbolic_trace
    from mbquant.quant import layerwalk
    from mbquant.quant.ops import _Q

    q = _Q.quantize_per_tensor.default

    class M(torch.nn.Module):
        def forward(self, x):
            y = torch.relu(x)
            a = q(torch.nn.functional.hardtanh_(y), 0.1, 0, -128, 127, torch.int8)     # y: its users have run
            z = torch.sigmoid(x)
            v = q(z.view(-1), 0.1, 0, -128, 127, torch.int8)                           # z is read again below
            return a, v, z + 1

    gm = symbolic_trace(M())
    n = {node.name: node for node in gm.graph.nodes}
    cut = layerwalk.plan(gm, [])
    x = torch.randn(8)
    y = torch.relu(x)
    z = torch.sigmoid(x)
    env = {n["relu"]: y, n["hardtanh_"]: torch.nn.functional.hardtanh_(y), n["sigmoid"]: z, n["view"]: z.view(-1)}
    assert layerwalk._last_read(n["hardtanh_"], env, cut)
    assert not layerwalk._last_read(n["view"], env, cut), "sigmoid's value still has a user (the add) to run"
    assert not layerwalk._last_read(n["x"], env, cut), "not computed in this segment"
    env[n["add"]] = z + 1
    assert layerwalk._last_read(n["view"], env, cut)


def test_in_place_quantizes_give_the_same_biases(fmnist, monkeypatch):
    """The fast walk quantizes in the input's buffer where nothing else reads it (every hardtanh_ -> quantize of
    MobileNetV2): the corrected graph is bit for bit the one the out-of-place quantizes give."""
    from mbquant.quant import layerwalk

    monkeypatch.setattr(layerwalk, "CHANNELS_LAST_ABOVE", 32)
    fm, int8, batches = _setup(fmnist)
    other = copy.deepcopy(int8)
    calls = []
    last_read = layerwalk._last_read
    monkeypatch.setattr(layerwalk, "_last_read", lambda *a: calls.append(last_read(*a)) or calls[-1])
    correct_biases(int8, fm.graph, batches)
    assert sum(calls) > len(calls) // 2
    monkeypatch.setattr(layerwalk, "_last_read", lambda *a: False)
    correct_biases(other, fm.graph, batches)
    ours, theirs = int8.state_dict(), other.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
