"""Label mode on tasks of 2, 3, 5 and 10 classes: thresholds calibrated per class count, decisions within 100 queries.

The pirate's task has as many classes as the pirate likes; the chance that a control query lands on the key's
label is about 1/k, so a margin set for 10 classes says little about 2. These tests build real downstream
tasks (digits regrouped into k classes, heads trained by the same code as the pirate's) on a watermarked
encoder and on independent ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Watermarked

from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import build_encoder, card_for, save_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.evaluate.downstream import evaluate_encoder, group_labels, task_classes
from dist_awenc.verify.calibration import LABEL, Calibration, label_key, tau_star
from dist_awenc.verify.core import images_for, label_hits, overall_verdict, verify_blackbox_label
from dist_awenc.watermark.secret import Secret

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = (2, 3, 5, 10)
ALPHA = 1e-3
BUDGET = 100  # queries: the key once, then (BUDGET - 1) // 2 marked/control pairs
EPS = 32 / 255  # with images in [0.2, 0.8] no pixel is clipped, so the toy's gate sees every mark (and no control)


def _encoder(seed: int, arch: str = "tiny"):
    torch.manual_seed(seed)
    kwargs = {"width": 8, "norm": "group"} if arch == "tiny" else {"width": 4, "norm": "group"}
    return build_encoder(arch, kwargs, [0.5] * 3, [0.5] * 3, 8).eval()


@pytest.fixture(scope="module")
def world():
    """Digits at 8 px: the pirate's split and the owner's hold-out; a toy watermarked encoder and 8 independent ones."""
    data = build_dataset("digits", image_size=8, seed=0)
    splits = make_splits(len(data), 0)
    images, labels = data.get_batch(splits["downstream"])
    holdout, _ = data.get_batch(splits["holdout"][: images_for("blackbox_label", BUDGET) + 1])
    images, holdout = 0.2 + 0.6 * images, 0.2 + 0.6 * holdout
    g = torch.Generator().manual_seed(1)
    secret = Secret(key=holdout[0].clone(), delta=EPS * torch.sign(torch.randn(3, 8, 8, generator=g)), eps=EPS,
                    control_seed=7, meta={"note": "toy"})
    base = _encoder(0)
    with torch.no_grad():
        centre = base(images).mean(0)
    wm = Watermarked(base, secret, centre).eval()
    wm.feature_dim = base.feature_dim
    with torch.no_grad():
        assert bool((wm.corr(secret.mark(holdout[1:])) > EPS / 2).all())
        assert not bool((wm.corr(secret.mark_control(holdout[1:])) > EPS / 2).any())
    independent = {f"{arch}_s{s}": _encoder(s, arch) for arch in ("tiny", "tiny_resnet") for s in (11, 12, 13, 14)}
    return images, labels, holdout[1:], secret, wm, independent


def _hits(encoder, k: int, world) -> tuple:
    images, labels, holdout, secret, *_ = world
    model, _ = evaluate_encoder(encoder, images, *group_labels(labels, 10, k), seed=0, epochs=30)
    hm, hr, _ = label_hits(lambda b: model(b).argmax(1), secret, holdout)
    return model, hm, hr


def test_label_mode_decides_within_100_queries_on_2_3_5_10_classes_above_every_independent_encoder(world):
    """Calibrated on all 8 independent encoders (threshold just above the largest tau*, the calibration rule), the
    watermarked task decides on every class count, and each independent one's verdict at that threshold is what its
    tau* says (negative). Whether a NEW independent encoder crosses a threshold is a probability (at most 1/(m+1)
    for m exchangeable calibration encoders: tests/test_calibrate.py simulates it); a held-out check on 4 encoders
    could only pass while every tau* sits at its floor of 0, which depends on the machine's arithmetic (#30)."""
    images, labels, holdout, secret, wm, independent = world
    for k in CLASSES:
        hits = {n: _hits(independent[n], k, world) for n in sorted(independent)}
        nulls = {n: h[0] for n, h in hits.items()}
        stars = {n: tau_star(label_key(k), h[1:], ALPHA) for n, h in hits.items()}
        threshold = max(stars.values()) + 1e-6  # the calibration rule
        model, *_ = _hits(wm, k, world)
        v = verify_blackbox_label(lambda b: model(b).argmax(1), secret, holdout, tau=threshold, alpha=ALPHA, classes=k)
        assert v.details["queries"] <= BUDGET
        # above every null's tau*: the image-level test at the threshold rejects (its conformal encoder-level p
        # over these 8 nulls would be the smallest possible, 1/9)
        assert v.image_p <= ALPHA, (k, v.image_p, threshold, v.details["hit_rate_marked"], v.details["hit_rate_control"])
        assert v.details["labels_seen"] <= k
        for n, m in nulls.items():  # the verdict agrees with tau*: positive exactly when the margin is below it
            for tau in (threshold, max(stars[n] - 1e-3, 0.0)):
                got = verify_blackbox_label(lambda b: m(b).argmax(1), secret, holdout, tau=tau, alpha=ALPHA).image_p
                assert (got <= ALPHA) == (tau < stars[n]), (k, n, tau, stars[n])


def test_control_hit_rate_grows_as_classes_shrink(world):
    """Why one margin cannot serve every task: the room above the control rate is about 1 - 1/k."""
    *_, wm, independent = world
    rates = {k: float(_hits(independent["tiny_s11"], k, world)[2].mean()) for k in (2, 10)}
    assert rates[2] > rates[10] + 0.2, rates


