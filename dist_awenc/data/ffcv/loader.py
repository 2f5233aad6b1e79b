"""Reading a ``.beton`` as a batch source in exactly the sampler's order."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor


from dist_awenc.data.crops import CropSpec
from dist_awenc.data.ffcv.crops import seeded_decoder_class
from dist_awenc.data.sampler import GlobalBatchSampler, IndexedBatch
from dist_awenc.data.ffcv._common import RESIZE_MODES, _require_ffcv

# --------------------------------------------------------------------------- reading


def _full_crop(height, width, scale, ratio):
    """Crop generator of the squash decoder: the whole image (then resized to (S, S))."""
    return 0, 0, height, width


_DECODERS: dict[str, type] = {}


def _squash_decoder_class() -> type:
    """FFCV decoder that resizes the whole image to (S, S), as ``ImageFolderDataset`` does."""
    if "squash" not in _DECODERS:
        from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

        class SquashResizeRGBImageDecoder(ResizedCropRGBImageDecoder):
            def __init__(self, output_size):
                super().__init__(output_size)
                self.scale = None
                self.ratio = 1.0

            @property
            def get_crop_generator(self):
                return _full_crop

        _DECODERS["squash"] = SquashResizeRGBImageDecoder
    return _DECODERS["squash"]


def _given_order_class() -> type:
    """A TraversalOrder that returns the order last set on it (FFCV 1.0.2 calls a custom order with the loader)."""
    if "order" not in _DECODERS:
        from ffcv.traversal_order.base import TraversalOrder

        class GivenOrder(TraversalOrder):
            def __init__(self, order: np.ndarray) -> None:  # the loader is attached by __call__
                self.order = order

            def __call__(self, loader) -> "GivenOrder":
                TraversalOrder.__init__(self, loader)
                return self

            def sample_order(self, epoch: int) -> np.ndarray:
                return self.order

        _DECODERS["order"] = GivenOrder
    return _DECODERS["order"]


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, local))


class FFCVSource:
    """Batch source reading a ``.beton`` (see :func:`write_beton`) in :class:`GlobalBatchSampler` order.

    Position ``p`` of the file plays the role of ``indices[p]`` of the
    torchvision source: the sampler permutes positions ``0..N-1`` with the
    same generator, so a ``.beton`` written from a split yields exactly the
    batches (and ``index``) of ``SamplerSource(dataset, GlobalBatchSampler(split, ...))``.

    Images are decoded by FFCV's compiled pipeline on ``num_workers`` CPU
    threads; when they all are (S, S) already they are copied as stored
    (exact for raw files), otherwise resized to (S, S): ``resize="squash"``
    resizes the whole image (as ``imagefolder`` does), ``"center"`` takes the
    central square first. uint8 batches are moved to ``device`` and become
    float32 in [0, 1] there.

    Args:
        path: the ``.beton``.
        image_size: side S of the yielded images.
        global_batch_size, seed, rank, world_size, drop_last: as for
            :class:`GlobalBatchSampler` (the same values give the same order).
        num_workers: decoding threads (None: this process's share of the CPUs,
            i.e. cores / LOCAL_WORLD_SIZE).
        device: where the images are delivered.
        resize: ``"squash"`` or ``"center"`` (only used when sizes differ from S).
        batches_ahead: batches FFCV decodes ahead.
        os_cache: read through the OS page cache (shared by the ranks of a node).
        crops: decode-time views (``views.crop=decode``): each stored image decoded once and every view's seeded
            box of :mod:`dist_awenc.data.crops` cut from it and resized to ``crops.size``
            (:mod:`dist_awenc.data.ffcv.crops`); batches are uint8 (b, V, 3, S, S). The loader is
            built again each epoch (the epoch's key is compiled in).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_size: int,
        global_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: Optional[int] = None,
        device: str | torch.device = "cpu",
        drop_last: bool = True,
        resize: str = "squash",
        batches_ahead: int = 3,
        os_cache: bool = True,
        crops: Optional[CropSpec] = None,
    ) -> None:
        _require_ffcv()
        from ffcv.reader import Reader

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"no .beton at '{self.path}'; write one with `awenc data write-beton`")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int; got {image_size!r}")
        try:
            reader = Reader(str(self.path))
        except Exception as err:  # a truncated or foreign file
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"'{self.path}' is not a readable .beton ({msg})") from None
        names = list(reader.handlers)
        if "image" not in names or "label" not in names:
            raise ValueError(f"'{self.path}' must have fields 'image' and 'label'; it has {', '.join(names)}")
        meta = reader.metadata  # one structured column per field, named by position (f0, f1, ...)
        col = {name: meta[meta.dtype.names[i]] for i, name in enumerate(names)}
        self.num_samples = int(reader.num_samples)
        self.fields = names
        self.labels = torch.as_tensor(np.array(col["label"], dtype=np.int64))
        self.dataset_indices = (torch.as_tensor(np.array(col["index"], dtype=np.int64)) if "index" in names
                                else torch.arange(self.num_samples))
        heights, widths = np.asarray(col["image"]["height"]), np.asarray(col["image"]["width"])
        self.image_size = int(image_size)
        self.exact_size = bool((heights == image_size).all() and (widths == image_size).all())
        self.sampler = GlobalBatchSampler(self.num_samples, global_batch_size, seed=seed, rank=rank,
                                          world_size=world_size, drop_last=drop_last)
        self.device = torch.device(device)
        self.num_workers = int(num_workers) if num_workers else _default_threads()
        self.resize, self.batches_ahead, self.os_cache = resize, int(batches_ahead), bool(os_cache)
        self.crops = crops
        self._epoch: Optional[int] = None  # the epoch the decode-time crop loader was built for
        self._loader = None
        self._order = None
        self._live: Optional[Iterator] = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __len__(self) -> int:
        return self.num_samples

    def positions(self, epoch: int, start: int = 0) -> Tensor:
        """File positions this rank reads for ``epoch`` from global batch ``start`` on, in order (LongTensor)."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)
        return self.sampler.local_positions().flatten()

    def _image_decoder(self, epoch: int):
        """The image field's decoder: every view's seeded crop from one decode (decode-time crops), or S x S images."""
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, SimpleRGBImageDecoder

        S = self.image_size
        if self.crops is not None:
            c = self.crops
            return seeded_decoder_class()(c.size, c.key(epoch), c.n_views, c.scale, c.ratio, c.full_decode)
        if self.exact_size:
            return SimpleRGBImageDecoder()
        if self.resize == "center":
            return CenterCropRGBImageDecoder((S, S), ratio=1.0)
        return _squash_decoder_class()((S, S))

    def _build_loader(self, epoch: int):
        import numba
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        image_ops: list = [self._image_decoder(epoch), ToTensor()]
        if self.device.type != "cpu":
            image_ops.append(ToDevice(self.device, non_blocking=True))
        if self.crops is None:  # decode-time views are (b, V, S, S, 3): _EpochBatches permutes them
            image_ops.append(ToTorchImage(channels_last=True))
        pipelines: dict = {"image": image_ops, "label": [IntDecoder(), ToTensor()]}
        for name in self.fields:
            if name not in ("image", "label"):
                pipelines[name] = [IntDecoder(), ToTensor()] if name == "index" else None
        # the loader's length (and its truncation of every epoch's order) comes from the first
        # order: give it a full epoch, later (resumed) epochs are never longer
        full = self.batches_per_epoch * self.sampler.local_batch_size
        self._order = _given_order_class()(np.arange(full, dtype=np.uint64))
        threads = max(1, min(self.num_workers, int(numba.config.NUMBA_NUM_THREADS)))
        self._loader = Loader(str(self.path), batch_size=self.sampler.local_batch_size, num_workers=threads,
                              os_cache=self.os_cache, order=self._order, distributed=False, seed=0,
                              pipelines=pipelines, drop_last=False, batches_ahead=self.batches_ahead)

    def iterate(self, epoch: int, start: int) -> Iterator[IndexedBatch]:
        """This rank's batches of ``epoch`` from global batch ``start`` on (as :class:`SamplerSource`)."""
        pos = self.positions(epoch, start)
        if self._live is not None:  # an abandoned epoch: stop its decoding thread
            self._live.close()
            self._live = None
        if pos.numel() == 0:
            return iter(())
        if self._loader is None or (self.crops is not None and self._epoch != epoch):
            self._build_loader(epoch)
            self._epoch = epoch
        self._order.order = pos.numpy().astype(np.uint64)
        self._live = _EpochBatches(iter(self._loader), pos, self.sampler.local_batch_size, "index" in self.fields,
                                   self.crops.n_views if self.crops is not None else 0)
        return self._live

    def close(self) -> None:
        """Stop the decoding thread of an unfinished epoch (also done by the next ``iterate``)."""
        if self._live is not None:
            self._live.close()
            self._live = None


