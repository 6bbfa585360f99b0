"""Regression checks users put in their CI: `mbquant check`, `mbquant baseline write`, the pytest plugin and the
examples/regression folder, on the demo recipe's .pte and on a deliberately broken quantization."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mbquant.check import check, read_baseline, write_baseline
from mbquant.cli import main
from mbquant.errors import ConfigError, DataError
from mbquant.records import RecordError
from mbquant.testing import assert_accuracy_drop

REPO = Path(__file__).resolve().parents[1]
PHONE = "mobilenet_v2_w0.5_r64_fmnist"
SMALL = "mobilenet_v2_w0.35_r64_fmnist"


def _pte(run_dir: Path) -> Path:
    (pte,) = run_dir.glob("*_int8.pte")
    return pte


@pytest.fixture(scope="module")
def good(phone_run, fmnist):
    """The default recipe's .pte checked on the same 2,000 images its run evaluated."""
    out, rep = phone_run
    return out, rep, check(_pte(out), fmnist / "val", float_model=PHONE, max_drop=0.5, min_agreement=99, limit=2000)


@pytest.fixture(scope="module")
def broken(degraded_run, fmnist):
    out, rep = degraded_run
    return out, rep, check(_pte(out), fmnist / "val", float_model=SMALL, max_drop=0.5, limit=500)


def test_check_reproduces_the_reports_accuracy_exactly(good):
    _, rep, v = good
    (art,) = rep["artifacts"]
    assert v.ok and v.images == art["images"] == 2000
    assert v.top1 == pytest.approx(art["top1"], abs=1e-9) and v.float_top1 == pytest.approx(rep["float"]["top1"])
    assert v.agreement == pytest.approx(art["agreement_float"], abs=1e-9)
    assert v.drop_pp == pytest.approx(art["drop_pp"], abs=1e-9)
    lo, hi = v.drop_ci95
    only_float, only_int8 = v.discordant
    assert lo < v.drop_pp < hi and only_float + only_int8 > 0
    assert v.drop_pp == pytest.approx(100 * (only_float - only_int8) / 2000)


def test_a_bundle_is_checked_with_its_own_preprocessing(phone_bundle, good, fmnist):
    """The bundle's contract is the run's preprocessing: the same numbers exactly (issue 17)."""
    v = check(phone_bundle, fmnist / "val", float_model=PHONE, max_drop=0.5, limit=2000)
    assert v.ok and v.images == 2000 and v.description.startswith("app bundle")
    assert (v.top1, v.agreement, v.drop_pp, v.eval_digest) == (good[2].top1, good[2].agreement, good[2].drop_pp,
                                                               good[2].eval_digest)


@pytest.mark.slow
def test_a_broken_quantization_fails_with_a_readable_verdict(broken):
    _, rep, v = broken
    assert rep["status"] == "ok" and rep["backends"]["pte-xnnpack"]["config"]["granularity"] == "per-tensor"
    assert not v.ok and v.drop_pp > 5
    text = v.text()
    assert text.startswith("mbquant check: FAILED")
    assert "pte-xnnpack, mobilenet_v2 w0.35 64x64" in text and "on 500 images of" in text
    assert f"drop {v.drop_pp:.2f} pp, 95 % CI [" in text and "only the float model gets right" in text
    assert f"FAIL       drop {v.drop_pp:.2f} pp <= --max-drop 0.5 pp (the artifact loses" in text


def test_strict_ci_judges_the_upper_end_of_the_interval(good, fmnist):
    out, _, v = good
    lo, hi = v.drop_ci95
    bound = (v.drop_pp + hi) / 2                       # above the point estimate, below the upper end
    kw = dict(float_model=PHONE, max_drop=bound, limit=2000)
    assert check(_pte(out), fmnist / "val", **kw).ok
    strict = check(_pte(out), fmnist / "val", strict_ci=True, **kw)
    assert not strict.ok and "upper end of the 95 % CI" in strict.text()


