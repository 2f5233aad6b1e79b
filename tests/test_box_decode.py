"""Decoding only what the boxes need (#29): the views of a JPEG decoded at the DCT scale its boxes allow equal the
full decode's views at the same boxes, within stated bounds, on files this test writes (several sizes; 4:4:4, 4:2:2
and 4:2:0 chroma); the files the fast path does not take (progressive, CMYK, grayscale, a PNG named .jpg, damaged)
get the full decode's views or its error, naming the file; the FFCV decoder's DCT scaling, the same.

The bounds, in levels of 0..255, per view (mean of |fast - full| over its pixels, and the largest single one):

* no DCT scaling (k = 1): the same decoded pixels (libjpeg-turbo's accurate IDCT, bit for bit) and the same bilinear
  reducing filter in torch's uint8 kernel: at most 1 level anywhere (intermediate rounding), and 0 for most pixels;
* k = 2, 4, 8 at outputs of 32 px and more: libjpeg's DCT-domain reduction replaces part of the triangle filter.
  On these photograph-like files (a smooth colour field with noise, as benchmarks/data.py writes) the views stay
  within 2 levels on average and 12 at a pixel (measured: at most 1.25 and 8, both with 4:2:2 at 1/4); the FFCV
  decoder (its area filter on the reduced image against the area filter on the full one) within 2 and 16.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REQUIRE_EXTRAS
from PIL import Image

from dist_awenc.data import build_dataset
from dist_awenc.data.bad_files import Replacement
from dist_awenc.data.box_decode import dct_scale, jpeg_header, views_from_jpeg
from dist_awenc.data.crops import CropSpec, crop_boxes, crop_uniforms
from dist_awenc.data.decode_views import DecodeSource, DecodeViews
from dist_awenc.data.images import ImageDecodeError, crop_pil
from dist_awenc.data.sampler import GlobalBatchSampler

needs_ffcv = pytest.mark.skipif(
    importlib.util.find_spec("ffcv") is None and not REQUIRE_EXTRAS,
    reason="FFCV is not installed (optional extra): run scripts/install_ffcv.sh to test the FFCV loader",
)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

EXACT_MAX = 1  # k = 1: levels, anywhere
SCALED_MEAN, SCALED_MAX = 2.0, 12  # k > 1, outputs >= 32 px: mean over a view, and any pixel
FFCV_MEAN, FFCV_MAX = 2.0, 16
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}  # PIL's codes


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth random colour field with mild noise, uint8 (h, w, 3): decodes like a photograph."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    img = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _boxes(h: int, w: int, n: int, views: int = 2, seed: int = 0) -> np.ndarray:
    """(n, views, 4) RandomResizedCrop boxes of an h x w image (the loaders' own draw)."""
    u = crop_uniforms(seed, np.arange(n), views)
    return crop_boxes(u, np.full(n, h), np.full(n, w), (0.08, 1.0), (3 / 4, 4 / 3))


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


# --------------------------------------------------------------------------- the torchvision path


def test_header_and_scale_rule():
    """The frame header is read without decoding; the scale is the largest 1/k keeping every box >= S both ways."""
    img = _photo(97, 61, 0)
    head = jpeg_header(_jpeg(img))
    assert (head.height, head.width, head.components, head.plain) == (61, 97, 3, True)
    assert not jpeg_header(_jpeg(img, progressive=True)).plain
    assert jpeg_header(_jpeg(Image.fromarray(img).convert("CMYK"))).components == 4
    assert jpeg_header(_jpeg(Image.fromarray(img).convert("L"))).components == 1
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None and jpeg_header(b"") is None and jpeg_header(_jpeg(img)[:40]) is None
    data = _jpeg(img)
    assert views_from_jpeg(data, lambda h, w: np.array([[0, 0, h, w]]), 8) is not None
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 97 * 61 - 1
    try:  # larger than PIL allows: PIL decides (it refuses decompression bombs)
        assert views_from_jpeg(data, lambda h, w: np.array([[0, 0, h, w]]), 8) is None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    box = lambda h, w: np.array([[0, 0, h, w], [0, 0, 300, 300]])  # noqa: E731
    assert [dct_scale(box(h, w), 32) for h, w in [(31, 400), (64, 63), (64, 64), (128, 999), (256, 256), (900, 900)]] \
        == [1, 1, 2, 4, 8, 8]


@pytest.mark.parametrize("chroma", list(SUBSAMPLING))
def test_views_equal_the_full_decodes_within_the_bound(chroma):
    """Every scale 1, 1/2, 1/4, 1/8 is taken on these sizes; each view against PIL's crop + resize of the whole
    decode at the same box."""
    seen: dict[int, list[tuple[float, int]]] = {}
    for case, (w, h, size) in enumerate([(500, 375, 224), (640, 480, 32), (333, 251, 32), (97, 61, 40)]):
        data = _jpeg(_photo(w, h, case), subsampling=SUBSAMPLING[chroma])
        with Image.open(io.BytesIO(data)) as img:
            full = img.convert("RGB")
        for boxes in _boxes(h, w, 12, seed=case):
            fast = views_from_jpeg(data, lambda hh, ww: boxes, size)
            assert fast is not None and fast.shape == (2, size, size, 3) and fast.dtype == np.uint8
            d = _diff(fast, crop_pil(full, lambda hh, ww: boxes, size))
            seen.setdefault(dct_scale(boxes, size), []).extend((float(v.mean()), int(v.max())) for v in d)
    assert set(seen) == {1, 2, 4, 8}, sorted(seen)
    assert max(m for _, m in seen[1]) <= EXACT_MAX
    scaled = [x for k in (2, 4, 8) for x in seen[k]]
    assert max(m for m, _ in scaled) <= SCALED_MEAN and max(m for _, m in scaled) <= SCALED_MAX, \
        {k: (max(m for m, _ in v), max(m for _, m in v)) for k, v in seen.items()}


def _write(root: Path, name: str, data: bytes) -> Path:
    (root / "c0").mkdir(parents=True, exist_ok=True)
    (root / "c0" / name).write_bytes(data)
    return root / "c0" / name


def test_other_files_take_the_full_decode_or_its_error(tmp_path):
    """A progressive, CMYK or grayscale JPEG, a PNG named .jpg and a JPEG with damaged data get exactly the full
    decode's views (or, where PIL cannot decode them either, its one-line error naming the file); a truncated file
    is replaced by the split's next readable image under data.bad_files=skip."""
    img = Image.fromarray(_photo(120, 90, 3))
    good = _jpeg(img)
    scan = good.index(b"\xff\xda") + 200
    damaged = good[:scan] + bytes(b ^ 0x5A for b in good[scan : scan + 64]) + good[scan + 64 :]
    files = {"a_progressive.jpg": _jpeg(img, progressive=True), "b_cmyk.jpg": _jpeg(img.convert("CMYK")),
             "c_gray.jpg": _jpeg(img.convert("L")), "d_damaged.jpg": damaged, "e_plain.jpg": good,
             "f_truncated.jpg": good[: len(good) // 2]}
    png = io.BytesIO()
    img.save(png, "PNG")
    files["b_png.jpg"] = png.getvalue()
    for name, data in files.items():
        _write(tmp_path, name, data)
    ds = build_dataset("imagefolder", root=tmp_path, image_size=16)
    names = [Path(p).name for p, _ in ds.samples]
    boxes = _boxes(90, 120, 1)[0]
    for k, name in enumerate(names):
        if name != "e_plain.jpg":
            assert views_from_jpeg(files[name], lambda h, w: boxes, 16) is None, name
        try:
            want = ds.crop_one(k, lambda h, w: boxes, 16, full=True)
        except ImageDecodeError as err:  # the truncated file, and the damaged one if PIL refuses it too
            with pytest.raises(ImageDecodeError) as got:
                ds.crop_one(k, lambda h, w: boxes, 16)
            assert str(got.value) == str(err) and name in str(err) and "\n" not in str(err)
            continue
        assert np.array_equal(ds.crop_one(k, lambda h, w: boxes, 16), want) or name == "e_plain.jpg", name
    views = DecodeViews(ds, CropSpec(size=16, n_views=2, seed=0), Replacement(range(len(ds))))
    j, got, skipped = views.views_of(names.index("f_truncated.jpg"), lambda h, w: boxes)
    assert names[j] == "a_progressive.jpg" and got.shape == (2, 16, 16, 3)  # wraps to the split's first file
    assert [Path(p).name for p, _ in skipped] == ["f_truncated.jpg"] and "f_truncated.jpg" in skipped[0][1]


def test_the_loader_delivers_the_same_images_and_boxes_either_way(tmp_path):
    """DecodeSource with the default and with full_decode: the same order, labels and indices, views within the
    bounds; 2 workers change nothing."""
    for k in range(8):
        w, h = (200 + 40 * k, 150 + 20 * (k % 3))
        _write(tmp_path, f"{k}.jpg", _jpeg(_photo(w, h, k), subsampling=k % 3))
    ds = build_dataset("imagefolder", root=tmp_path, image_size=32)
    spec = CropSpec(size=32, n_views=2, seed=7)
    sampler = lambda: GlobalBatchSampler(len(ds), 4, seed=7)  # noqa: E731
    fast = list(DecodeSource(ds, sampler(), spec).iterate(1, 0))
    full = list(DecodeSource(ds, sampler(), dataclasses.replace(spec, full_decode=True)).iterate(1, 0))
    workers = list(DecodeSource(ds, sampler(), spec, num_workers=2).iterate(1, 0))
    for a, b, c in zip(fast, full, workers):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels) and torch.equal(a.images, c.images)
        d = (a.images.float() - b.images.float()).abs()
        assert d.mean(dim=(2, 3, 4)).max() <= SCALED_MEAN and d.max() <= SCALED_MAX


# --------------------------------------------------------------------------- the FFCV decoder


@needs_ffcv
def test_ffcv_dct_scaling_keeps_the_views(tmp_path):
    """The FFCV decoder with and without DCT scaling, on JPEGs stored at their own size: the same boxes; views of
    images decoded at scale 1 identical, the others within the bound."""
    from dist_awenc.data import ffcv as ffcv_mod

    sizes = [(320, 240), (256, 256), (180, 300), (400, 300), (96, 80), (500, 375)]
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(_photo(w, h, k)).save(tmp_path / f"{k}.png")  # the beton stores them as JPEG
    root = tmp_path / "img"
    for k in range(len(sizes)):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{k}.png").rename(root / f"c{k % 2}" / f"{k}.png")
    ds = build_dataset("imagefolder", root=root, image_size=16)
    beton = ffcv_mod.write_beton(ds, tmp_path / "b.beton", mode="jpg", original=True, jpeg_quality=90,
                                 progress=False, max_resolution=500)
    spec = CropSpec(size=32, n_views=2, seed=2)

    def views(s):
        src = ffcv_mod.FFCVSource(beton, image_size=32, global_batch_size=3, seed=2, crops=s, num_workers=1)
        batches = list(src.iterate(0, 0))
        return torch.cat([b.images for b in batches]), torch.cat([b.index for b in batches])

    (fast, index), (full, index2) = views(spec), views(dataclasses.replace(spec, full_decode=True))
    assert torch.equal(index, index2) and fast.shape == full.shape == (6, 2, 3, 32, 32)
    hw = {i: Image.open(ds.samples[i][0]).size[::-1] for i in range(len(ds))}
    u = crop_uniforms(spec.key(0), index.numpy(), 2)  # the beton holds the dataset in order: position = index
    scales = []
    for r, i in enumerate(index.tolist()):
        boxes = crop_boxes(u[r : r + 1], np.array([hw[i][0]]), np.array([hw[i][1]]), spec.scale, spec.ratio)[0]
        k = dct_scale(boxes, 32)
        scales.append(k)
        d = (fast[r].float() - full[r].float()).abs()
        if k == 1:
            assert torch.equal(fast[r], full[r])
        else:
            assert d.mean(dim=(1, 2, 3)).max() <= FFCV_MEAN and d.max() <= FFCV_MAX, (k, d.mean(), d.max())
    assert 1 in scales and max(scales) > 1, scales
