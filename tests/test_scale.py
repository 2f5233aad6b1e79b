"""Scaling rules in the config (issue #31): the lr per 256 images of the optimiser's batch (linear / sqrt / none),
warm-up and checkpoint intervals in epochs, their resolution at several batches and process counts, the refusal of
both forms at once, ``awenc plan-scale``, the values a run prints and saves, and the refusal of gradient
accumulation where it changes what a method computes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_overrides
from dist_awenc.cli import main
from dist_awenc.config import CalibrateConfig, DemoConfig, EmbedConfig, PretrainConfig, load_config
from dist_awenc.engine.plan import DEFAULT_CHECKPOINT_EVERY, resolve, scale_table, scaled_lr
from dist_awenc.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET_SPLIT = 1_255_544  # 98% of ImageNet-1k's 1,281,167 training images (the recipes' data.splits)


def _sections(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, list(overrides))


@pytest.mark.parametrize("scaling, lr, batch, accum, processes, expected", [
    ("linear", 0.3, 4096, 1, 8, 4.8),  # SimCLR's 0.3 x B/256
    ("linear", 0.3, 2048, 2, 64, 4.8),  # the optimiser's batch counts the accumulated micro-steps
    ("linear", 0.3, 256, 1, 1, 0.3),
    ("linear", 0.03, 512, 1, 32, 0.06),  # MoCo v2's 0.03 at 256
    ("sqrt", 1.2, 4096, 1, 8, 4.8),  # SimCLR's 0.075 x sqrt(B) = 1.2 x sqrt(B/256)
    ("sqrt", 1.2, 1024, 1, 32, 2.4),
    ("none", 2e-3, 4096, 1, 64, 2e-3),  # an absolute lr stays absolute
])
def test_lr_resolves_at_several_batches_and_process_counts(scaling, lr, batch, accum, processes, expected):
    cfg = _sections(f"optim.lr={lr}", f"optim.lr_scaling={scaling}", f"train.batch_size={batch}",
                    f"train.grad_accum={accum}", "train.grad_accum_ok=true")
    r = resolve(cfg.optim, cfg.train, IMAGENET_SPLIT, processes)
    assert r.lr == pytest.approx(expected, rel=1e-12)
    assert (r.processes, r.micro_batch, r.global_batch) == (processes, batch // processes, batch * accum)
    assert r.steps_per_epoch == IMAGENET_SPLIT // (batch * accum) and r.base_lr == lr


@pytest.mark.parametrize("batch, spe", [(4096, 306), (2048, 613), (16384, 76)])
def test_epoch_intervals_resolve_to_steps_of_the_batch(batch, spe):
    cfg = _sections("optim.warmup_epochs=10", "train.checkpoint_every_epochs=0.5", f"train.batch_size={batch}")
    r = resolve(cfg.optim, cfg.train, IMAGENET_SPLIT, 8)
    assert (r.steps_per_epoch, r.warmup_steps, r.checkpoint_every) == (spe, 10 * spe, round(0.5 * spe))
    tiny = _sections("train.checkpoint_every_epochs=0.001", "train.batch_size=64")
    assert resolve(tiny.optim, tiny.train, 640, 1).checkpoint_every == 1  # at least every step


def test_step_fields_and_defaults_keep_their_meaning():
    cfg = _sections("optim.warmup_steps=40", "train.checkpoint_every=7", "train.batch_size=64")
    r = resolve(cfg.optim, cfg.train, 6400, 2)
    assert (r.warmup_steps, r.checkpoint_every) == (40, 7)
    plain = _sections("train.batch_size=64")
    assert resolve(plain.optim, plain.train, 6400, 1).checkpoint_every == DEFAULT_CHECKPOINT_EVERY == 200


@pytest.mark.parametrize("overrides, match", [
    (["optim.warmup_steps=3060", "optim.warmup_epochs=10"], r"warmup_steps=3060 and warmup_epochs=10.0 are both set"),
    (["train.checkpoint_every=1000", "train.checkpoint_every_epochs=1"], "checkpoint_every=1000 and checkpoint_every_epochs"),
    (["optim.lr_scaling=cube"], "lr_scaling must be one of none, linear, sqrt"),
    (["optim.warmup_epochs=-1"], "must be >= 0"),
    (["train.checkpoint_every_epochs=0"], "checkpoint_every_epochs > 0"),
])
def test_both_forms_at_once_and_bad_values_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        _sections(*overrides)
    assert "\n" not in str(e.value)


def test_the_demo_sections_refuse_both_forms_too_and_say_how_to_pick_one():
    with pytest.raises(ConfigError, match=r"checkpoint_every=500 and .* \(the other to null\)"):
        load_config(DemoConfig, None, ["pretrain.checkpoint_every_epochs=2"])
    cfg = load_config(DemoConfig, None, ["pretrain.checkpoint_every=null", "pretrain.checkpoint_every_epochs=2"])
    assert resolve(cfg.optim, cfg.pretrain, 898, 1).checkpoint_every == 2 * (898 // 128)


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("digits_*.yaml")) + [CONFIGS / "embed" / "digits.yaml",
                                                                                        CONFIGS / "demo" / "digits.yaml"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_digits_configs_keep_their_absolute_values(path):
    """The digits recipes (demo, embed, calibration's pre-training) resolve to exactly what they set: lr_scaling none."""
    schema = {"pretrain": PretrainConfig, "embed": EmbedConfig, "demo": DemoConfig}[path.parent.name]
    cfg = load_config(schema, path)
    pairs = [(cfg.optim, cfg.pretrain), (cfg.embed_optim, cfg.embed)] if schema is DemoConfig else [(cfg.optim, cfg.train)]
    for optim, train in pairs:
        assert optim.lr_scaling == "none" and optim.warmup_epochs is None and train.checkpoint_every_epochs is None
        for processes, batch in ((1, train.batch_size), (2, train.batch_size), (8, 8 * train.batch_size)):
            r = resolve(optim, type(train)(**{**train.__dict__, "batch_size": batch}), 100_000, processes)
            assert (r.lr, r.warmup_steps) == (optim.lr, optim.warmup_steps)
    cal = load_config(CalibrateConfig, None)
    assert resolve(cal.optim, cal.pretrain, 898, 1).lr == cal.optim.lr


@pytest.mark.parametrize("method, lr, warmup, ckpt", [("simclr", 4.8, 3060, 306), ("byol", 3.2, 3060, 306),
                                                      ("moco_v2", 0.03, 0, round(0.2 * 4904))])
def test_imagenet_recipes_resolve_to_the_papers_values_at_their_batch(method, lr, warmup, ckpt):
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / f"imagenet_resnet50_{method}.yaml")
    r = resolve(cfg.optim, cfg.train, IMAGENET_SPLIT, 8)
    assert r.lr == pytest.approx(lr, rel=1e-12) and (r.warmup_steps, r.checkpoint_every) == (warmup, ckpt)


