"""Decode-time views that decode only what their boxes need: the torchvision loader's fast path (#29).

The boxes of an image are drawn first (:mod:`dist_awenc.data.crops`, from the file's size read off its header), then
the JPEG is decoded at the smallest DCT scale 1/k (k in 1, 2, 4, 8) at which every view's box still measures at least
the output side S in both directions, by libjpeg-turbo through simplejpeg (its wheels bundle libjpeg-turbo: nothing
to install with apt). Each view is then cut and resized exactly as by the full decode, with the same box arithmetic
and the same resampler family (bilinear with the reducing, antialiasing filter, which only reads pixels inside the
box):

* k = 1 (no scaling): the decoded pixels are PIL's, bit for bit (the same libjpeg-turbo, the same accurate integer
  IDCT and fancy upsampling), and the box is resized by torch's uint8 antialiased bilinear kernel (a port of
  Pillow-SIMD's resampler, 2-3x faster than PIL's own); its intermediate rounding differs from PIL's by at most
  1 level (``tests/test_box_decode.py`` states and checks the bounds);
* k > 1: the box is (top / k, left / k, height / k, width / k) of the scaled image, a fractional box, which PIL's
  bilinear resize takes as such (``Image.resize(box=...)``, after cutting the whole scaled pixels that the box
  touches, so no pixel outside it is read). The views differ from the full decode's by the difference between
  libjpeg's DCT-domain reduction and the part of the triangle filter it replaces (bounded in the test).

The decoder is not asked for a region: no maintained binding exposes libjpeg-turbo's partial decode (the libjpeg
API's ``jpeg_crop_scanline``/``jpeg_skip_scanlines``, TurboJPEG 3's ``tj3SetCroppingRegion``), and the region that
PyTurboJPEG and FFCV 1.0.2 offer is a lossless crop (``tjTransform``: every coefficient entropy-decoded, the crop
re-encoded, then decoded again), measured slower than the whole decode (``python -m benchmarks loader``, rows
``decode only``). A file this path does not take (anything but a sequential 8-bit 3-component JPEG: a PNG named
``.JPEG``, CMYK, grayscale, progressive) or that libjpeg-turbo reports as damaged (a warning counts) returns None,
and the caller decodes it with PIL as before (:func:`dist_awenc.data.images.crop_pil`), where an unreadable file
raises the error naming it that ``data.bad_files`` acts on.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["DCT_SCALES", "JpegHeader", "dct_scale", "jpeg_header", "views_from_jpeg", "views_from_file"]

DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg-turbo's fast reduced-size IDCTs give (1/8, 1/4, 1/2, 1)
_SEQUENTIAL = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential (Huffman); SOF2 is progressive
_WARNED: list[bool] = []


class JpegHeader(NamedTuple):
    """What the start-of-frame segment says: size, number of components, frame type (SOFn marker), bit depth."""

    height: int
    width: int
    components: int
    marker: int
    precision: int

    @property
    def plain(self) -> bool:
        """A sequential 8-bit JPEG of 3 components (YCbCr, or RGB by an Adobe marker): what the fast path takes."""
        sequential = self.marker in _SEQUENTIAL and self.precision == 8
        return sequential and self.components == 3 and self.height > 0 and self.width > 0


def jpeg_header(data: bytes) -> Optional[JpegHeader]:
    """The frame header of the JPEG ``data`` (its markers walked up to the first SOFn), or None for anything else
    (another format, a header cut short)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            if pos + 10 > n:
                return None
            h, w = data[pos + 5] << 8 | data[pos + 6], data[pos + 7] << 8 | data[pos + 8]
            return JpegHeader(h, w, data[pos + 9], marker, data[pos + 4])
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return None


