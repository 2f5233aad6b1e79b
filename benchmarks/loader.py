"""Suite ``loader``: images/s per CPU core of the loaders, two views per image at the output size.

All rows read the same generated JPEGs (:mod:`benchmarks.data`, 500 x 375 by default), two views per image:

* ``torchvision/PIL RandomResizedCrop + flip``: ``ImageFolder`` with torchvision's per-image transforms
  cutting what the project's decode-time loaders cut (RandomResizedCrop, flip, ToTensor): the like-for-like
  reference of the project's loaders, whose colour work runs batched on the device;
* ``torchvision/PIL full SimCLR views``: the same plus colour jitter, grayscale and blur in the loader
  (the usual recipe when the GPU does none of it);
* ``project torchvision path (views.crop=decode)``: the project's ``imagefolder`` dataset through its
  ``DecodeSource``: each image decoded once, its two seeded boxes cut from the original and resized (uint8);
* ``project FFCV decode-time crop``: ``FFCVSource(crops=...)`` on a ``.beton`` of the files stored as JPEG at
  their own size (``beton.original=true``): every view's seeded crop from one decode, FFCV's compiled threads;
* ``nvjpeg`` (GPU only): ``data.decode=device``, the project's ``DeviceDecodeSource``: the bytes and boxes from
  the loader, ``torchvision.io.decode_jpeg(device="cuda")`` of the batch, the same boxes resized on the device.

Per core = images/s divided by the cores doing the work: one for a DataLoader without workers (torch
threads set to 1 while it runs: PIL decodes on one core), the workers otherwise, FFCV's decoding threads.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from benchmarks.common import Context, SuiteWriter, rates, row, scaled, short_error
from benchmarks.data import write_jpegs

COLUMNS = [("name", "loader"), ("settings", "settings"), ("images_per_s", "images/s"),
           ("images_per_s_per_core", "images/s per core")]
TABLE_SETTINGS = ["image_size", "jpeg", "batch", "num_workers", "cores", "views_per_image"]
VIEWS_CONFIG = "configs/pretrain/imagenet_resnet50_simclr.yaml"
_KEEP: list = []  # FFCV sources live until exit: a numba dispatcher collected mid-run prints a harmless KeyError


def views_config():
    """The ImageNet SimCLR config's views (strong crop, jitter, grayscale, blur); defaults if the file is missing."""
    from dist_awenc.config import PretrainConfig, load_config
    from dist_awenc.data import ViewConfig

    from benchmarks.common import REPO

    path = REPO / VIEWS_CONFIG
    return load_config(PretrainConfig, path).views if path.exists() else ViewConfig(crop_scale_min=0.08, blur_p=0.5)


