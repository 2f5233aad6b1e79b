"""Self-supervised methods (SimCLR, MoCo v2, BYOL) as ``nn.Module`` s.

All methods share one interface so that the trainer and the watermark
embedding (which uses :meth:`SSLMethod.cl_loss` as its utility term ``L_CL``)
never branch on the method:

* ``Method(backbone, feature_dim, *, proj_hidden_dim=512, proj_dim=128,
  head_norm="none", <method hyper-parameters>)``; ``backbone`` maps images
  ``(b, 3, H, W)`` to features ``(b, feature_dim)``.
* ``forward(views) -> {"loss": scalar}``: the whole step (online and
  momentum branches, loss, MoCo's enqueue) happens in this single call, so the
  module can be wrapped in DDP (one forward per backward).
* ``momentum_update(progress)``: called on the *unwrapped* module after every
  optimiser step, ``progress = step / total_steps`` in ``[0, 1]``.
* ``.backbone`` is the online backbone (the encoder that is released);
  ``.method_name`` is the registry name.

Losses are symmetrised over the two views as the *mean* of the two directions,
so their scale matches the one-directional loss.

Momentum (target / key) networks are deep copies of the online backbone and
projector with ``requires_grad=False``; only their parameters are averaged, their
buffers (BatchNorm statistics) are updated by their own forward passes.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.encoders.heads import HEAD_NORMS, MLPHead
from dist_awenc.engine import dist
from dist_awenc.ssl.losses import byol_regression, moco_infonce, nt_xent

METHODS: dict[str, type["SSLMethod"]] = {}


def register_method(name: str) -> Callable[[type["SSLMethod"]], type["SSLMethod"]]:
    """Class decorator adding an :class:`SSLMethod` subclass to :data:`METHODS`.

    Sets ``cls.method_name = name``. Raises ``ValueError`` on a duplicate name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_method: name must be a non-empty string, got {name!r}")

    def decorator(cls: type["SSLMethod"]) -> type["SSLMethod"]:
        if name in METHODS:
            raise ValueError(
                f"SSL method {name!r} is already registered (by {METHODS[name].__qualname__})"
            )
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return decorator


def build_method(name: str, backbone: nn.Module, feature_dim: int, **kwargs) -> "SSLMethod":
    """Instantiate the registered method ``name``.

    Args:
        name: a key of :data:`METHODS` (``simclr``, ``moco_v2``, ``byol``).
        backbone: image encoder, ``(b, 3, H, W) -> (b, feature_dim)``.
        feature_dim: size of the backbone's output features.
        **kwargs: keyword hyper-parameters of the method's constructor.

    Returns:
        The method module. Raises ``ValueError`` for an unknown name.
    """
    if name not in METHODS:
        raise ValueError(f"unknown SSL method {name!r}; valid names: {', '.join(METHODS)}")
    return METHODS[name](backbone, feature_dim, **kwargs)


