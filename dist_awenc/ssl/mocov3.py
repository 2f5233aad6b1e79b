"""MoCo v3 (Chen, Xie, He 2021, arXiv:2104.02057) as an :class:`~dist_awenc.ssl.methods.SSLMethod`.

Registered as ``moco_v3``; imported by :mod:`dist_awenc.ssl` (and by :mod:`dist_awenc.ssl.pretrain`), so the
method is in :data:`~dist_awenc.ssl.methods.METHODS` wherever methods are built.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dist_awenc.ssl.losses import mocov3_infonce
from dist_awenc.ssl.methods import BYOL, _check_temperature, register_method


@register_method("moco_v3")
class MoCoV3(BYOL):
    """MoCo v3: a query encoder with a predictor, a momentum key encoder, and the keys of the batch as negatives.

    Query = ``predictor(projector(backbone(view)))``; key = ``momentum_projector(momentum_backbone(view))``
    (frozen copies, averaged by :meth:`momentum_update`). Symmetrised loss
    ``(L(q1, k2) + L(q2, k1)) / 2`` (``loss_reduction="sum"``: the paper's ``L(q1, k2) + L(q2, k1)``; its ``2T``
    factor is left out: under AdamW, the paper's optimiser, a constant loss scale changes nothing but Adam's eps)
    with :func:`~dist_awenc.ssl.losses.mocov3_infonce`: the keys of every rank
    are gathered (no gradient), so the negatives are the rest of the global batch; there is no queue. The momentum
    follows the cosine schedule of the paper, BYOL's (:func:`~dist_awenc.ssl.methods.byol_momentum`: from
    ``momentum`` to 1; the last value used is kept in ``current_momentum``): the networks, the predictor and the
    momentum update are BYOL's, only the loss differs. The paper's heads use BatchNorm (``head_norm="batch"``) and
    a 3-layer projector (``proj_layers=3``; the default, 2, is the other methods'). Everything the method holds
    (heads, momentum encoders) is in its ``state_dict``, so a checkpoint resumes it exactly.

    Args:
        backbone, feature_dim, **head (proj_hidden_dim, proj_dim, head_norm, proj_out_norm, proj_layers, loss_reduction): see
            :class:`~dist_awenc.ssl.base.SSLMethod`.
        temperature: InfoNCE temperature (default 0.2, the paper's ViT setting).
        momentum: base momentum ``m0`` in ``[0, 1]`` (default 0.99).
        pred_hidden_dim: hidden width of the predictor (default 512).

    Shape:
        ``views: [(b, 3, H, W)] * 2`` -> ``{"loss": ()}``.
    """

    micro_batch_terms = ("MoCo v3's negatives come from each micro-batch",)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        temperature: float = 0.2,
        momentum: float = 0.99,
        pred_hidden_dim: int = 512,
        **head: Any,
    ) -> None:
        super().__init__(backbone, feature_dim, momentum=momentum, pred_hidden_dim=pred_hidden_dim, **head)
        _check_temperature(temperature, "MoCoV3")
        self.temperature = float(temperature)

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = self._check_views(views)
        q1 = self.predictor(self.projector(self.backbone(v1)))
        q2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(v1))
            k2 = self.momentum_projector(self.momentum_backbone(v2))
        loss = self._two_way(mocov3_infonce(q1, k2, self.temperature), mocov3_infonce(q2, k1, self.temperature))
        return {"loss": loss}
