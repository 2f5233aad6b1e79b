"""Tests of dist_awenc.data: datasets, splits, the global batch sampler and the views."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dist_awenc.data import (
    DATASETS,
    DatasetNotFoundError,
    EmptyDatasetError,
    GlobalBatchSampler,
    ImageDecodeError,
    ViewConfig,
    build_dataset,
    loader,
    make_splits,
    make_views,
    mild_view_config,
    register_dataset,
    train_test_split_indices,
)
from dist_awenc.data.views import apply_params, sample_params

VALID = "cifar10, cifar100, digits, fake, imagefolder, stl10, svhn"


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits", image_size=16)


# --------------------------------------------------------------------------- datasets


def test_digits_shape_range_labels(digits):
    assert len(digits) == 1797 and digits.num_classes == 10
    assert digits.images.shape == (1797, 3, 16, 16) and digits.images.dtype == torch.float32
    assert digits.images.min() >= 0.0 and digits.images.max() <= 1.0
    assert digits.images.max() > 0.9  # scaled from 0..16, not left tiny
    assert torch.equal(digits.images[:, 0], digits.images[:, 2])  # gray repeated to 3 channels
    assert digits.labels.dtype == torch.long
    assert set(digits.labels.tolist()) == set(range(10))
    image, label = digits[5]
    assert image.shape == (3, 16, 16) and isinstance(label, int)


def test_digits_other_size_and_subset():
    ds = build_dataset("digits", image_size=8, size=100, seed=3)
    assert ds.images.shape == (100, 3, 8, 8)
    again = build_dataset("digits", image_size=8, size=100, seed=3)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(KeyError) as info:
        build_dataset("nope")
    assert isinstance(info.value, ValueError)
    assert str(info.value) == f"unknown dataset 'nope'; valid: {VALID}"


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="'digits' is already registered.*cifar10"):
        register_dataset("digits")(lambda **kw: None)
    assert set(DATASETS) == set(VALID.split(", "))


def test_fake_dataset():
    ds = build_dataset("fake", image_size=12, size=24, seed=1)
    assert ds.images.shape == (24, 3, 12, 12) and len(ds) == 24 and ds.num_classes == 10
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert torch.equal(ds.images, build_dataset("fake", image_size=12, size=24, seed=1).images)
    assert not torch.equal(ds.images, build_dataset("fake", image_size=12, size=24, seed=2).images)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_torchvision_dataset_missing_root(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=f"dataset '{name}': no data under .*download=True"):
        build_dataset(name, root=tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError, match="no data root given"):
        build_dataset(name, root=None)
    with pytest.raises(DatasetNotFoundError):  # exists but empty
        build_dataset(name, root=tmp_path)


def test_cifar10_wrong_files_is_not_found(tmp_path):
    (tmp_path / "readme.txt").write_text("not cifar")
    with pytest.raises(FileNotFoundError, match="CIFAR10"):
        build_dataset("cifar10", root=tmp_path)


def _write_png(path, size, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_loads_pngs(tmp_path):
    sizes = [(10, 7), (20, 20), (5, 9)]
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i, size in enumerate(sizes):
            _write_png(tmp_path / cls / f"{i}.png", size, colour)
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image extension")
    ds = build_dataset("imagefolder", root=tmp_path, image_size=8)
    assert len(ds) == 6 and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 0
    assert torch.allclose(image[0], torch.ones(8, 8)) and image[2].max() == 0.0  # red
    images, labels = ds.get_batch(torch.tensor([1, 4]))
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]
    assert images[1, 2].min() == 1.0  # blue


def test_a_training_source_sends_decoded_files_as_uint8(tmp_path):
    """build_source's torchvision source: an image folder's batches are the decoder's uint8, and the loop's transfer
    (move_step) makes exactly get_batch's float32 of them; an in-memory dataset stays float32."""
    from dist_awenc.data.ffcv import build_source
    from dist_awenc.data.transfer import HostDraw, move_step

    rng = np.random.default_rng(0)
    for i in range(8):
        _write_png(tmp_path / f"c{i % 2}" / f"{i}.png", (int(rng.integers(5, 20)), 9), tuple(int(c) for c in rng.integers(0, 256, 3)))
    ds = build_dataset("imagefolder", root=tmp_path, image_size=8)
    src = build_source(ds, torch.arange(8), GlobalBatchSampler(8, 4, seed=0), image_size=8)
    batch = next(iter(src.iterate(0, 0)))
    assert batch.images.dtype == torch.uint8
    (on_device, *_), _ = move_step(batch, HostDraw([]), "cpu")
    assert torch.equal(on_device, ds.get_batch(batch.index)[0])
    digits = build_dataset("digits", image_size=8)
    mem = next(iter(build_source(digits, torch.arange(16), GlobalBatchSampler(16, 4, seed=0), image_size=8).iterate(0, 0)))
    assert mem.images.dtype == torch.float32


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"<root>/<class>/<image>"):
        build_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(EmptyDatasetError, match="no class folders"):
        build_dataset("imagefolder", root=tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("text")
    with pytest.raises(EmptyDatasetError, match="no image files"):
        build_dataset("imagefolder", root=tmp_path)
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"definitely not a png")
    ds = build_dataset("imagefolder", root=tmp_path)
    with pytest.raises(ImageDecodeError, match="broken.png"):
        ds[0]


