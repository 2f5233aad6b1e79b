"""Calibration on a tiny null population: thresholds, false positives, exact bounds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_overrides
from dist_awenc.config import CalibrateConfig, PretrainConfig, VerifySection, WatermarkConfig, load_config
from dist_awenc.verify.calibrate import load_thresholds, mode_test, tau_star
from dist_awenc.verify.run import margins


def test_tau_star_is_where_the_test_crosses_alpha():
    rng = np.random.default_rng(0)
    s = rng.normal(0.2, 0.05, size=200)
    t = tau_star("whitebox", s, 1e-3)
    assert mode_test("whitebox", s, t - 1e-3).p_value < 1e-3 <= mode_test("whitebox", s, t + 1e-3).p_value
    hm, hr = rng.random(49) < 0.9, rng.random(49) < 0.1
    t = tau_star("blackbox_label", (hm, hr), 1e-3)
    assert 0 < t < 1
    assert mode_test("blackbox_label", (hm, hr), t - 1e-3).p_value < 1e-3 <= mode_test("blackbox_label", (hm, hr), t + 1e-3).p_value


def test_calibration_on_a_tiny_population(tmp_path):
    from dist_awenc.ssl.pretrain import pretrain
    from dist_awenc.verify.calibrate import calibrate
    from dist_awenc.watermark.generate import watermark

    f0 = pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "f0")))
    secret = watermark(load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={f0}",
                                                           "data.image_size=8", "generation.steps=5", "generation.batch_size=32"]))
    cfg = load_config(CalibrateConfig, None, [
        f"run.out_dir={tmp_path}", f"owner_encoder={f0}", f"secret={secret}", "data.image_size=8",
        "population.methods=[simclr]", "population.widths=[8]", "population.seeds=3", "population.n_secrets=3",
        "population.holdout_fraction=0.25", "encoder.proj_hidden_dim=32", "encoder.proj_dim=16",
        "pretrain.batch_size=64", "pretrain.max_steps=3", "generation.steps=5", "generation.batch_size=32",
        "probe.epochs=3",
    ])
    report = calibrate(cfg)
    saved = json.loads((tmp_path / "calibration" / "calibration.json").read_text())
    assert saved["population"]["trials"] == 4 * 3  # (3 null seeds + f0) x 3 secrets
    for mode, m in saved["modes"].items():
        assert m["false_positives"] == 0  # no calibration trial is positive under its threshold
        cal = [t for t in m["null"] if t["encoder"] not in m["heldout"]["encoders"]]
        assert all(not t["positive"] for t in cal) and len(cal) == m["trials"]
        assert m["threshold"] >= max(t["tau_star"] for t in cal)
        assert m["threshold"] >= m["default_margin"]
        assert m["fpr_upper_95"] == pytest.approx(1 - 0.05 ** (1 / m["trials"]), abs=1e-9)
        assert m["heldout"]["trials"] + m["trials"] == 12
        assert any(t["own_secret"] for t in m["null"])  # f0 with the secret generated on it
    thresholds = load_thresholds(tmp_path / "calibration")
    assert thresholds == {mode: m["threshold"] for mode, m in report["modes"].items()}
    v = VerifySection(calibration=str(tmp_path / "calibration" / "calibration.json"))
    assert margins(v) == thresholds
    assert (tmp_path / "calibration" / "calibration.png").stat().st_size > 0
