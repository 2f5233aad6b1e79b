"""Self-supervised losses as small pure functions.

Every function computes in float32: inputs are cast and autocast is off inside
(:func:`_fp32`; under autocast a matmul would otherwise run in bf16 again).
The only cross-process communication is :func:`nt_xent`'s
differentiable gather and :func:`mocov3_infonce`'s gather of keys (no gradient)
through :mod:`dist_awenc.engine.dist`; the other losses are local means, which
DDP's gradient averaging turns into the global mean.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dist_awenc.engine import dist


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")  # where autocast can be on (not `meta`, which the step tests use)


def _fp32(fn):
    """Run ``fn`` with autocast off on the device of its first argument (its inputs are cast to float32 inside)."""
    @functools.wraps(fn)
    def wrapped(first: torch.Tensor, *args, **kwargs):
        dev = first.device.type
        if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
            return fn(first, *args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapped


def _check_temperature(temperature: float, where: str) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"{where}: temperature must be a positive number, got {temperature!r}")


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str, where: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"{where}: {names} must be 2-D tensors of the same shape (b, d); "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{where}: empty batch")


@_fp32
def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    gather: bool = True,
) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR.

    Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive
    Learning of Visual Representations" (arXiv:2002.05709), Eq. 1.

    Each of the ``2b`` local embeddings is an anchor; its positive is the other
    view of the same image and its negatives are the other ``2B - 2``
    embeddings, where ``B`` is the global batch (``B = world_size * b`` with
    ``gather=True``, else ``B = b``). Only the local anchor rows of the
    similarity matrix are computed: ``(2b, 2B)``.

    With ``gather=True`` the candidates come from every rank through the
    differentiable :func:`dist_awenc.engine.dist.gather`; with DDP's gradient
    averaging the loss and the parameter gradients equal those of one process
    on the concatenated batch. All ranks must have the same local ``b``. The
    gathered tensor keeps gradients exact on gloo (see ``dist.gather``).

    Args:
        z1: embeddings of the first view, ``(b, d)`` (normalised inside).
        z2: embeddings of the second view, ``(b, d)``; row ``i`` pairs with ``z1[i]``.
        temperature: softmax temperature ``tau > 0``.
        gather: take negatives from all ranks (identity on one process).

    Shape:
        ``z1, z2: (b, d)`` -> scalar.

    Returns:
        The mean over the ``2b`` local anchors of the cross entropy (float32).
    """
    _check_temperature(temperature, "nt_xent")
    _check_pair(z1, z2, "z1 and z2", "nt_xent")
    b, d = z1.shape
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    anchors = torch.cat([z1, z2], dim=0)  # (2b, d): [view 1; view 2]
    if gather and dist.is_dist():
        # one collective for both views: (b, 2, d) -> (W*b, 2, d) -> view-major (2*W*b, d)
        stacked = dist.gather(torch.stack([z1, z2], dim=1))
        if stacked.shape[0] != dist.world_size() * b:
            raise ValueError("nt_xent: every rank must use the same local batch size")
        candidates = stacked.transpose(0, 1).reshape(-1, d)
        offset = dist.rank() * b
    else:
        candidates = anchors
        offset = 0
    big_b = candidates.shape[0] // 2

    logits = anchors @ candidates.T / temperature  # (2b, 2B)
    idx = torch.arange(b, device=anchors.device)
    self_idx = torch.cat([offset + idx, big_b + offset + idx])
    pos_idx = torch.cat([big_b + offset + idx, offset + idx])
    rows = torch.arange(2 * b, device=anchors.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


@_fp32
def moco_infonce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = 0.2,
) -> torch.Tensor:
    """InfoNCE of MoCo with a queue of negatives.

    He, Fan, Wu, Xie, Girshick 2020, "Momentum Contrast for Unsupervised Visual
    Representation Learning" (arXiv:1911.05722), Eq. 1; MoCo v2 hyper-parameters
    from Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum
    Contrastive Learning" (arXiv:2003.04297).

    ``logits = [q.k, q.queue^T] / T`` with cross entropy to index 0. ``q``,
    ``k`` and ``queue`` are L2-normalised inside (a no-op for the already
    normalised queue); ``k`` and ``queue`` are detached.

    Args:
        q: queries, ``(b, d)`` (gradient flows).
        k: positive keys, ``(b, d)``; row ``i`` pairs with ``q[i]``.
        queue: negative keys, ``(K, d)``.
        temperature: softmax temperature ``T > 0``.

    Shape:
        ``q, k: (b, d)``, ``queue: (K, d)`` -> scalar.

    Returns:
        Mean cross entropy over the ``b`` local queries (float32).
    """
    _check_temperature(temperature, "moco_infonce")
    _check_pair(q, k, "q and k", "moco_infonce")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"moco_infonce: queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}"
        )
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (b, 1)
    l_neg = q @ queue.T  # (b, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


@_fp32
def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised regression loss ``2 - 2 cos(p, sg(z))``.

    Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning" (arXiv:2006.07733), Eq. 2.

    Args:
        p: online predictions, ``(b, d)``.
        z: target projections, ``(b, d)`` (detached inside: stop-gradient).

    Shape:
        ``p, z: (b, d)`` -> scalar.

    Returns:
        Mean over the batch of ``2 - 2 cos(p_i, z_i)``, in ``[0, 4]`` (float32).
    """
    _check_pair(p, z, "p and z", "byol_regression")
    cos = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
    return (2.0 - 2.0 * cos).mean()


@_fp32
def mocov3_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, gather: bool = True) -> torch.Tensor:
    """InfoNCE of MoCo v3: the keys of the whole batch are the candidates, no queue.

    Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers" (arXiv:2104.02057),
    Algorithm 1: ``logits = q @ k_all^T / T``, cross entropy to each query's own key. The keys are detached (the
    momentum encoder's) and, with ``gather=True``, gathered from every rank without gradient
    (:func:`dist_awenc.engine.dist.gather_nograd`, rank-major), so query ``i`` of rank ``r`` is labelled
    ``r * b + i``; with DDP's gradient averaging the loss and gradients equal one process on the concatenated batch.
    The paper scales the loss by ``2T`` (a learning-rate rescale); here it is the plain cross entropy, like the
    other losses.

    Args:
        q: queries (predictor outputs), ``(b, d)``; normalised inside.
        k: keys (momentum projections of the other view), ``(b, d)``; row ``i`` pairs with ``q[i]``.
        temperature: softmax temperature ``T > 0``.
        gather: take the keys of all ranks (identity on one process).

    Shape:
        ``q, k: (b, d)`` -> scalar.

    Returns:
        Mean cross entropy over the ``b`` local queries (float32).
    """
    _check_temperature(temperature, "mocov3_infonce")
    _check_pair(q, k, "q and k", "mocov3_infonce")
    b = q.shape[0]
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    offset = 0
    if gather and dist.is_dist():
        keys = dist.gather_nograd(k)
        if keys.shape[0] != dist.world_size() * b:
            raise ValueError("mocov3_infonce: every rank must use the same local batch size")
        offset = dist.rank() * b
    else:
        keys = k
    logits = q @ keys.T / temperature  # (b, W*b)
    return F.cross_entropy(logits, offset + torch.arange(b, device=q.device))
