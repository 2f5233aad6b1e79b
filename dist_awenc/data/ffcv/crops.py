"""FFCV's decode-time crop with the project's seeded boxes (``views.crop=decode`` with ``data.loader=ffcv``).

FFCV's own ``RandomResizedCropRGBImageDecoder`` draws its boxes from numpy's global generator inside compiled code,
which nothing seeds: the crops would differ between runs, resumes and process counts. :func:`seeded_box` is the
arithmetic of :func:`dist_awenc.data.crops.crop_boxes` on the uniforms of
:func:`~dist_awenc.data.crops.crop_uniforms`, written as scalar code that numba compiles; the decoder
(:func:`seeded_decoder_class`) is FFCV's resized-crop decoder with that box in place of FFCV's draw, and it cuts
every view of an image from one decode (FFCV's recipe of one pipeline per view decodes each image once per view). The epoch's key is a constant of the compiled code, so the source builds its
FFCV loader again at each epoch (a compile of a few seconds, once an epoch).
"""
from __future__ import annotations

import math

import numpy as np

from dist_awenc.data.crops import ATTEMPTS, MAX_VIEWS

__all__ = ["seeded_box", "seeded_decoder_class"]

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

        def __init__(self, size: int, key: int, n_views: int, scale: tuple[float, float], ratio: tuple[float, float]):
            super().__init__((size, size))
            self.key, self.n_views = np.uint64(key), int(n_views)
            self.scale, self.ratio = scale, ratio

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
            box_c = Compiler.compile(seeded_box)
            key, n_views = self.key, self.n_views
            smin, smax = float(self.scale[0]), float(self.scale[1])
            lrmin, lrmax = math.log(self.ratio[0]), math.log(self.ratio[1])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    for v in range(n_views):  # one decode, every view
                        i, j, h, w = box_c(key, np.uint64(source_ix), np.uint64(v), height, width,
                                           smin, smax, lrmin, lrmax)
                        resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix, v])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    _CLASSES["decoder"] = SeededResizedCropDecoder
    return SeededResizedCropDecoder