def torchvision_transform(v, size: int):
    """torchvision's per-image version of the same views (two per image)."""
    from torchvision import transforms as T

    radius = max(1, int(-(-3 * v.blur_sigma_max // 1)))
    one = T.Compose([
        T.RandomResizedCrop(size, scale=(v.crop_scale_min, v.crop_scale_max), ratio=(v.crop_ratio_min, v.crop_ratio_max)),
        T.RandomHorizontalFlip(v.flip_p),
        T.RandomApply([T.ColorJitter(v.brightness, v.contrast, v.saturation, v.hue)], p=v.jitter_p),
        T.RandomGrayscale(v.grayscale_p),
        T.RandomApply([T.GaussianBlur(2 * radius + 1, (v.blur_sigma_min, v.blur_sigma_max))], p=v.blur_p),
        T.ToTensor(),
    ])
    return lambda img: (one(img), one(img))


def passes(ctx: Context, make_iter: Callable[[], Iterable], consume: Callable, reps: int, warm_batches: int = 1) -> list[float]:
    """Seconds of ``reps`` full passes (after ``warm_batches`` batches of warm-up); each pass is a fresh iterator."""
    it = iter(make_iter())
    for _ in range(warm_batches):
        consume(next(it), -1)
    secs = []
    for r in range(reps):
        t = time.perf_counter()
        for i, b in enumerate(make_iter()):
            consume(b, r * 100000 + i)
        secs.append(time.perf_counter() - t)
    return secs


def run(ctx: Context, args) -> Path:
    cpu = Context(device=torch.device("cpu"), quick=ctx.quick, out_dir=ctx.out_dir, threads=ctx.threads,
                  max_seconds=ctx.max_seconds, started=ctx.started)
    out = SuiteWriter("loader", cpu, COLUMNS, TABLE_SETTINGS)
    n, jpeg, size, batch = (64, (160, 120), 64, 16) if ctx.quick else (384, (500, 375), 224, 32)
    reps = args.reps or (2 if ctx.quick else 3)
    v = views_config()
    cores_here = os.cpu_count() or 1
    workers = [0] + ([min(8, cores_here - 1)] if cores_here >= 4 and not ctx.quick else [])
    with tempfile.TemporaryDirectory(prefix="awenc_bench_loader_") as tmp:
        info = write_jpegs(Path(tmp) / "jpeg", n, jpeg, processes=1 if ctx.quick else None)
        base = {"images": n, "jpeg": f"{jpeg[0]}x{jpeg[1]}", "jpeg_mean_kib": info["mean_kib"], "image_size": size,
                "batch": batch, "views_per_image": 2, "passes": reps}
        images = n // batch * batch

        def add(name: str, settings: dict, fn: Callable[[], list[float]], cores: int) -> None:
            s = {**base, **settings, "cores": cores}
            if cpu.out_of_time():
                out.add(row(name, s, status="skipped", note="suite time budget (--max-seconds) used up"))
                return
            try:
                with torch_threads(1 if settings.get("num_workers") == 0 else torch.get_num_threads()):
                    ips = rates(fn(), images)
            except NotInstalled as e:
                out.add(row(name, s, status="not installed", note=str(e)))
                return
            except Unsupported as e:
                out.add(row(name, s, status="unsupported", note=str(e)))
                return
            except Exception as e:  # noqa: BLE001
                out.add(row(name, s, status="failed", note=short_error(e)))
                return
            out.add(row(name, s, images_per_s=ips, images_per_s_per_core=scaled(ips, 1 / cores)))

        for w in workers:
            for name, loader in torchvision_loaders(info["root"], v, size, batch, w).items():
                add(f"{name} (workers={w})", {"num_workers": w}, lambda: passes(cpu, lambda: loader, _sink, reps), max(w, 1))
            source = project_source(info["root"], v, size, batch, w)
            add(f"project torchvision path, views.crop=decode (workers={w})", {"num_workers": w},
                lambda: passes(cpu, lambda: source.iterate(0, 0), _sink, reps), max(w, 1))
        for t in [1] + [w for w in workers if w]:
            add(f"project FFCV decode-time crop (threads={t})", {"num_workers": t, "beton": "jpg, original size"},
                lambda: ffcv_passes(cpu, info, v, size, batch, t, reps), t)
        add("nvjpeg decode + crops on the GPU", {"num_workers": 0, "device": "cuda"},
            lambda: nvjpeg_passes(cpu, info, v, size, batch, reps), 1)
    return out.json_path


_sink = lambda b, i: None  # noqa: E731


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torchvision_loaders(root: str, v, size: int, batch: int, workers: int) -> dict:
    """The two torchvision/PIL reference loaders: RandomResizedCrop + flip, and the full SimCLR views."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    crop = T.Compose([T.RandomResizedCrop(size, scale=(v.crop_scale_min, v.crop_scale_max),
                                          ratio=(v.crop_ratio_min, v.crop_ratio_max)),
                      T.RandomHorizontalFlip(v.flip_p), T.PILToTensor()])
    two = {"torchvision/PIL RandomResizedCrop + flip": lambda img: (crop(img), crop(img)),
           "torchvision/PIL full SimCLR views": torchvision_transform(v, size)}
    return {name: DataLoader(ImageFolder(root, transform=tf), batch_size=batch, shuffle=True, num_workers=workers,
                             drop_last=True, persistent_workers=workers > 0) for name, tf in two.items()}


def _decode_spec(v, size: int):
    """The views' decode-time crops (whatever ``v.crop`` says: every project row cuts at decode time)."""
    import dataclasses

    from dist_awenc.data.decode_views import crop_spec

    return crop_spec(dataclasses.replace(v, crop="decode"), size, seed=0)


def project_source(root: str, v, size: int, batch: int, workers: int, *, device: str | None = None):
    """The project's decode-time loader over ``root``: DecodeSource, or DeviceDecodeSource on ``device``."""
    from dist_awenc.data import GlobalBatchSampler, build_dataset
    from dist_awenc.data.decode_views import DecodeSource, DeviceDecodeSource

    ds = build_dataset("imagefolder", root=root, image_size=size)
    sampler, spec = GlobalBatchSampler(len(ds), batch, seed=0), _decode_spec(v, size)
    if device is None:
        return DecodeSource(ds, sampler, spec, workers)
    return DeviceDecodeSource(ds, sampler, spec, device, workers)


def ffcv_passes(ctx: Context, info: dict, v, size: int, batch: int, threads: int, reps: int) -> list[float]:
    """FFCV with the project's seeded decode-time crop, on the files stored as JPEG at their own size."""
    if importlib.util.find_spec("ffcv") is None:
        raise NotInstalled("ffcv is not installed (scripts/install_ffcv.sh)")
    from dist_awenc.data import build_dataset
    from dist_awenc.data.ffcv import FFCVSource, write_beton

    beton = Path(info["root"]).parent / "bench.beton"
    if not beton.exists():
        ds = build_dataset("imagefolder", root=info["root"], image_size=size)
        write_beton(ds, beton, mode="jpg", original=True, jpeg_quality=90, num_workers=1, progress=False,
                    max_resolution=max(info["width"], info["height"]))
    spec = _decode_spec(v, size)
    source = FFCVSource(beton, image_size=size, global_batch_size=batch, seed=0, num_workers=threads, crops=spec)
    _KEEP.append(source)
    try:
        return passes(ctx, lambda: source.iterate(0, 0), _sink, reps)
    finally:
        source.close()


def nvjpeg_passes(ctx: Context, info: dict, v, size: int, batch: int, reps: int) -> list[float]:
    """``data.decode=device`` on a GPU: the workers read the bytes and boxes, nvjpeg decodes, the device cuts."""
    if not torch.cuda.is_available():
        raise Unsupported("no CUDA device: nvjpeg decoding runs on a GPU only")
    source = project_source(info["root"], v, size, batch, 0, device="cuda")
    return passes(ctx, lambda: source.iterate(0, 0), lambda b, i: torch.cuda.synchronize(), reps)


class NotInstalled(RuntimeError):
    """What a row needs is missing here (recorded as ``not installed``, not as a failure)."""


class Unsupported(RuntimeError):
    """This device cannot run the row (a GPU-only path on a CPU): recorded as ``unsupported``, not a failure."""
