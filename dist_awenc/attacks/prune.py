"""Pruning attacks: global unstructured magnitude pruning and structured (channel) pruning.

Both use :mod:`torch.nn.utils.prune` and then :func:`torch.nn.utils.prune.remove`,
so the attacked backbone has a plain state_dict (same keys and shapes as the
suspect) with exact zeros where weights were pruned.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from dist_awenc.attacks.base import AttackData, AttackOptions, as_fraction, register_attack, weight_modules
from dist_awenc.encoders.io import Encoder
from dist_awenc.errors import ConfigError


def zero_fraction(modules: list[nn.Module]) -> float:
    """Fraction of exactly-zero entries over the ``weight`` of ``modules``."""
    zeros = sum(int((m.weight == 0).sum()) for m in modules)
    total = sum(m.weight.numel() for m in modules)
    return zeros / total if total else 0.0


def global_magnitude_masks(encoder: Encoder, ratio: float, name: str) -> list[nn.Module]:
    """Global L1 (magnitude) unstructured pruning of every conv / linear weight of the backbone to ``ratio``.

    ``round(ratio * total)`` weights with the smallest magnitude over all those
    layers together are masked (``prune.global_unstructured`` with
    ``L1Unstructured``); the masks stay attached (``weight = weight_orig *
    weight_mask``, recomputed at every forward, so training keeps pruned weights
    at zero) until :func:`remove_masks`. Returns the pruned modules.
    """
    modules = weight_modules(encoder.backbone)
    if not modules:
        raise ConfigError(f"attack {name}: the backbone has no conv / linear weights")
    prune.global_unstructured([(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=ratio)
    return modules


def remove_masks(modules: list[nn.Module]) -> dict:
    """Make the pruning permanent (plain ``weight`` parameters, exact zeros); the sparsity info."""
    for m in modules:
        prune.remove(m, "weight")
    return {"sparsity": zero_fraction(modules), "n_weights": sum(m.weight.numel() for m in modules),
            "n_layers": len(modules)}


@register_attack("prune_global", strengths=[0.1, 0.3, 0.5, 0.7, 0.9])
def prune_global(encoder: Encoder, card: dict, strength: float, data: AttackData,
                 options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Global L1 (magnitude) unstructured pruning of every conv / linear weight to ratio ``strength``
    (:func:`global_magnitude_masks`). Biases and normalisation layers are left alone.
    """
    ratio = as_fraction(strength, "prune_global", "the fraction of weights pruned")
    modules = global_magnitude_masks(encoder, ratio, "prune_global")
    return encoder, {"target_sparsity": ratio, **remove_masks(modules)}


@register_attack("prune_channel", strengths=[0.1, 0.2, 0.3, 0.5])
def prune_channel(encoder: Encoder, card: dict, strength: float, data: AttackData,
                  options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Zero the fraction ``strength`` of output channels with the smallest L1 norm in every conv layer.

    Per layer ``round(strength * out_channels)`` channels
    (``prune.ln_structured(n=1, dim=0)``); a pruned channel's bias, if any, is
    zeroed too, as removing the channel would.
    """
    ratio = as_fraction(strength, "prune_channel", "the fraction of channels pruned per conv layer")
    convs = weight_modules(encoder.backbone, (nn.Conv2d,))
    if not convs:
        raise ConfigError(f"attack prune_channel: backbone '{card['arch']}' has no conv layers")
    pruned = []
    for conv in convs:
        prune.ln_structured(conv, "weight", amount=ratio, n=1, dim=0)
        prune.remove(conv, "weight")
        dead = conv.weight.detach().flatten(1).abs().sum(1) == 0  # (out_channels,)
        if conv.bias is not None:
            with torch.no_grad():
                conv.bias[dead] = 0
        pruned.append(int(dead.sum()))
    return encoder, {"channels_pruned": pruned, "channels_total": [c.out_channels for c in convs],
                     "channel_fraction": sum(pruned) / sum(c.out_channels for c in convs),
                     "sparsity": zero_fraction(convs)}
