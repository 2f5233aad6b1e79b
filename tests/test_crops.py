"""Decode-time views (#12, "standard views from the original image"): torchvision's RandomResizedCrop boxes, seeded
per (seed, epoch, position, view), cut from the original image by the torchvision loader and by FFCV alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from dist_awenc.data.crops import ATTEMPTS, CropSpec, crop_boxes, crop_key, crop_uniforms

H, W = 375, 500  # a typical ImageNet photograph


def _ours(n: int, h: int = H, w: int = W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), epoch: int = 0) -> np.ndarray:
    u = crop_uniforms(crop_key(0, epoch), np.arange(n), 1)
    return crop_boxes(u, np.full(n, h), np.full(n, w), scale, ratio)[:, 0]


def _torchvision(n: int, h: int = H, w: int = W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    return np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize("h,w,scale", [(H, W, (0.08, 1.0)), (64, 64, (0.3, 1.0)), (32, 96, (0.08, 1.0))])
def test_the_box_distribution_is_randomresizedcrops(h, w, scale):
    """Area fraction, log aspect and position of 6000 boxes: two-sample KS tests against torchvision's own draws
    (a 0.1% level for each of 4 statistics; a broken fallback, clamping instead of retrying, or a missing
    rounding fails them), and the boxes always lie inside the image."""
    ours, ref = _ours(6000, h, w, scale), _torchvision(6000, h, w, scale)
    for b in (ours, ref):
        i, j, bh, bw = b.T
        assert (i >= 0).all() and (j >= 0).all() and (i + bh <= h).all() and (j + bw <= w).all() and (bh > 0).all()

    def features(b):
        i, j, bh, bw = b.T.astype(float)
        return {"area": bh * bw / (h * w), "log_aspect": np.log(bw / bh), "centre_y": (i + bh / 2) / h,
                "centre_x": (j + bw / 2) / w}

    fo, fr = features(ours), features(ref)
    for name in fo:
        p = stats.ks_2samp(fo[name], fr[name]).pvalue
        assert p > 1e-3, f"{name}: KS p = {p:.2g} (ours mean {fo[name].mean():.4f}, torchvision {fr[name].mean():.4f})"


def test_the_test_sees_a_wrong_distribution():
    """The same KS check rejects the old clamped boxes (area drawn in (0.08, 1) and clamped to the image)."""
    ours = _ours(6000)
    area = ours[:, 2] * ours[:, 3] / (H * W)
    rng = np.random.default_rng(0)
    s, r = rng.uniform(0.08, 1.0, 6000), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), 6000))
    clamped = np.minimum(np.sqrt(s * r), 1.0) * np.minimum(np.sqrt(s / r), 1.0)
    assert stats.ks_2samp(area, clamped).pvalue < 1e-3


def test_every_attempt_failing_gives_torchvisions_central_crop():
    """A 10x1000 strip admits no box of aspect 3/4..4/3 above a tiny area: the fallback is the central crop at the
    nearest allowed aspect, exactly as torchvision's."""
    u = np.full((1, 1, ATTEMPTS, 4), 0.99)  # large areas only: none fits in a 10-pixel-high strip
    (box,) = crop_boxes(u, np.array([10]), np.array([1000]), (0.5, 1.0), (3 / 4, 4 / 3))[:, 0]
    h, w = 10, round(10 * 4 / 3)
    assert box.tolist() == [0, (1000 - w) // 2, h, w]


def test_boxes_depend_on_seed_epoch_position_and_view_only():
    key = crop_key(7, 3)
    u = crop_uniforms(key, np.array([5, 9, 5]), 2)
    assert np.array_equal(u[0], u[2])  # the same position: the same draws, wherever it sits in a batch
    assert not np.array_equal(u[0, 0], u[0, 1])  # two views differ
    assert not np.array_equal(u[0], u[1])
    assert not np.array_equal(u, crop_uniforms(crop_key(7, 4), np.array([5, 9, 5]), 2))  # another epoch
    assert ((u >= 0) & (u < 1)).all()
    # position 9 alone, or as the first of several: the same uniforms (no dependence on batch layout)
    assert np.array_equal(crop_uniforms(key, np.array([9]), 2)[0], u[1])


def test_the_uniforms_are_uniform():
    u = crop_uniforms(crop_key(0, 0), np.arange(2000), 2).reshape(-1)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02


def test_crop_spec_refuses_bad_values():
    with pytest.raises(ValueError, match="views per image"):
        CropSpec(size=8, n_views=0, seed=0)
    with pytest.raises(ValueError, match="view size"):
        CropSpec(size=0, n_views=2, seed=0)


# --------------------------------------------------------------------------- the torchvision loader


def _folder(root, n: int = 12, seed: int = 0):
    """``n`` JPEG photographs of varied sizes (some landscape, some portrait) in 2 class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"c{k % 2}" / f"{k:03d}.jpg", quality=95)
    from dist_awenc.data import build_dataset

    return build_dataset("imagefolder", root=root, image_size=16)


def _batches(dataset, spec, world: int = 1, rank: int = 0, batch: int = 4, epoch: int = 0, indices=None):
    from dist_awenc.data.decode_views import DecodeSource
    from dist_awenc.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(indices if indices is not None else len(dataset), batch, seed=spec.seed, rank=rank,
                                 world_size=world)
    return list(DecodeSource(dataset, sampler, spec).iterate(epoch, 0))


def test_the_folder_loader_cuts_each_box_from_the_original_file(tmp_path):
    """Each view is PIL's crop of the file at full resolution, resized to S: the box a test computes from
    (seed, epoch, position, view) and the file's own size; uint8, (b, V, 3, S, S), labels and indices kept. (The
    reference decode, ``full_decode``; tests/test_box_decode.py bounds how far the default's views are from it.)"""
    from PIL import Image

    ds = _folder(tmp_path)
    spec = CropSpec(size=16, n_views=2, seed=5, scale=(0.2, 1.0), full_decode=True)
    indices = torch.tensor([3, 7, 1, 0, 11, 5, 2, 9])
    batches = _batches(ds, spec, indices=indices, epoch=2)
    assert [tuple(b.images.shape) for b in batches] == [(4, 2, 3, 16, 16)] * 2
    assert batches[0].images.dtype == torch.uint8
    from dist_awenc.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(indices, 4, seed=5)
    sampler.set_epoch(2)
    positions = sampler.epoch_positions()
    u = crop_uniforms(crop_key(5, 2), positions.numpy(), 2)
    got = torch.cat([b.images for b in batches])
    for k, p in enumerate(positions.tolist()):
        idx = int(indices[p])
        assert int(torch.cat([b.index for b in batches])[k]) == idx
        with Image.open(ds.samples[idx][0]) as img:
            img = img.convert("RGB")
            boxes = crop_boxes(u[k : k + 1], np.array([img.height]), np.array([img.width]), spec.scale, spec.ratio)[0]
            for v, (i, j, h, w) in enumerate(boxes.tolist()):
                want = np.asarray(img.crop((j, i, j + w, i + h)).resize((16, 16), Image.BILINEAR))
                assert np.array_equal(got[k, v].permute(1, 2, 0).numpy(), want)


def test_decode_views_do_not_depend_on_the_number_of_processes(tmp_path):
    ds = _folder(tmp_path)
    spec = CropSpec(size=16, n_views=2, seed=1)
    one = torch.cat([b.images for b in _batches(ds, spec, batch=4, epoch=1)])
    ranks = [_batches(ds, spec, world=2, rank=r, batch=4, epoch=1) for r in range(2)]
    two = torch.cat([torch.cat([ranks[0][k].images, ranks[1][k].images]) for k in range(len(ranks[0]))])
    assert torch.equal(one, two)
    assert not torch.equal(one, torch.cat([b.images for b in _batches(ds, spec, batch=4, epoch=2)]))


def test_an_in_memory_dataset_is_cropped_from_its_stored_images():
    """A tensor dataset's 'original' is the stored S x S image: views are bilinear resamples of its boxes."""
    import torch.nn.functional as F

    from dist_awenc.data import TensorImageDataset

    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.rand(8, 3, 24, 24, generator=g), torch.arange(8) % 2, 2)
    spec = CropSpec(size=12, n_views=2, seed=3)
    (batch,) = _batches(ds, spec, batch=8)
    assert batch.images.shape == (8, 2, 3, 12, 12) and batch.images.dtype == torch.float32
    k = int((batch.index == 4).nonzero())  # position 4 of range(8) is image 4
    u = crop_uniforms(crop_key(3, 0), np.array([4]), 2)
    i, j, h, w = crop_boxes(u, np.array([24]), np.array([24]), spec.scale, spec.ratio)[0, 1].tolist()
    want = F.interpolate(ds.images[4:5, :, i : i + h, j : j + w], size=(12, 12), mode="bilinear",
                         align_corners=False, antialias=h > 12 or w > 12)[0]
    assert torch.allclose(batch.images[k, 1], want.clamp(0, 1))


