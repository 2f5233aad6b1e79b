"""Writing ``.beton`` files atomically from any registered dataset."""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


from dist_awenc.data.ffcv._common import WRITE_MODES, BetonWriteError, _require_ffcv
from dist_awenc.files import durable_replace, tmp_name

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
    (S, S) image; any file PIL reads (a PNG named ``.JPEG``, CMYK and grayscale
    JPEGs) is stored as RGB, so FFCV's decoder only ever meets its own encoding.
    With a ``replacement`` (``data.bad_files=skip``) an unreadable file's item
    holds the split's next readable image and its label (``index`` stays the
    item's own, so the file still matches its split), and ``(path, reason)`` goes
    to ``skipped``. A failure is reported to ``errors`` (when set) with the item's
    index before it propagates, so the parent stops the other workers at once.
    """

    def __init__(self, dataset, *, original: bool, errors=None, replacement=None, skipped=None) -> None:
        self.dataset, self.original, self.errors = dataset, original, errors
        self.replacement, self.skipped = replacement, skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def _image_label(self, index: int) -> tuple[np.ndarray, int]:
        if self.original:
            from dist_awenc.data.images import open_rgb

            path, label = self.dataset.samples[index]
            return np.asarray(open_rgb(path), dtype=np.uint8).copy(), int(label)
        image, label = self.dataset[index]
        return _to_uint8_hwc(image), int(label)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        from dist_awenc.data.bad_files import first_readable

        try:
            _, (image, label), bad = first_readable(int(index), self._image_label, self.replacement)
            for found in bad:
                self.skipped.put(found)
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
    bad_files: str = "refuse",
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
        bad_files: an image file PIL cannot decode: ``"refuse"`` stops the write naming it; ``"skip"`` stores the
            split's next readable image (and its label) in its place, logs the file and the count at the end.

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

    from dist_awenc.data.bad_files import Replacement, check_bad_files

    check_bad_files(bad_files)
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
    tmp = tmp_name(path, ".partial")
    errors, skipped = mp.Queue(), mp.Queue()
    writer_cls = _writer_class()
    fields = {
        "image": RGBImageField(write_mode=mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality),
        "label": IntField(),
        "index": IntField(),
    }
    writer = writer_cls(str(tmp), fields, page_size=page_size, num_workers=min(num_workers, len(idx)))
    writer.progress, writer.desc, writer.errors = progress, f"write {path.name}", errors
    items = _BetonItems(dataset, original=original, errors=errors, skipped=skipped,
                        replacement=Replacement(idx) if bad_files == "skip" else None)
    try:
        writer.from_indexed_dataset(items, indices=idx, chunksize=max(1, int(chunksize)))
        durable_replace(tmp, path)
        _log_skipped(skipped, path)
    except (MemoryError, ValueError) as err:  # FFCV's allocator: an encoded image larger than a page
        if isinstance(err, ValueError) and "page size" not in str(err):
            raise
        raise BetonWriteError(f"an image does not fit in one {page_size}-byte page; lower max_resolution or "
                              f"raise page_size ({str(err).splitlines()[0]})") from None
    finally:
        for q in (errors, skipped):
            q.cancel_join_thread()
            q.close()
        if tmp.exists():
            tmp.unlink()
    return path


def _log_skipped(skipped, path: Path) -> None:
    """Log each file the writer workers replaced (once) and their count (``bad_files=skip``)."""
    import queue

    from dist_awenc.data.bad_files import BadFileLog

    log = BadFileLog(who=path.name)
    while True:
        try:
            log.note([skipped.get(timeout=0.1)])
        except queue.Empty:
            break
    if log.replaced:
        from dist_awenc.log import warn

        warn(f"{path.name}: {log.replaced} item(s) hold the split's next readable image in place of "
             f"{len(log.seen)} unreadable file(s) named above (data.bad_files=skip)")
