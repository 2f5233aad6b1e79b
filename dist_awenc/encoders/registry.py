"""One registry of backbones: ``@register_encoder(name)`` and ``build_backbone``.

A backbone maps normalised images (b, 3, H, W) to features (b, feature_dim)
and exposes ``feature_dim``. Heads live in :mod:`dist_awenc.encoders.heads`.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from dist_awenc.errors import ConfigError

ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ENCODERS:
            raise ValueError(f"encoder '{name}' is already registered; registered: {', '.join(sorted(ENCODERS))}")
        ENCODERS[name] = fn
        return fn

    return deco


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone; keyword arguments it does not take are ignored."""
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder '{name}'; valid: {', '.join(sorted(ENCODERS))}")
    fn = ENCODERS[name]
    accepted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})


def arch_kwargs(name: str, **kwargs) -> dict:
    """The subset of ``kwargs`` that backbone ``name`` takes (what a card records)."""
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder '{name}'; valid: {', '.join(sorted(ENCODERS))}")
    accepted = inspect.signature(ENCODERS[name]).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}
