"""What engine a run actually used, read from inside the run and written to ``<run>/engine.json``.

A launcher flag can silently replace what a launcher config asks for (``accelerate launch --multi_gpu`` turns a
DeepSpeed config into plain DDP), so the run records what it got, not what was asked: Accelerate's distributed type,
DeepSpeed's ZeRO stage as the engine reports it, the process and machine counts, device, backend and precision.
Each start of the run (the first, and every resume) appends one entry.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from dist_awenc.files import atomic_write_text
from dist_awenc.log import info

ENGINE_FILE = "engine.json"


def describe_engine(accelerator: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The engine of a prepared ``model``: ``distributed_type`` (NO, MULTI_CPU, MULTI_GPU, DEEPSPEED...),
    ``zero_stage`` (None without DeepSpeed), ``num_processes``, ``num_machines``, ``device``, ``backend``,
    ``mixed_precision``, the DeepSpeed JSON a launcher config named, and the launcher (torchrun or none)."""
    import torch.distributed as tdist

    plugin = accelerator.state.deepspeed_plugin
    zero = None
    if hasattr(model, "zero_optimization_stage"):  # a DeepSpeedEngine: ask the engine itself
        zero = int(model.zero_optimization_stage())
    elif plugin is not None:
        zero = int(plugin.zero_stage or 0)
    world = accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)  # processes on this machine (torchrun sets it)
    precision = accelerator.mixed_precision
    if hasattr(model, "bfloat16_enabled"):  # DeepSpeed's own precision (its config may set it)
        precision = "bf16" if model.bfloat16_enabled() else "fp16" if model.fp16_enabled() else "no"
    return {
        "distributed_type": str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)),
        "zero_stage": zero,
        # the DeepSpeed JSON the launcher's config named (None under train.deepspeed, which the run's config records)
        "launcher_deepspeed_config": os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if plugin is not None else None,
        "num_processes": world,
        "num_machines": max(1, world // max(1, local)),
        "device": accelerator.device.type,
        "backend": tdist.get_backend() if tdist.is_available() and tdist.is_initialized() else None,
        "mixed_precision": precision,
        "launcher": "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "none",
    }


def engine_summary(desc: dict[str, Any]) -> str:
    kind = desc["distributed_type"] + (f" ZeRO-{desc['zero_stage']}" if desc["zero_stage"] is not None else "")
    return (f"{kind}, {desc['num_processes']} process(es) on {desc['num_machines']} machine(s), {desc['device']}"
            f"{', ' + desc['backend'] if desc['backend'] else ''}, precision {desc['mixed_precision']}")


def record_engine(run_dir: Path, accelerator: Any, model: torch.nn.Module, start_step: int) -> None:
    """Append the engine of this start of the run (:func:`describe_engine` of the prepared ``model``) to
    ``run_dir/engine.json`` and log it (the main process writes)."""
    if not accelerator.is_main_process:
        return
    desc = describe_engine(accelerator, model)
    path = Path(run_dir) / ENGINE_FILE
    try:
        starts = json.loads(path.read_text())["starts"] if path.exists() else []
    except (ValueError, KeyError, TypeError):
        starts = []  # unreadable (a kill mid-write cannot leave that: the write is atomic): start the list again
    entry = {**desc, "start_step": start_step, "time": round(time.time(), 3),
             "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}
    atomic_write_text(path, json.dumps({"starts": starts + [entry]}, indent=1) + "\n")
    info(f"engine: {engine_summary(desc)} (from step {start_step}; {path})")