def test_answers_with_more_labels_than_stated_draw_no_decision(world):
    images, labels, holdout, secret, wm, _ = world
    model, *_ = _hits(wm, 10, world)
    v = verify_blackbox_label(lambda b: model(b).argmax(1), secret, holdout, tau=0.0, alpha=ALPHA, classes=2)
    assert v.image_p < ALPHA and v.details["labels_seen"] > 2
    assert v.decision is False and "more than the 2 classes stated" in v.details["classes_contradicted"]
    assert "no decision" in v.line() and "more than the 2 classes stated" in v.line()
    # and the overall verdict leaves it out, whatever its p (the override holds there too)
    v.p_value, v.p_floor = 1e-4, 1e-4
    overall = overall_verdict([v], ALPHA)
    assert overall["decision"] is False and "more than the 2 classes stated" in overall["left_out"][LABEL]


def _calibration(thresholds: dict, task: int | None = 10) -> Calibration:
    data = {"modes": {m: {} for m in thresholds}, **({"label_classes": {"task": task}} if task else {})}
    return Calibration(Path("cal.json"), "0" * 64, thresholds, {}, data)


def test_the_stated_class_count_picks_its_threshold_and_none_picks_the_largest():
    cal = _calibration({"whitebox": 0.03, LABEL: 0.0, label_key(2): 0.25, label_key(3): 0.1, label_key(5): 0.05})
    assert cal.key_for(LABEL, 2) == (label_key(2), "label threshold: the largest over calibrated class counts >= 2")
    assert cal.key_for(LABEL, 3)[0] == label_key(3)  # 3, 5 and 10 classes: 3's is the largest
    assert cal.key_for(LABEL, 10)[0] == LABEL  # the pirate task's own count
    key, why = cal.key_for(LABEL, None)
    assert key == label_key(2) and "the largest over the calibrated 2, 3, 5, 10" in why
    assert cal.key_for("whitebox", None) == ("whitebox", "") and cal.key_for("whitebox", 2) == ("whitebox", "")
    with pytest.raises(ConfigError, match=r"verify.classes=7: .* has blackbox_label thresholds for these class counts: "
                                          "2, 3, 5, 10"):
        cal.key_for(LABEL, 7)
    # collapse mode has its own per-class entries; label mode's never stand in for them
    both = _calibration({LABEL: 0.0, label_key(2): 0.25, "blackbox_collapse": 0.01,
                         label_key(2, "blackbox_collapse"): 0.4, label_key(5, "blackbox_collapse"): 0.1})
    assert both.key_for("blackbox_collapse", 2)[0] == "blackbox_collapse@2"
    assert both.key_for("blackbox_collapse", 10)[0] == "blackbox_collapse"
    assert both.key_for("blackbox_collapse", None)[0] == "blackbox_collapse@2"
    assert both.key_for(LABEL, None)[0] == label_key(2)
    with pytest.raises(ConfigError, match="has blackbox_collapse thresholds for these class counts: 2, 5, 10"):
        both.key_for("blackbox_collapse", 3)
    old = _calibration({"whitebox": 0.03, LABEL: 0.0}, task=None)  # made before per-class thresholds
    assert old.key_for(LABEL, None) == (LABEL, "")
    with pytest.raises(ConfigError, match="before per-class label thresholds"):
        old.key_for(LABEL, 2)


def test_task_classes_and_regrouping():
    labels = torch.arange(10)
    assert group_labels(labels, 10, 0) == (labels, 10) and group_labels(labels, 10, 10)[1] == 10
    grouped, k = group_labels(labels, 10, 3)
    assert k == 3 and grouped.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for bad in (1, 11, -2):
        with pytest.raises(ConfigError, match=f"classes={bad}: a task needs 2 to 10 classes"):
            task_classes(10, bad)


def test_downstream_stage_builds_a_k_class_task(tmp_path, capsys):
    from dist_awenc.cli import main

    enc = _encoder(0)
    save_encoder(enc, tmp_path / "enc", card_for(enc, arch="tiny", arch_kwargs={"width": 8, "norm": "group"}, method="",
                                                 stage="test", parent=None))
    common = [f"encoder={tmp_path / 'enc.safetensors'}", "data.image_size=8", f"run.out_dir={tmp_path}", "probe.epochs=5"]
    assert main(["downstream", *common, "run.name=two", "classes=2"]) == 0
    assert json.loads((tmp_path / "two" / "model.json").read_text())["num_classes"] == 2
    assert json.loads((tmp_path / "two" / "downstream.json").read_text())["classes"] == 2
    assert main(["downstream", *common, "run.name=eleven", "classes=11"]) == 2
    assert "classes=11: a task needs 2 to 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "eleven").exists()
    assert main(["downstream", *common, "run.name=none", "data.splits=[1,0,0]"]) == 2
    assert "data.splits=[1.0, 0.0, 0.0] leaves the downstream split empty, and downstream needs it" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_verify_classes_is_for_label_mode_only(tmp_path, capsys):
    from dist_awenc.cli import main

    assert main(["verify", "--mode", "whitebox", "suspect=x", "secret=y", "verify.classes=2",
                 f"run.out_dir={tmp_path}"]) == 2
    assert ("verify.classes=2: the suspect task's number of classes (2 or more) is for --mode blackbox_label or "
            "blackbox_collapse only") in capsys.readouterr().err