def test_pretraining_with_decode_views_runs_and_resumes(tmp_path):
    """``views.crop=decode`` through ``awenc pretrain`` on an image folder: it trains, and a resumed run ends
    with the same weights as an uninterrupted one (the boxes are a function of epoch and position)."""
    from accelerate.state import AcceleratorState

    from dist_awenc.config import PretrainConfig, load_config
    from dist_awenc.engine.loop import Interrupted
    from dist_awenc.ssl.pretrain import pretrain
    from tests.conftest import tiny_overrides, weights

    _folder(tmp_path / "imgs", n=16)
    extra = {"data.name": "imagefolder", "data.root": str(tmp_path / "imgs"), "data.splits": "[1.0,0.0,0.0]",
             "data.image_size": 16, "views.crop": "decode", "views.crop_scale_min": 0.08, "train.batch_size": 8,
             "train.max_steps": 4, "train.checkpoint_every": 2}

    def run(name, **kw):
        AcceleratorState._reset_state(reset_partial_state=True)
        return pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, name, **extra)), **kw)

    whole = run("whole")
    with pytest.raises(Interrupted):
        run("cut", interrupt_at=2)
    resumed = run("cut")
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decoding_on_the_device_cuts_the_same_views(tmp_path):
    """data.decode=device: the workers send JPEG bytes and boxes, the device decodes (here the CPU stands in for a
    GPU's nvjpeg) and cuts the same boxes; the views match PIL's within resampling differences, batch by batch."""
    from dist_awenc.data.decode_views import DeviceDecodeSource
    from dist_awenc.data.sampler import GlobalBatchSampler

    ds = _folder(tmp_path)
    spec = CropSpec(size=16, n_views=2, seed=2)
    pil = _batches(ds, spec, batch=4, epoch=3)
    dev = list(DeviceDecodeSource(ds, GlobalBatchSampler(len(ds), 4, seed=2), spec, "cpu").iterate(3, 0))
    assert [torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels) for a, b in zip(pil, dev)] == [True] * 3
    a, b = torch.cat([x.images for x in pil]).float(), torch.cat([x.images for x in dev]).float()
    assert b.shape == a.shape and dev[0].images.dtype == torch.uint8
    assert (a - b).abs().mean() < 3.0, (a - b).abs().mean()  # levels of 255: PIL's vs torch's bilinear filter