class _EpochBatches:
    """Iterator over one epoch of an FFCV loader, as :class:`IndexedBatch` copies of FFCV's reused buffers."""

    def __init__(self, epoch_it, pos: Tensor, batch_size: int, has_index: bool, views: int = 0) -> None:
        self._it, self._pos, self._b, self._has_index, self._views = epoch_it, pos, batch_size, has_index, views
        self._k = 0
        self._closed = False

    def __iter__(self) -> "_EpochBatches":
        return self

    def __next__(self) -> IndexedBatch:
        if self._closed:
            raise StopIteration
        try:
            out = next(self._it)
        except StopIteration:
            self._closed = True  # FFCV's iterator closed itself
            raise
        images, labels = out[0], out[1]
        # FFCV reuses its buffers: copy out before the next batch is decoded
        if self._views:  # decode-time views: (b, V, S, S, 3) -> uint8 (b, V, 3, S, S)
            images = images.permute(0, 1, 4, 2, 3).contiguous()
        else:
            images = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        labels = labels.reshape(-1).to(torch.long, copy=True)
        if self._has_index:
            index = out[2].reshape(-1).to(torch.long, copy=True)
        else:
            index = self._pos[self._k * self._b : self._k * self._b + labels.numel()].clone()
        self._k += 1
        return IndexedBatch(images, labels, index)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._it.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
