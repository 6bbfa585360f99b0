"""--max-drop PP --fallback auto: the blocks a search may keep in float, the in-graph stand-in it ranks them with
(equal to what the quantizer builds), the held-out slice, the search order, and the requests it refuses."""
import pytest
import torch

from mbquant.config import QuantConfig, RunConfig
from mbquant.errors import ConfigError
from mbquant.fallback import held_out, smallest_meeting, units, with_float_units, with_float_weights
from mbquant.pipeline import check_run
from mbquant.quant.bias_correction import folded_reference
from mbquant.quant.export import FloatModel
from mbquant.quant.graph import summarize
from tests.conftest import quantize_pt2e


@pytest.mark.parametrize("first", [0, 1, 3, 7, 19, 20])
def test_the_search_finds_the_smallest_k_that_meets_with_few_probes(first):
    tried = []

    def meets(k):
        tried.append(k)
        return k >= first

    assert smallest_meeting(meets, 20) == first
    assert len(tried) <= 2 * 5 + 1                       # doubling, then bisection: about 2 log2(20) probes
    assert first == 0 or first - 1 in tried               # the k just below the answer was seen failing


def test_the_search_says_when_not_even_every_block_meets():
    tried = []
    assert smallest_meeting(lambda k: tried.append(k) or False, 5) is None
    assert tried == [0, 1, 2, 4, 5]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    """The session's trained MobileNetV1 0.25 at 32 px (a trained model: a random one outputs near-constant logits),
    40 calibration images, and its INT8 graph (minmax ranges, no bias correction: what the ranking starts from)."""
    from mbquant import calibrate
    from mbquant.models.checkpoint import load_checkpoint

    root, ck = tiny_ckpt
    model, info = load_checkpoint(ck)[:2]
    calib = calibrate.from_folder(root / "train", info.preset, 40, seed=0)
    return model.eval(), calib, _int8(model, calib)


def _int8(model, calib, keep=()):
    return quantize_pt2e(model, 32, calib, observer="minmax", bias_correction=False, keep_float=keep).int8


def test_units_are_the_blocks_holding_quantized_layers(tiny):
    blocks = units(tiny[2])
    assert blocks == [f"features.{i}" for i in range(14)] + ["classifier.1"]
    assert units(tiny[2], ("features.0", "classifier.1")) == blocks[1:-1]


def test_a_block_put_back_in_float_in_the_graph_computes_what_the_quantizer_builds_for_it(tiny):
    """The ranking's stand-in (float weights, no quantization inside the block) equals keeping the block in float
    with --keep-float: same ranges at its borders (observers see float activations either way)."""
    model, calib, int8 = tiny
    sim = with_float_units(int8, folded_reference(FloatModel(model, 32).graph), ("features.3",))
    real = _int8(model, calib, ("features.3",))
    assert summarize(sim).float_layers == summarize(real).float_layers == ["features.3.dw.0", "features.3.pw.0"]
    x = calib.images[:16]
    with torch.no_grad():
        a, b, before = sim(x), real(x), int8(x)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (a - before).abs().max() > 1e-2                # and it did change the logits
    count = lambda gm: sum(1 for n in gm.graph.nodes if "quantize_per_tensor" in str(n.target))  # noqa: E731
    assert count(sim) == count(real) < count(int8)


def test_float_weights_swap_every_weight_and_bias_and_keep_every_activation_quantize(tiny):
    """The stand-in for 'weights exact, activations INT8' (benchmarks/agreement_jitter.py): every quantized
    conv/linear reads the float weight and bias, and the activations are quantized exactly as before, so that
    removing the activation quantizes as well gives the float graph back."""
    model, calib, int8 = tiny
    ref = folded_reference(FloatModel(model, 32).graph)
    sim = with_float_weights(int8, ref, tuple(units(int8)))
    kinds = lambda gm: [str(n.target) for n in gm.graph.nodes if "quantize_per" in str(n.target)]  # noqa: E731
    assert "quantized_decomposed.dequantize_per_channel.default" in kinds(int8)
    assert "quantized_decomposed.dequantize_per_channel.default" not in kinds(sim)
    assert kinds(sim) == [k for k in kinds(int8) if "per_channel" not in k]
    x = calib.images[:16]
    with torch.no_grad():
        assert (sim(x) - int8(x)).abs().max() > 1e-3                  # the weights did change
        for n in list(sim.graph.nodes):                              # now drop the activation rounding too
            if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default:
                for d in list(n.users):
                    d.replace_all_uses_with(n.args[0])
        sim.graph.eliminate_dead_code()
        sim.recompile()
        assert torch.allclose(sim(x), ref(x), atol=1e-5), (sim(x) - ref(x)).abs().max()


