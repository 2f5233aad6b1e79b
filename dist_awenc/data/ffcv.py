"""Optional FFCV data path: ``.beton`` writing and a batch source reading it.

FFCV (``ffcv==1.0.2``, the ``ffcv`` extra) needs system libraries (OpenCV,
libjpeg-turbo, pkg-config); ``scripts/install_ffcv.sh`` installs them and it.
This module imports without FFCV: every entry point that needs it raises
:class:`FFCVNotInstalledError` with the install steps, and the torchvision
path (:class:`~dist_awenc.data.sampler.SamplerSource`) stays the default.

* :func:`write_beton` turns any registered dataset (or a split of it) into a
  ``.beton`` with the fields ``image`` (RGB, raw or JPEG), ``label`` and
  ``index`` (the item's index in the source dataset), atomically: it writes a
  temporary file next to the target and renames it only once complete.
* :class:`FFCVSource` is a batch source for :func:`dist_awenc.engine.loop.fit`:
  ``iterate(epoch, start)`` yields ``(images (b,3,S,S) float [0,1], labels (b,),
  index (b,))`` in exactly the order of :class:`GlobalBatchSampler` with the
  same seed, world size and rank, decoding on CPU threads (FFCV's JIT
  pipeline) and handing uint8 batches to the device, where they become float.
  The contrastive views are made afterwards on the device by
  :func:`~dist_awenc.data.views.make_views`, exactly as with the torchvision
  source, so both sources give the same view distribution.
* :func:`write_beton_stage` is ``awenc data write-beton``: a :class:`BetonConfig`
  (a ``data`` section as in every stage, and a ``beton`` section) -> one file.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dist_awenc.config import DataSection
from dist_awenc.errors import AwencError, ConfigError

from .sampler import GlobalBatchSampler, IndexedBatch, SamplerSource
from .splits import SPLIT_NAMES, make_splits

__all__ = [
    "BetonConfig",
    "BetonSection",
    "BetonWriteError",
    "FFCVNotInstalledError",
    "FFCVSource",
    "build_source",
    "ffcv_available",
    "write_beton",
    "write_beton_stage",
]

FFCV_REQUIREMENT = "ffcv==1.0.2"
INSTALL_HINT = (
    "install it with scripts/install_ffcv.sh [VENV] (Debian/Ubuntu: apt-get install -y --no-install-recommends "
    "pkg-config libopencv-dev libturbojpeg0-dev, then pip install 'dist_awenc[ffcv]'), or use the torchvision "
    "loader (data.loader=torch)"
)
WRITE_MODES = ("raw", "jpg")
RESIZE_MODES = ("squash", "center")
SPLITS = (*SPLIT_NAMES, "all")


# --------------------------------------------------------------------------- availability


class FFCVNotInstalledError(AwencError, ImportError):
    """FFCV (the optional ``ffcv`` extra) is not installed or does not import."""


class BetonWriteError(AwencError, RuntimeError):
    """Writing a ``.beton`` failed (the partial file has been removed)."""


_FFCV_IMPORT_ERROR: Optional[BaseException] = None


def ffcv_available() -> bool:
    """True when ``ffcv`` (its writer, loader and compiled extension) imports."""
    try:
        _require_ffcv()
    except FFCVNotInstalledError:
        return False
    return True


def _require_ffcv() -> None:
    """Import FFCV's modules, or raise :class:`FFCVNotInstalledError` naming the install steps."""
    try:
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except Exception as err:  # ImportError, or OSError of a compiled extension missing its .so
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FFCVNotInstalledError(f"the FFCV loader needs {FFCV_REQUIREMENT}, which does not import here "
                                    f"({msg}); {INSTALL_HINT}") from err


# --------------------------------------------------------------------------- writing


