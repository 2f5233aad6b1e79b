"""`awenc attack` and `awenc robustness` at a tiny size: files, cards, resumable tasks, the table."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import tiny_overrides
from dist_awenc.cli import main
from dist_awenc.config import PretrainConfig, WatermarkConfig, load_config
from dist_awenc.encoders.io import load_encoder
from dist_awenc.verify.core import MODES


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    from accelerate.state import AcceleratorState

    from dist_awenc.ssl.pretrain import pretrain
    from dist_awenc.watermark.generate import watermark

    AcceleratorState._reset_state(reset_partial_state=True)
    root = tmp_path_factory.mktemp("owner")
    f0 = pretrain(load_config(PretrainConfig, None, tiny_overrides(root, "f0")))
    secret = watermark(load_config(WatermarkConfig, None, [f"run.out_dir={root}", "run.name=wm", f"encoder={f0}",
                                                           "data.image_size=8", "generation.steps=5", "generation.batch_size=32",
                                                           "plan.n_whitebox=64", "plan.alternatives=0"]))
    return f0, secret


FAST = ["data.image_size=8", "options.epochs=1", "options.batch_size=32", "probe.epochs=3"]


def test_attack_stage_writes_a_child_card_and_accuracies(owner, tmp_path):
    f0, _ = owner
    assert main(["attack", f"encoder={f0}", f"run.out_dir={tmp_path}", "run.name=pruned",
                 "attack.name=prune_global", "attack.strength=0.5", *FAST]) == 0
    enc, card = load_encoder(tmp_path / "pruned")
    _, parent = load_encoder(f0)
    assert card["parent"] == parent["sha256"] and card["attack"]["attack"] == "prune_global"
    result = json.loads((tmp_path / "pruned" / "attack.json").read_text())
    assert 0 <= result["downstream"]["attacked"]["linear_probe"] <= 1
    weights = [p for n, p in enc.backbone.named_parameters() if p.ndim > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=1e-3)


def test_query_attacked_encoder_gets_the_same_whitebox_verdict_from_the_cli_and_robustness(owner, tmp_path):
    """A query-side attack changes the pirate's serving path, not the weights: loading the attacked encoder
    gives the suspect's bare weights, so `awenc verify` and `awenc robustness` inspect the same thing."""
    import json

    f0, secret = owner
    assert main(["attack", f"encoder={f0}", f"run.out_dir={tmp_path}", "run.name=noisy",
                 "attack.name=query_noise", "attack.strength=0.05", *FAST]) == 0
    enc, card = load_encoder(tmp_path / "noisy")
    plain, _ = load_encoder(f0)
    assert card["query_transform"]["kind"] == "noise"
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(enc(x), plain(x))  # the card's transform is not applied on load
    assert main(["verify", "--mode", "whitebox", f"suspect={tmp_path / 'noisy'}", f"secret={secret}",
                 f"run.out_dir={tmp_path}", "run.name=v_noisy", "data.image_size=8"]) == 0
    cli = json.loads((tmp_path / "v_noisy" / "verdict.json").read_text())
    assert main(["robustness", f"encoder={f0}", f"secret={secret}", f"run.out_dir={tmp_path}", "run.name=rob",
                 "grid.attacks=[query_noise]", "grid.strengths={query_noise: [0.05]}", *FAST]) == 0
    row = next(r for r in csv.DictReader((tmp_path / "rob" / "robustness.csv").open()) if r["attack"] == "query_noise")
    assert float(row["p_whitebox"]) == pytest.approx(cli["image_p"], rel=1e-12)  # the image-level p at the margin
    assert (row["decision_whitebox"] == "True") == (cli["image_p"] <= cli["alpha"])


