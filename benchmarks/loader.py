"""Suite ``loader``: images/s per CPU core of the loaders, two views per image at the output size.

All rows read the same generated JPEGs (:mod:`benchmarks.data`, 500 x 375 by default), two views per image:

* ``torchvision/PIL RandomResizedCrop + flip``: ``ImageFolder`` with torchvision's per-image transforms
  cutting what the project's decode-time loaders cut (RandomResizedCrop, flip, ToTensor): the like-for-like
  reference of the project's loaders, whose colour work runs batched on the device;
* ``torchvision/PIL full SimCLR views``: the same plus colour jitter, grayscale and blur in the loader
  (the usual recipe when the GPU does none of it);
* ``project torchvision path, views.crop=decode, full PIL decode``: the project's ``imagefolder`` dataset through
  its ``DecodeSource`` with ``CropSpec.full_decode``: each image decoded whole once by PIL, its two seeded boxes
  cut from the original and resized (uint8), as before #29;
* ``project torchvision path, views.crop=decode, decode only the boxes``: the default since #29
  (:mod:`dist_awenc.data.box_decode`): boxes from the header's size first, the JPEG decoded by simplejpeg at the
  smallest DCT scale keeping every box >= the output side, then the same crop + resize;
* ``project FFCV decode-time crop``: ``FFCVSource(crops=...)`` on a ``.beton`` of the files stored as JPEG at
  their own size (``beton.original=true``): every view's seeded crop from one decode, FFCV's compiled threads
  (at the DCT scale the boxes allow; and with ``full decode``, always at full size);
* ``nvjpeg`` (GPU only): ``data.decode=device``, the project's ``DeviceDecodeSource``: the bytes and boxes from
  the loader, ``torchvision.io.decode_jpeg(device="cuda")`` of the batch, the same boxes resized on the device;
* ``decode only, <library> <scale>`` (:mod:`benchmarks.decoders`): the JPEG libraries alone, which chose the
  library of the box-decoding path;
* ``cores to feed one H100/H200``: the ResNet-50 SimCLR step at 224 px, bf16 + channels_last, measured on an H200
  (docs/scale.md) consumes :data:`APPETITE` two-view images/s (4,470 views/s); each loader row's
  ``cores_per_gpu`` is that over its images/s per core, and this row lists them.

Like for like: the torchvision rows flip in their per-image transform; the project's loaders leave the flip (and
the colour work) to the batched views on the device, so their rows flip half of each batch's views in the
consumer, on the same core. ``ratio_vs_pil`` = a row's images/s per core over the PIL RandomResizedCrop + flip
row's (the same number of workers). Per core = images/s divided by the cores doing the work: one for a DataLoader
without workers (torch threads set to 1 while it runs: PIL decodes on one core), the workers otherwise, FFCV's
decoding threads.
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

from benchmarks.common import Context, SuiteWriter, rates, ratio, row, scaled, short_error
from benchmarks.data import write_jpegs
from benchmarks.decoders import decoder_rows

COLUMNS = [("name", "loader"), ("settings", "settings"), ("images_per_s", "images/s"),
           ("images_per_s_per_core", "images/s per core"), ("ratio_vs_pil", "x PIL RandomResizedCrop"),
           ("cores_per_gpu", "cores for one H100/H200")]
APPETITE = 2235.0  # two-view images/s of one H200 in the ResNet-50 SimCLR step at 224 px (4,470 views/s)
PIL_RRC = "torchvision/PIL RandomResizedCrop + flip"
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

        pil: dict[int, dict] = {}  # workers -> the PIL RandomResizedCrop row's images/s per core

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
            per_core = scaled(ips, 1 / cores)
            if name.startswith(PIL_RRC):
                pil[s["num_workers"]] = per_core
            out.add(row(name, s, images_per_s=ips, images_per_s_per_core=per_core, cores_per_gpu=cores_for(per_core),
                        ratio_vs_pil=ratio(per_core, pil.get(s["num_workers"], pil.get(0)))))

        for w in workers:
            for name, loader in torchvision_loaders(info["root"], v, size, batch, w).items():
                add(f"{name} (workers={w})", {"num_workers": w}, lambda: passes(cpu, lambda: loader, _sink, reps), max(w, 1))
            for full, what in ((True, "full PIL decode"), (False, "decode only the boxes")):
                source = project_source(info["root"], v, size, batch, w, full=full)
                add(f"project torchvision path, views.crop=decode, {what} (workers={w})",
                    {"num_workers": w, "decode": "full" if full else "boxes"},
                    lambda: passes(cpu, lambda: source.iterate(0, 0), _flip_half, reps), max(w, 1))
        for t in [1] + [w for w in workers if w]:
            for full in (True, False):
                add(f"project FFCV decode-time crop{', full decode' if full else ''} (threads={t})",
                    {"num_workers": t, "beton": "jpg, original size", "decode": "full" if full else "boxes"},
                    lambda: ffcv_passes(cpu, info, v, size, batch, t, reps, full), t)
        add("nvjpeg decode + crops on the GPU", {"num_workers": 0, "device": "cuda"},
            lambda: nvjpeg_passes(cpu, info, v, size, batch, reps), 1)
        for r in decoder_rows(info["root"], reps, {**base, "views_per_image": 0, "image_size": None, "batch": None},
                              cpu.out_of_time):
            out.add(r)
        out.add(cores_row(out.rows, base))
    return out.json_path


def cores_for(per_core: dict | None) -> dict | None:
    """Cores one H100/H200 needs at :data:`APPETITE` with a loader of ``per_core`` images/s per core (stats)."""
    if not per_core or not per_core["min"]:
        return None
    return {"median": APPETITE / per_core["median"], "min": APPETITE / per_core["max"],
            "max": APPETITE / per_core["min"], "n": per_core["n"]}


def cores_row(rows: list[dict], base: dict) -> dict:
    """The summary: each measured loader's cores for one GPU at the ResNet-50 appetite, in one line."""
    cores = [f"{r['name']}: {r['cores_per_gpu']['median']:.1f}" for r in rows
             if r["status"] == "ok" and r.get("cores_per_gpu") and r.get("kind") != "aux"]
    appetite = {"median": APPETITE, "min": APPETITE, "max": APPETITE, "n": 1}
    return row(f"cores to feed one H100/H200 at {APPETITE:,.0f} images/s ({2 * APPETITE:,.0f} views/s: "
               "ResNet-50 SimCLR, 224 px, bf16 + channels_last)", {**base, "cores": None}, kind="aux",
               images_per_s=appetite, note="; ".join(cores) or "no loader row measured")