def _to_uint8_hwc(image: Any) -> np.ndarray:
    """A dataset image -> uint8 (H, W, 3) array.

    Accepts the registry's tensors (float (3|1, H, W) in [0, 1], or uint8
    channels-first), numpy arrays (H, W, 3|1), float in [0, 1] or uint8, and PIL images.
    """
    if isinstance(image, Tensor):
        arr = image.detach().cpu()
        if arr.dim() != 3 or arr.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor of shape (3, H, W); got {tuple(arr.shape)}")
        arr = arr.permute(1, 2, 0)
    elif isinstance(image, np.ndarray):
        arr = torch.from_numpy(np.ascontiguousarray(image))
        if arr.dim() != 3 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"expected an image array of shape (H, W, 3); got {tuple(arr.shape)}")
    elif hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if arr.dtype != torch.uint8:
        arr = arr.to(torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    if arr.shape[-1] == 1:
        arr = arr.expand(-1, -1, 3)
    return np.ascontiguousarray(arr.numpy())


class _BetonItems:
    """Adapts a registered dataset to the ``(image uint8 HWC, label, index)`` items FFCV's writer encodes.

    With ``original=True`` (datasets with ``samples``: ``imagefolder``) the
    image file is read at its own resolution instead of the dataset's resized
    (S, S) image. A failure is reported to ``errors`` (when set) with the item's
    index before it propagates, so the parent stops the other workers at once.
    """

    def __init__(self, dataset, *, original: bool, errors=None) -> None:
        self.dataset, self.original, self.errors = dataset, original, errors

    def __len__(self) -> int:
        return len(self.dataset)

    def _image_label(self, index: int) -> tuple[np.ndarray, int]:
        if self.original:
            from PIL import Image

            from .datasets import ImageDecodeError

            path, label = self.dataset.samples[index]
            try:
                with Image.open(path) as img:
                    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy(), int(label)
            except (OSError, ValueError, SyntaxError) as err:
                raise ImageDecodeError(f"cannot decode image file '{path}': {err}") from err
        image, label = self.dataset[index]
        return _to_uint8_hwc(image), int(label)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        try:
            image, label = self._image_label(int(index))
        except BaseException as err:
            _report(self.errors, err, f"item {int(index)}")
            raise
        return image, label, int(index)


def _report(errors, err: BaseException, where: str) -> None:
    """Put a failure on the error queue (once per process), keeping the exception when it pickles."""
    if errors is None or getattr(err, "_awenc_reported", False):
        return
    try:
        err._awenc_reported = True  # type: ignore[attr-defined]
    except Exception:
        pass
    text = f"{where}: {type(err).__name__}: {err}"
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        import pickle

        pickle.loads(pickle.dumps(err))  # some exceptions pickle but cannot be rebuilt
        payload: Any = err
    except Exception:
        payload = None
    try:
        errors.put((text, tb, payload))
    except Exception:
        errors.put((text, tb, None))


def _guarded_worker(errors, work_fn, *args) -> None:
    """Run FFCV's writer worker; on failure report it and exit 1 without a second traceback."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    try:
        work_fn(*args)
    except BaseException as err:
        _report(errors, err, "writer worker")
        raise SystemExit(1)


def _writer_class():
    """A DatasetWriter whose workers' failures stop the write instead of hanging it (FFCV 1.0.2 waits forever)."""
    import multiprocessing as mp

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm.auto import tqdm

    class _Writer(DatasetWriter):
        progress: bool = True
        desc: str = "write beton"
        errors = None

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            workqueue = mp.Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            allocations_queue = mp.Queue()
            done_number = mp.Value("Q", 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done_number,
                    allocations_queue, *extra_worker_args)
            procs = [mp.Process(target=_guarded_worker, args=(self.errors, work_fn, *args), daemon=True)
                     for _ in range(self.num_workers)]
            bar = tqdm(total=num_samples, desc=self.desc, unit="img", disable=not self.progress, dynamic_ncols=True)
            try:
                for p in procs:
                    p.start()
                allocations: list = []
                collected = 0
                previous = 0
                while True:
                    failure = self._failure(procs)
                    if failure is not None:
                        raise failure
                    val = done_number.value
                    if val > previous:
                        bar.update(val - previous)
                        previous = val
                    # allocations arrive once a worker has flushed its last page and exits
                    while collected < len(procs):
                        try:
                            allocations.extend(allocations_queue.get(timeout=0.05))
                        except Exception:  # queue.Empty
                            break
                        collected += 1
                    if collected == len(procs) and previous >= num_samples:
                        break
                    if previous < num_samples:
                        time.sleep(0.05)
                for p in procs:
                    p.join()
                self.finalize(allocations)
            finally:
                bar.close()
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                for p in procs:
                    if p.pid is not None:
                        p.join(timeout=10)
                for q in (workqueue, allocations_queue):
                    q.cancel_join_thread()
                    q.close()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _failure(self, procs) -> Optional[BaseException]:
            reported = None
            if self.errors is not None:
                try:
                    reported = self.errors.get_nowait()
                except Exception:
                    reported = None
            if reported is None:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if not dead:
                    return None
                # a worker died (killed, out of memory) without a report; give a late report a moment
                if self.errors is not None:
                    try:
                        reported = self.errors.get(timeout=1.0)
                    except Exception:
                        reported = None
                if reported is None:
                    return BetonWriteError(f"a writer worker exited with code {dead[0].exitcode} (killed, "
                                           "or out of memory?) before the .beton was complete")
            text, tb, payload = reported
            if isinstance(payload, BaseException):
                try:
                    payload.add_note(f"(raised in a .beton writer worker)\n{tb}")
                except AttributeError:  # Python < 3.11
                    pass
                return payload
            return BetonWriteError(f"writing the .beton failed: {text}")

    return _Writer


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def write_beton(
    dataset,
    path: str | os.PathLike,
    *,
    indices: Tensor | Sequence[int] | None = None,
    mode: str = "raw",
    max_resolution: Optional[int] = None,
    jpeg_quality: int = 90,
    original: bool = False,
    num_workers: int = 1,
    page_size: Optional[int] = None,
    chunksize: int = 100,
    overwrite: bool = True,
    progress: bool = True,
) -> Path:
    """Write ``dataset`` (or the items ``indices`` of it) to an FFCV ``.beton``.

    Item ``i`` of the file holds ``image`` (RGBImageField), ``label`` (IntField)
    and ``index`` (IntField: ``indices[i]``, the item's index in ``dataset``),
    so :class:`FFCVSource` yields the same ``index`` as the torchvision source.

    Args:
        dataset: a registered dataset (items ``(float (3,S,S) in [0,1], label)``).
        path: the ``.beton`` to create (parent folders are created).
        indices: dataset indices to write, in file order (None: all). Pass a
            split of :func:`make_splits` to write that split.
        mode: ``"raw"`` (uint8 pixels, exact) or ``"jpg"`` (JPEG, smaller).
        max_resolution: shrink images whose longest side exceeds this (FFCV's
            INTER_AREA resize, aspect kept); None keeps them as they are.
        jpeg_quality: JPEG quality 1..100 (``mode="jpg"``).
        original: store each image file at its own resolution (capped by
            ``max_resolution``) instead of the dataset's (S, S) image; needs a
            dataset with ``samples`` (``imagefolder``). :class:`FFCVSource` then
            resizes at decoding time.
        num_workers: writer processes.
        page_size: FFCV page size in bytes (a power of two >= 2 MiB; every
            encoded image must fit in one page). None: 8 MiB, or more when the
            largest possible image needs it.
        chunksize: items per work unit of a writer process.
        overwrite: replace an existing file (it stays untouched if writing fails).
        progress: show a progress bar.

    Returns:
        The path written.

    Raises:
        FFCVNotInstalledError: FFCV is absent.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: bad options.
        BetonWriteError, or the dataset's own error (e.g. ImageDecodeError):
            the write failed; no file is left at ``path`` (or the old one stays).
    """
    _require_ffcv()
    import multiprocessing as mp

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE

    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {', '.join(WRITE_MODES)}; got {mode!r}")
    if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise ValueError(f"jpeg_quality must be an int in [1, 100]; got {jpeg_quality!r}")
    if max_resolution is not None and (not isinstance(max_resolution, int) or max_resolution < 1):
        raise ValueError(f"max_resolution must be None or a positive int; got {max_resolution!r}")
    if max_resolution is not None and max_resolution > 65535:
        raise ValueError(f"max_resolution must be <= 65535 (FFCV stores sides as uint16); got {max_resolution}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1; got {num_workers}")
    if original and not hasattr(dataset, "samples"):
        raise ValueError(f"original=True needs a dataset of image files (imagefolder); "
                         f"{type(dataset).__name__} has no 'samples'")
    n = len(dataset)
    if indices is None:
        idx = list(range(n))
    else:
        idx = [int(i) for i in torch.as_tensor(indices, dtype=torch.long).flatten().tolist()]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"indices must lie in [0, {n}); got {bad[0]}")
    if not idx:
        raise ValueError("nothing to write: the dataset (or the given indices) is empty")
    if page_size is None:
        side = None if original else int(getattr(dataset, "image_size", 0)) or None
        if max_resolution is not None:
            side = max_resolution if side is None else min(side, max_resolution)
        if side is None:  # unknown image sizes: FFCV's default
            page_size = 4 * MIN_PAGE_SIZE
        else:  # room for 16 of the largest possible (raw) image: under 1/16 of a page is lost to padding
            page_size = max(MIN_PAGE_SIZE, _next_pow2(16 * 3 * side * side))
    if page_size < MIN_PAGE_SIZE or page_size >= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}); got {page_size}")

    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=True (beton.overwrite=true) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    errors = mp.Queue()
    writer_cls = _writer_class()
    fields = {
        "image": RGBImageField(write_mode=mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "index": IntField(),
    }
    writer = writer_cls(str(tmp), fields, page_size=page_size, num_workers=min(num_workers, len(idx)))
    writer.progress, writer.desc, writer.errors = progress, f"write {path.name}", errors
    items = _BetonItems(dataset, original=original, errors=errors)
    try:
        writer.from_indexed_dataset(items, indices=idx, chunksize=max(1, int(chunksize)))
        os.replace(tmp, path)
    except (MemoryError, ValueError) as err:  # FFCV's allocator: an encoded image larger than a page
        if isinstance(err, ValueError) and "page size" not in str(err):
            raise
        raise BetonWriteError(f"an image does not fit in one {page_size}-byte page; lower max_resolution or "
                              f"raise page_size ({str(err).splitlines()[0]})") from None
    finally:
        errors.cancel_join_thread()
        errors.close()
        if tmp.exists():
            tmp.unlink()
    return path


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
        batches = list(self.sampler)
        if not batches:
            return torch.empty(0, dtype=torch.long)
        return torch.tensor(batches, dtype=torch.long).flatten()

    def _build_loader(self):
        import numba
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        S = self.image_size
        if self.exact_size:
            decoder = SimpleRGBImageDecoder()
        elif self.resize == "center":
            decoder = CenterCropRGBImageDecoder((S, S), ratio=1.0)
        else:
            decoder = _squash_decoder_class()((S, S))
        image_ops: list = [decoder, ToTensor()]
        if self.device.type != "cpu":
            image_ops.append(ToDevice(self.device, non_blocking=True))
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
        if self._loader is None:
            self._build_loader()
        self._order.order = pos.numpy().astype(np.uint64)
        self._live = _EpochBatches(iter(self._loader), pos, self.sampler.local_batch_size, "index" in self.fields)
        return self._live

    def close(self) -> None:
        """Stop the decoding thread of an unfinished epoch (also done by the next ``iterate``)."""
        if self._live is not None:
            self._live.close()
            self._live = None


class _EpochBatches:
    """Iterator over one epoch of an FFCV loader, as :class:`IndexedBatch` copies of FFCV's reused buffers."""

    def __init__(self, epoch_it, pos: Tensor, batch_size: int, has_index: bool) -> None:
        self._it, self._pos, self._b, self._has_index = epoch_it, pos, batch_size, has_index
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


# --------------------------------------------------------------------------- stage


@dataclass
class BetonSection:
    out: str = ""  # the .beton to write; "" -> betons/<data.name>_<split>_<image_size>px_<mode>.beton
    split: str = "pretrain"  # pretrain | holdout | downstream | all (the splits of data.split_seed)
    mode: str = "raw"  # raw (exact uint8 pixels) | jpg
    max_resolution: Optional[int] = None  # shrink longer sides above this (original=true: e.g. 256 for ImageNet)
    jpeg_quality: int = 90
    original: bool = False  # imagefolder: store the files' own resolution (FFCVSource resizes when reading)
    num_workers: int = 0  # writer processes; 0: all CPU cores
    page_size: Optional[int] = None  # bytes, power of two >= 2 MiB; None: automatic
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"beton.split must be one of {', '.join(SPLITS)}; got {self.split!r}")
        if self.mode not in WRITE_MODES:
            raise ValueError(f"beton.mode must be one of {', '.join(WRITE_MODES)}; got {self.mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"beton.jpeg_quality must be in [1, 100]; got {self.jpeg_quality}")
        if self.max_resolution is not None and self.max_resolution < 1:
            raise ValueError(f"beton.max_resolution must be null or positive; got {self.max_resolution}")
        if self.num_workers < 0:
            raise ValueError(f"beton.num_workers must be >= 0; got {self.num_workers}")
        if self.page_size is not None and (self.page_size < 2**21 or self.page_size >= 2**32
                                           or self.page_size & (self.page_size - 1)):
            raise ValueError(f"beton.page_size must be null or a power of two in [2 MiB, 4 GiB); got {self.page_size}")


@dataclass
class BetonConfig:
    data: DataSection = field(default_factory=DataSection)
    beton: BetonSection = field(default_factory=BetonSection)


def beton_path(cfg: BetonConfig) -> Path:
    """The output path of a :class:`BetonConfig` (``beton.out`` or the default name)."""
    if cfg.beton.out:
        return Path(cfg.beton.out).expanduser()
    return Path("betons") / f"{cfg.data.name}_{cfg.beton.split}_{cfg.data.image_size}px_{cfg.beton.mode}.beton"


def write_beton_stage(cfg: BetonConfig) -> Path:
    """``awenc data write-beton``: write the ``beton.split`` of ``data`` to a ``.beton``; returns its path.

    The dataset is built exactly as the training stages build it (same name,
    root, image_size, size and split_seed), so ``data.loader=ffcv`` with this
    file feeds the same items as the torchvision loader.
    """
    from dist_awenc.engine.log import info

    from .datasets import build_dataset

    _require_ffcv()
    out = beton_path(cfg)
    if out.exists() and not cfg.beton.overwrite:
        raise ConfigError(f"'{out}' exists; set beton.overwrite=true to replace it, or beton.out=<other path>")
    if cfg.beton.original and cfg.data.name != "imagefolder":
        raise ConfigError(f"beton.original=true needs data.name=imagefolder (image files); got '{cfg.data.name}'")
    d = cfg.data
    dataset = build_dataset(d.name, root=d.root, image_size=d.image_size, seed=d.split_seed, size=d.size)
    indices = None if cfg.beton.split == "all" else make_splits(len(dataset), d.split_seed)[cfg.beton.split]
    n = len(dataset) if indices is None else int(indices.numel())
    workers = cfg.beton.num_workers or _default_threads()
    info(f"write-beton {d.name} split={cfg.beton.split} ({n} of {len(dataset)} images, {cfg.beton.mode}"
         f"{', original files' if cfg.beton.original else f', {d.image_size}px'}"
         f"{f', max side {cfg.beton.max_resolution}' if cfg.beton.max_resolution else ''}) -> {out}")
    t0 = time.perf_counter()
    write_beton(dataset, out, indices=indices, mode=cfg.beton.mode, max_resolution=cfg.beton.max_resolution,
                jpeg_quality=cfg.beton.jpeg_quality, original=cfg.beton.original, num_workers=workers,
                page_size=cfg.beton.page_size, overwrite=cfg.beton.overwrite, progress=cfg.beton.progress)
    size_mb = out.stat().st_size / 2**20
    info(f"wrote {out} ({n} images, {size_mb:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    return out


# --------------------------------------------------------------------------- choosing a source


def build_source(
    data: DataSection,
    dataset,
    indices: Tensor,
    sampler: GlobalBatchSampler,
    *,
    device: str | torch.device = "cpu",
):
    """The batch source a training stage should use for ``data``.

    ``data.loader`` (``torch`` | ``ffcv`` | ``auto``; absent: ``torch``) picks
    :class:`SamplerSource` or :class:`FFCVSource` on ``data.beton``; ``auto``
    takes FFCV when it is installed and ``data.beton`` is set, else torchvision.
    The ``.beton`` must hold exactly ``indices`` (the stage's split, in order),
    which a file written by ``awenc data write-beton`` with the same ``data``
    section and that split does.

    Raises:
        ConfigError: unknown loader, no ``data.beton``, or a file of another split.
        FFCVNotInstalledError: ``data.loader=ffcv`` without FFCV.
    """
    loader = str(getattr(data, "loader", "torch") or "torch")
    beton = getattr(data, "beton", None)
    if loader not in ("torch", "ffcv", "auto"):
        raise ConfigError(f"data.loader must be one of torch, ffcv, auto; got '{loader}'")
    if loader == "auto":
        loader = "ffcv" if beton and ffcv_available() else "torch"
    if loader == "torch":
        return SamplerSource(dataset, sampler, data.num_workers)
    if not beton:
        raise ConfigError("data.loader=ffcv needs data.beton=<file.beton> (write it with `awenc data write-beton`)")
    try:
        source = FFCVSource(beton, image_size=data.image_size, global_batch_size=sampler.global_batch_size,
                            seed=sampler.seed, rank=sampler.rank, world_size=sampler.world_size,
                            drop_last=sampler.drop_last, num_workers=data.num_workers or None, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.beton: {err}") from None
    want = torch.as_tensor(indices, dtype=torch.long).flatten()
    if not torch.equal(source.dataset_indices, want):
        raise ConfigError(
            f"data.beton '{beton}' holds {source.num_samples} images that are not this stage's split "
            f"({want.numel()} images of data.name={data.name}, data.split_seed={data.split_seed}); write it with "
            "`awenc data write-beton` using the same data section and the matching beton.split"
        )
    return source