def dct_scale(boxes: np.ndarray, size: int) -> int:
    """The largest k of :data:`DCT_SCALES` at which every box (V, 4) ``(top, left, h, w)`` still measures at least
    ``size`` pixels in both directions once the image is decoded at 1/k."""
    short = int(np.asarray(boxes)[:, 2:].min()) if len(boxes) else 0
    return next((k for k in DCT_SCALES if short >= k * size), 1)


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:  # a broken install: PIL decodes everything, as before this path existed
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn("simplejpeg is not installed: decode-time views fall back to PIL's full decode "
                          "(pip install simplejpeg, or reinstall dist_awenc)", RuntimeWarning, stacklevel=3)
        return None
    return simplejpeg


def views_from_jpeg(data: bytes, boxes_of, size: int) -> Optional[np.ndarray]:
    """The views of the JPEG ``data``: ``boxes_of(height, width)`` -> int (V, 4) boxes, each cut and resized to
    (size, size) from a decode at :func:`dct_scale`: uint8 (V, size, size, 3); None where the file is no plain JPEG,
    is larger than PIL's ``MAX_IMAGE_PIXELS``, libjpeg-turbo reports it damaged, or simplejpeg is missing (the caller
    decodes it with PIL)."""
    head = jpeg_header(data)
    if head is None or not head.plain:
        return None
    limit = Image.MAX_IMAGE_PIXELS  # a decompression bomb to PIL is PIL's to refuse (data.bad_files), not ours
    if limit is not None and head.height * head.width > limit:
        return None
    sj = _simplejpeg()
    if sj is None:
        return None
    H, W = head.height, head.width
    boxes = np.asarray(boxes_of(H, W), dtype=np.int64)
    k = dct_scale(boxes, size)
    want = (-(-H // k), -(-W // k))
    try:  # strict: a libjpeg warning (corrupt data, premature end) raises too
        img = sj.decode_jpeg(data, colorspace="RGB", min_height=want[0] if k > 1 else 0,
                             min_width=want[1] if k > 1 else 0, strict=True)
    except (ValueError, RuntimeError):
        return None
    if img.shape[:2] != want:  # a scale other than 1/k chosen: never seen, but then PIL's decode is the reference
        return None
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    if k == 1:
        whole = torch.from_numpy(img).permute(2, 0, 1)[None]  # (1, 3, H, W), channels-last in memory
        for v, (top, left, h, w) in enumerate(boxes.tolist()):
            out[v] = resize_box_uint8(whole[..., top : top + h, left : left + w], size)
    else:
        for v, box in enumerate(boxes.tolist()):
            out[v] = resize_scaled_box(img, box, k, size)
    return out


def views_from_file(path: str, boxes_of, size: int) -> Optional[np.ndarray]:
    """:func:`views_from_jpeg` of the file at ``path``; None also where it cannot be read (PIL's decode then names
    it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return views_from_jpeg(data, boxes_of, size)


def resize_box_uint8(patch: torch.Tensor, size: int) -> np.ndarray:
    """A uint8 (1, 3, h, w) patch resized to (size, size, 3): bilinear, antialiased when shrinking (torch's uint8
    kernel, PIL's BILINEAR algorithm with its own intermediate rounding). The patch is copied channels-last first:
    a box sliced from a channels-last image is neither layout, and torch would take its slow path (twice the time)."""
    patch = patch.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def resize_scaled_box(img: np.ndarray, box, k: int, size: int) -> np.ndarray:
    """The box ``(top, left, h, w)`` of the full-resolution image, on ``img`` decoded at 1/k: the whole scaled pixels
    it touches are cut, then PIL resizes the fractional box among them to (size, size, 3) (bilinear, reducing)."""
    top, left, h, w = (c / k for c in box)
    y0, x0 = math.floor(top), math.floor(left)
    y1, x1 = min(math.ceil(top + h), img.shape[0]), min(math.ceil(left + w), img.shape[1])
    patch = Image.fromarray(np.ascontiguousarray(img[y0:y1, x0:x1]))
    box_in_patch = (left - x0, top - y0, left - x0 + w, top - y0 + h)
    return np.asarray(patch.resize((size, size), Image.BILINEAR, box=box_in_patch))
