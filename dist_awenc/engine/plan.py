"""How long a training stage runs (:class:`TrainPlan`) and the loop settings a ``train:`` section implies.

Shared by the stages that run :func:`dist_awenc.engine.loop.fit`: pre-training
(``awenc pretrain``) and watermark embedding (``awenc watermark``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_awenc.engine import dist
from dist_awenc.engine.loop import LoopSettings
from dist_awenc.errors import ConfigError


@dataclass
class TrainPlan:
    """Steps and epochs a train section and a data size imply."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, train, n_samples: int) -> "TrainPlan":
        if train.batch_size < 1 or train.grad_accum < 1 or train.epochs < 1:
            raise ConfigError("train.batch_size, train.grad_accum and train.epochs must be >= 1")
        if train.batch_size % dist.world_size():
            raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by the {dist.world_size()} processes")
        spe = n_samples // train.batch_size // train.grad_accum
        if spe < 1:
            raise ConfigError(
                f"train.batch_size={train.batch_size} x grad_accum={train.grad_accum} exceeds the {n_samples} training images"
            )
        total = spe * train.epochs
        return cls(spe, min(total, train.max_steps) if train.max_steps else total)


def loop_settings(train, run_dir: Path, plan: TrainPlan, desc: str) -> LoopSettings:
    return LoopSettings(run_dir=run_dir, total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                        grad_accum=train.grad_accum, checkpoint_every=train.checkpoint_every,
                        keep_checkpoints=train.keep_checkpoints, log_every=train.log_every,
                        progress=train.progress, desc=desc, micro_batch=train.batch_size // dist.world_size(),
                        channels_last=train.channels_last)
