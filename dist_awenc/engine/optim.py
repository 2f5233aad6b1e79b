"""Optimisers: AdamW, SGD, and LARS for large batches (You et al. 2017).

Biases and normalisation weights (1-d parameters) get no weight decay and,
under LARS, no trust-ratio scaling, as in SimCLR/BYOL's recipes.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dist_awenc.errors import ConfigError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ``eta * |w| / |g + wd w|``.

    Param groups with ``lars=False`` (biases, norms) take plain SGD steps.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ConfigError(f"LARS: need lr > 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0 (got {lr}, {momentum}, {weight_decay}, {eta})")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One step per param group with ``torch._foreach_*`` ops (no per-parameter Python loop, no host sync):
        ``d = g + wd w``; on ``lars`` groups ``d *= eta |w| / |d|`` (1 where either norm is 0);
        ``buf = momentum * buf + d`` (``d`` on the first step); ``w -= lr * buf``."""
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            d = torch._foreach_add(grads, params, alpha=g["weight_decay"]) if g["weight_decay"] else grads
            if g["lars"]:
                w_norm, d_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(d))
                trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                d = torch._foreach_mul(d, list(trust.unbind()))
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, b in enumerate(bufs) if b is not None]
            if old:
                torch._foreach_mul_([bufs[i] for i in old], g["momentum"])
                torch._foreach_add_([bufs[i] for i in old], [d[i] for i in old])
            for i, b in enumerate(bufs):  # the first step only: the buffers start as d
                if b is None:
                    bufs[i] = self.state[params[i]]["momentum_buffer"] = d[i].clone()
            torch._foreach_add_(params, bufs, alpha=-g["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weights of rank >= 2 only; trainable parameters only."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars"} for g in groups], lr=lr)
    if name == "sgd":
        return torch.optim.SGD([{k: v for k, v in g.items() if k != "lars"} for g in groups], lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ConfigError(f"unknown optimizer '{name}'; valid: adamw, lars, sgd")
