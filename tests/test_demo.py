"""`awenc demo` end to end at its smallest setting: every stage runs and the report has its schema."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dist_awenc.cli import main
from dist_awenc.config import DemoConfig, EmbedConfig, RobustSection, ShadowSection, WatermarkConfig, load_config
from dist_awenc.stages import demo as demo_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = ["jpeg", "resize", "crop", "noise", "blur"]  # the demo's default: all five transforms, half the marks bare
PLAIN = ["robust.transforms=[]", "shadow.weight=0"]  # the one-line way back to plain AWEncoder (docs/robustness.md)

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

    # the stages ran the demo's recipe: transforms in stage 1 and stage 2, the shadow student in stage 2
    wm_cfg = yaml.safe_load((root / "watermark" / "config.yaml").read_text())
    emb_cfg = yaml.safe_load((root / "embed" / "config.yaml").read_text())
    for c in (wm_cfg, emb_cfg):
        assert c["robust"]["transforms"] == RECIPE and c["robust"]["p_identity"] == 0.5
    assert emb_cfg["shadow"] == {"weight": 1.0, "arch": "", "refresh": 70}
    assert json.loads((root / "watermark" / "secret.json").read_text())["robust"]["transforms"] == RECIPE

    # running it again reuses every complete stage and gives the same verdicts
    assert main(["demo", f"run.out_dir={tmp_path}", *SMALL]) == 0
    again = json.loads((root / "report.json").read_text())
    assert [(r["p_value"], r["image_p"]) for r in again["verification"]] == [(r["p_value"], r["image_p"]) for r in rows]
    assert "reusing complete" in capsys.readouterr().out
    # ... but never for another recipe: plain AWEncoder is refused at stage 1, naming the field, nothing deleted
    assert main(["demo", f"run.out_dir={tmp_path}", *SMALL, *PLAIN]) == 2
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


def test_the_demo_embeds_with_the_recipe_and_one_line_gives_plain_awencoder(monkeypatch, tmp_path, capsys):
    assert main(["config", "demo"]) == 0  # what `awenc config demo` prints
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["robust"]["transforms"] == RECIPE and printed["robust"]["p_identity"] == 0.5
    assert printed["shadow"] == {"weight": 1.0, "arch": "", "refresh": 70}
    recipe = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}"])
    wm, emb = recipe["watermark"], recipe["embed"]
    assert isinstance(wm, WatermarkConfig) and isinstance(emb, EmbedConfig)
    for c in (wm, emb):
        assert c.robust.transforms == RECIPE and c.robust.p_identity == 0.5
        assert c.robust.jpeg_quality == RobustSection().jpeg_quality  # the other fields stay the stages' defaults
    assert (emb.shadow.weight, emb.shadow.refresh, emb.shadow.arch) == (1.0, 70, "")
    # the configs shipped for digits say the same
    shipped_demo = load_config(DemoConfig, CONFIGS / "demo/digits.yaml")
    assert (shipped_demo.robust, shipped_demo.shadow) == (DemoConfig().robust, DemoConfig().shadow)
    assert load_config(WatermarkConfig, CONFIGS / "watermark/digits.yaml").robust == wm.robust
    shipped = load_config(EmbedConfig, CONFIGS / "embed/digits.yaml")
    assert (shipped.robust, shipped.shadow) == (emb.robust, emb.shadow)

    # plain AWEncoder: stage 1 and stage 2 get the stages' own (off) sections, exactly as before the recipe, so an
    # older plain demo folder is reused and the secret's hash is unchanged
    plain = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}", *PLAIN])
    assert plain["watermark"].robust == RobustSection() and plain["watermark"].robust.transforms == []
    assert plain["embed"].robust == RobustSection() and plain["embed"].shadow == ShadowSection()
    assert plain["embed"].shadow.weight == 0
    # either switch alone
    only_t = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}", "shadow.weight=0"])["embed"]
    assert only_t.robust.transforms == RECIPE and only_t.shadow == ShadowSection()
    only_s = stage_configs(monkeypatch, [f"run.out_dir={tmp_path}", "robust.transforms=[]"])["embed"]
    assert only_s.robust == RobustSection() and only_s.shadow.weight == 1.0
