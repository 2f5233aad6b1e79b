"""The one training loop (pre-training and watermark embedding share it).

Device, process count and precision come from Accelerate (the launcher or
``Accelerator()``'s environment). The loop owns nothing random: batches come
from a batch source seeded by epoch (:class:`~dist_awenc.data.sampler.SamplerSource`),
views are seeded by the micro-step, and the learning rate is a pure function
of the step, so a resumed run continues bit-for-bit where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors import SafetensorError
from tqdm.auto import tqdm

from dist_awenc.data.bad_files import replaced_samples
from dist_awenc.data.transfer import HostDraw, StepInputs, move_step
from dist_awenc.engine import dist, precision
from dist_awenc.engine.describe import record_engine
from dist_awenc.engine.preempt import Stopper
from dist_awenc.engine.tracker import JSONLinesTracker
from dist_awenc.engine.zero import deepspeed_on_cpu, launcher_deepspeed, refuse_lars_under_zero, refuse_zero3
from dist_awenc.engine.zero import zero_stage  # noqa: F401  (re-exported: callers and tests import it from here)
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.files import atomic_write_text, fsync_dir
from dist_awenc.log import info

CKPT_PREFIX = "step_"


class Interrupted(Exception):
    """``fit(interrupt_at=...)`` stopped right after a checkpoint, as a kill would."""


class BatchSource(Protocol):
    def iterate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]: ...


@dataclass
class LoopSettings:
    run_dir: Path
    total_steps: int  # optimiser steps
    steps_per_epoch: int
    grad_accum: int = 1
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    desc: str = "train"
    micro_batch: int = 0  # per process; tells DeepSpeed its batch arithmetic
    channels_last: bool = False


def make_accelerator(run_dir: Path, mixed_precision: Optional[str] = None, trackers: list[str] | None = None,
                     grad_accum: int = 1, compile: bool = False, deepspeed: Optional[str] = None,
                     optimizer: str = "") -> Accelerator:
    """An Accelerator logging to ``run_dir/metrics.jsonl`` (+ tensorboard / wandb when asked).

    Process count, device and DeepSpeed come from the launcher (``accelerate
    launch --config_file configs/accelerate/...``); ``compile`` asks for
    torch.compile (inductor) on top of what the launcher sets; ``deepspeed``
    (a DeepSpeed JSON) selects ZeRO from the run's config instead, and wins
    over the launcher's; both routes also run on CPU processes (gloo). ``optimizer`` (the
    ``optim.name``) is checked against it before anything is written: LARS under ZeRO is refused.
    """
    plugin = None
    if deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        if not Path(deepspeed).is_file():
            raise ConfigError(f"train.deepspeed: no DeepSpeed config at '{deepspeed}' (see configs/deepspeed/)")
        refuse_lars_under_zero(optimizer, zero_stage(deepspeed), f"train.deepspeed={deepspeed}")
        refuse_zero3(zero_stage(deepspeed), f"train.deepspeed={deepspeed}")
        if "RANK" not in os.environ:  # one process without a launcher: DeepSpeed still wants a rendezvous
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        if not torch.cuda.is_available():
            deepspeed_on_cpu()
        plugin = DeepSpeedPlugin(hf_ds_config=str(deepspeed))
    elif launcher_deepspeed() and not torch.cuda.is_available():  # the launcher's DeepSpeed config, CPU processes
        deepspeed_on_cpu()
    if mixed_precision in ("False", "false"):  # YAML 1.1 reads `no` as false (`train.mixed_precision=no`)
        mixed_precision = "no"
    if mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, not '{mixed_precision}'")
    log_with: list[Any] = [JSONLinesTracker(run_dir / "metrics.jsonl")]
    for t in trackers or []:
        if t not in ("tensorboard", "wandb"):
            raise ConfigError(f"unknown tracker '{t}'; valid: tensorboard, wandb")
        log_with.append(t)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        dynamo_backend="inductor" if compile else None,
        deepspeed_plugin=plugin,
        log_with=log_with,
        project_dir=str(run_dir),
        rng_types=[],  # no hidden RNG: samplers and views are seeded explicitly
        dataloader_config=DataLoaderConfiguration(split_batches=False),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # Accelerate's silent CPU pitfall: N copies that all think they are rank 0
        raise ConfigError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes}; on CPU launch with "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N (see README)"
        )
    return accelerator


def cosine_schedule(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, kind: str = "cosine") -> Callable[[int], float]:
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine (or constant)."""
    if kind not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule must be cosine or constant, not '{kind}'")

    def at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return at


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress is a hidden .tmp folder)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


