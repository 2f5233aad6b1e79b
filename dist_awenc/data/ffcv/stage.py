"""``awenc data write-beton`` and choosing a training stage's batch source."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from dist_awenc.config import DataSection
from dist_awenc.errors import ConfigError
from dist_awenc.data.bad_files import check_bad_files, scan_files
from dist_awenc.data.crops import CropSpec
from dist_awenc.data.decode_views import DecodeSource, DeviceDecodeSource
from dist_awenc.data.sampler import GlobalBatchSampler, SamplerSource
from dist_awenc.data.splits import splits_for
from dist_awenc.data.ffcv._common import SPLITS, WRITE_MODES, ffcv_available, _require_ffcv
from dist_awenc.data.ffcv.loader import FFCVSource, _default_threads
from dist_awenc.data.ffcv.writer import write_beton

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
    from dist_awenc.log import info

    from dist_awenc.data.datasets import build_dataset

    _require_ffcv()
    out = beton_path(cfg)
    if out.exists() and not cfg.beton.overwrite:
        raise ConfigError(f"'{out}' exists; set beton.overwrite=true to replace it, or beton.out=<other path>")
    if cfg.beton.original and cfg.data.name != "imagefolder":
        raise ConfigError(f"beton.original=true needs data.name=imagefolder (image files); got '{cfg.data.name}'")
    d = cfg.data
    dataset = build_dataset(d.name, root=d.root, image_size=d.image_size, seed=d.split_seed, size=d.size)
    indices = None if cfg.beton.split == "all" else splits_for(len(dataset), d.split_seed, d.splits, "write-beton",
                                                                       cfg.beton.split)[cfg.beton.split]
    n = len(dataset) if indices is None else int(indices.numel())
    workers = cfg.beton.num_workers or _default_threads()
    info(f"write-beton {d.name} split={cfg.beton.split} ({n} of {len(dataset)} images, {cfg.beton.mode}"
         f"{', original files' if cfg.beton.original else f', {d.image_size}px'}"
         f"{f', max side {cfg.beton.max_resolution}' if cfg.beton.max_resolution else ''}) -> {out}")
    t0 = time.perf_counter()
    write_beton(dataset, out, indices=indices, mode=cfg.beton.mode, max_resolution=cfg.beton.max_resolution,
                jpeg_quality=cfg.beton.jpeg_quality, original=cfg.beton.original, num_workers=workers,
                page_size=cfg.beton.page_size, overwrite=cfg.beton.overwrite, progress=cfg.beton.progress,
                bad_files=d.bad_files)
    size_mb = out.stat().st_size / 2**20
    info(f"wrote {out} ({n} images, {size_mb:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    return out


# --------------------------------------------------------------------------- choosing a source


def source_options(data: DataSection) -> dict:
    """The keyword arguments of :func:`build_source` that a stage's ``data`` section sets."""
    return {"loader": getattr(data, "loader", "torch"), "beton": getattr(data, "beton", None),
            "image_size": data.image_size, "num_workers": data.num_workers, "decode": getattr(data, "decode", "cpu"),
            "bad_files": getattr(data, "bad_files", "skip")}


def build_source(
    dataset,
    indices: Tensor,
    sampler: GlobalBatchSampler,
    *,
    loader: str = "torch",
    beton: Optional[str] = None,
    image_size: int,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    crops: Optional[CropSpec] = None,
    decode: str = "cpu",
    bad_files: str = "skip",
    gather: Optional[Callable[[object], list]] = None,
):
    """The batch source a training stage should use.

    ``loader`` (``torch`` | ``ffcv`` | ``auto``) picks :class:`SamplerSource` or
    :class:`FFCVSource` on ``beton``; ``auto`` takes FFCV when it is installed
    and ``beton`` is set, else torchvision. The ``.beton`` must hold exactly
    ``indices`` (the stage's split, in order), which a file written by
    ``awenc data write-beton`` with the same ``data`` section and that split does.
    A stage passes its ``data`` section's fields (``data.loader``, ``data.beton``...). With ``crops`` (pre-training
    with ``views.crop=decode``) either loader cuts the views from the original images (batches (b, V, 3, S, S)).
    ``bad_files`` (:mod:`dist_awenc.data.bad_files`): the torch loaders replace an unreadable file's sample
    (``skip``), or every file of ``indices`` is decoded here first and a bad one refused (``refuse``; with
    ``gather``, the engine's all-gather of Python objects, each rank scans its share); a ``.beton`` was checked
    when written.

    Raises:
        ConfigError: unknown loader, no ``beton``, or a file of another split.
        FFCVNotInstalledError: ``loader="ffcv"`` without FFCV.
    """
    loader = str(loader or "torch")
    if loader not in ("torch", "ffcv", "auto"):
        raise ConfigError(f"data.loader must be one of torch, ffcv, auto; got '{loader}'")
    if decode not in ("cpu", "device"):
        raise ConfigError(f"data.decode must be cpu or device; got '{decode}'")
    try:
        check_bad_files(bad_files)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if loader == "auto":
        loader = "ffcv" if beton and ffcv_available() else "torch"
    if decode == "device" and (crops is None or loader != "torch"):
        raise ConfigError("data.decode=device decodes the views' crops of image files on the device: it needs "
                          "views.crop=decode and data.loader=torch (FFCV decodes on its own threads)")
    if loader == "torch":
        pin = torch.device(device).type == "cuda"
        if bad_files == "refuse":
            scan_files(dataset, indices, num_workers=num_workers, rank=sampler.rank, world=sampler.world_size,
                       gather=gather)
        if decode == "device":
            return DeviceDecodeSource(dataset, sampler, crops, device, num_workers, pin_memory=pin, bad_files=bad_files)
        if crops is not None:
            return DecodeSource(dataset, sampler, crops, num_workers, pin_memory=pin, bad_files=bad_files)
        return SamplerSource(dataset, sampler, num_workers, pin_memory=pin, uint8=True, bad_files=bad_files)
    if not beton:
        raise ConfigError("data.loader=ffcv needs data.beton=<file.beton> (write it with `awenc data write-beton`)")
    try:
        source = FFCVSource(beton, image_size=image_size, global_batch_size=sampler.global_batch_size,
                            seed=sampler.seed, rank=sampler.rank, world_size=sampler.world_size,
                            drop_last=sampler.drop_last, num_workers=num_workers or None, device=device, crops=crops)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.beton: {err}") from None
    want = torch.as_tensor(indices, dtype=torch.long).flatten()
    if not torch.equal(source.dataset_indices, want):
        raise ConfigError(
            f"data.beton '{beton}' holds {source.num_samples} images that are not this stage's split "
            f"({want.numel()} images of the data section's dataset and split_seed); write it with "
            "`awenc data write-beton` using the same data section and the matching beton.split"
        )
    return source
