"""How long a training stage runs (:class:`TrainPlan`), the absolute values its ``optim:`` and ``train:`` sections
resolve to at a batch and a process count (:class:`Resolved`), and the loop settings they imply.

Shared by the stages that run :func:`dist_awenc.engine.loop.fit`: pre-training
(``awenc pretrain``) and watermark embedding (``awenc embed``).

Scaling rules (docs/configuration.md): B is the optimiser's batch, ``train.batch_size`` (the global batch of one
micro-step, split over the processes) x ``train.grad_accum``. With ``optim.lr_scaling`` ``linear`` the learning
rate is ``optim.lr x B / 256``, with ``sqrt`` ``optim.lr x sqrt(B / 256)``, with ``none`` (the default) ``optim.lr``
itself. ``optim.warmup_epochs`` and ``train.checkpoint_every_epochs`` are epochs of the stage's split, rounded to
optimiser steps (a checkpoint at least every step); the step fields say the same in steps, and a section sets one
of each pair.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from dist_awenc.engine import dist
from dist_awenc.engine.loop import LoopSettings
from dist_awenc.errors import ConfigError

BASE_BATCH = 256  # optim.lr is the learning rate at this many images per optimiser step when lr_scaling is not none
DEFAULT_CHECKPOINT_EVERY = 200  # steps, where train: sets neither checkpoint_every nor checkpoint_every_epochs


@dataclass
class TrainPlan:
    """Steps and epochs a train section and a data size imply."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, train, n_samples: int, processes: Optional[int] = None) -> "TrainPlan":
        """``processes``: None for this run's (:func:`dist.world_size`); a count plans another (``awenc plan-scale``)."""
        world = dist.world_size() if processes is None else processes
        if train.batch_size < 1 or train.grad_accum < 1 or train.epochs < 1:
            raise ConfigError("train.batch_size, train.grad_accum and train.epochs must be >= 1")
        if train.batch_size % world:
            raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by the {world} processes")
        spe = n_samples // train.batch_size // train.grad_accum
        if spe < 1:
            raise ConfigError(
                f"train.batch_size={train.batch_size} x grad_accum={train.grad_accum} exceeds the {n_samples} training images"
            )
        total = spe * train.epochs
        return cls(spe, min(total, train.max_steps) if train.max_steps else total)


def scaled_lr(lr: float, scaling: str, batch: int) -> float:
    """``optim.lr`` under ``optim.lr_scaling`` at ``batch`` images per optimiser step (none: ``lr`` unchanged)."""
    if scaling == "none":
        return lr
    if scaling == "linear":
        return lr * batch / BASE_BATCH
    if scaling == "sqrt":
        return lr * math.sqrt(batch / BASE_BATCH)
    raise ConfigError(f"optim.lr_scaling must be none, linear or sqrt; got {scaling!r}")


def warmup_steps(optim, steps_per_epoch: int) -> int:
    """``optim.warmup_steps``, or ``optim.warmup_epochs`` x steps per epoch rounded."""
    if optim.warmup_epochs is None:
        return int(optim.warmup_steps)
    return int(round(optim.warmup_epochs * steps_per_epoch))


def checkpoint_steps(train, steps_per_epoch: int) -> int:
    """``train.checkpoint_every``, or ``train.checkpoint_every_epochs`` x steps per epoch rounded (>= 1), or 200."""
    if train.checkpoint_every_epochs is not None:
        return max(1, int(round(train.checkpoint_every_epochs * steps_per_epoch)))
    return int(train.checkpoint_every) if train.checkpoint_every is not None else DEFAULT_CHECKPOINT_EVERY


