"""Backbones from timm: ``timm/<timm model name>`` for every model timm has, built with ``num_classes=0``.

``timm/vit_tiny_patch16_224``, ``timm/resnet18``, ``timm/convnext_atto``, ... are resolved by the registry's
``timm/`` family without being listed; the backbone is ``timm.create_model(name, pretrained=False,
num_classes=0, ...)`` itself (its key names are timm's, so a pirate's timm state dict maps onto it with its
classifier dropped), with ``feature_dim`` set to its pooled feature size. Nothing is ever downloaded:
``pretrained`` is always False, and a pretrained tag (``name.augreg_in21k``) is refused.

Arguments, a small explicit set by family (anything else is a one-line ConfigError naming what it takes):

* ViTs and DeiTs (timm's ``vision_transformer``, ``deit``): ``stem`` = ``imagenet`` (the patch size in the
  name) or ``patch<N>`` (N x N patches, e.g. ``patch4`` for 16-32 px images), and ``img_size`` (pixels; None:
  the model's own, 224 for most). The patch embedding is a ViT's stem, so the existing ``encoder.stem`` /
  ``suspect_card.stem`` fields carry it; ``awenc pretrain`` and ``awenc import`` set ``img_size`` to the input size.
* ResNets and ConvNeXts (``resnet``, ``convnext``): ``stem`` = ``imagenet`` (timm's own) or ``cifar``, a small
  adapter for 16-32 px images: the first convolution becomes a 3x3 stride-1 one (and a ResNet's max-pool an
  identity), everything else is timm's model unchanged.
* every other timm model: no arguments (timm's model as it is).

timm is imported on first use of a ``timm/`` name (importing it takes seconds), never by ``import dist_awenc``.
"""
from __future__ import annotations

import difflib
import functools
import re
from typing import Any, Callable, Optional

import torch
from torch import nn

from dist_awenc.encoders.registry import register_family
from dist_awenc.errors import ConfigError

PREFIX = "timm/"
TRANSFORMERS = ("vision_transformer", "deit")  # take img_size and a patch size (stem=patch<N>)
SMALL_STEM = ("resnet", "convnext")  # take stem=cifar
PATCH = re.compile(r"patch([1-9][0-9]*)")


def _timm() -> Any:
    import timm  # noqa: PLC0415  (lazy: seconds to import)

    return timm


def family(name: str) -> str:
    """The timm module that defines model ``name`` (``vision_transformer``, ``resnet``, ``convnext``, ...)."""
    return _timm().models.model_entrypoint(name).__module__.rpartition(".")[2]


def _check_name(name: str) -> None:
    timm = _timm()
    base, tag = timm.models.split_model_name_tag(name)
    if tag:
        raise ConfigError(f"timm model '{name}': give the name without its pretrained tag ('timm/{base}'); "
                          "weights are never downloaded")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close: {', '.join(PREFIX + c for c in close)}" if close else "; timm.list_models() lists them"
        raise ConfigError(f"unknown timm model '{name}'{hint}")


