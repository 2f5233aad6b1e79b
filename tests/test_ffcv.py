"""The optional FFCV path: .beton writing, FFCVSource order and round trips.

Everything but the "absent" tests is skipped where FFCV is not installed
(scripts/install_ffcv.sh installs it with its system libraries).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REQUIRE_EXTRAS

from dist_awenc.config import DataSection, load_config
from dist_awenc.data import GlobalBatchSampler, SamplerSource, build_dataset, make_splits
from dist_awenc.data import ffcv as ffcv_mod
from dist_awenc.errors import AwencError, ConfigError

# find_spec, not an import: collecting this file stays cheap (importing FFCV takes seconds);
# an installed but broken FFCV fails these tests rather than skipping them, and so does a missing one where
# AWENC_REQUIRE_EXTRAS is set (CI installs it)
needs_ffcv = pytest.mark.skipif(
    importlib.util.find_spec("ffcv") is None and not REQUIRE_EXTRAS,
    reason="FFCV is not installed (optional extra): run scripts/install_ffcv.sh to test the FFCV loader",
)

# numba (0.68, under FFCV 1.0.2) raises a KeyError in the finalizer of a garbage-collected
# loader's compiled decoder; it is ignored by Python and harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# --------------------------------------------------------------------------- fixtures


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour gradient with a little noise (JPEG and resizing keep it close)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = rng.uniform(0.1, 0.9, 3)
    slope = rng.uniform(-0.3, 0.3, (2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.normal(0, 0.01, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _write_folder(root: Path, sizes: list[tuple[int, int]], per_class: int, seed: int, smooth: bool) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            arr = _smooth_image(rng, h, w) if smooth else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def fixed_folder(tmp_path_factory) -> Path:
    """2 classes x 12 random 8x8 PNGs."""
    return _write_folder(tmp_path_factory.mktemp("fixed") / "img", [(8, 8)], 12, seed=0, smooth=False)


@pytest.fixture(scope="module")
def varied_folder(tmp_path_factory) -> Path:
    """2 classes x 8 smooth PNGs of various sizes (smaller and larger than 8, not square)."""
    sizes = [(5, 7), (12, 9), (8, 8), (16, 10), (9, 14), (6, 6), (20, 20), (11, 8)]
    return _write_folder(tmp_path_factory.mktemp("varied") / "img", sizes, 8, seed=1, smooth=True)


@pytest.fixture(scope="module")
def fixed_beton(fixed_folder, tmp_path_factory) -> Path:
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    return ffcv_mod.write_beton(ds, tmp_path_factory.mktemp("b") / "fixed.beton", progress=False)


def _epoch(source, epoch: int, start: int = 0) -> list:
    return list(source.iterate(epoch, start))


def _by_index(batches) -> dict[int, tuple[torch.Tensor, int]]:
    out = {}
    for b in batches:
        for img, lab, i in zip(b.images, b.labels, b.index):
            out[int(i)] = (img, int(lab))
    return out


# --------------------------------------------------------------------------- without FFCV


def test_module_imports_and_errors_without_ffcv(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")] + ["ffcv"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert ffcv_mod.ffcv_available() is False
    ds = build_dataset("digits", image_size=8, size=16)
    with pytest.raises(ffcv_mod.FFCVNotInstalledError, match="install_ffcv.sh") as info:
        ffcv_mod.write_beton(ds, tmp_path / "x.beton")
    assert isinstance(info.value, ImportError) and isinstance(info.value, AwencError)
    with pytest.raises(ffcv_mod.FFCVNotInstalledError, match=r"dist_awenc\[ffcv\]"):
        ffcv_mod.FFCVSource(tmp_path / "x.beton", image_size=8, global_batch_size=4, seed=0)
    assert not (tmp_path / "x.beton").exists()
    # the torchvision source stays the default and needs nothing
    sampler = GlobalBatchSampler(len(ds), 4, seed=0)
    assert isinstance(ffcv_mod.build_source(ds, torch.arange(len(ds)), sampler, image_size=8), SamplerSource)
    auto = DataSection(loader="auto", beton=str(tmp_path / "x.beton"))
    assert isinstance(ffcv_mod.build_source(ds, torch.arange(len(ds)), sampler, **ffcv_mod.source_options(auto)), SamplerSource)
    want = DataSection(loader="ffcv", beton=str(tmp_path / "x.beton"))
    with pytest.raises(ffcv_mod.FFCVNotInstalledError):
        ffcv_mod.build_source(ds, torch.arange(len(ds)), sampler, **ffcv_mod.source_options(want))


def test_beton_config_validation():
    cfg = load_config(ffcv_mod.BetonConfig, overrides=["data.name=imagefolder", "beton.split=holdout", "beton.mode=jpg"])
    assert cfg.beton.split == "holdout" and cfg.beton.mode == "jpg"
    assert ffcv_mod.beton_path(cfg).name == "imagefolder_holdout_16px_jpg.beton"
    for bad in ("beton.split=train", "beton.mode=png", "beton.jpeg_quality=0", "beton.page_size=1000", "beton.foo=1"):
        with pytest.raises(ConfigError):
            load_config(ffcv_mod.BetonConfig, overrides=[bad])


# --------------------------------------------------------------------------- round trips


@needs_ffcv
def test_raw_round_trip_is_exact(fixed_folder, fixed_beton):
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    # 24 images, global batch 5, no drop_last: the last batch wraps around, every image is read
    src = ffcv_mod.FFCVSource(fixed_beton, image_size=8, global_batch_size=5, seed=0, drop_last=False)
    assert src.exact_size and len(src) == len(ds) == 24
    assert torch.equal(src.labels, ds.labels) and torch.equal(src.dataset_indices, torch.arange(24))
    batches = _epoch(src, 0)
    assert all(b.images.dtype == torch.float32 and b.images.shape == (5, 3, 8, 8) for b in batches)
    got = _by_index(batches)
    assert sorted(got) == list(range(24))
    for i, (img, lab) in got.items():
        ref_img, ref_lab = ds[i]
        assert torch.equal(img, ref_img), f"image {i} differs"
        assert lab == ref_lab


@needs_ffcv
def test_original_resolution_round_trip(fixed_folder, varied_folder, tmp_path):
    from PIL import Image

    # 8x8 files stored as they are read back bit for bit
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    p = ffcv_mod.write_beton(ds, tmp_path / "orig.beton", original=True, num_workers=2, progress=False)
    got = _by_index(_epoch(ffcv_mod.FFCVSource(p, image_size=8, global_batch_size=4, seed=1), 0))
    assert len(got) == 24
    for i, (img, _) in got.items():
        ref = torch.from_numpy(np.array(Image.open(ds.samples[i][0]).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal((img * 255).round().to(torch.uint8), ref)

    # files of various sizes: stored at their own size (capped by max_resolution), resized when read
    from ffcv.reader import Reader

    vds = build_dataset("imagefolder", root=varied_folder, image_size=8)
    p = ffcv_mod.write_beton(vds, tmp_path / "varied.beton", original=True, max_resolution=12, progress=False)
    meta = Reader(str(p)).metadata
    sides = np.maximum(meta["f0"]["height"], meta["f0"]["width"])
    assert sides.max() == 12 and sides.min() == 6  # 16x10 and 20x20 shrunk to 12; small ones kept
    src = ffcv_mod.FFCVSource(p, image_size=8, global_batch_size=4, seed=0)
    assert not src.exact_size
    got = _by_index(_epoch(src, 0))
    assert len(got) == 16
    errs = [(img - vds[i][0]).abs().mean().item() for i, (img, _) in got.items()]
    assert max(errs) < 0.03, errs  # cv2 INTER_AREA vs PIL bilinear on smooth images
    assert all(lab == vds[i][1] for i, (_, lab) in got.items())
    center = ffcv_mod.FFCVSource(p, image_size=6, global_batch_size=4, seed=0, resize="center")
    assert _epoch(center, 0)[0].images.shape == (4, 3, 6, 6)


@needs_ffcv
def test_variable_size_dataset_images_round_trip(varied_folder, tmp_path):
    # the dataset's own (S, S) images (the default) are exact whatever the file sizes
    ds = build_dataset("imagefolder", root=varied_folder, image_size=8)
    p = ffcv_mod.write_beton(ds, tmp_path / "v.beton", progress=False)
    got = _by_index(_epoch(ffcv_mod.FFCVSource(p, image_size=8, global_batch_size=8, seed=0), 0))
    assert len(got) == 16 and all(torch.equal(img, ds[i][0]) for i, (img, _) in got.items())


@needs_ffcv
def test_jpeg_round_trip_is_close(varied_folder, tmp_path):
    ds = build_dataset("imagefolder", root=varied_folder, image_size=16)
    p = ffcv_mod.write_beton(ds, tmp_path / "j.beton", mode="jpg", jpeg_quality=90, progress=False)
    got = _by_index(_epoch(ffcv_mod.FFCVSource(p, image_size=16, global_batch_size=8, seed=0), 0))
    errs = torch.tensor([(img - ds[i][0]).abs().mean().item() for i, (img, _) in got.items()])
    assert len(got) == 16 and errs.max() < 0.02, errs
    assert errs.max() > 0  # it really is JPEG


# --------------------------------------------------------------------------- order


@needs_ffcv
def test_order_equals_sampler_source(fixed_folder, fixed_beton):
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    for world in (1, 2):
        for rank in range(world):
            src = ffcv_mod.FFCVSource(fixed_beton, image_size=8, global_batch_size=6, seed=7, rank=rank, world_size=world)
            ref = SamplerSource(ds, GlobalBatchSampler(len(ds), 6, seed=7, rank=rank, world_size=world))
            for epoch, start in ((0, 0), (1, 0), (1, 2), (2, 3), (2, 4)):
                a, b = _epoch(src, epoch, start), _epoch(ref, epoch, start)
                assert len(a) == len(b) == 4 - start
                for x, y in zip(a, b):
                    assert torch.equal(x.index, y.index)
                    assert torch.equal(x.labels, y.labels) and torch.equal(x.images, y.images)
    # the ranks' slices together are the single-process batches
    one = _epoch(ffcv_mod.FFCVSource(fixed_beton, image_size=8, global_batch_size=6, seed=7), 3)
    two = [_epoch(ffcv_mod.FFCVSource(fixed_beton, image_size=8, global_batch_size=6, seed=7, rank=r, world_size=2), 3)
           for r in range(2)]
    for k, b in enumerate(one):
        assert torch.equal(b.index, torch.cat([two[0][k].index, two[1][k].index]))


@needs_ffcv
def test_abandoned_epoch_and_resume(fixed_beton):
    src = ffcv_mod.FFCVSource(fixed_beton, image_size=8, global_batch_size=4, seed=3, num_workers=1)
    full = _epoch(src, 5)
    it = src.iterate(5, 0)
    next(it)  # abandon mid-epoch, as the loop does at the end of training
    resumed = _epoch(src, 5, 2)
    assert [b.index.tolist() for b in resumed] == [b.index.tolist() for b in full[2:]]
    assert _epoch(src, 5, src.batches_per_epoch) == []
    src.close()


@needs_ffcv
def test_split_beton_matches_split_sampler(fixed_folder, tmp_path):
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    split = make_splits(len(ds), seed=0)["pretrain"]
    p = ffcv_mod.write_beton(ds, tmp_path / "pre.beton", indices=split, progress=False)
    data = DataSection(name="imagefolder", image_size=8, loader="ffcv", beton=str(p))
    for rank in range(2):
        sampler = GlobalBatchSampler(split, 4, seed=2, rank=rank, world_size=2)
        src = ffcv_mod.build_source(ds, split, sampler, **ffcv_mod.source_options(data))
        assert isinstance(src, ffcv_mod.FFCVSource)
        ref = SamplerSource(ds, GlobalBatchSampler(split, 4, seed=2, rank=rank, world_size=2))
        for x, y in zip(_epoch(src, 1), _epoch(ref, 1), strict=True):
            assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
    other = make_splits(len(ds), seed=0)["downstream"]
    with pytest.raises(ConfigError, match="not this stage's split"):
        ffcv_mod.build_source(ds, other, GlobalBatchSampler(other, 2, seed=0), **ffcv_mod.source_options(data))
    missing = dataclasses.replace(data, beton=str(tmp_path / "none.beton"))
    with pytest.raises(ConfigError, match="no .beton"):
        ffcv_mod.build_source(ds, split, GlobalBatchSampler(split, 4, seed=0), **ffcv_mod.source_options(missing))


# --------------------------------------------------------------------------- atomic writes


class _Unrebuildable(Exception):
    """Pickles, but cannot be rebuilt from its args: reaches the parent as text."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