# --------------------------------------------------------------------------- splits


def test_splits_disjoint_cover_deterministic():
    splits = make_splits(1797, seed=0)
    assert list(splits) == ["pretrain", "holdout", "downstream"]
    allidx = torch.cat(list(splits.values()))
    assert torch.equal(allidx.sort().values, torch.arange(1797))  # disjoint and covering
    assert [len(v) for v in splits.values()] == [898, 359, 540]
    again = make_splits(1797, seed=0)
    assert all(torch.equal(splits[k], again[k]) for k in splits)
    other = make_splits(1797, seed=1)
    assert not torch.equal(splits["pretrain"], other["pretrain"])


def test_splits_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        make_splits(100, 0, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        make_splits(100, 0, (0.8, 0.3, -0.1))
    with pytest.raises(ValueError, match="3 entries"):
        make_splits(100, 0, (0.5, 0.5))
    with pytest.raises(ValueError, match="too small"):
        make_splits(2, 0)


def test_split_fractions_are_a_config_field_and_zero_leaves_a_split_empty():
    from dist_awenc.data import splits_for
    from dist_awenc.errors import ConfigError

    default = make_splits(1797, seed=0)
    same = make_splits(1797, 0, [0.5, 0.2, 0.3])
    assert all(torch.equal(default[k], same[k]) for k in default)  # the field's default is the split every run used
    everything = make_splits(1797, 0, [1, 0, 0])
    assert len(everything["pretrain"]) == 1797 and len(everything["holdout"]) == len(everything["downstream"]) == 0
    other_dataset = splits_for(1797, 0, [0, 0, 1], "downstream", "downstream")
    assert len(other_dataset["downstream"]) == 1797
    with pytest.raises(ConfigError, match=r"data.splits=\[1, 0, 0\] leaves the holdout split empty, and verify needs it"):
        splits_for(1797, 0, [1, 0, 0], "verify", "holdout")
    with pytest.raises(ConfigError, match="data.splits: fractions must be in"):
        splits_for(1797, 0, [0.5, 0.6, 0.0], "verify", "holdout")
    with pytest.raises(ValueError, match="too small"):
        make_splits(10, 0, (0.98, 0.01, 0.01))  # a positive fraction that rounds to no image


def test_train_test_split_indices():
    idx = make_splits(500, seed=0)["downstream"]
    train, test = train_test_split_indices(idx, seed=4, test_fraction=0.3)
    assert len(test) == 45 and len(train) == 105
    assert torch.equal(torch.cat([train, test]).sort().values, idx)
    train2, test2 = train_test_split_indices(idx, seed=4)
    assert torch.equal(train, train2) and torch.equal(test, test2)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split_indices(idx, seed=0, test_fraction=1.0)


# --------------------------------------------------------------------------- sampler


def test_sampler_rank_slices_equal_single_process():
    indices = make_splits(103, seed=0)["pretrain"]  # 52 indices: 6 batches of 8, 4 dropped
    single = GlobalBatchSampler(indices, 8, seed=7)
    ranks = [GlobalBatchSampler(indices, 8, seed=7, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        full = list(single)
        assert len(full) == len(single) == 6 and all(len(b) == 8 for b in full)
        parts = [list(s) for s in ranks]
        assert all(len(b) == 4 for p in parts for b in p)
        assert [a + b for a, b in zip(*parts)] == full
        flat = sum(full, [])
        assert len(set(flat)) == len(flat) and set(flat) <= set(indices.tolist())
    single.set_epoch(0)
    epoch0 = list(single)
    single.set_epoch(1)
    assert list(single) != epoch0
    single.set_epoch(0)
    assert list(single) == epoch0  # seeded by (seed, epoch) only
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(single) == epoch0


def test_sampler_resume_and_errors():
    sampler = GlobalBatchSampler(40, 8, seed=1)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_start(2)
    assert len(sampler) == 3 and list(sampler) == full[2:]
    sampler.set_epoch(4)
    assert len(sampler) == 5
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        GlobalBatchSampler(40, 8, seed=0, world_size=3)
    with pytest.raises(ValueError, match="larger than the 5 indices"):
        GlobalBatchSampler(5, 8, seed=0)
    with pytest.raises(ValueError, match="start batch"):
        sampler.set_start(6)


def test_sampler_no_drop_last_pads_and_no_shuffle():
    sampler = GlobalBatchSampler(10, 4, seed=0, shuffle=False, drop_last=False)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_loader_yields_images_labels_index(digits):
    sampler = GlobalBatchSampler(torch.arange(100, 164), 16, seed=0, rank=1, world_size=2)
    batches = list(loader(digits, sampler))
    assert len(batches) == 4
    images, labels, index = batches[0]
    assert images.shape == (8, 3, 16, 16) and labels.shape == (8,) and index.shape == (8,)
    assert index.tolist() == next(iter(sampler))
    assert torch.equal(images, digits.images[index]) and torch.equal(labels, digits.labels[index])


def test_loader_with_lazy_dataset(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"c{i % 2}" / f"{i}.png", (6, 6), (i * 60, 0, 0))
    ds = build_dataset("imagefolder", root=tmp_path, image_size=4)
    images, labels, index = next(iter(loader(ds, GlobalBatchSampler(4, 4, seed=0))))
    assert images.shape == (4, 3, 4, 4)
    assert labels.tolist() == ds.labels[index].tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_sampler_source_builds_one_loader_whose_workers_persist_across_epochs(digits, workers):
    from dist_awenc.data import SamplerSource

    split = torch.arange(40, 88)
    source = SamplerSource(digits, GlobalBatchSampler(split, 8, seed=4, rank=1, world_size=2), workers)
    fresh = SamplerSource(digits, GlobalBatchSampler(split, 8, seed=4, rank=1, world_size=2), 0)
    seen, pids = [], []
    for epoch, start, take in [(0, 0, 2), (0, 3, 3), (1, 0, 6), (2, 5, 1)]:  # partly consumed epochs, resumes
        it = source.iterate(epoch, start)
        got = [next(it) for _ in range(take)]
        want = list(fresh.iterate(epoch, start))[:take]
        assert all(torch.equal(a.index, b.index) and torch.equal(a.images, b.images) for a, b in zip(got, want))
        seen.append(source._loader)
        if workers:
            pids.append([w.pid for w in source._loader._iterator._workers])
    assert all(ld is seen[0] for ld in seen)  # one DataLoader for the run
    assert all(p == pids[0] for p in pids)  # the same worker processes in every epoch


def test_build_source_pins_memory_for_cuda_only(digits):
    from dist_awenc.data.ffcv import build_source

    sampler = GlobalBatchSampler(16, 8, seed=0)
    assert not build_source(digits, torch.arange(16), sampler, image_size=16, device="cpu").pin_memory
    assert build_source(digits, torch.arange(16), sampler, image_size=16, device=torch.device("cuda", 0)).pin_memory


# --------------------------------------------------------------------------- views

IDENTITY = dict(
    crop_scale_min=1.0, crop_scale_max=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0,
    flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
)


def test_views_shape_range_determinism(digits):
    x = digits.images[:8]
    cfg = ViewConfig(blur_p=0.5, n_views=3)
    views = make_views(x, cfg, seed=0, step=5)
    assert len(views) == 3
    for v in views:
        assert v.shape == x.shape and v.dtype == x.dtype
        assert v.min() >= 0.0 and v.max() <= 1.0
    again = make_views(x, cfg, seed=0, step=5)
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    later = make_views(x, cfg, seed=0, step=6)
    assert not torch.equal(views[0], later[0])
    assert not torch.equal(views[0], views[1])  # the views of one step differ
    other_stream = make_views(x, cfg, seed=0, step=5, stream=1)
    assert not torch.equal(views[0], other_stream[0])


@pytest.mark.parametrize("cfg", [ViewConfig(), ViewConfig(blur_p=0.5, grayscale_p=0.5), mild_view_config()])
def test_views_world_size_slicing(cfg):
    torch.manual_seed(0)
    x = torch.rand(8, 3, 12, 12)
    single = make_views(x, cfg, seed=3, step=11)
    parts = [make_views(x[r * 4 : (r + 1) * 4], cfg, seed=3, step=11, rank=r, world_size=2) for r in range(2)]
    for v in range(cfg.n_views):
        assert torch.equal(torch.cat([parts[0][v], parts[1][v]]), single[v])


def test_identity_params_reproduce_input():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 10, 10)
    params = sample_params(ViewConfig(**IDENTITY), 4, torch.Generator().manual_seed(0))
    assert torch.allclose(apply_params(x, params), x, atol=1e-5)


def test_flip_params_flip():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 10, 10)
    params = sample_params(ViewConfig(**{**IDENTITY, "flip_p": 1.0}), 4, torch.Generator().manual_seed(0))
    assert params["flip"].all()
    assert torch.allclose(apply_params(x, params), x.flip(-1), atol=1e-5)


def test_grayscale_and_jitter_params():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 10, 10)
    gen = torch.Generator().manual_seed(0)
    gray = apply_params(x, sample_params(ViewConfig(**{**IDENTITY, "grayscale_p": 1.0}), 4, gen))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    params = sample_params(ViewConfig(**{**IDENTITY, "jitter_p": 1.0, "hue": 0.0}), 4, gen)
    params["contrast"][:] = 1.0
    params["saturation"][:] = 1.0
    jittered = apply_params(x, params)
    expected = (x * params["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(jittered, expected, atol=1e-5)  # hue 0 is (numerically) the identity


def test_blur_smooths_and_crop_zooms():
    x = torch.zeros(2, 3, 33, 33)  # a dot far enough from the border for sigma <= 2
    x[:, :, 16, 16] = 1.0
    gen = torch.Generator().manual_seed(0)
    params = sample_params(ViewConfig(**{**IDENTITY, "blur_p": 1.0}), 2, gen)
    out = apply_params(x, params)
    assert out[:, :, 16, 16].max() < 1.0 and out[:, :, 16, 17].min() > 0.0
    assert torch.allclose(out.sum(dim=(2, 3)), torch.ones(2, 3), atol=1e-4)  # mass preserved
    zoom = ViewConfig(**{**IDENTITY, "crop_scale_min": 0.25, "crop_scale_max": 0.25})
    out = apply_params(x, sample_params(zoom, 2, gen))
    assert out.sum() > x.sum()  # a half-side crop magnifies the dot


def test_view_config_validation_and_mild():
    with pytest.raises(ValueError, match="flip_p is a probability"):
        ViewConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="crop_scale_min/max"):
        ViewConfig(crop_scale_min=0.9, crop_scale_max=0.5)
    with pytest.raises(ValueError, match="n_views"):
        ViewConfig(n_views=0)
    with pytest.raises(ValueError, match="blur_sigma"):
        ViewConfig(blur_sigma_min=3.0, blur_sigma_max=2.0)
    mild = mild_view_config()
    assert (mild.crop_scale_min, mild.grayscale_p, mild.blur_p, mild.jitter_p) == (0.8, 0.0, 0.0, 0.5)
    # plain fields, and one mapping of them (views.view2: the second view's overrides, keys checked when built)
    assert all(f.type in ("int", "float", "bool", "str", int, float, bool, str) for f in dataclasses.fields(ViewConfig)
               if f.name != "view2")
    assert {f.name: f.type for f in dataclasses.fields(ViewConfig)}["view2"] in ("dict[str, float]", dict[str, float])
    with pytest.raises(ValueError, match="views.crop must be one of device, decode"):
        ViewConfig(crop="center")


def test_views_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        make_views(torch.rand(2, 1, 8, 8), ViewConfig(), seed=0, step=0)
    with pytest.raises(ValueError, match="float"):
        make_views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ViewConfig(), seed=0, step=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_on_cuda_match_cpu():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    cfg = ViewConfig(blur_p=0.5)
    cpu = make_views(x, cfg, seed=0, step=1)
    gpu = make_views(x.cuda(), cfg, seed=0, step=1)
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and torch.allclose(a, b.cpu(), atol=1e-4)
