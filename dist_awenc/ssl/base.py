"""The interface every self-supervised method shares (:class:`SSLMethod`), its registry, and their helpers.

All methods share one interface so that the trainer and the watermark
embedding (which uses :meth:`SSLMethod.cl_loss` as its utility term ``L_CL``)
never branch on the method:

* ``Method(backbone, feature_dim, *, proj_hidden_dim=512, proj_dim=128, head_norm="none",
  proj_out_norm="none", proj_layers=2, loss_reduction="mean", <method hyper-parameters>)``; ``backbone`` maps
  images ``(b, 3, H, W)`` to features ``(b, feature_dim)``.
* ``forward(views) -> {"loss": scalar}``: the whole step (online and
  momentum branches, loss, MoCo's enqueue) happens in this single call, so the
  module can be wrapped in DDP (one forward per backward).
* ``momentum_update(progress)``: called on the *unwrapped* module after every
  optimiser step, ``progress = step / total_steps`` in ``[0, 1]``.
* ``.backbone`` is the online backbone (the encoder that is released);
  ``.method_name`` is the registry name; ``micro_batch_terms`` names what the method computes over its batch (what
  gradient accumulation would take from each micro-batch instead of the optimiser's batch).

A symmetrised loss (view 1 -> 2 and 2 -> 1) combines its two directions by ``loss_reduction``: ``mean`` (the
default, the one-direction scale every digits recipe was tuned at) or ``sum`` (BYOL's and MoCo v3's papers, and
SimCLR's released code: twice the gradient, which matters beside LARS's weight decay; docs/configuration.md).

Momentum (target / key) networks are deep copies of the online backbone and
projector with ``requires_grad=False``; only their parameters are averaged, their
buffers (BatchNorm statistics) are updated by their own forward passes.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dist_awenc.encoders.heads import HEAD_NORMS, MLPHead

LOSS_REDUCTIONS = ("mean", "sum")
PROJ_LAYERS = (2, 3)  # Linear layers of the projector: 2 (SimCLR, MoCo v2, BYOL), 3 (MoCo v3; SimCLR v2)

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


def method_parameters(cls: type) -> set[str]:
    """The keyword arguments an SSL method class accepts: its ``__init__``'s, and through a ``**head`` the ones of the
    classes it passes them on to (down to :class:`SSLMethod`'s projector and loss options)."""
    import inspect

    names: set[str] = set()
    for c in cls.__mro__:
        if "__init__" not in vars(c):
            continue
        params = inspect.signature(c.__init__).parameters
        names |= {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


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
        proj_hidden_dim: hidden width of the projector.
        proj_dim: output size of the projector.
        head_norm: ``"none"`` or ``"batch"`` normalisation in the MLP heads.
        proj_out_norm: ``"none"`` or ``"batch"``: BatchNorm on the projector's output (SimCLR v1's ImageNet head).
        proj_layers: ``2`` or ``3`` Linear layers in the projector (3: MoCo v3's, each hidden one followed by the
            ``head_norm`` and a ReLU).
        loss_reduction: ``"mean"`` or ``"sum"`` of the two directions of a symmetrised loss.
    """

    method_name: str = "base"
    # what the loss takes from the whole batch besides BatchNorm (gradient accumulation would take it from each
    # micro-batch): clauses for the refusal of engine/plan.py's refuse_silent_grad_accum
    micro_batch_terms: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        head_norm: str = "none",
        proj_out_norm: str = "none",
        proj_layers: int = 2,
        loss_reduction: str = "mean",
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
        if proj_out_norm not in HEAD_NORMS:
            raise ValueError(f"{where}: proj_out_norm must be one of {', '.join(HEAD_NORMS)}; got {proj_out_norm!r}")
        if proj_layers not in PROJ_LAYERS or isinstance(proj_layers, bool):
            raise ValueError(f"{where}: proj_layers must be one of {', '.join(map(str, PROJ_LAYERS))}; got {proj_layers!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"{where}: loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}; got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.feature_dim = feature_dim
        self.proj_dim, self.head_norm = proj_dim, head_norm
        self.backbone = backbone
        self.projector = MLPHead(feature_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, norm=head_norm,
                                 out_norm=proj_out_norm)

    def _two_way(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The two directions of a symmetrised loss, combined by ``loss_reduction``: ``(a + b) / 2`` or ``a + b``."""
        return 0.5 * (a + b) if self.loss_reduction == "mean" else a + b

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


