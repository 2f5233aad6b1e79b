"""The torchvision loader's decode-time views (``views.crop=decode``): each worker decodes an image once and cuts
its V random-resized crops from the original (:mod:`dist_awenc.data.crops`), so a batch is (b, V, 3, S, S).

With ``data.decode=device`` (:class:`DeviceDecodeSource`) the workers only read each JPEG's bytes and its size
(from the header) and compute the boxes; the training device decodes the batch (``torchvision.io.decode_jpeg``:
nvjpeg on a GPU) and cuts and resizes the same boxes there. A file the device decoder is not given, because it is
no plain 3-component JPEG (a PNG named ``.JPEG``, a CMYK or grayscale JPEG) or does not end where a JPEG ends, is
decoded in the worker by PIL, exactly as with ``data.decode=cpu``, and its views travel beside the bytes; a file the
device fails on is decoded on the host from its bytes. The batch has the same shape and order either way.

An unreadable file follows ``data.bad_files`` (:mod:`dist_awenc.data.bad_files`): replaced by the split's next
readable image (``skip``), or an error naming it (``refuse``, after the stage's scan).

:class:`CropBatchSampler` turns a :class:`~dist_awenc.data.sampler.GlobalBatchSampler` into requests that carry the
epoch and each image's position in the split (the two things its boxes depend on besides the seed);
:class:`DecodeViews` answers them through the dataset's ``crop_views``.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .bad_files import Loaded, Replacement, first_readable
from .crops import CropSpec, crop_boxes, crop_uniforms
from .views import ViewConfig
from .images import ImageDecodeError, crop_pil, resized_box
from .sampler import GlobalBatchSampler, IndexedBatch, SamplerSource

__all__ = ["CropBatchSampler", "CropRequest", "DecodeSource", "DecodeViews", "DeviceDecodeSource", "EncodedBatch",
           "crop_spec", "decode_crops", "device_decodable"]


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
    """Wraps an image dataset: a :class:`CropRequest` gives an :class:`IndexedBatch` of (b, V, 3, S, S) views (as a
    :class:`~dist_awenc.data.bad_files.Loaded` where a ``replacement`` stands in for unreadable files)."""

    def __init__(self, dataset: Dataset, spec: CropSpec, replacement: Optional[Replacement] = None) -> None:
        if not hasattr(dataset, "crop_views"):
            raise TypeError(f"views.crop=decode needs a dataset with crop_views(); {type(dataset).__name__} has none")
        self.dataset, self.spec = dataset, spec
        self.replacement = replacement if hasattr(dataset, "crop_one") else None  # only files can be unreadable

    def __len__(self) -> int:
        return len(self.dataset)

    def boxes(self, request: CropRequest):
        """``boxes_of(height, width, k)`` -> int64 (V, 4) boxes of the request's k-th image."""
        return self.boxes_at(request.positions, request.epoch)

    def boxes_at(self, positions: Sequence[int], epoch: int):
        """``boxes_of(height, width, k)`` -> int64 (V, 4) boxes of the image at split position ``positions[k]``."""
        spec = self.spec
        u = crop_uniforms(spec.key(epoch), np.asarray(positions), spec.n_views)
        return lambda h, w, k: crop_boxes(u[k : k + 1], np.array([h]), np.array([w]), spec.scale, spec.ratio)[0]

    def views_of(self, index: int, boxes_of) -> tuple[int, np.ndarray, list]:
        """Item ``index`` cut by PIL at ``boxes_of(height, width)``, or the split's next readable image where its file
        is unreadable: ``(index used, uint8 (V, S, S, 3), [(path, reason) of the files skipped]``."""
        spec = self.spec
        return first_readable(index, lambda j: self.dataset.crop_one(j, boxes_of, spec.size, spec.full_decode),
                              self.replacement)

    def __getitems__(self, request: CropRequest) -> IndexedBatch | Loaded:
        if self.replacement is None:
            index = torch.as_tensor(request.indices, dtype=torch.long)
            spec = self.spec
            images = self.dataset.crop_views(request.indices, self.boxes(request), spec.size, spec.full_decode)
            return IndexedBatch(images, self.dataset.labels[index], index)
        boxes_of, used, views, skipped = self.boxes(request), [], [], []
        for k, i in enumerate(request.indices):
            j, v, bad = self.views_of(i, lambda h, w, k=k: boxes_of(h, w, k))
            used.append(j)
            views.append(v)
            skipped += bad
        index = torch.as_tensor(used, dtype=torch.long)
        images = torch.from_numpy(np.stack(views)).permute(0, 1, 4, 2, 3)  # channels-last in memory: no copy here
        return Loaded(IndexedBatch(images, self.dataset.labels[index], index), tuple(skipped))


