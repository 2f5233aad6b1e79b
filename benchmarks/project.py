"""The project's side of a step benchmark: its configs, modules and loop, timed without a data loader.

:func:`project_case` builds what ``awenc pretrain`` / ``awenc embed`` build
from a config file (same helpers: ``encoder_from_config``,
``method_from_config``, ``build_optimizer``, ``make_accelerator``,
``loop_settings``, and the stage's own ``make_inputs``: ``pretrain_inputs`` /
``embed_inputs``, whose views ``fit`` makes inside the step), and
:func:`run_fit` runs the real :func:`dist_awenc.engine.loop.fit` on an
in-memory batch source already on the device,
reading the clock at block boundaries from the loop's ``after_step`` hook.
Between two project blocks the hook runs one block of the reference, so the
two alternate in the same process on the same device.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from benchmarks.common import REPO, Context

PRETRAIN_CONFIGS = {
    "resnet18_cifar32": {m: "configs/pretrain/cifar10_resnet18_simclr.yaml" for m in ("simclr", "moco_v2", "byol")},
    "resnet50_in224": {m: f"configs/pretrain/imagenet_resnet50_{m}.yaml" for m in ("simclr", "moco_v2", "byol")},
}
IMAGE_SIZE = {"resnet18_cifar32": 32, "resnet50_in224": 224}
# used where an ImageNet config file is missing: the CIFAR file with these overrides
R50_FALLBACK = ["encoder.arch=resnet50", "encoder.stem=imagenet", "encoder.mean=[0.485,0.456,0.406]",
                "encoder.std=[0.229,0.224,0.225]", "encoder.proj_hidden_dim=2048", "encoder.proj_dim=128"]
MODES = {  # mixed precision, channels_last, torch.compile
    "fp32": ("no", False, False),
    "bf16_cl": ("bf16", True, False),
    "bf16_cl_compile": ("bf16", True, True),
}


def project_features() -> dict[str, bool]:
    """Which speed options this checkout of the project has (they are being added while benchmarks exist)."""
    from dist_awenc.config import TrainSection
    from dist_awenc.engine import loop

    t = TrainSection()
    loop_fields = {f.name for f in dataclasses.fields(loop.LoopSettings)}
    return {
        "channels_last": hasattr(t, "channels_last") and "channels_last" in loop_fields,
        "compile": hasattr(t, "compile") and "compile" in inspect.signature(loop.make_accelerator).parameters,
        "sync_bn": hasattr(t, "sync_bn"),
        "prepare_model": hasattr(loop, "prepare_model"),
        "checkpoint_epochs": hasattr(t, "checkpoint_every_epochs"),  # train.checkpoint_every_epochs (#31)
    }


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def pretrain_config(model: str, method: str, *, batch: int, mode: str, out_dir: Path, extra: list[str] = ()):
    """The PretrainConfig ``awenc pretrain --config <file> <overrides>`` would resolve for this case."""
    from dist_awenc.config import PretrainConfig, load_config

    base = "simclr" if method == "embed" else method
    path = REPO / PRETRAIN_CONFIGS[model][base]
    overrides: list[str] = []
    if not path.exists() and model == "resnet50_in224":
        path = REPO / PRETRAIN_CONFIGS["resnet18_cifar32"]["simclr"]
        overrides += R50_FALLBACK
    overrides += [f"ssl.method={base}", f"data.image_size={IMAGE_SIZE[model]}", f"train.batch_size={batch}",
                  "train.progress=false", f"run.out_dir={out_dir}", *speed_overrides(mode)]
    cfg = load_config(PretrainConfig, path, [*overrides, *extra])
    return cfg, str(path.relative_to(REPO))


def speed_overrides(mode: str, *, keep_sync_bn: bool = False) -> list[str]:
    """The ``train.*`` overrides of a mode (precision, channels_last, compile), for the options this checkout has;
    SyncBatchNorm off (one process) unless ``keep_sync_bn`` (then the config's value stands)."""
    mp, cl, comp = MODES[mode]
    feats = project_features()
    over = [f"train.mixed_precision='{mp}'"]
    if feats["channels_last"]:
        over.append(f"train.channels_last={str(cl).lower()}")
    if feats["compile"]:
        over.append(f"train.compile={str(comp).lower()}")
    if feats["sync_bn"] and not keep_sync_bn:
        over.append("train.sync_bn=false")
    return over


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_project_accelerator(cfg, run_dir: Path, compile: bool):
    """The project's ``make_accelerator``; torch.compile through its option, else through Accelerate's env."""
    from dist_awenc.engine.loop import make_accelerator

    params = inspect.signature(make_accelerator).parameters
    kw: dict[str, Any] = {}
    if "grad_accum" in params:
        kw["grad_accum"] = cfg.train.grad_accum
    if "compile" in params:
        kw["compile"] = compile
        return make_accelerator(run_dir, cfg.train.mixed_precision, [], **kw)
    with _env(ACCELERATE_DYNAMO_BACKEND="INDUCTOR" if compile else "NO"):
        return make_accelerator(run_dir, cfg.train.mixed_precision, [], **kw)


@dataclass
class ProjectCase:
    """What ``pretrain()`` / ``embed()`` hand to ``fit``, plus the sections the reference is built from."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    make_inputs: Callable[[tuple, int], Any]
    after_step: Callable[[torch.nn.Module, int], None]
    cfg: Any  # the stage config (its train and optim sections drive the loop)
    embed: Optional[dict] = None  # delta, key, weights, freeze_bn for the reference


def random_secret(image_size: int, seed: int = 0):
    from dist_awenc.watermark.secret import Secret

    g = torch.Generator().manual_seed(seed)
    eps = 16 / 255
    key = torch.rand(3, image_size, image_size, generator=g)
    delta = (torch.rand(3, image_size, image_size, generator=g) * 2 - 1) * eps
    return Secret(key=key, delta=delta, eps=eps, control_seed=seed + 7919)


def random_alternatives(image_size: int, count: int):
    """``count`` random alternative secrets (keys, deltas within 16/255) for a stage-2 case's specificity term."""
    from dist_awenc.watermark.secret import AlternativeSecrets

    g = torch.Generator().manual_seed(1)
    keys = torch.rand(count, 3, image_size, image_size, generator=g)
    deltas = (torch.rand(count, 3, image_size, image_size, generator=g) * 2 - 1) * (16 / 255)
    return AlternativeSecrets(keys=keys, deltas=deltas, seeds=list(range(count)),
                              control_seeds=list(range(10_000, 10_000 + count)))


def project_case(cfg, method: str, total_steps: int, accelerator, device: Optional[torch.device] = None,
                 embed_cfg: Any = None) -> ProjectCase:
    """Mirror of the set-up in ``ssl/pretrain.py:pretrain`` (or ``watermark/embed.py:embed``) for one process.

    ``make_inputs`` is the stage's own (``pretrain_inputs`` / ``embed_inputs``, rank 0 of 1); ``device`` (default: the
    accelerator's) is where the embedding step's key lives, as ``embed()`` puts it. ``embed_cfg``: the EmbedConfig
    of the embedding step (its views, loss, optimiser, train, ``robust`` and ``shadow`` sections; f0 is still built
    from ``cfg.encoder``); None: stage 2's defaults on ``cfg``'s views, ssl, data, train and run sections.
    """
    from dist_awenc.engine import loop
    from dist_awenc.engine.optim import build_optimizer
    from dist_awenc.ssl.pretrain import encoder_from_config, method_from_config, pretrain_inputs

    device = device or (accelerator.device if accelerator is not None else torch.device("cpu"))

    def prepared(m):
        if hasattr(loop, "prepare_model"):
            return loop.prepare_model(m, accelerator, getattr(cfg.train, "sync_bn", False))
        return m

    torch.manual_seed(cfg.run.seed)
    encoder, arch, arch_kwargs = encoder_from_config(cfg.encoder, cfg.data.image_size)
    if method != "embed":
        ssl_model = prepared(method_from_config(cfg.ssl, cfg.encoder, encoder))
        optimizer = build_optimizer(ssl_model, cfg.optim.name, optimizer_lr(cfg.optim, cfg.train), cfg.optim.weight_decay,
                                    cfg.optim.momentum)
        return ProjectCase(ssl_model, optimizer, pretrain_inputs(cfg.views, cfg.run.seed, 0, 1),
                           lambda m, step: m.momentum_update(step / total_steps), cfg)

    from dist_awenc.config import EmbedConfig
    from dist_awenc.watermark.embed import EmbedTask, embed_inputs
    from dist_awenc.watermark.shadow import Shadow, build_shadow
    from dist_awenc.watermark.specific import Specificity
    from dist_awenc.watermark.transforms import TransformParams

    if embed_cfg is None:
        ecfg = EmbedConfig()  # stage-2 defaults (loss weights, mild views, optimiser) on the pre-training sections
        ecfg.views, ecfg.ssl, ecfg.data, ecfg.train, ecfg.run = cfg.views, cfg.ssl, cfg.data, cfg.train, cfg.run
    else:
        ecfg = embed_cfg
    secret = random_secret(cfg.data.image_size)
    f = copy.deepcopy(encoder)
    method_module = method_from_config(ecfg.ssl, cfg.encoder, f)
    loss_kw = {k: getattr(ecfg.loss, k) for k in ("lambda_cl", "lambda_wm", "lambda_dev", "lambda_key", "lambda_keep", "freeze_bn")}
    shadow = None
    if ecfg.shadow.weight > 0:  # as embed() builds it: a fresh student of f0's architecture (or shadow.arch)
        card = {"arch": arch, "arch_kwargs": arch_kwargs}
        shadow = Shadow(build_shadow(encoder, card, ecfg.shadow.arch, ecfg.run.seed), ecfg.run.seed, ecfg.shadow.arch, card)
    specific = None
    if ecfg.specific.weight > 0:  # as embed() builds it, on random alternatives (their values cost nothing here)
        specific = Specificity(random_alternatives(cfg.data.image_size, max(ecfg.specific.secrets, 19)),
                               ecfg.specific.secrets, ecfg.specific.images, ecfg.specific.suppress)
    task = prepared(EmbedTask(method_module, encoder, secret, shadow=shadow, lambda_shadow=ecfg.shadow.weight,
                              specific=specific, lambda_specific=ecfg.specific.weight, **loss_kw))
    optimizer = build_optimizer(task, ecfg.optim.name, optimizer_lr(ecfg.optim, ecfg.train), ecfg.optim.weight_decay,
                                ecfg.optim.momentum)
    make_inputs = embed_inputs(ecfg.views, ecfg.mild_views, secret.key.to(device), ecfg.run.seed, 0, 1,
                               TransformParams.of(ecfg.robust),
                               (len(specific.keys), specific.secrets) if specific is not None else None)
    weights = {"cl": ecfg.loss.lambda_cl, "wm": ecfg.loss.lambda_wm, "dev": ecfg.loss.lambda_dev,
               "key": ecfg.loss.lambda_key, "keep": ecfg.loss.lambda_keep}
    refresh = ecfg.shadow.refresh  # embed()'s hook: momentum encoders, then the shadow's restart every `refresh` steps
    return ProjectCase(task, optimizer, make_inputs, lambda m, step: m.after_step(step, total_steps, refresh), ecfg,
                       embed={"delta": secret.delta, "key": secret.key, "weights": weights, "freeze_bn": ecfg.loss.freeze_bn,
                              "optim": ecfg.optim})


def optimizer_lr(optim, train) -> float:
    """The learning rate ``pretrain()`` gives the optimiser: ``optim.lr`` under ``optim.lr_scaling`` at the batch
    (checkouts without scaling rules: ``optim.lr``)."""
    try:
        from dist_awenc.engine.plan import scaled_lr
    except ImportError:
        return optim.lr
    return scaled_lr(optim.lr, getattr(optim, "lr_scaling", "none"), train.batch_size * train.grad_accum)


def fixed_images(case: ProjectCase, batch: int, device) -> torch.Tensor:
    """The benchmark's fixed batch on ``device``: (b, 3, S, S), or the loader's decode-time views (b, V, 3, S, S)
    when pre-training cuts them there (``views.crop=decode``, the ImageNet recipes): the step then only flips
    and colours, as in a real run."""
    s, v = case.cfg.data.image_size, case.cfg.views
    shape = (batch, v.n_views, 3, s, s) if case.embed is None and v.crop == "decode" else (batch, 3, s, s)
    return torch.rand(*shape, device=device)


class FixedBatchSource:
    """A BatchSource yielding one fixed batch (already on the device) forever: no loader in the timing."""

    def __init__(self, images: torch.Tensor) -> None:
        self.batch = (images, torch.zeros(len(images), dtype=torch.long, device=images.device),
                      torch.arange(len(images), device=images.device))

    def iterate(self, epoch: int, start: int):
        while True:
            yield self.batch


class _Done(Exception):
    pass


def run_fit(ctx: Context, case: ProjectCase, accelerator, images: torch.Tensor, run_dir: Path, *, warmup: int, steps: int,
            reps: int, between: Optional[Callable[[int], None]] = None) -> list[float]:
    """Run the project's ``fit`` for ``warmup + reps * steps`` steps; seconds of each block of ``steps``.

    ``between(k)`` runs (untimed for the project) before project block ``k``:
    the reference's blocks. ``fit`` is stopped from the hook after the last
    block, before its final checkpoint (which is not part of a step).
    """
    from dist_awenc.engine.loop import cosine_schedule, fit
    from dist_awenc.ssl.pretrain import TrainPlan, loop_settings

    o = case.cfg.optim

    total = warmup + reps * steps
    plan = TrainPlan(steps_per_epoch=10**9, total_steps=total)
    settings = loop_settings(case.cfg.train, run_dir, plan, "bench")
    settings.checkpoint_every = 10**9
    settings.progress = False
    bounds = {warmup + k * steps: k for k in range(reps + 1)}
    seconds: list[float] = []
    t0 = [0.0]

    def after_step(model, step: int) -> None:
        case.after_step(model, step)
        k = bounds.get(step)
        if k is None:
            return
        ctx.sync()
        now = time.perf_counter()
        if k > 0:
            seconds.append(now - t0[0])
        if k == reps:
            raise _Done
        if between is not None:
            between(k)
        ctx.sync()
        t0[0] = time.perf_counter()

    try:
        fit(accelerator, case.model, case.optimizer, source=FixedBatchSource(images), make_inputs=case.make_inputs,
            lr_at=cosine_schedule(total, o.warmup_steps, o.min_lr_ratio, o.schedule),
            settings=settings, config_yaml="bench: true\n", after_step=after_step)
    except _Done:
        pass
    return seconds