def test_imagenet_simclr_on_8_32_64_gpus_keeps_the_rule_and_the_epochs():
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / "imagenet_resnet50_simclr.yaml")
    rows = scale_table(cfg.optim, cfg.train, IMAGENET_SPLIT, 256, (8, 32, 64))
    assert [r.global_batch for r in rows] == [2048, 8192, 16384]
    assert [r.lr for r in rows] == pytest.approx([2.4, 9.6, 19.2], rel=1e-12)
    assert [(r.steps_per_epoch, r.warmup_steps, r.checkpoint_every) for r in rows] == [(613, 6130, 613), (153, 1530, 153),
                                                                                       (76, 760, 76)]


def test_plan_scale_prints_a_table_for_8_32_64_gpus(capsys):
    path = CONFIGS / "pretrain" / "imagenet_resnet50_byol.yaml"
    assert main(["plan-scale", "--config", str(path), "--images", str(IMAGENET_SPLIT), "--per-gpu-batch", "128"]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 128 | 1 | 1024 | 1226 | 367800 | 0.8 | 12260 | 1226 |" in out
    assert "| 32 | 128 | 1 | 4096 | 306 | 91800 | 3.2 | 3060 | 306 |" in out
    assert "| 64 | 128 | 1 | 8192 | 153 | 45900 | 6.4 | 1530 | 153 |" in out


def test_plan_scale_counts_the_split_and_names_what_does_not_fit(capsys):
    assert main(["plan-scale", "--config", str(CONFIGS / "pretrain" / "digits_simclr.yaml"), "--per-gpu-batch", "16",
                 "--gpus", "1", "64"]) == 0
    out = capsys.readouterr().out
    assert "898 images an epoch" in out and "| 1 | 16 | 1 | 16 | 56 |" in out
    assert "64 GPUs: train.batch_size=1024 x grad_accum=1 exceeds the 898 training images" in out
    assert main(["plan-scale", "--config", str(CONFIGS / "pretrain" / "imagenet_resnet50_simclr.yaml")]) == 2
    assert "pass --images" in capsys.readouterr().err


def test_a_run_prints_and_saves_what_it_resolved(tmp_path, capsys):
    from dist_awenc.ssl.pretrain import pretrain

    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, "r", **{
        "optim.lr": 0.004, "optim.lr_scaling": "linear", "optim.warmup_epochs": 1, "train.checkpoint_every": "null",
        "train.checkpoint_every_epochs": 0.5, "train.max_steps": 4, "data.splits": "[1.0,0,0]"}))
    enc = pretrain(cfg)
    saved = json.loads((tmp_path / "r" / "resolved.json").read_text())
    spe = 1797 // 64
    assert saved == {"processes": 1, "micro_batch": 64, "grad_accum": 1, "global_batch": 64, "steps_per_epoch": spe,
                     "total_steps": 4, "lr_scaling": "linear", "base_lr": 0.004, "lr": 0.001, "warmup_steps": spe,
                     "checkpoint_every": round(spe / 2)}
    assert json.loads(enc.with_suffix(".json").read_text())["resolved"] == saved
    assert "resolved: 1 process(es) x 64 images = 64 a step" in capsys.readouterr().out
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.001 * (s + 1) / spe for s in range(4)])  # warm-up towards the scaled lr


