"""One registry of backbones: ``@register_encoder(name)`` and ``build_backbone``.

A backbone maps normalised images (b, 3, H, W) to features (b, feature_dim)
and exposes ``feature_dim``. Heads live in :mod:`dist_awenc.encoders.heads`.

Besides the names registered one by one (:data:`ENCODERS`), a family resolves every name under a prefix
(``register_family("timm/", resolve)``: ``timm/vit_tiny_patch16_224``, ``timm/resnet18``, ...) without listing
them; ``resolve(rest)`` returns the factory of that name or raises a one-line ConfigError.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

from torch import nn

from dist_awenc.errors import ConfigError

ENCODERS: dict[str, Callable[..., nn.Module]] = {}
FAMILIES: dict[str, Callable[[str], Callable[..., nn.Module]]] = {}  # prefix -> resolve(name after the prefix)


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ENCODERS:
            raise ValueError(f"encoder '{name}' is already registered; registered: {', '.join(sorted(ENCODERS))}")
        ENCODERS[name] = fn
        return fn

    return deco


def register_family(prefix: str, resolve: Callable[[str], Callable[..., nn.Module]]) -> None:
    """Names ``<prefix><rest>`` resolve through ``resolve(rest)`` (which raises ConfigError for an unknown ``rest``)."""
    if not prefix.endswith("/") or prefix in FAMILIES:
        raise ValueError(f"encoder family '{prefix}': a prefix ends with '/' and is registered once")
    FAMILIES[prefix] = resolve


def valid_names() -> str:
    """What an architecture name may be, for error messages."""
    return ", ".join(sorted(ENCODERS)) + "".join(f", {p}<model name>" for p in sorted(FAMILIES))


def factory(name: str) -> Callable[..., nn.Module]:
    """The function that builds backbone ``name`` (registered, or resolved by its family).

    Raises:
        ConfigError: an unknown name (one line, the valid ones listed or close names suggested).
    """
    if name in ENCODERS:
        return ENCODERS[name]
    for prefix, resolve in FAMILIES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return resolve(name[len(prefix):])
    raise ConfigError(f"unknown encoder '{name}'; valid: {valid_names()}")


def _params(name: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(factory(name)).parameters)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone; an argument it does not take is an error (as in timm), never ignored."""
    params = _params(name)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"encoder '{name}' takes no argument {', '.join(map(repr, unknown))} "
                          f"(it takes: {', '.join(params) or 'none'})")
    return factory(name)(**kwargs)


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


def parse_arch(spec: str, key: str = "population.archs") -> tuple[str, Optional[int]]:
    """``name[:width]`` -> (name, width or None); the name must be a known backbone (one-line error naming ``key``)."""
    name, _, width = str(spec).partition(":")
    if width and not width.isdigit():
        raise ConfigError(f"{key}: '{spec}' is not name or name:width (e.g. tiny:32, tiny_resnet:16, resnet18)")
    try:
        factory(name)
    except ConfigError as e:
        raise ConfigError(f"{key}: '{spec}': {e}") from None
    return name, int(width) if width else None
