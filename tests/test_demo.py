"""`awenc demo` end to end at its smallest setting: every stage runs and the report has its schema."""
from __future__ import annotations

import json

import pytest

from dist_awenc.cli import main

SMALL = [
    "data.image_size=8", "encoder.width=8", "encoder.proj_hidden_dim=32", "encoder.proj_dim=16",
    "pretrain.batch_size=64", "pretrain.epochs=1", "pretrain.max_steps=3", "pretrain.progress=false",
    "embed.batch_size=64", "embed.epochs=1", "embed.max_steps=3", "embed.progress=false",
    "generation.steps=5", "generation.batch_size=32", "probe.epochs=3",
]


@pytest.mark.numerics
def test_demo_smallest_setting_writes_report(tmp_path, capsys):
    assert main(["demo", f"run.out_dir={tmp_path}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "| model | test | encoder-level p" in out and "image-level p" in out  # the verdict table is printed
    assert "alpha = 0.05" in out and "whitebox_permutation" in out  # the demo's alpha, reachable with J = 19
    root = tmp_path / "demo"
    report = json.loads((root / "report.json").read_text())
    assert set(report["utility"]) >= {"clean", "watermarked"}
    for u in report["utility"].values():
        assert 0 <= u["linear_probe"] <= 1 and 0 <= u["knn"] <= 1
    rows = report["verification"]
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("watermarked", "clean", "independent")
        for mode in ("whitebox", "whitebox_permutation", "blackbox_score", "blackbox_score_permutation",
                     "blackbox_label", "blackbox_label_permutation", "blackbox_collapse")}
    perm = [r for r in rows if r["mode"].endswith("_permutation")]
    assert all(r["alternatives"] == report["plan"]["alternatives"] > 0 for r in perm)
    assert all(r["p_value"] >= 1 / (r["alternatives"] + 1) for r in perm)  # never below its resolution
    assert set(report["overall"]) == {"watermarked", "clean", "independent"}
    assert all(set(o) == {"weights", "probabilities", "labels"} for o in report["overall"].values())
    for r in rows:  # only encoder-level p-values decide: the uncalibrated margins have none and decide nothing
        assert isinstance(r["decision"], bool) and r["n"] > 0 and r["alpha"] == 0.05
        if r["mode"].endswith("_permutation"):  # alone in its access's family: Holm is its own p <= alpha
            assert 0 < r["p_value"] <= 1 and r["p_floor"] == pytest.approx(0.05) and r["image_p"] is None
            assert r["decision"] == (r["p_value"] <= r["alpha"]) == report["overall"][r["model"]][r["access"]]["decision"]
        else:
            assert r["p_value"] is None and r["decision"] is False and 0 <= r["image_p"] <= 1
    label = [r for r in rows if r["mode"] in ("blackbox_label", "blackbox_collapse")]  # the margin tests' budget
    assert all(r["queries"] <= 100 for r in label)
    assert len(report["secret_sha256"]) == 64 and report["seconds"] > 0
    assert (root / "report.md").read_text().startswith("# dist_awenc demo report")
    assert (root / "report.png").stat().st_size > 0

    # running it again reuses every complete stage and gives the same verdicts
    assert main(["demo", f"run.out_dir={tmp_path}", *SMALL]) == 0
    again = json.loads((root / "report.json").read_text())
    assert [(r["p_value"], r["image_p"]) for r in again["verification"]] == [(r["p_value"], r["image_p"]) for r in rows]
    assert "reusing complete" in capsys.readouterr().out
