"""Self-supervised methods (SimCLR, MoCo v2, BYOL) as ``nn.Module`` s.

The interface they share, the registry and the helpers are in :mod:`dist_awenc.ssl.base` (re-exported here);
MoCo v3 is in :mod:`dist_awenc.ssl.mocov3`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.encoders.heads import MLPHead
from dist_awenc.engine import dist
from dist_awenc.ssl.base import (  # noqa: F401  (re-exported: the registry and helpers' historical home)
    LOSS_REDUCTIONS,
    METHODS,
    SSLMethod,
    _check_positive_int,
    _check_temperature,
    _check_unit_interval,
    _ema_,
    _frozen_copy,
    build_method,
    register_method,
)
from dist_awenc.ssl.losses import byol_regression, moco_infonce, nt_xent


@register_method("simclr")
class SimCLR(SSLMethod):
    """SimCLR: Chen, Kornblith, Norouzi, Hinton 2020 (arXiv:2002.05709).

    ``z_v = projector(backbone(view_v))`` and the NT-Xent loss with negatives
    gathered from every rank (:func:`~dist_awenc.ssl.losses.nt_xent`). The two
    views go through the backbone separately (per-view BatchNorm statistics).

    Loss scale: :func:`nt_xent` is the mean over the 2N anchors, the paper's Algorithm 1 (``1/2N sum_k [l(2k-1, 2k)
    + l(2k, 2k-1)]``), i.e. the mean of the two directions (``loss_reduction="mean"``). The released code
    (google-research/simclr ``add_contrastive_loss``: ``loss_a + loss_b``, each a mean over N) sums them, twice
    that, and its LARS recipe (0.3 x B/256, weight decay 1e-6) was tuned at that scale: ``loss_reduction="sum"``
    (configs/pretrain/imagenet_resnet50_simclr.yaml). SimCLR v1's ImageNet projector ends in BatchNorm
    (``proj_out_norm="batch"``).

    Args:
        backbone, feature_dim, **head (proj_hidden_dim, proj_dim, head_norm, proj_out_norm, proj_layers, loss_reduction): see
            :class:`~dist_awenc.ssl.base.SSLMethod`.
        temperature: NT-Xent temperature (default 0.5).

    Shape:
        ``views: [(b, 3, H, W)] * 2`` -> ``{"loss": ()}``.
    """

    micro_batch_terms = ("SimCLR's negatives come from each micro-batch",)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.5,
        **head: Any,
    ) -> None:
        super().__init__(backbone, feature_dim, **head)
        _check_temperature(temperature, "SimCLR")
        self.temperature = float(temperature)

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = self._check_views(views)
        z1 = self.projector(self.backbone(v1))
        z2 = self.projector(self.backbone(v2))
        loss = nt_xent(z1, z2, self.temperature, gather=True)  # the mean of the two directions
        return {"loss": loss if self.loss_reduction == "mean" else 2.0 * loss}


@register_method("moco_v2")
class MoCoV2(SSLMethod):
    """MoCo v2: He et al. 2020 (arXiv:1911.05722), Chen et al. 2020 (arXiv:2003.04297).

    Query encoder = ``backbone`` + ``projector``; key encoder =
    ``momentum_backbone`` + ``momentum_projector`` (frozen copies updated by
    :meth:`momentum_update` with the fixed momentum ``m``). Symmetrised loss
    ``(InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2`` against a queue of ``K``
    normalised keys (``symmetric=True``, the default: this project's digits recipes), or the papers' loss
    ``InfoNCE(q1, k2)`` alone (``symmetric=False``: half the encoder passes of a step, one key per image enqueued;
    the compute the papers' 200-epoch figures count, configs/pretrain/imagenet_resnet50_moco_v2.yaml).

    **Enqueue happens inside** :meth:`forward`, after the loss is computed and
    under ``no_grad``: the keys of both views are gathered from every rank
    (:func:`~dist_awenc.engine.dist.gather_nograd`, order: view 1 of ranks
    0..W-1, then view 2 of ranks 0..W-1; ``symmetric=False``: view 2's keys only) and written into the ring buffer
    ``queue`` at ``queue_ptr`` (wrapping around; if more than ``K`` keys arrive
    only the last ``K`` are kept). Every rank therefore holds the same queue,
    equal to that of one process on the concatenated batch. Enqueue happens
    only in training mode (``self.training``), so evaluating ``L_CL`` in
    eval mode leaves the queue untouched.

    The queue starts as random normalised vectors from a generator seeded with
    ``queue_seed`` (identical on all ranks).

    Shuffle-BN (He et al. 2020, Sec. 3.3) is **not** implemented: the key
    encoder sees the local batch in order. Use ``head_norm="none"`` and/or a
    backbone without BatchNorm (or SyncBN) if information leakage through BN
    statistics matters.

    Args:
        backbone, feature_dim, **head (proj_hidden_dim, proj_dim, head_norm, proj_out_norm, proj_layers, loss_reduction): see
            :class:`~dist_awenc.ssl.base.SSLMethod`.
        temperature: InfoNCE temperature (default 0.2).
        queue_size: number ``K`` of negatives in the queue (default 4096).
        momentum: EMA momentum ``m`` of the key encoder, in ``[0, 1]`` (default 0.99).
        queue_seed: seed of the queue initialisation.
        symmetric: both directions (True) or the papers' one (False).

    Shape:
        ``views: [(b, 3, H, W)] * 2`` -> ``{"loss": ()}``; ``queue: (K, proj_dim)``,
        ``queue_ptr: (1,)`` long.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor
    micro_batch_terms = ("MoCo v2's queue takes each micro-batch's keys (a step's later micro-batches see its earlier "
                         "ones' keys as negatives)",)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.2,
        queue_size: int = 4096,
        momentum: float = 0.99,
        queue_seed: int = 0,
        symmetric: bool = True,
        **head: Any,
    ) -> None:
        super().__init__(backbone, feature_dim, **head)
        _check_temperature(temperature, "MoCoV2")
        _check_positive_int(queue_size, "queue_size", "MoCoV2")
        _check_unit_interval(momentum, "momentum", "MoCoV2")
        if not isinstance(queue_seed, int) or isinstance(queue_seed, bool):
            raise ValueError(f"MoCoV2: queue_seed must be an int, got {queue_seed!r}")
        if not isinstance(symmetric, bool):
            raise ValueError(f"MoCoV2: symmetric must be a bool, got {symmetric!r}")
        if not symmetric and self.loss_reduction != "mean":
            raise ValueError("MoCoV2: loss_reduction sums two directions; symmetric=False has one (leave it at mean)")
        self.symmetric = symmetric
        self.temperature = float(temperature)
        self.queue_size = queue_size
        self.momentum = float(momentum)

        self.momentum_backbone = _frozen_copy(self.backbone)
        self.momentum_projector = _frozen_copy(self.projector)
        gen = torch.Generator().manual_seed(queue_seed)
        queue = F.normalize(torch.randn(queue_size, self.proj_dim, generator=gen), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = self._check_views(views)
        if not self.symmetric:  # the papers' step: query of view 1, key of view 2
            q1 = self.projector(self.backbone(v1))
            with torch.no_grad():
                k2 = F.normalize(self.momentum_projector(self.momentum_backbone(v2)).float(), dim=1)
            loss = moco_infonce(q1, k2, self.queue.clone(), self.temperature)
            if self.training:
                self._dequeue_and_enqueue(k2)
            return {"loss": loss}
        q1 = self.projector(self.backbone(v1))
        q2 = self.projector(self.backbone(v2))
        with torch.no_grad():
            k1 = F.normalize(self.momentum_projector(self.momentum_backbone(v1)).float(), dim=1)
            k2 = F.normalize(self.momentum_projector(self.momentum_backbone(v2)).float(), dim=1)
        queue = self.queue.clone()  # the loss must not see this step's keys
        loss = self._two_way(moco_infonce(q1, k2, queue, self.temperature), moco_infonce(q2, k1, queue, self.temperature))
        if self.training:
            self._dequeue_and_enqueue(k1, k2)
        return {"loss": loss}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, *keys: torch.Tensor) -> None:
        """Write the keys of all ranks into the ring buffer.

        Args:
            keys: one local ``(b, proj_dim)`` tensor per view (normalised).
        """
        stacked = torch.stack(keys, dim=1)  # (b, V, d)
        gathered = dist.gather_nograd(stacked)  # (W*b, V, d)
        new = gathered.transpose(0, 1).reshape(-1, stacked.shape[-1])  # view-major
        new = new[-self.queue_size:].to(self.queue.dtype)
        # tensor arithmetic on the pointer: no host synchronisation on GPU
        idx = (self.queue_ptr + torch.arange(new.shape[0], device=self.queue.device)) % self.queue_size
        self.queue.index_copy_(0, idx, new)
        self.queue_ptr.add_(new.shape[0]).remainder_(self.queue_size)

    def momentum_update(self, progress: float) -> None:
        """Key encoder EMA with the fixed momentum ``m`` (``progress`` is only checked)."""
        super().momentum_update(progress)
        _ema_(self.momentum_backbone, self.backbone, self.momentum)
        _ema_(self.momentum_projector, self.projector, self.momentum)


def byol_momentum(base_momentum: float, progress: float) -> float:
    """BYOL's cosine momentum schedule (Grill et al. 2020, Sec. 3.2).

    ``m = 1 - (1 - m0) * (cos(pi * progress) + 1) / 2``: ``m0`` at
    ``progress = 0``, ``1`` at ``progress = 1``.
    """
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


@register_method("byol")
class BYOL(SSLMethod):
    """BYOL: Grill et al. 2020, "Bootstrap Your Own Latent" (arXiv:2006.07733).

    Online network = ``backbone`` + ``projector`` + ``predictor``; target
    network = ``momentum_backbone`` + ``momentum_projector`` (frozen copies).
    Loss ``(L(p1, z2') + L(p2, z1')) / 2`` with
    :func:`~dist_awenc.ssl.losses.byol_regression` (``loss_reduction="mean"``); the paper sums the two
    (``L + L~``, Sec. 3.2; ``loss_reduction="sum"``, configs/pretrain/imagenet_resnet50_byol.yaml), twice the
    gradient, the scale its LARS recipe (0.2 x B/256, weight decay 1.5e-6) was tuned at. After every optimiser step
    :meth:`momentum_update` applies the EMA with the cosine-scheduled momentum
    :func:`byol_momentum` (from ``momentum`` to 1); the last value used is kept
    in ``current_momentum``. The paper uses ``head_norm="batch"``.

    Args:
        backbone, feature_dim, **head (proj_hidden_dim, proj_dim, head_norm, proj_out_norm, proj_layers, loss_reduction): see
            :class:`~dist_awenc.ssl.base.SSLMethod`.
        momentum: base momentum ``m0`` in ``[0, 1]`` (default 0.99).
        pred_hidden_dim: hidden width of the predictor (default 512).

    Shape:
        ``views: [(b, 3, H, W)] * 2`` -> ``{"loss": ()}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        momentum: float = 0.99,
        pred_hidden_dim: int = 512,
        **head: Any,
    ) -> None:
        super().__init__(backbone, feature_dim, **head)
        _check_unit_interval(momentum, "momentum", type(self).__name__)
        _check_positive_int(pred_hidden_dim, "pred_hidden_dim", type(self).__name__)
        self.base_momentum = float(momentum)
        self.current_momentum = float(momentum)
        self.predictor = MLPHead(self.proj_dim, pred_hidden_dim, self.proj_dim, num_layers=2, norm=self.head_norm)
        self.momentum_backbone = _frozen_copy(self.backbone)
        self.momentum_projector = _frozen_copy(self.projector)

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = self._check_views(views)
        p1 = self.predictor(self.projector(self.backbone(v1)))
        p2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            t1 = self.momentum_projector(self.momentum_backbone(v1))
            t2 = self.momentum_projector(self.momentum_backbone(v2))
        loss = self._two_way(byol_regression(p1, t2), byol_regression(p2, t1))
        return {"loss": loss}

    def momentum_update(self, progress: float) -> None:
        """Target EMA with ``m = byol_momentum(momentum, progress)``."""
        super().momentum_update(progress)
        m = byol_momentum(self.base_momentum, float(progress))
        _ema_(self.momentum_backbone, self.backbone, m)
        _ema_(self.momentum_projector, self.projector, m)
        self.current_momentum = m