def test_decoding_on_the_device_hands_other_files_to_pil_and_refuses_bad_settings(tmp_path):
    """PNG files are no JPEGs: the workers cut their views with PIL, as data.decode=cpu does (tests/test_bad_files.py
    covers CMYK, grayscale and broken files)."""
    from PIL import Image

    from dist_awenc.config import DataSection
    from dist_awenc.data import TensorImageDataset
    from dist_awenc.data.decode_views import DecodeSource, DeviceDecodeSource
    from dist_awenc.data.ffcv import build_source, source_options
    from dist_awenc.data.sampler import GlobalBatchSampler
    from dist_awenc.errors import ConfigError

    spec = CropSpec(size=8, n_views=2, seed=0)
    (tmp_path / "a").mkdir()
    for k in range(4):
        Image.new("RGB", (12, 10), (k * 40, 0, 0)).save(tmp_path / "a" / f"{k}.png")
    from dist_awenc.data import build_dataset

    ds = build_dataset("imagefolder", root=tmp_path, image_size=8)
    (dev,) = list(DeviceDecodeSource(ds, GlobalBatchSampler(4, 4, seed=0), spec, "cpu").iterate(0, 0))
    (cpu,) = list(DecodeSource(ds, GlobalBatchSampler(4, 4, seed=0), spec).iterate(0, 0))
    assert torch.equal(dev.images, cpu.images) and torch.equal(dev.index, cpu.index)
    with pytest.raises(TypeError, match="reads image files; TensorImageDataset holds none"):
        DeviceDecodeSource(TensorImageDataset(torch.rand(4, 3, 8, 8), torch.zeros(4), 1), GlobalBatchSampler(4, 4, seed=0),
                           spec, "cpu")
    opts = source_options(DataSection(name="imagefolder", image_size=8, decode="device"))
    with pytest.raises(ConfigError, match="needs views.crop=decode"):
        build_source(ds, torch.arange(4), GlobalBatchSampler(4, 4, seed=0), **opts)
    with pytest.raises(ConfigError, match="data.decode must be cpu or device"):
        build_source(ds, torch.arange(4), GlobalBatchSampler(4, 4, seed=0), **{**opts, "decode": "gpu"})