def _as_is(batch):
    """The workers already built the batch (``__getitems__``): nothing to collate."""
    return batch


class DecodeSource(SamplerSource):
    """:class:`SamplerSource` whose batches are decode-time views (one persistent DataLoader, as its parent)."""

    views_class: type = DecodeViews  # what answers a CropRequest in the workers

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler, spec: CropSpec, num_workers: int = 0, *,
                 pin_memory: bool = False, bad_files: str = "skip") -> None:
        super().__init__(dataset, sampler, num_workers, pin_memory=pin_memory, bad_files=bad_files)
        self.dataset = self.views_class(dataset, spec, self.replacement)

    def _make_loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=CropBatchSampler(self.sampler), collate_fn=_as_is,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)


class EncodedBatch(NamedTuple):
    """A local batch of b images as the workers send it under ``data.decode=device``: a few tensors, whatever b is.

    Attributes:
        data: the bytes of the m files the device decodes, one uint8 tensor (file r at ``data[ends[r-1]:ends[r]]``).
        ends: int64 (m,).
        boxes: int64 (m, V, 4) views' boxes of those files.
        rows: int64 (m,) their rows in the batch.
        views: uint8 (b - m, V, 3, S, S) the other rows' views, cut by PIL in the worker (any format PIL reads).
        view_rows: int64 (b - m,) their rows.
        labels, index: (b,) of the images the rows hold.
        positions: int64 (b,) the rows' positions in the split; epoch: int64 (), whose boxes (for a rescue on the host).
    """

    data: Tensor
    ends: Tensor
    boxes: Tensor
    rows: Tensor
    views: Tensor
    view_rows: Tensor
    labels: Tensor
    index: Tensor
    positions: Tensor
    epoch: Tensor


