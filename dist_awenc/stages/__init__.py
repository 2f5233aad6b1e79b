"""Every stage in one table: what it does, the function that runs it, and its config class.

The package holds the orchestration stages, those that combine the rooms below (each imports from several of
data, encoders, ssl, watermark, verify, attacks, evaluate): :mod:`~dist_awenc.stages.calibrate` (pre-trains and
attacks null encoders), :mod:`~dist_awenc.stages.robustness`, :mod:`~dist_awenc.stages.ablation` and
:mod:`~dist_awenc.stages.demo`. The other stages sit in their rooms (``ssl.pretrain``, ``watermark.generate``, ...).

This table is the one place that says where a stage's code is. Config classes live
in :mod:`dist_awenc.config`, except those whose fields come from a registry
the config module must not import (``attack``'s options, ``robustness``'s
grid), which sit beside their stage function. The CLI,
``awenc config``, ``awenc submit`` and the tests find a stage only through
:data:`STAGES`, so adding a stage is one row. Tools without a config
(``awenc serve``, ``awenc data``, ``awenc import``) are wired in the CLI.

Entries are ``"module:attribute"`` strings, imported on first use: this module
imports nothing heavy (importing it does not import the stage modules beside it), so ``awenc --help`` and
``awenc sweep status`` start without torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    help: str
    run: str  # "module:function", called with the loaded config
    schema: str  # "module:ConfigClass"


STAGES: dict[str, Stage] = {
    "pretrain": Stage("contrastive pre-training (SimCLR, MoCo v2, BYOL) of a clean encoder",
                      "dist_awenc.ssl.pretrain:pretrain", "dist_awenc.config:PretrainConfig"),
    "watermark": Stage("stage 1: generate the secret (key image + universal watermark) on f0",
                       "dist_awenc.watermark.generate:watermark", "dist_awenc.config:WatermarkConfig"),
    "embed": Stage("stage 2: embed the secret into the encoder (same training loop as pretrain)",
                   "dist_awenc.watermark.embed:embed", "dist_awenc.config:EmbedConfig"),
    "downstream": Stage("train the pirate's linear head; report linear-probe and kNN accuracy",
                        "dist_awenc.evaluate.downstream:downstream", "dist_awenc.config:DownstreamConfig"),
    "verify": Stage("verify a suspect: white-box (encoder) or black-box (downstream model)",
                    "dist_awenc.verify.run:verify", "dist_awenc.config:VerifyConfig"),
    "attack": Stage("apply one removal attack at one strength; report the pirate's downstream accuracy",
                    "dist_awenc.attacks.stage:attack", "dist_awenc.attacks.stage:AttackConfig"),
    "robustness": Stage("attack x strength x verification mode grid on one machine: robustness.csv and plots",
                        "dist_awenc.stages.robustness:robustness", "dist_awenc.stages.robustness:RobustnessConfig"),
    "ablation": Stage("compare watermark variants' robustness runs: utility, TPR per mode, held-out FP, cost",
                      "dist_awenc.stages.ablation:ablation", "dist_awenc.config_ablation:AblationConfig"),
    "calibrate": Stage("set each mode's margin from a null population; exact bound on the false-positive rate",
                       "dist_awenc.stages.calibrate:calibrate", "dist_awenc.config:CalibrateConfig"),
    "demo": Stage("the whole method on scikit-learn's digits, on CPU, with a verdict table",
                  "dist_awenc.stages.demo:demo", "dist_awenc.config:DemoConfig"),
}

# stages whose work is launched as one training job (`awenc submit <stage>`)
SUBMITTABLE = ("pretrain", "embed", "watermark", "downstream")


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def stage_function(stage: str) -> Callable[[Any], Any]:
    return _load(STAGES[stage].run)


def schema(stage: str) -> type:
    """The config class of ``stage`` (a KeyError names no stage: the CLI's choices already checked it)."""
    return _load(STAGES[stage].schema)
