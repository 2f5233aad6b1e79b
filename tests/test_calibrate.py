"""Calibration: encoder-level thresholds and bounds, conditions bound to the secret, plan enforcement in verify."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from dist_awenc.config import CalibrateConfig, PretrainConfig, VerifyConfig, WatermarkConfig, load_config
from dist_awenc.errors import ConfigError
from dist_awenc.verify.calibration import NullEncoder, load_calibration, mode_test, summarise, tau_star

from dist_awenc.verify.core import MODES


def test_tau_star_is_where_the_test_crosses_alpha():
    rng = np.random.default_rng(0)
    s = rng.normal(0.2, 0.05, size=200)
    t = tau_star("whitebox", s, 1e-3)
    assert mode_test("whitebox", s, t - 1e-3).p_value < 1e-3 <= mode_test("whitebox", s, t + 1e-3).p_value
    hm, hr = rng.random(49) < 0.9, rng.random(49) < 0.1
    t = tau_star("blackbox_label", (hm, hr), 1e-3)
    assert 0 < t < 1
    assert mode_test("blackbox_label", (hm, hr), t - 1e-3).p_value < 1e-3 <= mode_test("blackbox_label", (hm, hr), t + 1e-3).p_value


def _null(name, family, value):
    return NullEncoder(name=name, family=family, tau_star={m: value for m in MODES}, effect={m: 0.0 for m in MODES})


def test_summary_counts_families_and_never_reports_an_in_sample_rate():
    """Threshold = max tau* over calibration families; FPR bounds only over held-out families, each labelled."""
    nulls = []
    for i in range(20):  # 20 families: a null encoder and its attacked copy
        nulls += [_null(f"e{i}", f"e{i}", 0.01 * i), _null(f"e{i}__prune", f"e{i}", 0.01 * i + 0.005)]
    owner = {m: {"tau_star": 0.5, "effect": 0.3} for m in MODES}
    rep = summarise(nulls, owner, 1e-3, 0.5, seed=0)
    rep.update(conditions={"secret_sha256": "a" * 64, "alpha": 1e-3, "n": {"whitebox": 256}, "dataset": "digits",
                           "dataset_size": 1797, "split_seed": 0}, population={"families": 20, "encoders": [e.name for e in nulls]})
    from dist_awenc.verify.calibration import markdown

    md = markdown(rep)
    assert "Clopper-Pearson" in md and "zero by construction" in md
    assert "exceeds the maximum of 10 calibration families with probability 0.50" in md
    assert sum(line.startswith("| e") for line in md.splitlines()) == 1 + 20  # header + every held-out encoder
    held = set(rep["heldout_families"])
    assert len(held) == 10 and set(rep["calibration_families"]) == {f"e{i}" for i in range(20)} - held
    m = rep["modes"]["whitebox"]
    cal_max = max(e.tau_star["whitebox"] for e in nulls if e.family not in held)
    assert m["threshold"] == pytest.approx(cal_max + 1e-6)
    assert m["calibration"] == {"families": 10, "encoders": 20}
    h = m["heldout"]
    assert h["families"] == 10 and h["encoders"] == 20
    k = sum(any(e.tau_star["whitebox"] > m["threshold"] for e in nulls if e.family == f) for f in held)
    assert h["false_positive_families"] == k  # a family is positive when any member is
    from dist_awenc.verify.stats import clopper_pearson_upper

    assert h["heldout_fpr_upper_95"] == pytest.approx(clopper_pearson_upper(k, 10))
    assert m["exceed_probability_bound"] == pytest.approx(1 / 11)
    assert m["owner_f0"]["detected_at_threshold"] is True
    assert not any(t["positive"] for t in m["null"] if not t["heldout"])  # zero by construction...
    assert "fpr_upper_95" not in m and "false_positives" not in m  # ...and so never reported as a rate
    assert all(e.name != "owner_f0" for e in nulls)


def test_zero_of_m_heldout_families_gives_the_exact_bound():
    nulls = [_null(f"e{i}", f"e{i}", 0.5 if i % 2 else 0.1) for i in range(30)]
    rep = summarise(nulls, None, 1e-3, 0.5, seed=3)
    for m in rep["modes"].values():
        h = m["heldout"]
        if h["false_positive_families"] == 0:
            assert h["heldout_fpr_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 15), abs=1e-9)


def test_a_correct_calibration_lets_a_heldout_family_through_about_half_the_time():
    """Simulated size: i.i.d. null families (two members each), threshold set by summarise on half of them.

    The share of splits with at least one held-out positive matches heldout_crossing_probability (1/2 for 30
    and 30), so "no held-out positive" is a coin flip, not a property of a secret; each held-out family crosses
    with probability at most the reported order-statistic bound 1 / (m' + 1).
    """
    from dist_awenc.verify.calibration import heldout_crossing_probability

    rng = np.random.default_rng(0)
    trials, any_crossing, crossings, families = 400, 0, 0, 0
    for t in range(trials):
        nulls = []
        for i in range(60):
            parent, attacked = rng.normal(size=2)
            nulls += [_null(f"e{i}", f"e{i}", float(parent)), _null(f"e{i}__prune", f"e{i}", float(attacked))]
        h = summarise(nulls, None, 1e-3, 0.5, seed=t)["modes"]["whitebox"]["heldout"]
        any_crossing += h["false_positive_families"] > 0
        crossings += h["false_positive_families"]
        families += h["families"]
    expected = heldout_crossing_probability(30, 30)
    assert expected == pytest.approx(0.5)
    se = (expected * (1 - expected) / trials) ** 0.5
    assert abs(any_crossing / trials - expected) < 4 * se
    assert crossings / families == pytest.approx(1 / 31, abs=0.01)  # per family: the order-statistic bound, attained
    with pytest.raises(ValueError, match="calibration family"):
        heldout_crossing_probability(0, 30)


def _owner(tmp_path, alternatives=2):
    from dist_awenc.ssl.pretrain import pretrain
    from dist_awenc.watermark.generate import watermark

    f0 = pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "f0")))
    secret = watermark(load_config(WatermarkConfig, None, [
        f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={f0}", "data.image_size=8", "generation.steps=5",
        "generation.batch_size=32", f"plan.alternatives={alternatives}", "plan.n_whitebox=64"]))
    return f0, secret


def _verify(tmp_path, suspect, secret, *extra):
    from dist_awenc.verify.run import verify

    return verify(load_config(VerifyConfig, None, [f"run.out_dir={tmp_path}", f"suspect={suspect}", f"secret={secret}",
                                                   "data.image_size=8", *extra]))


def test_calibration_binds_to_the_secret_and_verify_enforces_its_conditions(tmp_path):
    from dist_awenc.stages.calibrate import calibrate

    f0, secret = _owner(tmp_path)
    cfg = load_config(CalibrateConfig, None, [
        f"run.out_dir={tmp_path}", f"owner_encoder={Path(f0).parent}", f"secret={secret}", "data.image_size=8",  # a run folder
        "population.archs=[tiny:8,tiny_resnet:4]", "population.methods=[simclr]", "population.seeds=2",
        "population.attacks=[prune_global:0.3]", "population.n_secrets=2", "population.holdout_fraction=0.5",
        "population.owner_budget=false", "encoder.proj_hidden_dim=32", "encoder.proj_dim=16",
        "pretrain.batch_size=64", "pretrain.max_steps=3", "generation.steps=5", "generation.batch_size=32",
        "probe.epochs=3",
    ])
    report = calibrate(cfg)
    path = tmp_path / "calibration" / "calibration.json"
    saved = json.loads(path.read_text())
    assert len(saved["population"]["encoders"]) == 8 and saved["population"]["families"] == 4  # 4 + 4 attacked
    assert "owner_f0" not in saved["population"]["encoders"]  # f0 is the owner's reference, not a null
    # the label-only modes are calibrated per class count too (the pirate's 10 digits regrouped into 2, 3, 5 classes)
    assert saved["label_classes"]["task"] == 10 and saved["label_classes"]["regrouped"] == [2, 3, 5]
    assert list(saved["modes"]) == [*MODES, *(f"{m}@{k}" for m in ("blackbox_label", "blackbox_collapse") for k in (2, 3, 5))]
    assert "`blackbox_label@k`" in (tmp_path / "calibration" / "calibration.md").read_text()
    assert saved["conditions"]["n"]["whitebox"] == 64 and saved["conditions"]["alpha"] == 1e-3
    for mode, m in saved["modes"].items():
        assert m["owner_f0"] is not None
        assert m["heldout"]["families"] == 2 and m["calibration"]["families"] == 2
    assert (tmp_path / "calibration" / "calibration.png").stat().st_size > 0
    cal = load_calibration(path)
    assert cal.thresholds == {mode: m["threshold"] for mode, m in report["modes"].items()}
    record = json.loads((tmp_path / "wm" / "secret.json").read_text())
    assert record["calibration"]["sha256"] == cal.sha256  # bound once calibrated

    # the bound calibration is used without being named, and every verdict names it
    verdicts = _verify(tmp_path, f0, secret, "run.name=v_bound")
    assert verdicts[0].calibration_sha256 == cal.sha256 and verdicts[0].threshold == cal.thresholds["whitebox"]
    assert verdicts[0].mode == "whitebox" and verdicts[1].mode == "whitebox_permutation"
    out = json.loads((tmp_path / "v_bound" / "verdict.json").read_text())
    assert out["calibration_sha256"] == cal.sha256 and "overall" in out and len(out["tests"]) == 2

    # a calibration from other conditions is refused, exploratory or not
    other = tmp_path / "other.json"
    doc = json.loads(path.read_text())
    doc["conditions"]["n"]["whitebox"] = 256
    other.write_text(json.dumps(doc))
    for extra in ([], ["verify.exploratory=true"]):
        with pytest.raises(ConfigError, match="other conditions: n for whitebox 256 \\(here 64\\)"):
            _verify(tmp_path, f0, secret, "run.name=v_other", f"verify.calibration={other}", *extra)
    assert not (tmp_path / "v_other").exists()  # refused before the run folder is made


def test_plan_deviations_are_refused_unless_exploratory(tmp_path):
    f0, secret = _owner(tmp_path, alternatives=0)
    v = _verify(tmp_path, f0, secret, "run.name=v_plan")
    assert v[0].n == 64 and v[0].alpha == 1e-3 and not v[0].exploratory  # n and alpha from the plan
    for dev, word in [("verify.n=32", "verify.n=32 instead of the plan's 64"),
                      ("verify.alpha=0.01", "verify.alpha=0.01 instead of the plan's 0.001"),
                      ("data.split_seed=1", "split_seed=1 instead of the plan's 0")]:
        with pytest.raises(ConfigError, match="deviates from the secret's plan: .*" + word.replace(".", "\\.")):
            _verify(tmp_path, f0, secret, "run.name=v_dev", dev)
        assert not (tmp_path / "v_dev").exists()
    v = _verify(tmp_path, f0, secret, "run.name=v_expl", "verify.n=32", "verify.exploratory=true")
    assert v[0].exploratory and v[0].n == 32 and "verify.n=32" in v[0].plan_deviations[0]
    assert "EXPLORATORY" in v[0].line()
    assert json.loads((tmp_path / "v_expl" / "verdict.json").read_text())["overall"]["exploratory"] is True


def test_a_threshold_that_passed_heldout_nulls_never_decides_unless_exploratory(tmp_path):
    """A calibration whose white-box threshold let a held-out independent family through is refused by verify."""
    from dist_awenc.data import build_dataset, make_splits
    from dist_awenc.verify.calibration import CALIBRATION_FORMAT, conditions
    from dist_awenc.watermark.secret import load_secret

    f0, secret = _owner(tmp_path, alternatives=0)
    sec = load_secret(secret)
    ds = build_dataset("digits", image_size=8, seed=0)
    cond = conditions(secret_sha256=sec.sha256, alpha=1e-3, n=sec.plan["n"], dataset="digits", dataset_size=len(ds),
                      split_seed=0, holdout_indices=make_splits(len(ds), 0)["holdout"])
    cal = tmp_path / "leaky.json"
    cal.write_text(json.dumps({"format": CALIBRATION_FORMAT, "conditions": cond, "modes": {
        m: {"threshold": 0.05, "heldout": {"false_positive_families": int(m == "whitebox"), "families": 15,
                                           "heldout_fpr_upper_95": 0.3 if m == "whitebox" else 0.181}} for m in MODES}}))
    with pytest.raises(ConfigError, match=r"let 1/15 held-out null families through at its whitebox threshold") as err:
        _verify(tmp_path, f0, secret, "run.name=v_leaky", f"verify.calibration={cal}")
    assert "\n" not in str(err.value) and "verify.exploratory=true" in str(err.value)
    assert not (tmp_path / "v_leaky").exists()
    v = _verify(tmp_path, f0, secret, "run.name=v_leaky", f"verify.calibration={cal}", "verify.exploratory=true")
    assert v[0].exploratory and any("held-out null families" in d for d in v[0].plan_deviations)


def _synthetic_calibration(path: Path, secret_path, threshold: float = 0.05) -> Path:
    """A calibration file for ``secret_path``'s conditions: 19 calibration families at tau* 0 .. 0.018, no held-out."""
    from dist_awenc.data import build_dataset, make_splits
    from dist_awenc.verify.calibration import CALIBRATION_FORMAT, conditions
    from dist_awenc.watermark.secret import load_secret

    sec = load_secret(secret_path)
    ds = build_dataset("digits", image_size=8, seed=0)
    cond = conditions(secret_sha256=sec.sha256, alpha=1e-3, n=sec.plan["n"], dataset="digits", dataset_size=len(ds),
                      split_seed=0, holdout_indices=make_splits(len(ds), 0)["holdout"])
    null = [{"encoder": f"e{i}", "family": f"f{i}", "heldout": False, "tau_star": 0.001 * i} for i in range(19)]
    path.write_text(json.dumps({"format": CALIBRATION_FORMAT, "conditions": cond,
                                "modes": {m: {"threshold": threshold, "null": null, "heldout": {
                                    "false_positive_families": 0, "families": 0, "heldout_fpr_upper_95": None}}
                                    for m in MODES}}))
    return path


def test_the_sealed_plan_refuses_what_a_verdict_could_be_shopped_over(tmp_path):
    """Sealed before release: the secret's hash covers the calibration; verify refuses another calibration, a mode that
    is not the plan's primary for the access, and a hand-set margin, each in one line (or marks it EXPLORATORY in
    every report); a calibration chosen after release is bound, not sealed, and every verdict says so."""
    from dist_awenc.evaluate.downstream import save_downstream
    from dist_awenc.evaluate.probe import DownstreamModel
    from dist_awenc.encoders.io import load_encoder
    from dist_awenc.files import sha256_file
    from dist_awenc.watermark.secret import load_secret, note_release, seal_calibration

    f0, secret = _owner(tmp_path, alternatives=0)
    before = load_secret(secret).sha256
    cal = _synthetic_calibration(tmp_path / "cal.json", secret)
    assert seal_calibration(secret, sha256_file(cal), cal) == "sealed"
    sealed = load_secret(secret)
    assert sealed.sha256 != before and sealed.plan["calibration"] == {"sha256": sha256_file(cal), "sealed_from": before}
    assert seal_calibration(secret, sha256_file(cal), cal) == "kept"  # once sealed, it stays

    v = _verify(tmp_path, f0, secret, "run.name=v_sealed")
    assert not v[0].exploratory and v[0].calibration_sha256 == sha256_file(cal) and "sealed in the plan" in v[0].threshold_source
    assert v[0].p_value is not None and v[0].p_floor == pytest.approx(1 / 20) and v[0].image_p is not None

    other = _synthetic_calibration(tmp_path / "other.json", secret, threshold=0.0)
    refusals = {
        "swapped calibration": ([f"verify.calibration={other}"], r"instead of the plan's calibration"),
        "hand-set margin": (["verify.tau_whitebox=0"], r"verify\.tau_whitebox=0 set by hand"),
    }
    for what, (extra, message) in refusals.items():
        with pytest.raises(ConfigError, match="deviates from the secret's plan: .*" + message) as err:
            _verify(tmp_path, f0, secret, "run.name=v_refused", *extra)
        assert "\n" not in str(err.value), what
        assert not (tmp_path / "v_refused").exists(), what
        v = _verify(tmp_path, f0, secret, f"run.name=v_{what[:4]}", *extra, "verify.exploratory=true")
        doc = json.loads((tmp_path / f"v_{what[:4]}" / "verdict.json").read_text())
        assert v[0].exploratory and "EXPLORATORY" in v[0].line() and doc["overall"]["exploratory"] is True, what

    # an unplanned mode as primary: label mode on a model whose probabilities the verifier holds (plan: score)
    enc, card = load_encoder(f0)
    model = tmp_path / "pirate" / "model"
    model.parent.mkdir()
    save_downstream(DownstreamModel(enc, enc.feature_dim, 10), card, 10, model)
    with pytest.raises(ConfigError, match="blackbox_label is not the plan's primary mode for probabilities access"):
        _verify(tmp_path, model.with_suffix(".safetensors"), secret, "run.name=v_label", "verify.mode=blackbox_label")
    assert _verify(tmp_path, model.with_suffix(".safetensors"), secret, "run.name=v_score",
                   "verify.mode=blackbox_score")[0].exploratory is False

    # released before calibrating: the calibration is bound in secret.json, the published hash stays valid
    _, late = _owner(tmp_path / "late", alternatives=0)
    note_release(late, tmp_path / "late" / "release.safetensors", load_secret(late).sha256)
    late_cal = _synthetic_calibration(tmp_path / "late_cal.json", late)
    assert seal_calibration(late, sha256_file(late_cal), late_cal) == "bound"
    assert "calibration" not in load_secret(late).plan
    v = _verify(tmp_path / "late", f0, late, "run.name=v_late")
    assert "chosen after release" in v[0].threshold_source and "after release" in v[0].details["calibration_chosen"]


def test_a_null_is_positive_when_its_test_at_the_threshold_gives_p_at_most_alpha():
    """The positive call is the test's own p at the threshold, computed directly from the kept trial (no reliance on
    tau*'s bisection); a trial cached before samples were kept falls back to tau* > threshold."""
    rng = np.random.default_rng(7)
    nulls = []
    for i in range(12):
        s = rng.normal(0.01 * i, 0.05, size=256)
        nulls.append(NullEncoder(name=f"e{i}", family=f"e{i}", tau_star={"whitebox": tau_star("whitebox", s, 1e-3)},
                                 samples={"whitebox": s.tolist()}))
    for e in nulls:
        for t in (0.0, e.tau_star["whitebox"] - 1e-4, e.tau_star["whitebox"] + 1e-4, 0.05):
            direct = mode_test("whitebox", np.asarray(e.samples["whitebox"]), t).p_value <= 1e-3
            assert e.positive_at("whitebox", t, 1e-3) == direct
    old = NullEncoder(name="old", family="old", tau_star={"whitebox": 0.02})
    assert old.positive_at("whitebox", 0.01, 1e-3) and not old.positive_at("whitebox", 0.03, 1e-3)
    hm, hr = rng.random(49) < 0.7, rng.random(49) < 0.2
    lab = NullEncoder(name="l", family="l", tau_star={"blackbox_label": tau_star("blackbox_label", (hm, hr), 1e-3)},
                      samples={"blackbox_label": [hm.astype(int).tolist(), hr.astype(int).tolist()]})
    assert lab.positive_at("blackbox_label", 0.0, 1e-3) == (mode_test("blackbox_label", (hm, hr), 0.0).p_value <= 1e-3)


def test_imported_third_party_encoders_join_the_null_population(tmp_path):
    """An owner at scale adds public checkpoints to the null population: ResNet-18 state dicts written by plain
    torchvision code, imported with `awenc import`, calibrate as families of their own beside the pre-trained ones."""
    import torchvision
    from safetensors.torch import save_file
    from torch import nn

    from dist_awenc.cli import main
    from dist_awenc.stages.calibrate import calibrate

    f0, secret = _owner(tmp_path, alternatives=0)
    extras = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"public{seed}.safetensors"))
        out = tmp_path / f"public{seed}"
        assert main(["import", str(tmp_path / f"public{seed}.safetensors"), "--arch", "resnet18", "--stem", "cifar",
                     "--input-size", "8", "--out", str(out)]) == 0
        extras.append(str(out))
    cfg = load_config(CalibrateConfig, None, [
        f"run.out_dir={tmp_path}", f"secret={secret}", "data.image_size=8", "population.archs=[tiny:8]",
        "population.methods=[simclr]", "population.seeds=1", "population.attacks=[]", "population.n_secrets=1",
        "population.label_classes=[]", "population.holdout_fraction=0.34", "population.owner_budget=false",
        f"population.extra_encoders=[{','.join(extras)}]", "encoder.proj_hidden_dim=32", "encoder.proj_dim=16",
        "pretrain.batch_size=64", "pretrain.max_steps=3", "probe.epochs=3"])
    report = calibrate(cfg)
    saved = json.loads((tmp_path / "calibration" / "calibration.json").read_text())
    assert saved["population"]["encoders"] == ["simclr_tiny8_group_s0", "extra_public0", "extra_public1"]
    assert saved["population"]["families"] == 3  # each imported checkpoint is a family of its own
    fams = {t["encoder"]: t["family"] for t in report["modes"]["whitebox"]["null"]}
    assert fams["extra_public0"] == "extra_public0" and fams["extra_public1"] == "extra_public1"
    assert len(report["calibration_families"]) == 2 and len(report["heldout_families"]) == 1
    cal = load_calibration(tmp_path / "calibration" / "calibration.json")
    assert len(cal.family_scores("whitebox")) == 2  # the conformal p's m' counts them