def _check_positive_int(value: object, name: str, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")


def _check_unit_interval(value: object, name: str, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: {name} must be in [0, 1], got {value!r}")


def _check_temperature(value: object, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{where}: temperature must be a positive number, got {value!r}")


def _frozen_copy(module: nn.Module) -> nn.Module:
    """Deep copy with ``requires_grad=False`` on every parameter."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def _ema_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``theta_t <- m * theta_t + (1 - m) * theta_o``: one ``_foreach_lerp_``, in the target's dtype (fp32 under DeepSpeed bf16)."""
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError(f"EMA: the target has {len(targets)} parameters, the online network {len(onlines)}")
    if targets:
        torch._foreach_lerp_(targets, [o.detach().to(t.dtype) for o, t in zip(onlines, targets)], 1.0 - momentum)


class SSLMethod(nn.Module):
    """Common base: online backbone + projector, view checking, interface.

    Args:
        backbone: image encoder, ``(b, 3, H, W) -> (b, feature_dim)``.
        feature_dim: backbone output size.
        proj_hidden_dim: hidden width of the 2-layer projector.
        proj_dim: output size of the projector.
        head_norm: ``"none"`` or ``"batch"`` normalisation in the MLP heads.
    """

    method_name: str = "base"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        head_norm: str = "none",
    ) -> None:
        super().__init__()
        where = type(self).__name__
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"{where}: backbone must be an nn.Module, got {type(backbone).__name__}")
        _check_positive_int(feature_dim, "feature_dim", where)
        _check_positive_int(proj_hidden_dim, "proj_hidden_dim", where)
        _check_positive_int(proj_dim, "proj_dim", where)
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"{where}: head_norm must be one of {', '.join(HEAD_NORMS)}; got {head_norm!r}")
        self.feature_dim = feature_dim
        self.proj_dim = proj_dim
        self.backbone = backbone
        self.projector = MLPHead(feature_dim, proj_hidden_dim, proj_dim, num_layers=2, norm=head_norm)

    def _check_views(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(views, (list, tuple)) or len(views) != 2:
            n = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
            raise ValueError(f"{type(self).__name__}: expected a list of 2 views, got {n}")
        v1, v2 = views
        if v1.shape != v2.shape:
            raise ValueError(
                f"{type(self).__name__}: the two views must have the same shape, "
                f"got {tuple(v1.shape)} and {tuple(v2.shape)}"
            )
        return v1, v2

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Args: views, a list of two ``(b, 3, H, W)`` batches (same images,
        two augmentations). Returns: ``{"loss": scalar}``."""
        raise NotImplementedError

    def cl_loss(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """The contrastive loss ``L_CL`` = ``self(views)["loss"]`` (same side
        effects as :meth:`forward`, e.g. MoCo's enqueue)."""
        return self(views)["loss"]

    def momentum_update(self, progress: float) -> None:
        """Update momentum networks after an optimiser step; no-op by default.

        Args:
            progress: ``step / total_steps`` in ``[0, 1]``.
        """
        _check_unit_interval(progress, "progress", f"{type(self).__name__}.momentum_update")


@register_method("simclr")
class SimCLR(SSLMethod):
    """SimCLR: Chen, Kornblith, Norouzi, Hinton 2020 (arXiv:2002.05709).

    ``z_v = projector(backbone(view_v))`` and the NT-Xent loss with negatives
    gathered from every rank (:func:`~dist_awenc.ssl.losses.nt_xent`). The two
    views go through the backbone separately (per-view BatchNorm statistics).

    Args:
        backbone, feature_dim, proj_hidden_dim, proj_dim, head_norm: see
            :class:`SSLMethod`.
        temperature: NT-Xent temperature (default 0.5).

    Shape:
        ``views: [(b, 3, H, W)] * 2`` -> ``{"loss": ()}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        head_norm: str = "none",
        temperature: float = 0.5,
    ) -> None:
        super().__init__(
            backbone, feature_dim, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim, head_norm=head_norm
        )
        _check_temperature(temperature, "SimCLR")
        self.temperature = float(temperature)

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = self._check_views(views)
        z1 = self.projector(self.backbone(v1))
        z2 = self.projector(self.backbone(v2))
        return {"loss": nt_xent(z1, z2, self.temperature, gather=True)}


@register_method("moco_v2")
class MoCoV2(SSLMethod):
    """MoCo v2: He et al. 2020 (arXiv:1911.05722), Chen et al. 2020 (arXiv:2003.04297).

    Query encoder = ``backbone`` + ``projector``; key encoder =
    ``momentum_backbone`` + ``momentum_projector`` (frozen copies updated by
    :meth:`momentum_update` with the fixed momentum ``m``). Symmetrised loss
    ``(InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2`` against a queue of ``K``
    normalised keys.

    **Enqueue happens inside** :meth:`forward`, after the loss is computed and
    under ``no_grad``: the keys of both views are gathered from every rank
    (:func:`~dist_awenc.engine.dist.gather_nograd`, order: view 1 of ranks
    0..W-1, then view 2 of ranks 0..W-1) and written into the ring buffer
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
        backbone, feature_dim, proj_hidden_dim, proj_dim, head_norm: see
            :class:`SSLMethod`.
        temperature: InfoNCE temperature (default 0.2).
        queue_size: number ``K`` of negatives in the queue (default 4096).
        momentum: EMA momentum ``m`` of the key encoder, in ``[0, 1]`` (default 0.99).
        queue_seed: seed of the queue initialisation.

    Shape:
        ``views: [(b, 3, H, W)] * 2`` -> ``{"loss": ()}``; ``queue: (K, proj_dim)``,
        ``queue_ptr: (1,)`` long.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        head_norm: str = "none",
        temperature: float = 0.2,
        queue_size: int = 4096,
        momentum: float = 0.99,
        queue_seed: int = 0,
    ) -> None:
        super().__init__(
            backbone, feature_dim, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim, head_norm=head_norm
        )
        _check_temperature(temperature, "MoCoV2")
        _check_positive_int(queue_size, "queue_size", "MoCoV2")
        _check_unit_interval(momentum, "momentum", "MoCoV2")
        if not isinstance(queue_seed, int) or isinstance(queue_seed, bool):
            raise ValueError(f"MoCoV2: queue_seed must be an int, got {queue_seed!r}")
        self.temperature = float(temperature)
        self.queue_size = queue_size
        self.momentum = float(momentum)

        self.momentum_backbone = _frozen_copy(self.backbone)
        self.momentum_projector = _frozen_copy(self.projector)
        gen = torch.Generator().manual_seed(queue_seed)
        queue = F.normalize(torch.randn(queue_size, proj_dim, generator=gen), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = self._check_views(views)
        q1 = self.projector(self.backbone(v1))
        q2 = self.projector(self.backbone(v2))
        with torch.no_grad():
            k1 = F.normalize(self.momentum_projector(self.momentum_backbone(v1)).float(), dim=1)
            k2 = F.normalize(self.momentum_projector(self.momentum_backbone(v2)).float(), dim=1)
        queue = self.queue.clone()  # the loss must not see this step's keys
        loss = 0.5 * (moco_infonce(q1, k2, queue, self.temperature) + moco_infonce(q2, k1, queue, self.temperature))
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
    :func:`~dist_awenc.ssl.losses.byol_regression`. After every optimiser step
    :meth:`momentum_update` applies the EMA with the cosine-scheduled momentum
    :func:`byol_momentum` (from ``momentum`` to 1); the last value used is kept
    in ``current_momentum``. The paper uses ``head_norm="batch"``.

    Args:
        backbone, feature_dim, proj_hidden_dim, proj_dim, head_norm: see
            :class:`SSLMethod`.
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
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        head_norm: str = "none",
        momentum: float = 0.99,
        pred_hidden_dim: int = 512,
    ) -> None:
        super().__init__(
            backbone, feature_dim, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim, head_norm=head_norm
        )
        _check_unit_interval(momentum, "momentum", type(self).__name__)
        _check_positive_int(pred_hidden_dim, "pred_hidden_dim", type(self).__name__)
        self.base_momentum = float(momentum)
        self.current_momentum = float(momentum)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim, num_layers=2, norm=head_norm)
        self.momentum_backbone = _frozen_copy(self.backbone)
        self.momentum_projector = _frozen_copy(self.projector)

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = self._check_views(views)
        p1 = self.predictor(self.projector(self.backbone(v1)))
        p2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            t1 = self.momentum_projector(self.momentum_backbone(v1))
            t2 = self.momentum_projector(self.momentum_backbone(v2))
        loss = 0.5 * (byol_regression(p1, t2) + byol_regression(p2, t1))
        return {"loss": loss}

    def momentum_update(self, progress: float) -> None:
        """Target EMA with ``m = byol_momentum(momentum, progress)``."""
        super().momentum_update(progress)
        m = byol_momentum(self.base_momentum, float(progress))
        _ema_(self.momentum_backbone, self.backbone, m)
        _ema_(self.momentum_projector, self.projector, m)
        self.current_momentum = m
