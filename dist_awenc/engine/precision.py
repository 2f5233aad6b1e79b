"""Reduced precision under DeepSpeed: what the engine casts, what stays fp32, and the autocast around it.

With ``bf16`` (or ``fp16``) enabled, DeepSpeed casts the module it wraps (every parameter; buffers too in
DeepSpeed before 0.19) and keeps fp32 master weights of the *trained* parameters in its optimizer. Accelerate
then turns its own autocast off. Left at that, three things break:

* the first conv sees fp32 images and bf16 weights (a dtype error);
* the frozen parts (momentum/target encoders, the embedding stage's f0) are cast too, although the optimizer
  holds no fp32 copy of them: an EMA ``m * t + (1 - m) * o`` with ``1 - m`` of 1e-2 or less loses most of its
  updates to bf16 rounding, and f0 (the reference the watermark is anchored to) is silently rounded;
* buffers such as MoCo's queue, the secret's delta and key image, the input normalisation would be rounded;
* a trained BatchNorm's running statistics must share its weights' dtype (:func:`norm_statistics_like_weights`).

So the loop (:func:`dist_awenc.engine.loop.fit`) does this, and only under a reduced-precision DeepSpeed engine:

1. before ``prepare``, :func:`kept_in_fp32` keeps (a reference to) every tensor the optimizer does not train
   (parameters with ``requires_grad=False`` and every buffer but a trained BatchNorm's statistics, which
   follow its weights into bf16);
2. after ``prepare`` (the engine's cast), :func:`restore` puts those original fp32 values back. DeepSpeed never
   partitions or flattens them under ZeRO-1/2 (its optimizer only holds the trained parameters), so they stay
   ordinary fp32 tensors of the module, saved and loaded with its ``state_dict`` (``load_state_dict`` copies into
   the existing dtype, so a resume keeps them fp32). ZeRO-3 partitions every parameter and is refused
   (:func:`dist_awenc.engine.loop.refuse_zero3`);
3. every forward runs under :func:`autocast` in the engine's dtype: the bf16 online network and the fp32
   frozen ones both compute in bf16 (as under Accelerate's own mixed precision), the losses cast to fp32 and
   turn autocast off (:mod:`dist_awenc.ssl.losses`), and the EMA is computed in fp32 from the bf16 online
   weights (:func:`dist_awenc.ssl.methods._ema_`);
4. at the end, :func:`to_fp32_master` gives the trained parameters their fp32 master values (not the bf16
   copies the forward used), so the released encoder is full precision.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


def engine_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The reduced dtype a prepared DeepSpeed engine trains in (None: not DeepSpeed, or fp32)."""
    if type(model).__name__ != "DeepSpeedEngine":
        return None
    if model.bfloat16_enabled():
        return torch.bfloat16
    if model.fp16_enabled():
        return torch.float16
    return None


def _trained_norm(m: nn.Module) -> bool:
    """A BatchNorm whose affine weights the optimizer trains (its statistics follow them into the engine's dtype)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad


def kept_in_fp32(module: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner, name, is_parameter, data) of every frozen parameter and every floating buffer of ``module``.

    The data itself is kept (a reference, no copy): the cast replaces ``.data``, and casting back would keep the
    bf16 rounding (f0 would no longer be the file it was loaded from).
    """
    kept = []
    for owner in module.modules():
        trained_norm = _trained_norm(owner)
        for name, p in owner.named_parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point():
                kept.append((owner, name, True, p.data))
        for name, b in owner.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and not trained_norm:
                kept.append((owner, name, False, b.data))
    return kept


def restore(kept: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> int:
    """Undo the engine's cast of the tensors :func:`kept_in_fp32` recorded; returns how many it changed."""
    changed = 0
    for owner, name, is_param, data in kept:
        t = owner._parameters[name] if is_param else owner._buffers[name]
        if t.dtype != data.dtype:
            t.data = data.to(t.device)
            changed += 1
    return changed


def norm_statistics_like_weights(module: nn.Module) -> int:
    """Give each trained BatchNorm's running statistics its weight's dtype (bf16 under the engine): the kernel
    takes statistics in the weight's dtype or in fp32 with fp32 weights, not fp32 statistics beside bf16 weights
    (DeepSpeed 0.19 casts parameters only). Frozen BatchNorms (momentum encoders, f0) keep fp32 throughout.
    Returns how many modules changed."""
    changed = 0
    for m in module.modules():
        if _trained_norm(m):
            for name in ("running_mean", "running_var"):
                b = getattr(m, name)
                if b is not None and b.dtype != m.weight.dtype:
                    setattr(m, name, b.to(m.weight.dtype))
                    changed += 1
    return changed


def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast in the engine's dtype (a no-op context without one)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def to_fp32_master(module: nn.Module) -> None:
    """Trained parameters <- DeepSpeed's fp32 master values; every other floating tensor to fp32.

    A collective under ZeRO-1/2 (each rank holds a partition of the master weights): call it on every rank.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    for p in module.parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            p.data = full.view_as(p).to(p.device) if full is not None else p.data.float()
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
