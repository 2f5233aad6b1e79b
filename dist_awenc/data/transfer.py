"""One host-to-device copy for many small CPU tensors.

A training step draws its random parameters on the CPU (seeded, the same on every device and process count). Moving
each small tensor separately costs one blocking copy apiece, and a blocking copy waits for the GPU to drain, so the
CPU never runs ahead. :func:`to_device_once` packs them into one byte buffer, pins it when the target is CUDA, and
makes a single ``non_blocking`` copy; the pieces are views of the device buffer.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["to_device_once"]

_ALIGN = 16  # bytes: every piece starts aligned for any dtype (complex128 included)


def to_device_once(tensors: Sequence[Tensor], device: str | torch.device) -> list[Tensor]:
    """The CPU ``tensors`` on ``device``, moved in one copy (pinned + non-blocking when ``device`` is CUDA).

    Args:
        tensors: CPU tensors of any shapes and dtypes.
        device: the target; on the CPU the tensors are returned as they are.

    Returns:
        Tensors of the same shapes, dtypes and values on ``device`` (views of one buffer: do not resize them).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return list(tensors)
    chunks, layout, offset = [], [], 0
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"to_device_once: expected CPU tensors, got one on {t.device}")
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        chunks += [raw, raw.new_zeros(pad)] if pad else [raw]
        layout.append((offset, raw.numel(), t.dtype, t.shape))
        offset += raw.numel() + pad
    if not chunks:
        return []
    host = torch.cat(chunks)
    if device.type == "cuda":
        host = host.pin_memory()
    buf = host.to(device, non_blocking=True)  # pinned: the copy is queued and the CPU goes on
    return [buf[o : o + n].view(dtype).view(shape) for o, n, dtype, shape in layout]
