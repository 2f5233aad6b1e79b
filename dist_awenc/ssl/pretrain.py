"""Stage: contrastive pre-training of a clean encoder (``awenc pretrain``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from dist_awenc.config import EncoderSection, PretrainConfig, to_dict, to_yaml
from dist_awenc.data import GlobalBatchSampler, ViewConfig, build_dataset, splits_for
from dist_awenc.data.decode_views import crop_spec
from dist_awenc.data.transfer import HostDraw, StepInputs
from dist_awenc.data.views import draw_views
from dist_awenc.encoders.io import Encoder, build_encoder, card_for, save_encoder, save_tensors
from dist_awenc.encoders.registry import resolve_arch_kwargs
from dist_awenc.encoders.timm_backbones import freeze_patch_embed
from dist_awenc.engine.dist import gather_objects
from dist_awenc.engine.loop import cosine_schedule, fit, make_accelerator, prepare_model
from dist_awenc.engine.optim import build_optimizer
from dist_awenc.engine.plan import Resolved, TrainPlan, loop_settings, refuse_silent_grad_accum, resolve  # noqa: F401
from dist_awenc.errors import ConfigError
from dist_awenc.data.ffcv import build_source, source_options
from dist_awenc.log import info
from dist_awenc.files import atomic_write_text
from dist_awenc.runs import RESOLVED_FILE, open_run
from dist_awenc.ssl.base import method_parameters
from dist_awenc.ssl.methods import METHODS, build_method


def encoder_from_config(enc, image_size: int) -> tuple[Encoder, str, dict]:
    """Build the pixel-space encoder an ``encoder:`` section describes.

    A backbone without a ``norm`` argument (a timm model) is built when ``encoder.norm`` is left at its default
    (any other value is an error naming what it takes); one with an ``img_size`` (a timm ViT) gets ``image_size``.
    ``encoder.freeze_patch_embed`` leaves a ViT's patch embedding untrained (an error for a net without one).
    """
    takes = resolve_arch_kwargs(enc.arch)
    explicit = {**({"norm": enc.norm} if "norm" in takes or enc.norm != EncoderSection.norm else {}),
                **({"width": enc.width} if enc.width is not None else {}),
                **({"stem": enc.stem} if enc.stem is not None else {}),
                **({"img_size": image_size} if "img_size" in takes else {})}
    kwargs = resolve_arch_kwargs(enc.arch, **explicit)
    encoder = build_encoder(enc.arch, kwargs, enc.mean, enc.std, image_size)
    if getattr(enc, "freeze_patch_embed", False):
        freeze_patch_embed(encoder.backbone, enc.arch)
    return encoder, enc.arch, kwargs


def method_from_config(ssl, enc, encoder: Encoder) -> torch.nn.Module:
    """Wrap ``encoder`` in the SSL method an ``ssl:`` section names (heads built fresh).

    A setting the method has no use for is an error where it is not at its default (``ssl.symmetric=false`` is
    MoCo v2's); a value the method refuses is a one-line ConfigError.
    """
    if ssl.method not in METHODS:
        raise ConfigError(f"unknown ssl.method '{ssl.method}'; valid: {', '.join(sorted(METHODS))}")
    kwargs: dict[str, Any] = dict(
        proj_hidden_dim=enc.proj_hidden_dim, proj_dim=enc.proj_dim, head_norm=enc.head_norm,
        proj_out_norm=getattr(enc, "proj_out_norm", "none"), proj_layers=getattr(enc, "proj_layers", 2),
        loss_reduction=ssl.loss_reduction,
        queue_size=ssl.queue_size, momentum=ssl.momentum, pred_hidden_dim=ssl.pred_hidden_dim,
    )
    if ssl.temperature is not None:
        kwargs["temperature"] = ssl.temperature
    accepted = method_parameters(METHODS[ssl.method])
    if not ssl.symmetric:
        if "symmetric" not in accepted:
            raise ConfigError(f"ssl.symmetric=false is MoCo v2's one-direction loss; {ssl.method}'s loss is symmetric "
                              "by definition (leave ssl.symmetric at true)")
        kwargs["symmetric"] = False
    try:
        return build_method(ssl.method, encoder, encoder.feature_dim, **{k: v for k, v in kwargs.items() if k in accepted})
    except ValueError as e:
        raise ConfigError(f"ssl/encoder settings: {str(e).splitlines()[0]}") from None


def micro_batch_terms(method: torch.nn.Module, contrastive: bool = True) -> list[str]:
    """What ``method`` (a trained module: SSL method or stage 2's task) takes from its whole batch, as clauses for
    :func:`~dist_awenc.engine.plan.refuse_silent_grad_accum`: the method's own terms (where its loss is computed:
    ``contrastive``), and BatchNorm statistics where a BatchNorm trains (stage 2's frozen ones do not)."""
    was = method.training
    method.train()
    terms = list(getattr(getattr(method, "method", method), "micro_batch_terms", ())) if contrastive else []
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in method.modules()):
        terms.append("BatchNorm statistics (SyncBN's too) come from each micro-batch")
    method.train(was)
    return terms


class PretrainInputs(StepInputs):
    """The loop's ``make_inputs`` of pre-training: the views of this rank's batch for a micro-step.

    The host half draws the views' parameters (:func:`~dist_awenc.data.views.draw_views`), the device half applies
    them, so the step moves nothing (:func:`~dist_awenc.data.transfer.move_step` takes the draw over with the batch).
    """

    def __init__(self, views: ViewConfig, seed: int, rank: int, world: int) -> None:
        self.views, self.seed, self.rank, self.world = views, seed, rank, world

    def draw(self, n: int, micro_step: int) -> HostDraw:
        d = draw_views(self.views, n, self.seed, micro_step, self.rank, self.world)
        return HostDraw([d.packed], d)

    def apply(self, batch, moved, draw: HostDraw) -> list[torch.Tensor]:
        return draw.host.apply(batch[0], moved[0])


def pretrain_inputs(views: ViewConfig, seed: int, rank: int, world: int) -> PretrainInputs:
    """The loop's ``make_inputs`` of pre-training (:class:`PretrainInputs`); ``make_inputs(batch, step)`` works too."""
    return PretrainInputs(views, seed, rank, world)


def pretrain(cfg: PretrainConfig, *, interrupt_at: Optional[int] = None) -> Path:
    """Pre-train an encoder; returns the path of its ``encoder.safetensors``.

    Re-running the same config on an unfinished run folder resumes it from
    its last checkpoint (``interrupt_at`` simulates a kill, for tests).
    """
    accelerator = make_accelerator(Path(cfg.run.out_dir) / cfg.run.name, cfg.train.mixed_precision, cfg.train.trackers,
                                   cfg.train.grad_accum, cfg.train.compile, cfg.train.deepspeed, cfg.optim.name)
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    indices = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "pre-training", "pretrain")["pretrain"]
    scale = resolve(cfg.optim, cfg.train, len(indices))
    plan = scale.plan
    torch.manual_seed(cfg.run.seed)
    encoder, arch, akw = encoder_from_config(cfg.encoder, cfg.data.image_size)
    method = prepare_model(method_from_config(cfg.ssl, cfg.encoder, encoder), accelerator, cfg.train.sync_bn)
    refuse_silent_grad_accum(cfg.train.grad_accum, cfg.train.grad_accum_ok, micro_batch_terms(method))
    optimizer = build_optimizer(method, cfg.optim.name, scale.lr, cfg.optim.weight_decay, cfg.optim.momentum)
    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = GlobalBatchSampler(indices, cfg.train.batch_size, seed=cfg.run.seed, rank=rank, world_size=world)

    def after_step(model, step: int) -> None:
        model.momentum_update(step / plan.total_steps)

    with open_run(cfg, "pretrain") as run_dir:
        info(f"pretrain {cfg.ssl.method} {arch} on {cfg.data.name} ({len(indices)} images, {world} process(es), "
             f"{plan.total_steps} steps) -> {run_dir}")
        note_resolved(scale, run_dir, accelerator.is_main_process)
        method = fit(
            accelerator, method, optimizer, source=build_source(dataset, indices, sampler, device=accelerator.device, gather=gather_objects, **source_options(cfg.data),
                                                crops=crop_spec(cfg.views, cfg.data.image_size, cfg.run.seed)),
            make_inputs=pretrain_inputs(cfg.views, cfg.run.seed, rank, world),
            lr_at=cosine_schedule(plan.total_steps, scale.warmup_steps, cfg.optim.min_lr_ratio, cfg.optim.schedule),
            settings=loop_settings(cfg.train, run_dir, plan, f"pretrain {cfg.ssl.method}"),
            config_yaml=to_yaml(cfg), after_step=after_step, interrupt_at=interrupt_at,
        )
        if accelerator.is_main_process:
            save_method(method, run_dir)
            card = card_for(method.backbone, arch=arch, arch_kwargs=akw, method=cfg.ssl.method, stage="pretrain",
                            parent=None, extra={"config": to_dict(cfg), "resolved": scale.record()})
            save_encoder(method.backbone, run_dir / "encoder", card)
            info(f"encoder -> {run_dir / 'encoder.safetensors'}")
        accelerator.wait_for_everyone()
    return run_dir / "encoder.safetensors"


def note_resolved(scale: Resolved, run_dir: Path, main: bool) -> None:
    """Print what the run's optim/train sections resolved to; rank 0 writes it to ``run_dir/resolved.json``."""
    info(f"resolved: {scale.summary()}")
    if main:
        atomic_write_text(run_dir / RESOLVED_FILE, json.dumps(scale.record(), indent=2) + "\n")


def save_method(method: torch.nn.Module, run_dir: Path) -> None:
    """The whole training module (heads, momentum encoders) for stages that continue it."""
    save_tensors(run_dir / "method.safetensors", dict(method.state_dict()), metadata={"method": method.method_name})