def create(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`` with ``feature_dim`` set."""
    try:
        model = _timm().create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"timm/{name} {kwargs}: timm refused to build it: {str(e).splitlines()[0] if str(e) else e}") from None
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model


def _positive(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive number of pixels; got {value!r}")
    return value


def build_transformer(name: str, stem: str = "imagenet", img_size: Optional[int] = None) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = _positive(img_size, f"timm/{name}: img_size")
    if stem != "imagenet":
        match = PATCH.fullmatch(str(stem))
        if match is None:
            raise ConfigError(f"unknown stem '{stem}' for timm/{name}; valid: imagenet (the patch size of its name), "
                              "patch<N> (N x N patches, e.g. patch4)")
        kwargs["patch_size"] = int(match.group(1))
        if img_size is not None and img_size % kwargs["patch_size"]:
            raise ConfigError(f"timm/{name}: img_size {img_size} is not a multiple of the patch size "
                              f"{kwargs['patch_size']} (stem {stem})")
    return create(name, **kwargs)


def _small_stem(model: nn.Module, fam: str, name: str) -> None:
    """Swap in a 3x3 stride-1 first convolution (same widths); a ResNet loses its max-pool."""
    parent, attr = (model, "conv1") if fam == "resnet" else (getattr(model, "stem", None), "0")
    old = getattr(parent, attr, None) if parent is not None else None
    if not isinstance(old, nn.Conv2d):
        raise ConfigError(f"timm/{name}: stem=cifar needs a single-convolution stem; this model's is "
                          f"{type(old).__name__}: use stem=imagenet")
    setattr(parent, attr, nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None))
    if fam == "resnet":
        model.maxpool = nn.Identity()


def build_cnn(name: str, fam: str, stem: str = "imagenet") -> nn.Module:
    if stem not in ("imagenet", "cifar"):
        raise ConfigError(f"unknown stem '{stem}' for timm/{name}; valid: cifar, imagenet")
    model = create(name)
    if stem == "cifar":
        _small_stem(model, fam, name)
    return model


@functools.lru_cache(maxsize=None)
def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory of ``timm/<name>``: its signature is the set of arguments that model takes."""
    _check_name(name)
    fam = family(name)
    if fam in TRANSFORMERS:
        def transformer(stem: str = "imagenet", img_size: Optional[int] = None) -> nn.Module:
            return build_transformer(name, stem, img_size)

        return transformer
    if fam in SMALL_STEM:
        def cnn(stem: str = "imagenet") -> nn.Module:
            return build_cnn(name, fam, stem)

        return cnn

    def plain() -> nn.Module:
        return create(name)

    return plain


register_family(PREFIX, resolve)


def freeze_patch_embed(backbone: nn.Module, arch: str) -> int:
    """MoCo v3's random patch projection (Chen, Xie, He 2021, Sec. 4.1): the patch embedding keeps its random
    initialisation and is never trained (``requires_grad=False``: no gradient, and the optimiser, which takes
    trainable parameters only, never holds it). Returns how many parameters it froze.

    Raises:
        ConfigError: ``arch`` has no patch embedding with parameters (only a ViT's ``patch_embed`` is one).
    """
    embed = getattr(backbone, "patch_embed", None)
    params = list(embed.parameters()) if isinstance(embed, nn.Module) else []
    if not params:
        raise ConfigError(f"encoder.freeze_patch_embed=true: {arch} has no patch embedding to freeze (a ViT's "
                          "patch_embed, e.g. timm/vit_base_patch16_224); leave it false for this architecture")
    for p in params:
        p.requires_grad_(False)
    return len(params)


def _kernel(state: dict[str, torch.Tensor], key: str) -> Optional[int]:
    w = state.get(key)
    return int(w.shape[-1]) if w is not None and w.ndim == 4 else None


def stem_from_weights(arch: str, state: dict[str, torch.Tensor]) -> tuple[Optional[str], str]:
    """The ``stem`` a timm backbone's weights were made with, from their first convolution: ``(stem, why)``
    (stem None where the weights do not say)."""
    name = arch[len(PREFIX):]
    fam = family(name)
    if fam in TRANSFORMERS:
        k = _kernel(state, "patch_embed.proj.weight")
        if k is None:
            return None, "patch_embed.proj.weight is absent"
        with torch.device("meta"):  # the name's own patch size, without allocating the model
            own = create(name).patch_embed.patch_size[0]
        return ("imagenet" if k == own else f"patch{k}"), f"patch_embed is {k}x{k}"
    key = "conv1.weight" if fam == "resnet" else "stem.0.weight"
    k = _kernel(state, key)
    stem = {3: "cifar", 7 if fam == "resnet" else 4: "imagenet"}.get(k) if k is not None else None
    return stem, f"{key.rpartition('.')[0]} is {k}x{k}" if k is not None else f"{key} is absent"
