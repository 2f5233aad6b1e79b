"""`awenc demo` end to end at its smallest setting: every stage runs and the report has its schema."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dist_awenc.cli import main
from dist_awenc.config import (DemoConfig, EmbedConfig, RobustSection, ShadowSection, SpecificSection, WatermarkConfig,
                               load_config)
from dist_awenc.stages import demo as demo_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = ["jpeg", "resize", "crop", "noise", "blur"]  # the recipe's transforms: all five, half the marks bare
# the recipe of docs/robustness.md as one override (the demo's default is plain AWEncoder: #27)
RECIPE_OVERRIDE = ["robust.transforms=[jpeg,resize,crop,noise,blur]", "robust.p_identity=0.5", "shadow.weight=1",
                   "shadow.refresh=70"]

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

    # the stages ran plain AWEncoder: no transforms in stage 1 or stage 2, no shadow student
    wm_cfg = yaml.safe_load((root / "watermark" / "config.yaml").read_text())
    emb_cfg = yaml.safe_load((root / "embed" / "config.yaml").read_text())
    for c in (wm_cfg, emb_cfg):
        assert c["robust"]["transforms"] == []
    assert emb_cfg["shadow"]["weight"] == 0
    assert emb_cfg["specific"] == {"weight": 10.0, "secrets": 4, "images": 16, "suppress": 1.0}  # + the specificity term, suppressing
    assert "robust" not in json.loads((root / "watermark" / "secret.json").read_text())

    # running it again reuses every complete stage and gives the same verdicts
    assert main(["demo", f"run.out_dir={tmp_path}", *SMALL]) == 0
    again = json.loads((root / "report.json").read_text())
    assert [(r["p_value"], r["image_p"]) for r in again["verification"]] == [(r["p_value"], r["image_p"]) for r in rows]
    assert "reusing complete" in capsys.readouterr().out
    # ... but never for another recipe: the transforms recipe is refused at stage 1, naming the field, nothing deleted
    assert main(["demo", f"run.out_dir={tmp_path}", *SMALL, *RECIPE_OVERRIDE]) == 2
    err = capsys.readouterr().err
    assert "holds a complete run made with other settings (robust.transforms was" in err and "nothing was deleted" in err
    assert yaml.safe_load((root / "embed" / "config.yaml").read_text()) == emb_cfg


class _Stop(Exception):
    pass


def stage_configs(monkeypatch, overrides: list[str]) -> dict[str, object]:
    """The configs demo() hands its stages under ``overrides``, up to stage 2 (nothing trains)."""
    seen: dict[str, object] = {}

    def fake_reuse_or_run(cfg, fn, output):
        seen[cfg.run.name] = cfg
        if isinstance(cfg, EmbedConfig):
            raise _Stop
        return f"{cfg.run.name}/{output}"

    monkeypatch.setattr(demo_stage, "reuse_or_run", fake_reuse_or_run)
    with pytest.raises(_Stop):
        demo_stage.demo(load_config(DemoConfig, None, overrides))
    return seen


def test_the_demo_embeds_plain_awencoder_and_one_override_gives_the_recipe(monkeypatch, tmp_path, capsys):
    assert main(["config", "demo"]) == 0  # what `awenc config demo` prints
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["robust"]["transforms"] == [] and printed["shadow"]["weight"] == 0
    recipe = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}", *RECIPE_OVERRIDE])
    wm, emb = recipe["watermark"], recipe["embed"]
    assert isinstance(wm, WatermarkConfig) and isinstance(emb, EmbedConfig)
    for c in (wm, emb):
        assert c.robust.transforms == RECIPE and c.robust.p_identity == 0.5
        assert c.robust.jpeg_quality == RobustSection().jpeg_quality  # the other fields stay the stages' defaults
    assert (emb.shadow.weight, emb.shadow.refresh, emb.shadow.arch) == (1.0, 70, "")
    # the configs shipped for digits are plain AWEncoder, as the demo's defaults
    shipped_demo = load_config(DemoConfig, CONFIGS / "demo/digits.yaml")
    assert (shipped_demo.robust, shipped_demo.shadow) == (DemoConfig().robust, DemoConfig().shadow)
    assert load_config(WatermarkConfig, CONFIGS / "watermark/digits.yaml").robust == RobustSection()
    shipped = load_config(EmbedConfig, CONFIGS / "embed/digits.yaml")
    assert (shipped.robust, shipped.shadow) == (RobustSection(), ShadowSection())

    # by default stage 1 and stage 2 get the stages' own (off) sections, so the secret's hash is the plain one
    plain = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}"])
    assert plain["watermark"].robust == RobustSection() and plain["watermark"].robust.transforms == []
    assert plain["embed"].robust == RobustSection() and plain["embed"].shadow == ShadowSection()
    # either switch alone
    recipe_t = RECIPE_OVERRIDE[:2]
    only_t = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}", *recipe_t])["embed"]
    assert only_t.robust.transforms == RECIPE and only_t.shadow == ShadowSection()
    only_s = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}", *RECIPE_OVERRIDE[2:]])["embed"]
    assert only_s.robust == RobustSection() and only_s.shadow.weight == 1.0 and only_s.shadow.refresh == 70


def test_the_demo_embeds_with_the_specificity_term_and_weight_0_is_plain(monkeypatch, tmp_path):
    assert stage_configs(monkeypatch, [f"run.out_dir={tmp_path}"])["embed"].specific == SpecificSection(10.0, 4, 16, 1.0)
    assert load_config(DemoConfig, CONFIGS / "demo/digits.yaml").specific == DemoConfig().specific  # shipped = default
    plain = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}", "specific.weight=0"])["embed"]
    assert plain.specific.weight == 0 and plain.robust == RobustSection() and plain.shadow == ShadowSection()


def test_the_ablation_scripts_refuse_a_demo_embedded_with_the_specificity_term(tmp_path):
    """scripts/plain_demo.py (ablation.sh, permutation.sh read runs/demo as plain AWEncoder): the demo's default
    stage 2 is not plain; `specific.weight=0` is."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_demo", Path(__file__).resolve().parents[1] / "scripts/plain_demo.py")
    plain_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain_demo)
    (tmp_path / "embed").mkdir()
    cfg = tmp_path / "embed" / "config.yaml"
    cfg.write_text(yaml.safe_dump({"robust": {"transforms": []}, "shadow": {"weight": 0}, "specific": {"weight": 10.0}}))
    why = plain_demo.why_not_plain(tmp_path)
    assert why and "specific.weight=10.0" in why and "scripts/demo.sh specific.weight=0" in why
    cfg.write_text(yaml.safe_dump({"robust": {"transforms": []}, "shadow": {"weight": 0}, "specific": {"weight": 0}}))
    assert plain_demo.why_not_plain(tmp_path) is None