@pytest.mark.slow
def test_assert_accuracy_drop_raises_the_verdict(broken, fmnist):
    out, _, _ = broken
    with pytest.raises(AssertionError, match=r"(?s)mbquant check: FAILED.*--max-drop 1 pp"):
        assert_accuracy_drop(SMALL, _pte(out), fmnist / "val", max_drop_pp=1.0, limit=300)


def test_cli_check_exit_codes_json_and_verdict_file(good, fmnist, tmp_path, capsys):
    # the default recipe's .pte passes --max-drop 0.5 and fails --min-agreement 100 (its agreement on the 2,000
    # images is about 99.5 %: about ten images flip on every host kind; the broken quantization's verdict is in
    # make test-slow); the second decodes its images in two worker processes: the same numbers as decoding here
    for gate, images, rc_expected in ((["--max-drop", "0.5"], 300, 0),
                                      (["--min-agreement", "100", "--decode-workers", "2"], 2000, 1)):
        out = tmp_path / f"verdict{rc_expected}.json"
        rc = main(["check", str(_pte(good[0])), "--data", str(fmnist / "val"), "--float-weights", PHONE, *gate,
                   "--limit", str(images), "--out", str(out)])
        captured = capsys.readouterr()
        assert rc == rc_expected
        verdict = json.loads(out.read_text())
        assert verdict["ok"] is (rc == 0) and verdict["images"] == images
        if images == 2000:
            assert (verdict["top1"], verdict["agreement"], verdict["drop_pp"], verdict["eval_digest"]) == (
                good[2].top1, good[2].agreement, good[2].drop_pp, good[2].eval_digest)
        stream = captured.out if rc == 0 else captured.err
        assert stream.startswith(f"mbquant check: {'PASSED' if rc == 0 else 'FAILED'}")


@pytest.mark.slow
def test_baseline_write_then_check_with_tolerance(good, broken, fmnist, tmp_path, capsys):
    base = tmp_path / "baseline.json"
    rc = main(["baseline", "write", str(_pte(good[0])), "--data", str(fmnist / "val"), "--float-weights", PHONE,
               "--limit", "300", "--tolerance", "0.3", "--why", "kernel families", "--out", str(base)])
    assert rc == 0 and "baseline written to" in capsys.readouterr().out
    rec = read_baseline(base)
    assert rec.images == 300 and rec.tolerance_pp == 0.3 and rec.tolerance_why == "kernel families"
    assert len(rec.artifact_sha256) == 64 and rec.float_top1 is not None
    # the same artifact passes its own baseline; the limit comes from the baseline
    assert main(["check", str(_pte(good[0])), "--data", str(fmnist / "val"), "--baseline", str(base)]) == 0
    capsys.readouterr()
    # the broken artifact on the same images fails it, naming the baseline it fell below
    rc = main(["check", str(_pte(broken[0])), "--data", str(fmnist / "val"), "--baseline", str(base)])
    err = capsys.readouterr().err
    assert rc == 1 and f"baseline {rec.top1:.2f} % - tolerance 0.3 pp" in err and "FAIL" in err
    assert "not the file the baseline was recorded from" in err                 # the sha256 is compared
    # a tolerance larger than the loss lets it through: the flag overrides the recorded one
    v = check(_pte(broken[0]), fmnist / "val", baseline=base, tolerance=100.0)
    assert v.ok and v.baseline["tolerance_used_pp"] == 100.0
    with pytest.raises(DataError, match=r"recorded on 300 images of .* this check saw 200 images"):
        check(_pte(good[0]), fmnist / "val", baseline=base, limit=200)