def test_an_attacked_copy_among_the_given_encoders_joins_its_parents_family(tmp_path):
    """population.extra_encoders: imported checkpoints are a family each; a copy `awenc attack` made of one of them
    (its card names the parent's hash), and a copy of that copy, count in the parent's family, not as new evidence."""
    from dist_awenc.encoders.io import build_encoder, card_for, save_encoder
    from dist_awenc.stages.calibrate import extra_families

    cards = {}
    for name, parent in (("a", None), ("b", None), ("a_pruned", "a"), ("a_pruned_q", "a_pruned")):
        torch.manual_seed(len(cards))
        enc = build_encoder("tiny", {"width": 4}, [0.5] * 3, [0.5] * 3, 8)
        card = card_for(enc, arch="tiny", arch_kwargs={"width": 4}, method="simclr", stage="attack" if parent else "import",
                        parent=cards[parent]["sha256"] if parent else None)
        (tmp_path / name).mkdir()
        cards[name] = save_encoder(enc, tmp_path / name / "encoder", card)
    got = extra_families([str(tmp_path / n) for n in ("a_pruned_q", "b", "a", "a_pruned")])
    assert {k: v[1] for k, v in got.items()} == {"extra_a_pruned_q": "extra_a", "extra_b": "extra_b",
                                                 "extra_a": "extra_a", "extra_a_pruned": "extra_a"}
    alone = extra_families([str(tmp_path / "a_pruned")])  # its parent is not listed: a family of its own
    assert alone == {"extra_a_pruned": (tmp_path / "a_pruned", "extra_a_pruned")}