def _save_checkpoint(accelerator: Accelerator, s: LoopSettings, step: int, config_yaml: str) -> None:
    final = s.run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(config_yaml)
        atomic_write_text(tmp / "loop.json", f'{{"step": {step}}}\n')
        tmp.rename(final)
        fsync_dir(final.parent)
        for old in checkpoints(s.run_dir)[: -s.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, run_dir: Path) -> int:
    found = checkpoints(run_dir)
    if not found:
        return 0
    last = found[-1]
    try:
        accelerator.load_state(str(last))
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"checkpoint {last} is unreadable (truncated or corrupt: {msg}); delete it to resume from the one before") from None
    step = int(last.name.removeprefix(CKPT_PREFIX))
    if accelerator.is_main_process:
        drop_metrics_after(run_dir / "metrics.jsonl", step)
    info(f"resumed from {last} (step {step})")
    return step


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove metric lines logged after ``step`` (the run repeats those steps on resume: no step twice)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by the kill that interrupted the run
        if logged is None or logged <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{x}\n" for x in kept))


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    source: BatchSource,
    make_inputs: Callable[[tuple[torch.Tensor, ...], int], Any],
    lr_at: Callable[[int], float],
    settings: LoopSettings,
    config_yaml: str,
    after_step: Optional[Callable[[torch.nn.Module, int], None]] = None,
    interrupt_at: Optional[int] = None,
) -> torch.nn.Module:
    """Train ``model`` (whose forward returns a dict with a scalar ``loss``) to ``total_steps``.

    Args:
        source: ``source.iterate(epoch, start_batch)`` yields this rank's
            batches (images, labels, index) of an epoch from a global batch on.
        make_inputs: ``(batch, micro_step) -> forward input`` where batch is
            (images, labels, index) of this rank and micro_step counts
            micro-batches from 0 over the whole run (the view seed). A
            :class:`~dist_awenc.data.transfer.StepInputs` has its host draw taken to
            the device with the batch, so the step itself copies nothing.
        after_step: ``(unwrapped_model, step)`` after each optimiser step
            (momentum encoders).
        interrupt_at: raise :class:`Interrupted` right after the checkpoint of
            this step, as a kill would (tests of resume).

    On a preemption signal (:mod:`~dist_awenc.engine.preempt`) every rank saves a checkpoint at the same step and
    :class:`~dist_awenc.engine.preempt.Preempted` is raised.

    Returns:
        The unwrapped model.
    """
    s = settings
    if s.steps_per_epoch < 1:
        raise ConfigError(
            f"one epoch has fewer than train.grad_accum={s.grad_accum} batches of train.batch_size; "
            "lower the batch size or add data"
        )
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    if accelerator.gradient_accumulation_steps != s.grad_accum:
        raise ConfigError(f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, the loop {s.grad_accum}")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # the launcher's DeepSpeed route too (accelerate launch --config_file ..._zero2.yaml)
        refuse_lars_under_zero("lars" if type(optimizer).__name__ == "LARS" else "", int(plugin.zero_stage or 0),
                               "the launcher's DeepSpeed config")
        refuse_zero3(int(plugin.zero_stage or 0), "the launcher's DeepSpeed config")
    if plugin is not None:  # no dataloader goes through prepare(): tell DeepSpeed the batch arithmetic
        plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": s.micro_batch, "gradient_accumulation_steps": s.grad_accum,
            "train_batch_size": s.micro_batch * s.grad_accum * accelerator.num_processes})
    if s.channels_last and plugin is None:  # DeepSpeed views every weight as bytes to broadcast it, which a
        model = model.to(memory_format=torch.channels_last)  # channels_last conv weight refuses: inputs only there
    # DeepSpeed bf16/fp16 casts the module it wraps: frozen parameters (momentum encoders, f0) and buffers (MoCo's
    # queue, the secret) go back to fp32 after its cast, and the forward runs under autocast (engine/precision.py)
    kept = precision.kept_in_fp32(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    low = precision.engine_dtype(model)
    if low is not None:
        precision.restore(kept)
        precision.norm_statistics_like_weights(model)
    del kept
    start = _resume(accelerator, s.run_dir)
    record_engine(s.run_dir, accelerator, model, start)  # the engine this run got, read from inside it
    accelerator.init_trackers(s.desc)
    bar = tqdm(total=s.total_steps, initial=start, desc=s.desc, disable=not (s.progress and accelerator.is_main_process),
               dynamic_ncols=True, leave=True)
    batches_per_epoch = s.steps_per_epoch * s.grad_accum
    step = start
    it = None
    sums: dict[str, torch.Tensor] = {}  # on device: no host sync per step
    count = 0
    model.train()
    stopper = Stopper()
    try:  # the stop-signal handlers are restored however the loop ends (a stale one would swallow the next run's)
        while step < s.total_steps:
            micro0 = step * s.grad_accum
            if it is None or micro0 % batches_per_epoch == 0:
                it = source.iterate(micro0 // batches_per_epoch, micro0 % batches_per_epoch)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_at(step)
            for micro in range(s.grad_accum):
                inputs = _inputs(make_inputs, next(it), micro0 + micro, accelerator.device)
                if s.channels_last:
                    inputs = _channels_last(inputs)
                # Accelerate syncs gradients (DDP, DeepSpeed) and steps only on the last micro-batch
                with accelerator.accumulate(model):
                    with precision.autocast(accelerator.device.type, low):
                        out = model(inputs)
                    accelerator.backward(out["loss"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    v = v.detach().float() / s.grad_accum
                    sums[k] = sums[k] + v if k in sums else v
            step += 1
            count += 1
            if after_step is not None:
                after_step(accelerator.unwrap_model(model), step)
            if step % s.log_every == 0 or step == s.total_steps:
                means = dist.all_reduce_mean(torch.stack(list(sums.values())) / count)  # one collective, one host read
                metrics = dict(zip(sums, means.tolist()))
                metrics["lr"] = optimizer.param_groups[0]["lr"]
                metrics["epoch"] = (step * s.grad_accum) / batches_per_epoch
                metrics.update(replaced_samples(source, dist.sum_scalar))  # data.bad_files=skip: samples replaced so far
                accelerator.log(metrics, step=step)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                sums.clear()
                count = 0
            bar.update(1)
            if step % s.checkpoint_every == 0 or step == s.total_steps:
                _save_checkpoint(accelerator, s, step, config_yaml)
            if step < s.total_steps and stopper.agreed():  # a preemption signal reached some rank: all stop here
                if step % s.checkpoint_every:
                    _save_checkpoint(accelerator, s, step, config_yaml)
                _finish_trackers(accelerator)
                raise stopper.stopped(step, accelerator.is_main_process, accelerator.wait_for_everyone)
            if interrupt_at is not None and step >= interrupt_at:
                bar.close()
                _finish_trackers(accelerator)
                raise Interrupted(f"interrupted after step {step}")
    finally:
        stopper.close()
    bar.close()
    _finish_trackers(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    if low is not None:  # the released weights are the fp32 master weights, not the bf16 copies the forward used
        precision.to_fp32_master(unwrapped)
    return unwrapped


def _inputs(make_inputs: Callable[[tuple[torch.Tensor, ...], int], Any], batch, micro_step: int, device) -> Any:
    """The forward's input of one micro-step: a :class:`StepInputs` gets its draw moved with the batch (two
    non-blocking copies before the step, none inside it); a plain callable gets the batch on the device."""
    if isinstance(make_inputs, StepInputs):
        draw = make_inputs.draw(len(batch[0]), micro_step)
        on_device, moved = move_step(batch, draw, device)
        return make_inputs.apply(on_device, moved, draw)
    on_device, _ = move_step(batch, HostDraw([]), device)
    return make_inputs(on_device, micro_step)


def _finish_trackers(accelerator: Accelerator) -> None:
    """Close the trackers but keep the process group (``end_training`` would destroy it)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _channels_last(inputs: Any) -> Any:
    """4-d tensors of a (nested) forward input in channels_last memory format."""
    if isinstance(inputs, torch.Tensor):
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.ndim == 4 else inputs
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_channels_last(x) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _channels_last(v) for k, v in inputs.items()}
    return inputs


def prepare_model(model: torch.nn.Module, accelerator: Accelerator, sync_bn: bool) -> torch.nn.Module:
    """SyncBatchNorm across processes when asked (PyTorch runs it on GPUs only)."""
    if not sync_bn:
        return model
    if accelerator.device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