def device_decodable(data: bytes) -> Optional[tuple[int, int]]:
    """``(height, width)`` of a file the device's JPEG decoder is given: a JPEG of 3 components read as RGB (not
    CMYK, not grayscale) whose data ends with the end-of-image marker (a truncated one does not); else None. Raises
    :class:`ImageDecodeError` (path unset) where not even the header can be read."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only
            fmt, mode, (w, h) = img.format, img.mode, img.size
    except Exception as err:  # PIL's failures: UnidentifiedImageError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"cannot read image header: {err}") from err
    return (h, w) if fmt == "JPEG" and mode == "RGB" and data.endswith(b"\xff\xd9") else None


class _EncodedViews(DecodeViews):
    def _encoded(self, index: int, boxes_of) -> tuple[Optional[np.ndarray], np.ndarray]:
        """``(bytes, boxes)`` of a file for the device, or ``(None, views cut by PIL)`` of any other readable file."""
        path = self.dataset.samples[index][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
            hw = device_decodable(data)
        except (OSError, ImageDecodeError) as err:
            raise ImageDecodeError(f"cannot read image file '{path}': {err}", path) from err
        if hw is None:  # PNG, CMYK, grayscale, no end marker: PIL here, as data.decode=cpu
            return None, self.dataset.crop_one(index, boxes_of, self.spec.size, self.spec.full_decode)
        return np.frombuffer(data, dtype=np.uint8), boxes_of(*hw)

    def __getitems__(self, request: CropRequest) -> Loaded:
        boxes_of, used, skipped = self.boxes(request), [], []
        data, boxes, rows, views, view_rows = [], [], [], [], []
        for k, i in enumerate(request.indices):
            j, (raw, got), bad = first_readable(i, lambda j: self._encoded(j, lambda h, w: boxes_of(h, w, k)),
                                                self.replacement)
            used.append(j)
            skipped += bad
            if raw is None:
                views.append(got)
                view_rows.append(k)
            else:
                data.append(raw)
                boxes.append(got)
                rows.append(k)
        index = torch.as_tensor(used, dtype=torch.long)
        n, s = self.spec.n_views, self.spec.size
        long = lambda x: torch.as_tensor(x, dtype=torch.long)  # noqa: E731
        batch = EncodedBatch(
            torch.from_numpy(np.concatenate(data)) if data else torch.empty(0, dtype=torch.uint8),
            long(np.cumsum([len(d) for d in data])), long(np.stack(boxes)) if boxes else torch.empty(0, n, 4).long(),
            long(rows), torch.from_numpy(np.stack(views)).permute(0, 1, 4, 2, 3) if views
            else torch.empty(0, n, 3, s, s, dtype=torch.uint8), long(view_rows), self.dataset.labels[index], index,
            long(request.positions), long(request.epoch))
        return Loaded(batch, tuple(skipped))


def decode_crops(data: Tensor, ends: Tensor, boxes: Tensor, size: int, device: torch.device) -> Tensor:
    """Decode the JPEG files in ``data`` (split at ``ends``) on ``device`` and cut each image's boxes (m, V, 4),
    resized to ``size`` (bilinear, antialiased when shrinking): uint8 (m, V, 3, size, size) on ``device``.

    Raises:
        RuntimeError: where the decoder fails on a file (the batch's other files are not returned).
    """
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
                 *, pin_memory: bool = False, bad_files: str = "skip") -> None:
        if not hasattr(dataset, "samples"):
            raise TypeError(f"data.decode=device reads image files; {type(dataset).__name__} holds none "
                            "(use data.name=imagefolder, or data.decode=cpu)")
        super().__init__(dataset, sampler, spec, num_workers, pin_memory=pin_memory, bad_files=bad_files)
        self.spec, self.device = spec, torch.device(device)

    def _finish(self, b: EncodedBatch) -> IndexedBatch:
        """The batch's views in row order on the device: the files decoded there, the workers' views beside them."""
        n, s = self.spec.n_views, self.spec.size
        labels, index, decoded = b.labels, b.index, None
        if len(b.rows):
            try:
                decoded = decode_crops(b.data, b.ends, b.boxes, s, self.device)
            except RuntimeError:  # a file the decoder refuses: the others on the device, that one on the host
                pass
            if decoded is not None and not len(b.view_rows):  # the common batch: every row decoded there, in order
                return IndexedBatch(decoded, labels, index)
        out = torch.empty(len(b.index), n, 3, s, s, dtype=torch.uint8, device=self.device)
        if decoded is not None:
            out[b.rows.to(self.device)] = decoded
        elif len(b.rows):
            labels, index = labels.clone(), index.clone()
            self._one_by_one(b, out, labels, index)
        if len(b.view_rows):
            out[b.view_rows.to(self.device)] = b.views.to(self.device, non_blocking=True)
        return IndexedBatch(out, labels, index)

    def _one_by_one(self, b: EncodedBatch, out: Tensor, labels: Tensor, index: Tensor) -> None:
        """Rows ``b.rows`` of ``out`` file by file: on the device, else by PIL from the bytes, else (unreadable) the
        split's next readable image, as in the workers (``labels`` and ``index`` follow)."""
        import io

        from PIL import Image

        starts = [0, *b.ends.tolist()[:-1]]
        for r, (a, e, row) in enumerate(zip(starts, b.ends.tolist(), b.rows.tolist())):
            try:
                out[row] = decode_crops(b.data[a:e], b.ends[r : r + 1] - a, b.boxes[r : r + 1], self.spec.size,
                                        self.device)[0]
                continue
            except RuntimeError:
                pass
            path = self.dataset.dataset.samples[int(b.index[row])][0]
            try:  # PIL on the host, from the bytes the worker read
                with Image.open(io.BytesIO(b.data[a:e].numpy().tobytes())) as img:
                    views = crop_pil(img.convert("RGB"), lambda h, w: b.boxes[r].numpy(), self.spec.size)
            except Exception as err:  # unreadable after all: data.bad_files decides, as in the workers
                if self.replacement is None:
                    raise ImageDecodeError(f"cannot decode image file '{path}': {err}", path) from err
                boxes_of = self.dataset.boxes_at([int(b.positions[row])], int(b.epoch))
                j, views, bad = self.dataset.views_of(self.replacement.next(int(b.index[row])),
                                                      lambda h, w: boxes_of(h, w, 0))
                self.bad_file_log.note([(path, f"cannot decode image file '{path}': {err}"), *bad])
                index[row], labels[row] = j, self.dataset.dataset.labels[j]
            out[row] = torch.from_numpy(views).permute(0, 3, 1, 2).to(self.device)