@pytest.mark.parametrize("method, extra, clause", [
    ("simclr", {}, "SimCLR's negatives come from each micro-batch"),
    ("moco_v2", {}, "MoCo v2's queue takes each micro-batch's keys"),
    ("moco_v3", {"encoder.head_norm": "batch"}, "MoCo v3's negatives come from each micro-batch"),
    ("byol", {"encoder.norm": "batch"}, "BatchNorm statistics"),
])
def test_grad_accum_is_refused_where_the_micro_batch_changes_the_method(tmp_path, method, extra, clause):
    from dist_awenc.ssl.pretrain import pretrain

    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, method, **{"ssl.method": method,
                                                                               "train.grad_accum": 2, **extra}))
    with pytest.raises(ConfigError, match="grad_accum_ok=true") as e:
        pretrain(cfg)
    assert clause in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / method).exists()  # refused before the run folder


def test_grad_accum_runs_where_nothing_depends_on_the_micro_batch_or_where_asked(tmp_path):
    from dist_awenc.ssl.pretrain import pretrain

    # BYOL on a GroupNorm net without BatchNorm heads: no negatives, no batch statistics
    pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "byol", **{
        "ssl.method": "byol", "train.grad_accum": 2, "train.max_steps": 2})))
    pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "simclr", **{
        "train.grad_accum": 2, "train.grad_accum_ok": "true", "train.max_steps": 2})))
    saved = json.loads((tmp_path / "simclr" / "resolved.json").read_text())
    assert (saved["grad_accum"], saved["global_batch"]) == (2, 128)


def test_micro_batch_terms_of_each_method():
    import torch

    from dist_awenc.ssl import build_method
    from dist_awenc.ssl.pretrain import micro_batch_terms

    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    kw = dict(proj_hidden_dim=8, proj_dim=4, queue_size=8, pred_hidden_dim=8)
    terms = {m: micro_batch_terms(build_method(m, backbone, 8, **{k: v for k, v in kw.items()
                                                                   if k in ("proj_hidden_dim", "proj_dim")
                                                                   or (k == "queue_size" and m == "moco_v2")
                                                                   or (k == "pred_hidden_dim" and m in ("byol", "moco_v3"))}))
             for m in ("simclr", "moco_v2", "byol", "moco_v3")}
    assert terms["byol"] == [] and all(len(terms[m]) == 1 for m in ("simclr", "moco_v2", "moco_v3"))
    with_bn = build_method("byol", backbone, 8, proj_hidden_dim=8, proj_dim=4, head_norm="batch")
    assert micro_batch_terms(with_bn) == ["BatchNorm statistics (SyncBN's too) come from each micro-batch"]
    assert math.isclose(scaled_lr(0.2, "linear", 4096), 3.2)


def test_a_run_folder_written_before_these_fields_is_the_same_run(tmp_path):
    """Old run folders (no lr_scaling, warmup_epochs, ... in their config.yaml, checkpoint_every 200) are resumed and
    reused by a config holding the new fields at their defaults; a new field set otherwise is a difference."""
    import yaml

    from dist_awenc.config import to_yaml
    from dist_awenc.runs import config_difference

    cfg = load_config(PretrainConfig, None, [f"run.out_dir={tmp_path}", "run.name=old"])
    old = yaml.safe_load(to_yaml(cfg))
    for section, key in [("optim", "lr_scaling"), ("optim", "warmup_epochs"), ("train", "grad_accum_ok"),
                         ("train", "checkpoint_every_epochs"), ("encoder", "proj_out_norm"), ("ssl", "symmetric"),
                         ("ssl", "loss_reduction"), ("views", "solarize_p"), ("views", "view2")]:
        old[section].pop(key)
    old["train"]["checkpoint_every"] = 200
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_difference(tmp_path / "old", cfg) is None
    scaled = load_config(PretrainConfig, None, [f"run.out_dir={tmp_path}", "run.name=old", "optim.lr_scaling=linear"])
    assert config_difference(tmp_path / "old", scaled)[0] == "optim.lr_scaling"
