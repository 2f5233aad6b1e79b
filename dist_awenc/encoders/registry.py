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


def _params(name: str) -> dict[str, inspect.Parameter]:
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder '{name}'; valid: {', '.join(sorted(ENCODERS))}")
    return dict(inspect.signature(ENCODERS[name]).parameters)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone; an argument it does not take is an error (as in timm), never ignored."""
    params = _params(name)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"encoder '{name}' takes no argument {', '.join(map(repr, unknown))} "
                          f"(it takes: {', '.join(params) or 'none'})")
    return ENCODERS[name](**kwargs)


def resolve_arch_kwargs(name: str, **explicit) -> dict:
    """Every argument of backbone ``name``: its defaults, overridden by ``explicit`` (what a card records).

    Raises:
        ConfigError: an explicit argument the backbone does not take (e.g. a width for a ResNet).
    """
    params = _params(name)
    unknown = sorted(set(explicit) - set(params))
    if unknown:
        raise ConfigError(f"encoder '{name}' takes no argument {', '.join(map(repr, unknown))} "
                          f"(it takes: {', '.join(params) or 'none'})")
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**out, **explicit}


def arch_kwargs(name: str, **kwargs) -> dict:
    """The subset of ``kwargs`` that backbone ``name`` takes (for callers that offer a superset on purpose)."""
    params = _params(name)
    return {k: v for k, v in kwargs.items() if k in params}
