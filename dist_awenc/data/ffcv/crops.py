"""FFCV's decode-time crop with the project's seeded boxes (``views.crop=decode`` with ``data.loader=ffcv``).

FFCV's own ``RandomResizedCropRGBImageDecoder`` draws its boxes from numpy's global generator inside compiled code,
which nothing seeds: the crops would differ between runs, resumes and process counts. :func:`seeded_box` is the
arithmetic of :func:`dist_awenc.data.crops.crop_boxes` on the uniforms of
:func:`~dist_awenc.data.crops.crop_uniforms`, written as scalar code that numba compiles; the decoder
(:func:`seeded_decoder_class`) is FFCV's resized-crop decoder with that box in place of FFCV's draw, and it cuts
every view of an image from one decode (FFCV's recipe of one pipeline per view decodes each image once per view).
The epoch's key is a constant of the compiled code, so the source builds its FFCV loader again at each epoch (a
compile of a few seconds, once an epoch).

The boxes of an image are drawn before it is decoded, and a JPEG is decoded at the smallest DCT scale 1/k (k in 1,
2, 4, 8: FFCV's ``imdecode`` passes it to libjpeg-turbo) at which every view's box still measures at least the
output side in both directions (#29). At k = 1 the view is FFCV's resize of the box (OpenCV's INTER_AREA), as
before; at k > 1 the box is fractional on the scaled image, and :func:`area_resize` averages the area of it that each
output pixel covers (INTER_AREA's rule when shrinking, which is always the case there). With
``CropSpec.full_decode`` every image is decoded whole (k = 1). No region is asked for: FFCV 1.0.2's crop is a
lossless transform (``tjTransform``) that costs more than it saves (:mod:`dist_awenc.data.box_decode`).
"""
from __future__ import annotations

import math

import numpy as np

from dist_awenc.data.crops import ATTEMPTS, MAX_VIEWS

