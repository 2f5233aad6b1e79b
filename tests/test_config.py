"""Typed config sections: YAML + dotted overrides, strict keys and types, shipped configs load."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dist_awenc.config import DemoConfig, PretrainConfig, load_config, to_yaml
from dist_awenc.errors import ConfigError
from dist_awenc.stages import STAGES, schema, stage_function

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {epochs: 7, batch_size: 64}\nssl: {method: byol}\n")
    cfg = load_config(PretrainConfig, f, ["train.epochs=9", "views.flip_p=0.25"])
    assert cfg.train.epochs == 9 and cfg.train.batch_size == 64 and cfg.ssl.method == "byol"
    assert cfg.views.flip_p == 0.25 and cfg.optim.name == "adamw"  # untouched default


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, ["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg and "epochs" in msg and "batch_size" in msg and "\n" not in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("encoder: {arch: tiny, widht: 8}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*encoder.widht.*width"):
        load_config(PretrainConfig, f)


def test_wrong_type_and_bad_section_values_are_errors():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(PretrainConfig, None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="flip_p"):
        load_config(PretrainConfig, None, ["views.flip_p=1.5"])  # checked by the section itself
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(PretrainConfig, None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, "nope.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(DemoConfig, None, ["pretrain.epochs=3", "loss.lambda_dev=0.25"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(DemoConfig, f) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_stage_config_loads(path):
    if path.parent.name in STAGES:
        load_config(schema(path.parent.name), path)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_row_names_a_function_and_a_config_class_that_loads_its_defaults(stage):
    assert callable(stage_function(stage))
    cfg = load_config(schema(stage), None)  # defaults alone make a valid config
    assert dataclasses.is_dataclass(cfg)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_imagenet_warmup_is_ten_epochs_of_the_split_it_pretrains_on(method):
    """The recipes' warm-up resolves to 10 epochs of the pre-training split, not of the whole dataset (written as
    optim.warmup_epochs since #31; 3060 steps at the shipped batch, as the step count it replaced)."""
    from dist_awenc.config import PretrainConfig
    from dist_awenc.data import make_splits
    from dist_awenc.engine.plan import resolve

    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / f"imagenet_resnet50_{method}.yaml")
    n_train = 1_281_167  # ImageNet-1k train
    n_split = len(make_splits(n_train, cfg.data.split_seed, cfg.data.splits)["pretrain"])
    per_epoch = n_split // cfg.train.batch_size
    assert resolve(cfg.optim, cfg.train, n_split, 8).warmup_steps == 10 * per_epoch == 3060


def test_imagenet_moco_v2_has_global_batch_norm():
    from dist_awenc.config import PretrainConfig

    assert load_config(PretrainConfig, CONFIGS / "pretrain" / "imagenet_resnet50_moco_v2.yaml").train.sync_bn
