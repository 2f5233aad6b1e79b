"""Registered backbones: two tiny CPU networks (plain and residual) and torchvision ResNets with either stem."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dist_awenc.encoders.registry import register_encoder
from dist_awenc.errors import ConfigError


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """``group`` (GroupNorm, 8 groups: no batch statistics), ``batch`` or ``none``."""
    if kind == "group":
        return lambda c: nn.GroupNorm(min(8, c), c)
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "none":
        return lambda c: nn.Identity()
    raise ConfigError(f"unknown norm '{kind}'; valid: batch, group, none")


class TinyConvNet(nn.Module):
    """Four 3x3 conv blocks (widths w, 2w, 4w, 4w; two stride-2) and global pooling.

    Shape: (b, 3, H, W) -> (b, 4w). Small enough to pre-train on 2 CPU cores.
    """

    def __init__(self, width: int = 32, norm: str = "group") -> None:
        super().__init__()
        make_norm = norm_layer(norm)
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        strides = [1, 2, 2, 1]
        layers: list[nn.Module] = []
        for cin, cout, s in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(cin, cout, 3, s, 1, bias=norm == "none"), make_norm(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))  # (b, 4w)


@register_encoder("tiny")
def tiny(width: int = 32, norm: str = "group") -> nn.Module:
    return TinyConvNet(width=width, norm=norm)


class _ResBlock(nn.Module):
    """3x3 conv-norm-relu-conv-norm plus a (1x1 when the shape changes) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, make_norm: Callable[[int], nn.Module], bias: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), make_norm(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=bias), make_norm(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias), make_norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class TinyResNet(nn.Module):
    """A small residual network: a 3x3 stem of width w, then residual blocks of widths w, 2w (stride 2)
    and 4w (stride 2), and global pooling. A second architecture family for CPU-scale null populations.

    Shape: (b, 3, H, W) -> (b, 4w).
    """

    def __init__(self, width: int = 16, norm: str = "group") -> None:
        super().__init__()
        make_norm, bias = norm_layer(norm), norm == "none"
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=bias), make_norm(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(_ResBlock(width, width, 1, make_norm, bias),
                                    _ResBlock(width, 2 * width, 2, make_norm, bias),
                                    _ResBlock(2 * width, 4 * width, 2, make_norm, bias))
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))  # (b, 4w)


@register_encoder("tiny_resnet")
def tiny_resnet(width: int = 16, norm: str = "group") -> nn.Module:
    return TinyResNet(width=width, norm=norm)


def _resnet(depth: int, stem: str, norm: str) -> nn.Module:
    if stem not in ("cifar", "imagenet"):
        raise ConfigError(f"unknown stem '{stem}'; valid: cifar, imagenet")
    make_norm = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(32, c)}.get(norm)
    if make_norm is None:
        raise ConfigError(f"resnet norm must be batch or group, not '{norm}'")
    import torchvision  # here, not at import: it costs a second of start-up (torch._dynamo) to every command

    net = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=make_norm)
    if stem == "cifar":  # 3x3 stride-1 stem without max-pool, for 32 px inputs
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


@register_encoder("resnet18")
def resnet18(stem: str = "cifar", norm: str = "batch") -> nn.Module:
    return _resnet(18, stem, norm)


@register_encoder("resnet34")
def resnet34(stem: str = "cifar", norm: str = "batch") -> nn.Module:
    return _resnet(34, stem, norm)


@register_encoder("resnet50")
def resnet50(stem: str = "cifar", norm: str = "batch") -> nn.Module:
    return _resnet(50, stem, norm)
