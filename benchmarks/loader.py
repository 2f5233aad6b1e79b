"""Suite ``loader``: images/s per CPU core of the loaders, with the two contrastive views made.

All rows read the same generated JPEGs (:mod:`benchmarks.data`):

* ``torchvision ImageFolder + PIL``: the usual recipe, two views per image
  made in the loader (RandomResizedCrop, flip, colour jitter, grayscale,
  blur, ToTensor, as the ImageNet SimCLR config asks);
* ``project imagefolder + make_views``: the project's ``imagefolder`` dataset
  (PIL decode + resize) through its ``SamplerSource``, then the project's
  batched ``make_views`` on the CPU (on a GPU they run on the device);
* ``project imagefolder decode only`` and ``project make_views only``: the two
  halves of the previous row;
* ``FFCV``: the project's FFCV loader (``dist_awenc.data.ffcv``) when ffcv
  and that module are importable, else marked ``not installed``.

Per core = images/s divided by the cores doing the work: the DataLoader
workers, or the torch threads of the main process with ``num_workers=0``;
for FFCV its decoding threads, plus the main process's torch threads when it
also makes the views.
"""
from __future__ import annotations

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
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from dist_awenc.data import GlobalBatchSampler, SamplerSource, build_dataset, make_views

    cpu = Context(device=torch.device("cpu"), quick=ctx.quick, out_dir=ctx.out_dir, threads=ctx.threads,
                  max_seconds=ctx.max_seconds, started=ctx.started)
    out = SuiteWriter("loader", cpu, COLUMNS, TABLE_SETTINGS)
    n, jpeg, size, batch = (64, (160, 120), 64, 16) if ctx.quick else (512, (500, 375), 224, 32)
    reps = args.reps or (2 if ctx.quick else 3)
    v = views_config()
    worker_options = [0] + ([min(8, (os.cpu_count() or 1) - 1)] if (os.cpu_count() or 1) >= 4 and not ctx.quick else [])
    with tempfile.TemporaryDirectory(prefix="awenc_bench_loader_") as tmp:
        info = write_jpegs(Path(tmp) / "jpeg", n, jpeg, processes=1 if ctx.quick else None)
        base = {"images": n, "jpeg": f"{jpeg[0]}x{jpeg[1]}", "jpeg_mean_kib": info["mean_kib"], "image_size": size,
                "batch": batch, "views_per_image": 2, "threads": torch.get_num_threads(), "passes": reps}

        def add(name: str, settings: dict, fn: Callable[[], list[float]], images_per_pass: int, cores: int) -> None:
            s = {**base, **settings, "cores": cores}
            if cpu.out_of_time():
                out.add(row(name, s, status="skipped", note="suite time budget (--max-seconds) used up"))
                return
            try:
                ips = rates(fn(), images_per_pass)
            except Exception as e:  # noqa: BLE001
                out.add(row(name, s, status="failed", note=short_error(e)))
                return
            out.add(row(name, s, images_per_s=ips, images_per_s_per_core=scaled(ips, 1 / cores)))

        sink = lambda b, i: None  # noqa: E731
        for w in worker_options:
            cores = w or torch.get_num_threads()
            tv = ImageFolder(info["root"], transform=torchvision_transform(v, size))
            add(f"torchvision ImageFolder + PIL, 2 views (workers={w})", {"num_workers": w},
                lambda: passes(cpu, lambda: DataLoader(tv, batch_size=batch, shuffle=True, num_workers=w, drop_last=True,
                                                       persistent_workers=False), sink, reps),
                n // batch * batch, cores)

            ds = build_dataset("imagefolder", root=info["root"], image_size=size)
            sampler = GlobalBatchSampler(len(ds), batch, seed=0)
            source = SamplerSource(ds, sampler, num_workers=w)
            make = lambda: source.iterate(0, 0)  # noqa: E731
            views = lambda b, i: make_views(b[0], v, seed=0, step=max(i, 0))  # noqa: E731
            add(f"project imagefolder + make_views on CPU (workers={w})", {"num_workers": w},
                lambda: passes(cpu, make, views, reps), n // batch * batch, cores)
            add(f"project imagefolder decode only (workers={w})", {"num_workers": w, "views_per_image": 0},
                lambda: passes(cpu, make, sink, reps), n // batch * batch, cores)

        x = torch.rand(batch, 3, size, size)
        add("project make_views only (in-memory batch)", {"num_workers": 0},
            lambda: passes(cpu, lambda: [x] * (n // batch), lambda b, i: make_views(b, v, seed=0, step=max(i, 0)), reps),
            n // batch * batch, torch.get_num_threads())
        for r in ffcv_rows(cpu, base, info, v, size, batch, reps, [1] + [w for w in worker_options if w]):
            out.add(r)
    return out.json_path


def ffcv_rows(ctx: Context, base: dict, info: dict, v, size: int, batch: int, reps: int, threads: list[int]) -> list[dict]:
    """The project's FFCV loader on the same files (stored as JPEG at their own size, decoded and resized
    at load time, as for ImageNet), when ffcv and ``dist_awenc.data.ffcv`` import here."""
    names = [f"FFCV (dist_awenc.data.ffcv) {what} (threads={t})" for t in threads for what in ("+ make_views", "decode only")]
    settings = {**base, "num_workers": None}

    def none(status: str, note: str) -> list[dict]:
        return [row(n, settings, status=status, note=note) for n in names]

    if importlib.util.find_spec("ffcv") is None:
        return none("not installed", "ffcv is not installed (scripts/install_ffcv.sh)")
    try:
        spec = importlib.util.find_spec("dist_awenc.data.ffcv")
    except ImportError:
        spec = None
    if spec is None:
        return none("not installed", "dist_awenc.data.ffcv is not in this checkout")
    try:
        mod = importlib.import_module("dist_awenc.data.ffcv")
    except Exception as e:  # noqa: BLE001
        return none("not installed", f"dist_awenc.data.ffcv does not import: {short_error(e)}")
    if not (hasattr(mod, "write_beton") and hasattr(mod, "FFCVSource")):
        return none("unsupported", "dist_awenc.data.ffcv has no write_beton(...) and FFCVSource(...) for this suite to call")
    import inspect

    from dist_awenc.data import build_dataset, make_views

    def accepted(fn, **kw):
        params = inspect.signature(fn).parameters
        return {k: val for k, val in kw.items() if k in params}

    try:
        ds = build_dataset("imagefolder", root=info["root"], image_size=size)
        beton = Path(info["root"]).parent / "bench.beton"
        mod.write_beton(ds, beton, **accepted(mod.write_beton, mode="jpg", original=True, jpeg_quality=90,
                                               max_resolution=max(info["width"], info["height"]), num_workers=1,
                                               progress=False))
    except Exception as e:  # noqa: BLE001
        return none("failed", f"write_beton: {short_error(e)}")
    out = []
    n = len(ds) // batch * batch
    views = lambda b, i: make_views(b[0], v, seed=0, step=max(i, 0))  # noqa: E731
    sink = lambda b, i: None  # noqa: E731
    for t in threads:
        for what, consume in (("+ make_views", views), ("decode only", sink)):
            name = f"FFCV (dist_awenc.data.ffcv) {what} (threads={t})"
            cores = t + (torch.get_num_threads() if consume is views else 0)
            s = {**settings, "num_workers": t, "ffcv_threads": t, "cores": cores, "beton": "jpg, original size",
                 "views_per_image": 2 if consume is views else 0}
            if ctx.out_of_time():
                out.append(row(name, s, status="skipped", note="suite time budget (--max-seconds) used up"))
                continue
            try:
                source = mod.FFCVSource(beton, **accepted(mod.FFCVSource, image_size=size, global_batch_size=batch, seed=0,
                                                          num_workers=t, device="cpu", resize="squash"))
                _KEEP.append(source)
                secs = passes(ctx, lambda: source.iterate(0, 0), consume, reps)
                if hasattr(source, "close"):
                    source.close()
            except Exception as e:  # noqa: BLE001
                out.append(row(name, s, status="failed", note=short_error(e)))
                continue
            ips = rates(secs, n)
            out.append(row(name, s, images_per_s=ips, images_per_s_per_core=scaled(ips, 1 / cores)))
    return out
