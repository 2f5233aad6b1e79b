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
# a task row's theft baselines (f0 and a random init on the task's split), for collect() on synthetic rows
BASELINES = {"f0_linear_probe": 0.9, "f0_knn": 0.9, "random_linear_probe": 0.8, "random_knn": 0.7}


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
                 "grid.attacks=[prune_global,finetune_resolution]",
                 "grid.strengths={prune_global: [0.2], finetune_resolution: [2]}", *FAST]) == 0
    rows = list(csv.DictReader((tmp_path / "robustness" / "robustness.csv").open()))
    assert {r["permutation_alternatives"] for r in rows} == {"3"}
    for key in ("p_permutation", "p_permutation_blackbox_score", "p_permutation_blackbox_label"):
        assert all(float(r[key]) in (0.25, 0.5, 0.75, 1.0) for r in rows), key
    # the derivative at twice the resolution: fed resized queries; its margin tests draw no decision, as in verify
    big = next(r for r in rows if r["attack"] == "finetune_resolution")
    assert big["input_size"] == "16" and big["margin_no_decision"].startswith("calibrated at 8 px; the suspect takes 16")
    assert all(big[f"decision_{m}"] == "False" for m in MODES)
    assert all(r["input_size"] == "8" and r["margin_no_decision"] == "" for r in rows if r is not big)
    # ... while the white-box tests read its weights (a CNN: they take any size) at the secret's 8 px
    assert big["whitebox_px"] == "8" and all(r["whitebox_px"] == "8" for r in rows)
    from dist_awenc.data import build_dataset, splits_for

    sec = load_secret(secret)
    ds = build_dataset("digits", image_size=8)
    x, _ = ds.get_batch(splits_for(len(ds), 0, [0.5, 0.2, 0.3], "test", "holdout")["holdout"][:64])
    enc, _ = load_encoder(f0)
    want = verify_permutation(enc, sec, load_plan_alternatives(secret, sec), x)
    assert float(rows[0]["p_permutation"]) == want.p_value and rows[0]["attack"] == "none"
    summary = json.loads((tmp_path / "robustness" / "robustness.json").read_text())["permutation"]
    assert summary["alternatives"] == 3 and summary["resolution"] == 0.25 and summary["weights"]["of"] >= 1
    thefts = [r for r in rows if r["theft"] == "True"]
    for access, column in (("weights", "permutation_at_limit"), ("probabilities", "permutation_at_limit_blackbox_score"),
                           ("labels", "permutation_at_limit_blackbox_label")):
        assert summary[access]["of"] == len(thefts)
        assert summary[access]["at_limit"] == sum(r[column] == "True" for r in thefts)
        assert summary[access]["at_limit"] == summary[access]["of"] - len(summary[access]["missed"])


