"""Host-to-device traffic of a training step: one copy for many small CPU tensors, and the step's inputs in halves.

A training step draws its random parameters on the CPU (seeded, the same on every device and process count). Moving
each small tensor separately costs one blocking copy apiece, and a blocking copy waits for the GPU to drain, so the
CPU never runs ahead. :func:`to_device_once` packs them into one byte buffer, pins it when the target is CUDA, and
makes a single ``non_blocking`` copy; the pieces are views of the device buffer.

:class:`StepInputs` splits a loop's ``make_inputs`` into a host half (:meth:`~StepInputs.draw`: the step's random
parameters, drawn on the CPU) and a device half (:meth:`~StepInputs.apply`: the forward's inputs, made from tensors
already on the device). :func:`move_step` takes a batch and a draw to the device before the step starts, in two
non-blocking copies (the images, pinned by the loader; everything else in one buffer), so the step itself moves
nothing and never waits on the host (tests/test_zero_copy.py counts the copies at the dispatcher).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["HostDraw", "StepInputs", "move_step", "to_device_once"]

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


@dataclass
class HostDraw:
    """What a step drew on the host.

    Attributes:
        tensors: CPU tensors the device half needs; :func:`move_step` moves them in one copy.
        host: anything that stays on the host (flags deciding which kernels run: reading them never syncs).
    """

    tensors: list[Tensor]
    host: Any = field(default=None)


class StepInputs:
    """A loop's ``make_inputs`` in two halves; calling it does both (with the draw moved by :func:`to_device_once`).

    Subclasses implement :meth:`draw` (host only: no device tensor is read or made) and :meth:`apply` (device only:
    no host tensor is moved), so a training step that starts from :func:`move_step`'s output makes no host-to-device
    copy and reads no device value.
    """

    def draw(self, n: int, micro_step: int) -> HostDraw:
        """The random parameters of micro-step ``micro_step`` for a local batch of ``n`` images, on the host."""
        raise NotImplementedError

    def apply(self, batch: tuple[Tensor, ...], moved: list[Tensor], draw: HostDraw) -> Any:
        """The forward's input from ``batch`` and ``moved`` (= ``draw.tensors``), both on the device."""
        raise NotImplementedError

    def __call__(self, batch: tuple[Tensor, ...], micro_step: int) -> Any:
        d = self.draw(len(batch[0]), micro_step)
        return self.apply(batch, to_device_once(d.tensors, batch[0].device), d)


def move_step(batch: Sequence[Tensor], draw: HostDraw, device: str | torch.device) -> tuple[tuple[Tensor, ...], list[Tensor]]:
    """A batch ``(images, *rest)`` and a step's draw on ``device``: two non-blocking copies, issued before the step.

    The images travel alone (the loader pinned them on CUDA, so nothing is copied on the host first); ``rest`` and
    ``draw.tensors`` share one buffer (:func:`to_device_once`). uint8 images become float32 in [0, 1] on the device.

    Returns:
        ``(batch on the device, draw.tensors on the device)``.
    """
    device = torch.device(device)
    images = batch[0].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.to(torch.float32).div_(255.0)
    host = [t for t in batch[1:] if t.device.type == "cpu"]  # a source may deliver some tensors on the device
    moved = iter(to_device_once([*host, *draw.tensors], device))
    rest = tuple(next(moved) if t.device.type == "cpu" else t for t in batch[1:])
    return (images, *rest), list(moved)