class _Failing(torch.utils.data.Dataset):
    """An imagefolder dataset whose item ``bad`` raises (or kills its worker)."""

    def __init__(self, ds, bad: int, how: str = "raise") -> None:
        self.ds, self.bad, self.how = ds, bad, how
        self.image_size = ds.image_size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if i == self.bad:
            if self.how == "exit":
                os._exit(3)
            if self.how == "odd":
                raise _Unrebuildable("odd error", f"at item {i}")
            raise RuntimeError(f"boom at item {i}")
        return self.ds[i]


@needs_ffcv
@pytest.mark.parametrize("workers", [1, 2])
def test_failed_write_leaves_no_file(fixed_folder, tmp_path, workers):
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    target = tmp_path / "out" / "x.beton"
    with pytest.raises(RuntimeError, match="boom at item 13"):
        ffcv_mod.write_beton(_Failing(ds, 13), target, num_workers=workers, chunksize=4, progress=False)
    assert not target.exists() and os.listdir(target.parent) == []
    # an existing file survives a failed overwrite untouched
    ffcv_mod.write_beton(ds, target, progress=False)
    before = target.read_bytes()
    with pytest.raises(ffcv_mod.BetonWriteError, match="exited with code 3"):
        ffcv_mod.write_beton(_Failing(ds, 5, how="exit"), target, num_workers=workers, progress=False)
    assert target.read_bytes() == before and sorted(os.listdir(target.parent)) == ["x.beton"]
    with pytest.raises(ffcv_mod.BetonWriteError, match="_Unrebuildable: odd error at item 2"):
        ffcv_mod.write_beton(_Failing(ds, 2, how="odd"), target, num_workers=workers, progress=False)
    assert target.read_bytes() == before and sorted(os.listdir(target.parent)) == ["x.beton"]
    with pytest.raises(FileExistsError):
        ffcv_mod.write_beton(ds, target, overwrite=False, progress=False)


