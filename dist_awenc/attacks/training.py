"""The small in-process training loop every training attack shares (the pirate's own loop)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from dist_awenc.data.views import ViewConfig, mild_view_config
from dist_awenc.errors import ConfigError


def mild_single_view() -> ViewConfig:
    """One mild view per image (:func:`~dist_awenc.data.views.mild_view_config` with ``n_views=1``)."""
    cfg = mild_view_config()
    cfg.n_views = 1
    return cfg


def strong_single_view() -> ViewConfig:
    """One strong view per image: random-resized crop 0.2..1 and flip, colour jitter (p 0.8), grayscale (p 0.2),
    Gaussian blur (p 0.5, sigma 0.1..2 px): the default :class:`ViewConfig` with a wider crop and blur on."""
    return ViewConfig(n_views=1, crop_scale_min=0.2, blur_p=0.5)


def batch_plan(n: int, batch_size: int, min_batch: int = 1) -> int:
    """Mini-batches per epoch: ``ceil(n / batch_size)``, less a last batch smaller than ``min_batch``."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= min_batch else 0)


def fit_steps(
    params: Iterable[nn.Parameter],
    loss_at: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    min_batch: int = 1,
    desc: str = "attack",
    progress: bool = True,
) -> list[float]:
    """Adam with a cosine-decayed learning rate over seeded random mini-batches.

    Args:
        params: the parameters to train.
        loss_at: ``(indices, step) -> scalar loss`` for the mini-batch of
            sample ``indices`` (a CPU LongTensor) at global ``step``.
        n: number of samples; each epoch visits a seeded permutation of them.
        epochs, batch_size, lr, weight_decay: the usual.
        seed: seed of the permutations.
        min_batch: a last batch smaller than this is skipped (2 for contrastive losses).
        desc, progress: the tqdm bar.

    Returns:
        The loss of every step.
    """
    per_epoch = batch_plan(n, batch_size, min_batch)
    total = epochs * per_epoch
    if total < 1:
        raise ConfigError(f"{desc}: {n} samples make no batch of at least {min_batch} (batch_size {batch_size})")
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    g = torch.Generator().manual_seed(seed)
    history: list[float] = []
    with tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for b in range(per_epoch):
                idx = perm[b * batch_size : (b + 1) * batch_size]
                loss = loss_at(idx, len(history))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history.append(float(loss.detach()))
                bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
                bar.update()
    return history