def test_check_refuses_what_it_cannot_judge(good, fmnist, tmp_path, capsys):
    pte = _pte(good[0])
    with pytest.raises(ConfigError, match="nothing to check"):
        check(pte, fmnist / "val", limit=10)
    with pytest.raises(ConfigError, match="pass --float-weights"):
        check(pte, fmnist / "val", max_drop=0.5, limit=10)
    with pytest.raises(ConfigError, match="--limit 10 is too few images to judge an accuracy drop"):
        check(pte, fmnist / "val", float_model=PHONE, max_drop=0.5, strict_ci=True, limit=10)
    lone = tmp_path / "lone.pte"
    shutil.copy(pte, lone)
    with pytest.raises(DataError, match="has no sidecar 'lone.pte.json'"):
        check(lone, fmnist / "val", float_model=PHONE, max_drop=1)
    (tmp_path / "b.json").write_text('{"top1": 90}')
    with pytest.raises(RecordError, match="is not a baseline .*write one with `mbquant baseline write`"):
        check(pte, fmnist / "val", baseline=tmp_path / "b.json")
    assert main(["check", str(tmp_path / "missing.pte"), "--data", str(fmnist / "val"), "--max-drop", "1",
                 "--float-weights", PHONE]) != 0
    assert "neither an artifact file nor a bundle folder" in capsys.readouterr().err
    assert main(["baseline", "write", str(pte), "--data", str(fmnist / "val"), "--tolerance", "-1",
                 "--out", str(tmp_path / "x.json")]) != 0
    assert "--tolerance" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


# ----------------------------------------------------------------------------- a user's project (pytester)

def _user_project(pytester, monkeypatch, bundle: Path, float_weights: str, baseline: Path | None) -> None:
    shutil.copy(REPO / "examples" / "regression" / "test_quantized_model.py", pytester.path)
    pytester.makeini("[pytest]\n")       # the project's own root, not mbquant's
    env = {"MODEL_BUNDLE": str(bundle), "FLOAT_WEIGHTS": float_weights,
           "MODEL_BASELINE": str(baseline or pytester.path / "no-baseline.json")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def user_baseline(phone_bundle, fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("userbase") / "baseline.json"
    write_baseline(phone_bundle, fmnist / "val", out, tolerance=0.3, float_model=PHONE, limit=300,
                   why="AVX2 vs AVX-512 VNNI kernels")
    return out


@pytest.mark.slow
def test_users_example_passes_on_a_good_bundle(pytester, monkeypatch, phone_bundle, user_baseline, fmnist):
    """The drop and baseline tests on 1,000 images (the noise-bound test needs more: make test-slow)."""
    _user_project(pytester, monkeypatch, phone_bundle, PHONE, user_baseline)
    res = pytester.runpytest_subprocess("--mbquant-data", str(fmnist / "val"), "--mbquant-limit", "1000", "-k",
                                        "not noise_bound", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=2, deselected=1)


@pytest.mark.slow
def test_users_example_passes_on_a_good_bundle_at_the_noise_bound(pytester, monkeypatch, phone_bundle, user_baseline,
                                                                   fmnist):
    _user_project(pytester, monkeypatch, phone_bundle, PHONE, user_baseline)
    # 2,000 images: enough for the strict test (the drop's 95 % CI is about +-0.3 pp there, +-0.9 pp on 300)
    res = pytester.runpytest_subprocess("--mbquant-data", str(fmnist / "val"), "--mbquant-limit", "2000", "-p",
                                        "no:cacheprovider")
    res.assert_outcomes(passed=3)


@pytest.mark.slow
def test_users_example_fails_readably_on_a_broken_artifact(pytester, monkeypatch, broken, user_baseline, fmnist):
    _user_project(pytester, monkeypatch, _pte(broken[0]), SMALL, user_baseline)
    res = pytester.runpytest_subprocess("--mbquant-data", str(fmnist / "val"), "--mbquant-limit", "300", "-p",
                                        "no:cacheprovider")
    res.assert_outcomes(failed=3)
    out = res.stdout.str()
    assert "AssertionError: mbquant check: FAILED" in out and "--max-drop 0.5 pp (the artifact loses" in out
    assert "upper end of the 95 % CI" in out and "tolerance 0.3 pp (recorded" in out


def test_users_example_skips_with_a_reason_without_data(pytester, monkeypatch, phone_bundle):
    _user_project(pytester, monkeypatch, phone_bundle, PHONE, None)
    monkeypatch.delenv("MBQUANT_DATA", raising=False)
    res = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    res.assert_outcomes(skipped=3)
    assert "pass --mbquant-data DIR" in res.stdout.str() and "no baseline.json" in res.stdout.str()