@needs_ffcv
def test_write_beton_rejects_bad_options(fixed_folder, tmp_path):
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    digits = build_dataset("digits", image_size=8, size=16)
    for kwargs in ({"mode": "png"}, {"jpeg_quality": 101}, {"max_resolution": 0}, {"indices": [0, 99]},
                   {"page_size": 3 << 20}, {"num_workers": 0}):
        with pytest.raises(ValueError):
            ffcv_mod.write_beton(ds, tmp_path / "x.beton", progress=False, **kwargs)
    with pytest.raises(ValueError, match="original=True"):
        ffcv_mod.write_beton(digits, tmp_path / "x.beton", original=True, progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- stage


@needs_ffcv
def test_write_beton_stage(fixed_folder, tmp_path):
    out = tmp_path / "betons" / "pre.beton"
    over = ["data.name=imagefolder", f"data.root={fixed_folder}", "data.image_size=8", "data.split_seed=4",
            "beton.split=pretrain", f"beton.out={out}", "beton.num_workers=2", "beton.progress=false"]
    cfg = load_config(ffcv_mod.BetonConfig, overrides=over)
    assert ffcv_mod.write_beton_stage(cfg) == out
    ds = build_dataset("imagefolder", root=fixed_folder, image_size=8)
    split = make_splits(len(ds), 4)["pretrain"]
    src = ffcv_mod.FFCVSource(out, image_size=8, global_batch_size=4, seed=0)
    assert torch.equal(src.dataset_indices, split) and torch.equal(src.labels, ds.labels[split])
    with pytest.raises(ConfigError, match="overwrite"):
        ffcv_mod.write_beton_stage(cfg)
    cfg = load_config(ffcv_mod.BetonConfig, overrides=[*over, "beton.overwrite=true", "beton.split=all", "beton.mode=jpg"])
    ffcv_mod.write_beton_stage(cfg)
    assert len(ffcv_mod.FFCVSource(out, image_size=8, global_batch_size=4, seed=0)) == 24
    bad = load_config(ffcv_mod.BetonConfig, overrides=["data.name=digits", "beton.original=true", f"beton.out={out}x"])
    with pytest.raises(ConfigError, match="imagefolder"):
        ffcv_mod.write_beton_stage(bad)


@needs_ffcv
def test_decode_time_crops_cut_the_same_boxes_as_the_torchvision_loader(tmp_path):
    """views.crop=decode through FFCV (one seeded decoder per view over the stored originals) and through the
    torchvision workers: the same images in the same order, and each view covers the same box. The images encode
    position (red = column, green = row), so a view's mean colour locates its box; the two resamplers (OpenCV's
    INTER_AREA, PIL's bilinear) agree on it within 2 levels, where another epoch's boxes miss by far more."""
    from PIL import Image

    from dist_awenc.data.crops import CropSpec
    from dist_awenc.data.decode_views import DecodeSource

    root = tmp_path / "img"
    for k in range(8):
        h, w = (48 + 8 * (k % 3), 64 - 4 * (k % 4))
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full((h, w), 40 * (k % 6))], -1)
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"c{k % 2}" / f"{k}.png")
    ds = build_dataset("imagefolder", root=root, image_size=16)
    beton = ffcv_mod.write_beton(ds, tmp_path / "orig.beton", original=True, progress=False)
    spec = CropSpec(size=16, n_views=2, seed=4, scale=(0.08, 1.0))

    def views(source, epoch):
        batches = _epoch(source, epoch)
        return torch.cat([b.images for b in batches]), torch.cat([b.index for b in batches])

    ffcv_src = ffcv_mod.FFCVSource(beton, image_size=16, global_batch_size=4, seed=4, crops=spec)
    torch_src = DecodeSource(ds, GlobalBatchSampler(len(ds), 4, seed=4), spec)
    (a, ia), (b, ib) = views(ffcv_src, 1), views(torch_src, 1)
    assert torch.equal(ia, ib) and a.shape == b.shape == (8, 2, 3, 16, 16) and a.dtype == b.dtype == torch.uint8
    means = lambda x: x[:, :, :2].float().mean(dim=(-1, -2))  # noqa: E731  (b, V, 2): box centre, in levels
    assert (means(a) - means(b)).abs().max() < 2.0, (means(a) - means(b)).abs().max()
    other, _ = views(ffcv_src, 2)  # the next epoch: the loader is rebuilt with that epoch's key
    assert (means(other) - means(b)).abs().max() > 20.0