_sink = lambda b, i: None  # noqa: E731


def _flip_half(batch, i: int) -> None:
    """The flip the device's batched views do, on this core: every other image's views mirrored (a new tensor)."""
    images = batch.images
    images[::2].flip(-1)


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


def project_source(root: str, v, size: int, batch: int, workers: int, *, device: str | None = None,
                   full: bool = False):
    """The project's decode-time loader over ``root``: DecodeSource (``full``: whole-image PIL decodes), or
    DeviceDecodeSource on ``device``."""
    import dataclasses

    from dist_awenc.data import GlobalBatchSampler, build_dataset
    from dist_awenc.data.decode_views import DecodeSource, DeviceDecodeSource

    ds = build_dataset("imagefolder", root=root, image_size=size)
    sampler = GlobalBatchSampler(len(ds), batch, seed=0)
    spec = dataclasses.replace(_decode_spec(v, size), full_decode=full)
    if device is None:
        return DecodeSource(ds, sampler, spec, workers)
    return DeviceDecodeSource(ds, sampler, spec, device, workers)


def ffcv_passes(ctx: Context, info: dict, v, size: int, batch: int, threads: int, reps: int,
                full: bool = False) -> list[float]:
    """FFCV with the project's seeded decode-time crop, on the files stored as JPEG at their own size."""
    import dataclasses

    if importlib.util.find_spec("ffcv") is None:
        raise NotInstalled("ffcv is not installed (scripts/install_ffcv.sh)")
    from dist_awenc.data import build_dataset
    from dist_awenc.data.ffcv import FFCVSource, write_beton

    beton = Path(info["root"]).parent / "bench.beton"
    if not beton.exists():
        ds = build_dataset("imagefolder", root=info["root"], image_size=size)
        write_beton(ds, beton, mode="jpg", original=True, jpeg_quality=90, num_workers=1, progress=False,
                    max_resolution=max(info["width"], info["height"]))
    spec = dataclasses.replace(_decode_spec(v, size), full_decode=full)
    source = FFCVSource(beton, image_size=size, global_batch_size=batch, seed=0, num_workers=threads, crops=spec)
    _KEEP.append(source)
    try:
        return passes(ctx, lambda: source.iterate(0, 0), _flip_half, reps)
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