def test_the_held_out_slice_shares_no_image_with_calibration_or_evaluation(calib32, small_folder):
    from mbquant.data import small_preset
    from mbquant.data.dataset import eval_set

    ev = eval_set(small_folder, small_preset(32), limit=20, seed=0)
    sl = held_out(calib32, ev, 60, seed=0)                 # all 120 - 40 - 20 images that are left
    taken = {s.path for s in calib32.dataset.samples} | {s.path for s in ev.samples}
    assert len(sl) == 60 and not {s.path for s in sl.samples} & taken
    assert sl.labelled and sl.classes == ev.classes
    big = eval_set(small_folder, small_preset(32))
    with pytest.raises(ConfigError, match=r"needs at least 200 labelled images .* found 0; pass --eval a different"):
        held_out(calib32, big, 1000, seed=0)


def test_requests_the_search_cannot_serve_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="no budget was given; add --max-drop"):
        RunConfig(fallback="auto")
    with pytest.raises(ConfigError, match=r"fallback 'manual' is not supported; choose one of: none, auto"):
        RunConfig(fallback="manual", max_drop=0.1)
    with pytest.raises(ConfigError, match=r"pte-cortex-m run every layer in INT8 .* drop --fallback"):
        check_run(QuantConfig(), RunConfig(target="mcu", max_drop=0.1, fallback="auto"))
    with pytest.raises(ConfigError, match="QAT trains every layer in INT8"):
        check_run(QuantConfig(recipe="qat"), RunConfig(max_drop=0.1, fallback="auto"), qat=True)
    assert check_run(QuantConfig(), RunConfig(max_drop=0.1, fallback="auto"))[0].name == "pte-xnnpack"


@pytest.mark.slow
def test_the_phone_job_keeps_the_fewest_blocks_the_slice_asks_for_and_the_artifact_gate_judges_them(fmnist, tmp_path):
    """The whole job with --max-drop 0.02 --fallback auto: the curve's probes, the chosen k (the smallest that met on
    the held-out slice, k - 1 seen failing), exactly those blocks in float in the INT8 model, and the run's status
    set by the artifact's own drop on the evaluation images (never by the slice)."""
    import json

    from mbquant.cli import main

    out = tmp_path / "run"
    rc = main(["ptq", "mobilenet_v2", "--calib", str(fmnist / "train"), "--eval", str(fmnist / "val"),
               "--eval-limit", "2000", "--max-drop", "0.02", "--fallback", "auto", "--no-float-program",
               "--latency-runs", "3", "--out", str(out), "--quiet"])
    folder = out if out.exists() else tmp_path / "run.failed"
    rep = json.loads((folder / "report.json").read_text())
    fb = rep["backends"]["pte-xnnpack"]["fallback"]
    k = len(fb["kept"])
    by_k = {c["kept"]: c for c in fb["curve"]}
    assert fb["units"] == 19 and fb["images"] == 2000 and fb["slice_root"].endswith("train")
    assert fb["kept"] == [r["unit"] for r in fb["ranking"]][:k]
    if fb["met_on_slice"]:
        assert by_k[k]["meets"] and by_k[k]["drop_pp"] <= 0.02
        assert k == 0 or not by_k[k - 1]["meets"]
    assert not any(c["meets"] for j, c in by_k.items() if j < k)
    float_layers = rep["backends"]["pte-xnnpack"]["float_layers"]
    for block in fb["kept"]:
        assert any(name.startswith(block + ".") for name in float_layers)
    assert rep["backends"]["pte-xnnpack"]["config"]["keep_float"] == ["logits", *fb["kept"]]
    art = rep["artifacts"][0]
    assert (rc == 0) == (art["drop_pp"] <= 0.02) == (rep["status"] == "ok")
    assert fb["without"]["programs"][0]["bytes"] <= art["bytes"]