@dataclass(frozen=True)
class Resolved:
    """What a stage's ``optim:`` and ``train:`` sections mean at one process count: printed at start, saved as the
    run folder's ``resolved.json`` and in the encoder's card."""

    processes: int
    micro_batch: int  # images per process per micro-step
    grad_accum: int
    global_batch: int  # images per optimiser step: train.batch_size x grad_accum
    steps_per_epoch: int
    total_steps: int
    lr_scaling: str
    base_lr: float  # optim.lr as written
    lr: float  # the optimiser's peak learning rate
    warmup_steps: int
    checkpoint_every: int  # steps

    @property
    def plan(self) -> TrainPlan:
        return TrainPlan(self.steps_per_epoch, self.total_steps)

    def record(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: processes, batches, lr and its rule, warm-up and checkpoint interval in steps and epochs."""
        spe = self.steps_per_epoch
        rule = {"none": "as set", "linear": f"{self.base_lr:g} x {self.global_batch}/{BASE_BATCH}",
                "sqrt": f"{self.base_lr:g} x sqrt({self.global_batch}/{BASE_BATCH})"}[self.lr_scaling]
        accum = f" x grad_accum {self.grad_accum}" if self.grad_accum > 1 else ""
        return (f"{self.processes} process(es) x {self.micro_batch} images{accum} = {self.global_batch} a step; "
                f"{spe} steps/epoch, {self.total_steps} steps; lr {self.lr:.6g} ({rule}); warm-up {self.warmup_steps} "
                f"steps ({self.warmup_steps / spe:.3g} epochs); checkpoint every {self.checkpoint_every} steps "
                f"({self.checkpoint_every / spe:.3g} epochs)")


def resolve(optim, train, n_samples: int, processes: Optional[int] = None) -> Resolved:
    """The absolute values of ``optim:`` and ``train:`` for ``n_samples`` images an epoch on ``processes``
    (None: this run's)."""
    world = dist.world_size() if processes is None else processes
    plan = TrainPlan.of(train, n_samples, world)
    batch = train.batch_size * train.grad_accum
    return Resolved(processes=world, micro_batch=train.batch_size // world, grad_accum=train.grad_accum,
                    global_batch=batch, steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps,
                    lr_scaling=optim.lr_scaling, base_lr=optim.lr, lr=scaled_lr(optim.lr, optim.lr_scaling, batch),
                    warmup_steps=warmup_steps(optim, plan.steps_per_epoch),
                    checkpoint_every=checkpoint_steps(train, plan.steps_per_epoch))


def scale_table(optim, train, n_samples: int, per_process_batch: int, processes: tuple[int, ...] = (8, 32, 64)
                ) -> list[Resolved]:
    """:func:`resolve` at ``per_process_batch`` images per process (a GPU) for each count in ``processes``."""
    if per_process_batch < 1:
        raise ConfigError(f"the per-GPU batch must be >= 1; got {per_process_batch}")
    out = []
    for n in processes:
        if n < 1:
            raise ConfigError(f"GPU counts must be >= 1; got {n}")
        out.append(resolve(optim, replace(train, batch_size=per_process_batch * n), n_samples, n))
    return out


def format_table(rows: list[Resolved]) -> str:
    """A markdown table of :func:`scale_table`'s rows."""
    head = ("| GPUs | per GPU | grad_accum | batch | steps/epoch | steps | lr | warm-up steps | checkpoint every (steps) |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r.processes} | {r.micro_batch} | {r.grad_accum} | {r.global_batch} | {r.steps_per_epoch} | {r.total_steps} "
        f"| {r.lr:.6g} | {r.warmup_steps} | {r.checkpoint_every} |\n" for r in rows)


def refuse_silent_grad_accum(grad_accum: int, ok: bool, reasons: list[str], where: str = "train") -> None:
    """``grad_accum > 1`` where the method's batch is the micro-batch (``reasons``: clauses such as "SimCLR's
    negatives come from each micro-batch") is refused in one line unless ``<where>.grad_accum_ok`` is set."""
    if grad_accum > 1 and reasons and not ok:
        raise ConfigError(f"{where}.grad_accum={grad_accum} would change what the method computes: {'; '.join(reasons)}, "
                          f"not from the optimiser's {grad_accum}x larger batch; lower {where}.batch_size with "
                          f"optim.lr_scaling instead, or set {where}.grad_accum_ok=true if that is meant")


def loop_settings(train, run_dir: Path, plan: TrainPlan, desc: str) -> LoopSettings:
    return LoopSettings(run_dir=run_dir, total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                        grad_accum=train.grad_accum, checkpoint_every=checkpoint_steps(train, plan.steps_per_epoch),
                        keep_checkpoints=train.keep_checkpoints, log_every=train.log_every,
                        progress=train.progress, desc=desc, micro_batch=train.batch_size // dist.world_size(),
                        channels_last=train.channels_last)


def plan_scale(stage: str, config: Optional[str], overrides: list[str], per_gpu_batch: Optional[int] = None,
               gpus: tuple[int, ...] = (8, 32, 64), images: Optional[int] = None) -> str:
    """``awenc plan-scale``: the lr, warm-up and checkpoint interval a training stage's config resolves to at
    ``per_gpu_batch`` images per GPU on each of ``gpus`` (default per-GPU batch: ``train.batch_size`` / 8, the
    shipped recipes' one node), for ``images`` an epoch (default: the config's pre-training split, counted)."""
    from dist_awenc.config import load_config
    from dist_awenc.stages import schema

    if stage not in ("pretrain", "embed"):
        raise ConfigError(f"plan-scale plans the training stages pretrain and embed, not '{stage}'")
    cfg = load_config(schema(stage), config, overrides)
    if per_gpu_batch is None:
        if cfg.train.batch_size % 8:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not 8 GPUs' worth: pass --per-gpu-batch")
        per_gpu_batch = cfg.train.batch_size // 8
    if images is None:
        images = _split_images(cfg.data)
    lines = [f"{stage} {config or '(defaults)'}: {images} images an epoch, {per_gpu_batch} images per GPU, "
             f"optim.lr={cfg.optim.lr:g} lr_scaling={cfg.optim.lr_scaling}", ""]
    rows, refused = [], []
    for n in gpus:
        try:
            rows += scale_table(cfg.optim, cfg.train, images, per_gpu_batch, (n,))
        except ConfigError as e:
            refused.append(f"{n} GPUs: {e}")
    return "\n".join(lines) + format_table(rows) + "".join(f"\n{r}" for r in refused)


def _split_images(data) -> int:
    """Images in the pre-training split of a ``data:`` section (the split pre-training and embedding train on)."""
    from dist_awenc.data import build_dataset, splits_for

    if data.name == "imagefolder" and not data.root:
        raise ConfigError("data.root is not set: pass --images (ImageNet-1k's train set: 1281167, 98% of it "
                          "pre-trains in the shipped recipes: --images 1255544) or data.root=")
    dataset = build_dataset(data.name, root=data.root, image_size=data.image_size, seed=data.split_seed, size=data.size)
    return len(splits_for(len(dataset), data.split_seed, data.splits, "plan-scale", "pretrain")["pretrain"])