def test_finetune_resolution_gives_a_derivative_at_twice_the_size_that_verify_takes(owner, tmp_path, capsys):
    """`awenc attack` fine-tunes at 2x the input size: the card says 16 px, the pirate's accuracy is measured on its
    images resized to 16 px, and `awenc verify` queries it resized (the margin test draws no decision)."""
    f0, secret = owner
    assert main(["attack", f"encoder={f0}", f"run.out_dir={tmp_path}", "run.name=big",
                 "attack.name=finetune_resolution", "attack.strength=2", *FAST]) == 0
    enc, card = load_encoder(tmp_path / "big")
    assert card["input_size"] == 16 and card["attack"]["input_size"] == 16 and card["attack"]["steps"] >= 1
    result = json.loads((tmp_path / "big" / "attack.json").read_text())
    assert 0 <= result["downstream"]["attacked"]["linear_probe"] <= 1
    assert main(["verify", "--mode", "whitebox", f"suspect={tmp_path / 'big'}", f"secret={secret}",
                 f"run.out_dir={tmp_path}", "run.name=v_big", "data.image_size=8"]) == 0
    verdict = json.loads((tmp_path / "v_big" / "verdict.json").read_text())
    test = verdict["tests"][0]
    assert test["details"]["input_size"] == {"secret": 8, "suspect": 16}
    assert "calibrated at 8 px; the suspect takes 16 px" in test["no_decision"]
    assert test["details"]["resize"]["method"] == "none"  # its weights were read at 8 px, not fed resized images
    capsys.readouterr()
    assert main(["attack", f"encoder={f0}", f"run.out_dir={tmp_path}", "run.name=same",
                 "attack.name=finetune_resolution", "attack.strength=1", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "strength is the factor on the input size" in err and "8 px -> 8 px" in err and "\n" not in err
    assert not (tmp_path / "same" / "encoder.safetensors").exists()


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
        row = {"attack": attack, "strength": float(i), "seed": 0, "linear_probe": 0.9, "knn": 0.9, "secret_sha256": "s",
               **BASELINES}
        for m in MODES:
            row.update({f"p_{m}": 1e-4, f"effect_{m}": tau, f"decision_{m}": True, f"tau_star_{m}": tau,
                        f"n_{m}": n[m], f"alpha_{m}": 1e-3})
        (tmp_path / "tasks" / f"{i}.json").write_text(json.dumps(row))
    summary = collect(tmp_path, 0.05, str(cal))
    assert summary["thresholds"] == {m: 0.05 for m in MODES}
    assert summary["modes"]["blackbox_label"]["detected"] == 2  # 0.3 and 0.1 > 0.05 (the @2 entry, 0.5, would give 0)
    assert summary["modes"]["blackbox_label"]["missed"] == ["prune_global@2"]
    assert summary["modes"]["blackbox_collapse"]["detected"] == 2


def _task_file(folder, i: int, attack: str, lp: float, knn: float, detected: bool, **extra) -> None:
    row = {"attack": attack, "strength": float(i), "seed": 0, "linear_probe": lp, "knn": knn, "secret_sha256": "s",
           **BASELINES, **extra}
    for m in MODES:
        row.update({f"p_{m}": 1e-4 if detected else 0.5, f"effect_{m}": 0.1, f"decision_{m}": detected,
                    f"tau_star_{m}": 0.1 if detected else 0.0, f"n_{m}": 100, f"alpha_{m}": 1e-3})
    (folder / f"{i}.json").write_text(json.dumps(row))


def test_collect_counts_only_thefts_and_lists_the_rest_with_their_numbers(tmp_path):
    """TPRs are over thefts (#27): half of f0's advantage over a random init of the row's own architecture on the
    probe and on kNN, and the probe within 5 points; the rule before #27 (keeps_utility) stays as a column."""
    from dist_awenc.stages.robustness import collect

    (tmp_path / "tasks").mkdir()
    # f0 0.9 / 0.9, random init 0.8 / 0.7: half the advantage is 0.85 probe, 0.80 kNN
    _task_file(tmp_path / "tasks", 0, "none", 0.9, 0.9, True)
    _task_file(tmp_path / "tasks", 1, "prune_global", 0.86, 0.80, False)  # exactly half on kNN: a theft, missed
    _task_file(tmp_path / "tasks", 2, "distill", 0.88, 0.78, True)  # kNN keeps 0.4: not a theft, though detected
    _task_file(tmp_path / "tasks", 3, "distill_arch", 0.87, 0.80, False, random_linear_probe=0.85, random_knn=0.75)
    # keeps f0's advantage over its (weaker) random init, but probes 6 points under the unattacked encoder
    _task_file(tmp_path / "tasks", 4, "finetune_full", 0.84, 0.9, True, random_linear_probe=0.7)
    summary = collect(tmp_path, 0.05)
    rows = {r["attack"]: r for r in csv.DictReader((tmp_path / "robustness.csv").open())}
    assert {a: r["theft"] for a, r in rows.items()} == {"none": "True", "prune_global": "True", "distill": "False",
                                                        "distill_arch": "False", "finetune_full": "False"}
    assert [a for a, r in rows.items() if r["keeps_utility"] == "True"] == ["none", "distill", "distill_arch",
                                                                             "prune_global"]
    assert float(rows["distill"]["knn_advantage_kept"]) == pytest.approx(0.4)
    assert float(rows["distill_arch"]["probe_advantage_kept"]) == pytest.approx(0.4)  # its own random init: 0.85
    assert summary["thefts"] == 2 and summary["utility_preserving"] == 4
    for m in MODES:
        assert summary["modes"][m] == {"tpr": 0.5, "detected": 1, "of": 2, "missed": ["prune_global@1"]}
    nots = {r["derivative"]: r for r in summary["not_thefts"]}
    assert set(nots) == {"distill@2", "distill_arch@3", "finetune_full@4"}
    assert nots["distill@2"]["knn"] == 0.78 and nots["distill@2"]["random_knn"] == 0.7
    assert nots["distill@2"]["because"].startswith("kNN keeps under 0.5")
    assert nots["finetune_full@4"]["because"] == "probe more than 5 points under the unattacked encoder"
    assert collect(tmp_path, 0.05, advantage_kept=0.3)["thefts"] == 4  # distill and distill_arch keep 0.4


def test_collect_refuses_task_files_from_before_the_theft_rule(tmp_path):
    from dist_awenc.errors import ConfigError
    from dist_awenc.stages.robustness import collect

    (tmp_path / "tasks").mkdir()
    _task_file(tmp_path / "tasks", 0, "none", 0.9, 0.9, True)
    row = json.loads((tmp_path / "tasks" / "0.json").read_text())
    del row["random_linear_probe"]
    (tmp_path / "tasks" / "0.json").write_text(json.dumps(row))
    with pytest.raises(ConfigError, match=r"none__0__s0\.json\) were written before the theft rule"):
        collect(tmp_path, 0.05)


def test_robustness_measures_f0_and_a_random_init_per_architecture_on_each_split(owner, tmp_path):
    """Each row carries f0's and a seeded random init's (of the row's architecture) probe and kNN, measured once
    per seed on the same split with the same probe, and the theft decision taken on them."""
    from dist_awenc.attacks.stage import PirateData
    from dist_awenc.config import DataSection, ProbeSection
    from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
    from dist_awenc.evaluate.theft import random_init_encoder, theft_decision

    f0, secret = owner
    assert main(["robustness", f"encoder={f0}", f"secret={secret}", f"run.out_dir={tmp_path}",
                 "grid.attacks=[prune_global,distill_arch]", "grid.strengths={prune_global: [0.2], distill_arch: [1]}",
                 "grid.seeds=[0,1]", *FAST]) == 0
    root = tmp_path / "robustness"
    rows = list(csv.DictReader((root / "robustness.csv").open()))
    assert {(r["attack"], r["arch"]) for r in rows} == {("none", "tiny"), ("prune_global", "tiny"),
                                                        ("distill_arch", "tiny_resnet")}
    names = sorted(p.name for p in (root / "baselines").iterdir())  # once per seed; random: once per architecture
    assert [n.rsplit("_", 3)[0] for n in names] == ["f0", "f0", "random_tiny", "random_tiny", "random_tiny_resnet",
                                                    "random_tiny_resnet"]
    enc, card = load_encoder(f0)
    pirate = PirateData.load(DataSection(image_size=8), 8)
    for r in rows:
        seed = int(r["seed"])
        if r["attack"] == "none":  # the encoder has no parent: it is its own f0, measured the same way
            assert float(r["f0_linear_probe"]) == float(r["linear_probe"]) and float(r["f0_knn"]) == float(r["knn"])
        kwargs = json.loads(r["arch_kwargs"])
        rand = random_init_encoder(r["arch"], kwargs, card["mean"], card["std"], 8, seed)
        _, m = evaluate_encoder(rand, pirate.images, pirate.labels, pirate.num_classes, seed=seed,
                                **probe_options(ProbeSection(epochs=3)))
        assert (float(r["random_linear_probe"]), float(r["random_knn"])) == (m["linear_probe"], m["knn"])
        unattacked = next(float(u["linear_probe"]) for u in rows if u["attack"] == "none" and u["seed"] == r["seed"])
        want = theft_decision(linear_probe=float(r["linear_probe"]), knn=float(r["knn"]),
                              unattacked_linear_probe=unattacked, **{k: float(r[k]) for k in BASELINES})
        assert r["theft"] == str(want["theft"]) and r["not_theft_because"] == want["not_theft_because"]
    summary = json.loads((root / "robustness.json").read_text())
    thefts = sum(r["theft"] == "True" for r in rows)
    assert summary["thefts"] == thefts and all(m["of"] == thefts for m in summary["modes"].values())
    assert len(summary["not_thefts"]) == len(rows) - thefts


def test_robustness_takes_f0_from_clean_or_the_card_and_refuses_another(owner, tmp_path, capsys):
    """The theft rule's f0: `clean=`, else the encoder the card's stage read (an embedding's or attack's
    `config.encoder`), checked against the card's parent hash; without either, a one-line error."""
    import shutil

    from dist_awenc.errors import ArtifactError, ConfigError
    from dist_awenc.stages.theft import load_clean

    f0, secret = owner
    assert main(["attack", f"encoder={f0}", f"run.out_dir={tmp_path}", "run.name=child",
                 "attack.name=prune_global", "attack.strength=0.3", *FAST]) == 0
    _, card = load_encoder(tmp_path / "child")  # parent: f0's hash; config.encoder: f0's path
    enc0, _ = load_encoder(f0)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(load_clean(card, "")(x), enc0(x)) and torch.equal(load_clean(card, str(f0))(x), enc0(x))
    assert load_clean(enc0_card := load_encoder(f0)[1], "") is None  # no parent: the encoder is its own f0
    assert enc0_card["parent"] is None
    bare = {k: v for k, v in card.items() if k != "config"}
    with pytest.raises(ConfigError, match=r"records no path; set clean=<f0 file or run folder>"):
        load_clean(bare, "")
    with pytest.raises(ConfigError, match="which is another encoder; set clean="):
        load_clean({**card, "config": {"encoder": str(tmp_path / "child")}}, "")
    with pytest.raises(ArtifactError, match="is not the encoder's parent"):
        load_clean({**card, "parent": "0" * 64}, str(f0))
    # through the stage: the card's f0 is measured on the task's split like every derivative
    rob = ["robustness", f"secret={secret}", f"run.out_dir={tmp_path}", "grid.attacks=[prune_global]",
           "grid.strengths={prune_global: [0.2]}", *FAST]
    assert main([*rob, f"encoder={tmp_path / 'child'}"]) == 0
    f0_row = json.loads((tmp_path / "robustness" / "baselines" / "f0__s0.json").read_text())
    unattacked = json.loads((tmp_path / "child" / "attack.json").read_text())["downstream"]["unattacked"]  # f0, seed 0
    assert (f0_row["linear_probe"], f0_row["knn"]) == (unattacked["linear_probe"], unattacked["knn"])
    shutil.copytree(tmp_path / "child", tmp_path / "bare")
    (tmp_path / "bare" / "encoder.json").write_text(json.dumps(bare))
    assert main([*rob, f"encoder={tmp_path / 'bare'}", "run.name=bare"]) == 2
    assert "set clean=<f0 file or run folder>" in capsys.readouterr().err
    assert main([*rob, f"encoder={tmp_path / 'bare'}", "run.name=bare", f"clean={f0}"]) == 0
