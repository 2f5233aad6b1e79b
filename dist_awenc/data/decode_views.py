"""The torchvision loader's decode-time views (``views.crop=decode``): each worker decodes an image once and cuts
its V random-resized crops from the original (:mod:`dist_awenc.data.crops`), so a batch is (b, V, 3, S, S).

With ``data.decode=device`` (:class:`DeviceDecodeSource`) the workers only read each JPEG's bytes and its size
(from the header) and compute the boxes; the training device decodes the batch (``torchvision.io.decode_jpeg``:
nvjpeg on a GPU) and cuts and resizes the same boxes there.

:class:`CropBatchSampler` turns a :class:`~dist_awenc.data.sampler.GlobalBatchSampler` into requests that carry the
epoch and each image's position in the split (the two things its boxes depend on besides the seed);
:class:`DecodeViews` answers them through the dataset's ``crop_views``.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .crops import CropSpec, crop_boxes, crop_uniforms
from .views import ViewConfig
from .images import resized_box
from .sampler import GlobalBatchSampler, IndexedBatch, SamplerSource

__all__ = ["CropBatchSampler", "CropRequest", "DecodeSource", "DecodeViews", "DeviceDecodeSource", "crop_spec",
           "decode_crops"]


def crop_spec(views: ViewConfig, size: int, seed: int) -> Optional[CropSpec]:
    """The loader's crops of a ``views`` section (``views.crop=decode``; None for ``device``)."""
    if views.crop != "decode":
        return None
    return CropSpec(size=size, n_views=views.n_views, seed=seed, scale=(views.crop_scale_min, views.crop_scale_max),
                    ratio=(views.crop_ratio_min, views.crop_ratio_max))


class CropRequest(NamedTuple):
    """One local batch to decode: dataset ``indices``, their ``positions`` in the split, the ``epoch``."""

    indices: list[int]
    positions: list[int]
    epoch: int


class CropBatchSampler(Sampler[CropRequest]):
    """The batches of ``sampler`` (same order, same rank slice, same start) as :class:`CropRequest`."""

    def __init__(self, sampler: GlobalBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[CropRequest]:
        s = self.sampler
        for pos in s.local_positions():
            yield CropRequest(s.indices[pos].tolist(), pos.tolist(), s.epoch)

    def __len__(self) -> int:
        return len(self.sampler)


class DecodeViews(Dataset):
    """Wraps an image dataset: a :class:`CropRequest` gives an :class:`IndexedBatch` of (b, V, 3, S, S) views."""

    def __init__(self, dataset: Dataset, spec: CropSpec) -> None:
        if not hasattr(dataset, "crop_views"):
            raise TypeError(f"views.crop=decode needs a dataset with crop_views(); {type(dataset).__name__} has none")
        self.dataset, self.spec = dataset, spec

    def __len__(self) -> int:
        return len(self.dataset)

    def boxes(self, request: CropRequest):
        """``boxes_of(height, width, k)`` -> int64 (V, 4) boxes of the request's k-th image."""
        spec = self.spec
        u = crop_uniforms(spec.key(request.epoch), np.asarray(request.positions), spec.n_views)
        return lambda h, w, k: crop_boxes(u[k : k + 1], np.array([h]), np.array([w]), spec.scale, spec.ratio)[0]

    def __getitems__(self, request: CropRequest) -> IndexedBatch:
        index = torch.as_tensor(request.indices, dtype=torch.long)
        images = self.dataset.crop_views(request.indices, self.boxes(request), self.spec.size)
        return IndexedBatch(images, self.dataset.labels[index], index)


def _as_is(batch):
    """The workers already built the batch (``__getitems__``): nothing to collate."""
    return batch


class DecodeSource(SamplerSource):
    """:class:`SamplerSource` whose batches are decode-time views (one persistent DataLoader, as its parent)."""

    views_class: type = DecodeViews  # what answers a CropRequest in the workers

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler, spec: CropSpec, num_workers: int = 0, *,
                 pin_memory: bool = False) -> None:
        super().__init__(self.views_class(dataset, spec), sampler, num_workers, pin_memory=pin_memory)

    def _make_loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=CropBatchSampler(self.sampler), collate_fn=_as_is,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)


class EncodedBatch(NamedTuple):
    """A local batch as the files' bytes (``data``: one uint8 tensor, file k at ``data[ends[k-1]:ends[k]]``), the
    views' ``boxes`` (b, V, 4), labels, index: a few tensors, whatever the batch size, cross from the workers."""

    data: torch.Tensor
    ends: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


class _EncodedViews(DecodeViews):
    def __getitems__(self, request: CropRequest) -> EncodedBatch:
        from PIL import Image

        from .images import ImageDecodeError

        boxes_of, data, boxes = self.boxes(request), [], []
        for k, i in enumerate(request.indices):
            path = self.dataset.samples[i][0]
            try:
                with Image.open(path) as img:  # the header only
                    fmt, (w, h) = img.format, img.size
            except (OSError, ValueError, SyntaxError) as err:
                raise ImageDecodeError(f"cannot read image file '{path}': {err}") from err
            if fmt != "JPEG":
                raise ImageDecodeError(f"data.decode=device decodes JPEG files only; '{path}' is {fmt}")
            with open(path, "rb") as f:
                data.append(np.frombuffer(f.read(), dtype=np.uint8))
            boxes.append(torch.from_numpy(boxes_of(h, w, k)))
        index = torch.as_tensor(request.indices, dtype=torch.long)
        ends = torch.as_tensor(np.cumsum([len(d) for d in data]), dtype=torch.long)
        return EncodedBatch(torch.from_numpy(np.concatenate(data)), ends, torch.stack(boxes),
                            self.dataset.labels[index], index)


def decode_crops(data: torch.Tensor, ends: torch.Tensor, boxes: torch.Tensor, size: int,
                 device: torch.device) -> torch.Tensor:
    """Decode the JPEG files in ``data`` (split at ``ends``) on ``device`` and cut each image's boxes (b, V, 4),
    resized to ``size`` (bilinear, antialiased when shrinking): uint8 (b, V, 3, size, size) on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    starts = [0, *ends.tolist()[:-1]]
    files = [data[a:b] for a, b in zip(starts, ends.tolist())]
    images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    # the boxes stay on the host: no device read
    return torch.stack([torch.stack([resized_box(img, box, size) for box in rows])
                        for img, rows in zip(images, boxes.tolist())])


class DeviceDecodeSource(DecodeSource):
    """Decode-time views decoded on ``device`` (``data.decode=device``): batches arrive with their views there."""

    views_class = _EncodedViews

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler, spec: CropSpec, device, num_workers: int = 0,
                 *, pin_memory: bool = False) -> None:
        if not hasattr(dataset, "samples"):
            raise TypeError(f"data.decode=device reads image files; {type(dataset).__name__} holds none "
                            "(use data.name=imagefolder, or data.decode=cpu)")
        super().__init__(dataset, sampler, spec, num_workers, pin_memory=pin_memory)
        self.spec, self.device = spec, torch.device(device)

    def iterate(self, epoch: int, start: int) -> Iterator[IndexedBatch]:
        for b in super().iterate(epoch, start):
            yield IndexedBatch(decode_crops(b.data, b.ends, b.boxes, self.spec.size, self.device), b.labels, b.index)
