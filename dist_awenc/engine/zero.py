"""DeepSpeed ZeRO through Accelerate: the stage a config asks for, what the loop refuses under it, CPU set-up.

ZeRO reaches a run two ways: ``train.deepspeed`` (a DeepSpeed JSON in the run's config) or the launcher's
config (``accelerate launch --config_file configs/accelerate/8gpu_zero2.yaml``, which sets ACCELERATE_USE_DEEPSPEED
in the processes); :func:`dist_awenc.engine.loop.make_accelerator` takes either (``train.deepspeed`` wins).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dist_awenc.errors import ConfigError


def launcher_deepspeed() -> bool:
    """The launcher's config chose DeepSpeed (``distributed_type: DEEPSPEED``): accelerate sets this in the processes."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def deepspeed_on_cpu() -> None:
    """Prepare Accelerate for DeepSpeed on CPU processes, before the plugin and the Accelerator are made.

    ACCELERATE_USE_CPU=1 (the README's CPU launch) makes Accelerate skip its DeepSpeed setup, and the Accelerator then
    fails ("no attribute 'mixed_precision'"): it goes (DeepSpeed picks its CPU accelerator itself). Accelerate must
    be told the backend (gloo), or it assumes one process and DeepSpeed's batch arithmetic fails.
    """
    from accelerate import PartialState

    os.environ.pop("ACCELERATE_USE_CPU", None)
    PartialState(backend="gloo")


def zero_stage(path: str | Path) -> int:
    """The ZeRO stage of a DeepSpeed JSON (0 when it sets none)."""
    try:
        doc = json.loads(Path(path).read_text())
        return int((doc.get("zero_optimization") or {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"train.deepspeed: {path} is not a DeepSpeed JSON config ({type(e).__name__}: {e})") from None


def refuse_lars_under_zero(optimizer: str, stage: int, where: str) -> None:
    """LARS scales each layer's step by ||w|| / ||g||; ZeRO 1-3 hand the optimizer flat partitions that cut
    across layers, so the trust ratios would be computed over slices of several layers: silently wrong."""
    if optimizer == "lars" and stage >= 1:
        raise ConfigError(f"optim.name=lars cannot run under ZeRO stage {stage} ({where}): ZeRO gives the optimizer flat "
                          "partitions across layers, so LARS's per-layer trust ratios would be wrong; use LARS with "
                          "DDP (no train.deepspeed) or optim.name=sgd/adamw under ZeRO")


def refuse_zero3(stage: int, where: str) -> None:
    """ZeRO-3 partitions every parameter, frozen ones included: the momentum EMA (outside the forward), f0, the
    fp32 frozen parts (:mod:`dist_awenc.engine.precision`) and the encoder saved at the end would see empty shards."""
    if stage >= 3:
        raise ConfigError(f"ZeRO stage {stage} ({where}) is not supported: it partitions every parameter, so momentum "
                          "encoders, f0 and the saved encoder would see shards; use ZeRO-1 or ZeRO-2 "
                          "(configs/deepspeed/zero1.json, zero2.json)")