def test_unknown_attack_is_a_one_line_error(owner, tmp_path, capsys):
    f0, _ = owner
    assert main(["attack", f"encoder={f0}", f"run.out_dir={tmp_path}", "attack.name=melt", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown attack 'melt'" in err and "prune_global" in err and "\n" not in err


def test_robustness_grid_table_and_resume(owner, tmp_path):
    f0, secret = owner
    args = ["robustness", f"encoder={f0}", f"secret={secret}", f"run.out_dir={tmp_path}",
            "grid.attacks=[prune_global,query_jpeg]", "grid.strengths={prune_global: [0.2, 0.8], query_jpeg: [50]}",
            *FAST]
    assert main(args) == 0
    root = tmp_path / "robustness"
    rows = list(csv.DictReader((root / "robustness.csv").open()))
    assert [(r["attack"], float(r["strength"])) for r in rows] == [("none", 0.0), ("prune_global", 0.2),
                                                                   ("prune_global", 0.8), ("query_jpeg", 50.0)]
    for r in rows:
        for mode in MODES:
            assert 0 <= float(r[f"p_{mode}"]) <= 1 and r[f"decision_{mode}"] in ("True", "False")
    assert float(rows[0]["accuracy_change"]) == 0.0
    summary = json.loads((root / "robustness.json").read_text())
    assert summary["tasks"] == 4 and set(summary["modes"]) == set(MODES)
    assert (root / "robustness.png").stat().st_size > 0
    # a second run reuses every task file and gives the same table
    before = {p.name: p.stat().st_mtime_ns for p in (root / "tasks").iterdir()}
    assert main(args) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (root / "tasks").iterdir()}
    assert list(csv.DictReader((root / "robustness.csv").open())) == rows


def test_robustness_ranks_each_derivative_by_the_permutation_test(owner, tmp_path):
    """With the plan's J alternative secrets, every task also runs the secret-permutation test on the weights the
    owner inspects: its p equals `verify_permutation` on the same images, and the summary counts the
    utility-keeping derivatives at the test's resolution limit 1/(J+1)."""
    from accelerate.state import AcceleratorState

    from dist_awenc.verify.permutation import verify_permutation
    from dist_awenc.verify.run import load_plan_alternatives
    from dist_awenc.watermark.generate import watermark
    from dist_awenc.watermark.secret import load_secret

    f0, _ = owner
    AcceleratorState._reset_state(reset_partial_state=True)
    secret = watermark(load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={f0}",
                                                           "data.image_size=8", "generation.steps=5",
                                                           "generation.batch_size=32", "plan.n_whitebox=64",
                                                           "plan.alternatives=3"]))
    assert main(["robustness", f"encoder={f0}", f"secret={secret}", f"run.out_dir={tmp_path}",
                 "grid.attacks=[prune_global]", "grid.strengths={prune_global: [0.2]}", *FAST]) == 0
    rows = list(csv.DictReader((tmp_path / "robustness" / "robustness.csv").open()))
    assert {r["permutation_alternatives"] for r in rows} == {"3"}
    assert all(float(r["p_permutation"]) in (0.25, 0.5, 0.75, 1.0) for r in rows)
    from dist_awenc.data import build_dataset, splits_for

    sec = load_secret(secret)
    ds = build_dataset("digits", image_size=8)
    x, _ = ds.get_batch(splits_for(len(ds), 0, [0.5, 0.2, 0.3], "test", "holdout")["holdout"][:64])
    enc, _ = load_encoder(f0)
    want = verify_permutation(enc, sec, load_plan_alternatives(secret, sec), x)
    assert float(rows[0]["p_permutation"]) == want.p_value and rows[0]["attack"] == "none"
    summary = json.loads((tmp_path / "robustness" / "robustness.json").read_text())["permutation"]
    assert summary["alternatives"] == 3 and summary["resolution"] == 0.25 and summary["of"] >= 1
    assert summary["at_limit"] == summary["of"] - len(summary["missed"])


def test_collect_applies_the_pirate_tasks_own_label_threshold_of_a_per_class_calibration(tmp_path):
    """A calibration with per-class-count label entries (blackbox_label@k, `population.label_classes`): the grid's
    pirate task has the dataset's own classes, so its label decisions use the mode's own threshold, not an @k one."""
    from dist_awenc.stages.robustness import collect
    from dist_awenc.verify.calibration import CALIBRATION_FORMAT
    from dist_awenc.verify.core import MODES

    n = {"whitebox": 256, "blackbox_score": 100, "blackbox_label": 100, "blackbox_collapse": 100}
    modes = {m: {"threshold": 0.05, "null": [{"tau_star": 0.01}]} for m in MODES}
    modes["blackbox_label@2"] = {"threshold": 0.5, "null": [{"tau_star": 0.2}]}
    modes["blackbox_collapse@2"] = {"threshold": 0.5, "null": [{"tau_star": 0.2}]}
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"format": CALIBRATION_FORMAT, "modes": modes, "label_classes": {"task": 10},
                               "conditions": {"secret_sha256": "s", "n": n, "alpha": 1e-3}}))
    (tmp_path / "tasks").mkdir()
    for i, (attack, tau) in enumerate([("none", 0.3), ("distill", 0.1), ("prune_global", 0.01)]):
        row = {"attack": attack, "strength": float(i), "seed": 0, "linear_probe": 0.9, "knn": 0.9, "secret_sha256": "s"}
        for m in MODES:
            row.update({f"p_{m}": 1e-4, f"effect_{m}": tau, f"decision_{m}": True, f"tau_star_{m}": tau,
                        f"n_{m}": n[m], f"alpha_{m}": 1e-3})
        (tmp_path / "tasks" / f"{i}.json").write_text(json.dumps(row))
    summary = collect(tmp_path, 0.05, str(cal))
    assert summary["thresholds"] == {m: 0.05 for m in MODES}
    assert summary["modes"]["blackbox_label"]["detected"] == 2  # 0.3 and 0.1 > 0.05 (the @2 entry, 0.5, would give 0)
    assert summary["modes"]["blackbox_label"]["missed"] == ["prune_global@2"]
    assert summary["modes"]["blackbox_collapse"]["detected"] == 2