__all__ = ["area_resize", "dct_factor", "seeded_box", "seeded_decoder_class"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_ONE, _FOUR = np.uint64(1), np.uint64(4)
_MAXV, _ATT = np.uint64(MAX_VIEWS), np.uint64(ATTEMPTS)
_INV53 = 1.0 / 2**53


def seeded_box(key, pos, view, height, width, smin, smax, lrmin, lrmax):
    """The box ``(i, j, h, w)`` of ``view`` of the image at split position ``pos`` (height x width), for the epoch
    whose key is ``key``: :func:`~dist_awenc.data.crops.crop_boxes` for one image (key, pos, view as uint64)."""
    H, W = np.float64(height), np.float64(width)
    base = (pos * _MAXV + view) * _ATT
    u = np.empty(4)
    for a in range(ATTEMPTS):
        c = (base + np.uint64(a)) * _FOUR
        for k in range(4):  # outputs c..c+3 of splitmix64 seeded with key, as crop_uniforms
            z = key + (c + np.uint64(k) + _ONE) * _GOLDEN
            z = (z ^ (z >> _S30)) * _M1
            z = (z ^ (z >> _S27)) * _M2
            z = z ^ (z >> _S31)
            u[k] = np.float64(z >> _S11) * _INV53
        area = H * W * (smin + (smax - smin) * u[0])
        aspect = math.exp(lrmin + (lrmax - lrmin) * u[1])
        w = np.rint(math.sqrt(area * aspect))
        h = np.rint(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            i = math.floor(u[2] * (H - h + 1))
            j = math.floor(u[3] * (W - w + 1))
            return int(i), int(j), int(h), int(w)
    rmin, rmax = math.exp(lrmin), math.exp(lrmax)
    in_ratio = W / H
    if in_ratio < rmin:
        w, h = W, np.rint(W / rmin)
    elif in_ratio > rmax:
        w, h = np.rint(H * rmax), H
    else:
        w, h = W, H
    return int(math.floor((H - h) / 2)), int(math.floor((W - w) / 2)), int(h), int(w)


def dct_factor(boxes, size, full):
    """The largest k in 8, 4, 2, 1 at which every box (V, 4) of an image, decoded at 1/k, still measures at least
    ``size`` pixels both ways (1 with ``full``): :func:`dist_awenc.data.box_decode.dct_scale`, compiled."""
    if full:
        return 1
    short = boxes[0, 2]
    for v in range(boxes.shape[0]):
        short = min(short, boxes[v, 2], boxes[v, 3])
    k = 8
    while k > 1 and short < k * size:
        k //= 2
    return k


def area_resize(src, top, left, height, width, dst):
    """``dst`` (S, T, 3) uint8 <- the box of ``src`` (rows, cols, 3) uint8 at fractional ``top, left, height,
    width`` (at least S x T): each output pixel the mean of the source area it covers, rounded."""

    def area_weights(start, length, n_out, limit):  # nested: numba compiles it with its caller
        """Output pixels 0..n_out-1 covering [start, start + length) of an axis of ``limit`` pixels: the first
        source pixel of each, and the weights (n_out, taps) of the source pixels it overlaps (a row sums to 1)."""
        step = length / n_out
        taps = int(math.ceil(step)) + 1
        first = np.zeros(n_out, np.int64)
        weights = np.zeros((n_out, taps), np.float32)
        for o in range(n_out):
            a = start + o * step
            b = a + step
            c0 = int(math.floor(a))
            first[o] = c0
            for t in range(taps):
                c = c0 + t
                if c >= limit:
                    break
                overlap = min(b, c + 1.0) - max(a, float(c))
                if overlap > 0:
                    weights[o, t] = overlap / step
        return first, weights

    out_h, out_w = dst.shape[0], dst.shape[1]
    fy, wy = area_weights(top, height, out_h, src.shape[0])
    fx, wx = area_weights(left, width, out_w, src.shape[1])
    r0 = fy[0]
    rows = min(fy[out_h - 1] + wy.shape[1], src.shape[0]) - r0
    tmp = np.zeros((rows, out_w, 3), np.float32)
    for r in range(rows):  # along each row first
        for o in range(out_w):
            for t in range(wx.shape[1]):
                wgt = wx[o, t]
                if wgt > 0:
                    c = fx[o] + t
                    for ch in range(3):
                        tmp[r, o, ch] += wgt * src[r0 + r, c, ch]
    for o in range(out_h):  # then down each column
        acc = np.zeros((out_w, 3), np.float32)
        for t in range(wy.shape[1]):
            wgt = wy[o, t]
            if wgt > 0:
                r = fy[o] + t - r0
                for q in range(out_w):
                    for ch in range(3):
                        acc[q, ch] += wgt * tmp[r, q, ch]
        for q in range(out_w):
            for ch in range(3):
                dst[o, q, ch] = np.uint8(min(max(math.floor(acc[q, ch] + 0.5), 0.0), 255.0))


_CLASSES: dict[str, type] = {}


def seeded_decoder_class() -> type:
    """FFCV's ``ResizedCropRGBImageDecoder`` cutting :func:`seeded_box` boxes (built on first use: FFCV is optional)."""
    if "decoder" in _CLASSES:
        return _CLASSES["decoder"]
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class SeededResizedCropDecoder(ResizedCropRGBImageDecoder):
        """Every view of an image from one decode: view v cut at the box of ``(key, file position, v)`` and resized
        to ``size``; the output of an image is (n_views, size, size, 3) uint8."""

        def __init__(self, size: int, key: int, n_views: int, scale: tuple[float, float], ratio: tuple[float, float],
                     full_decode: bool = False):
            super().__init__((size, size))
            self.key, self.n_views = np.uint64(key), int(n_views)
            self.scale, self.ratio, self.full_decode = scale, ratio, bool(full_decode)

        @property
        def get_crop_generator(self):  # unused: generate_code below calls seeded_box
            return None

        def declare_state_and_memory(self, previous_state):
            state, (out, temp) = super().declare_state_and_memory(previous_state)
            shape = (self.n_views, *self.output_size, 3)
            return replace(state, shape=shape), (AllocationQuery(shape, out.dtype), temp)

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            box_c, factor_c = Compiler.compile(seeded_box), Compiler.compile(dct_factor)
            area_c = Compiler.compile(area_resize)
            key, n_views, size, full = self.key, self.n_views, self.output_size[0], self.full_decode
            smin, smax = float(self.scale[0]), float(self.scale[1])
            lrmin, lrmax = math.log(self.ratio[0]), math.log(self.ratio[1])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    boxes = np.empty((n_views, 4), np.int64)
                    for v in range(n_views):  # the boxes first: they say how finely to decode
                        i, j, h, w = box_c(key, np.uint64(source_ix), np.uint64(v), height, width,
                                           smin, smax, lrmin, lrmax)
                        boxes[v, 0] = i
                        boxes[v, 1] = j
                        boxes[v, 2] = h
                        boxes[v, 3] = w
                    k = 1
                    if field["mode"] == jpg:
                        k = factor_c(boxes, size, full)
                        rows, cols = (height + k - 1) // k, (width + k - 1) // k
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, k, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * rows * cols].reshape(rows, cols, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    for v in range(n_views):  # one decode, every view
                        i, j, h, w = boxes[v, 0], boxes[v, 1], boxes[v, 2], boxes[v, 3]
                        if k == 1:
                            resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix, v])
                        else:
                            area_c(temp_buffer, i / k, j / k, h / k, w / k, destination[dst_ix, v])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    _CLASSES["decoder"] = SeededResizedCropDecoder
    return SeededResizedCropDecoder
