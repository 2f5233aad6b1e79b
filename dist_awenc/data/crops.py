"""Standard random-resized crops, drawn from the original image at decode time.

The box of view ``v`` of the image at position ``p`` of a split, in epoch ``e``, is a pure function of
``(seed, e, p, v)`` and of the image's own height and width: the uniforms come from a counter-based generator
(splitmix64's output stream, keyed by ``crop_key(seed, e)``, at counter ``((p * MAX_VIEWS + v) * ATTEMPTS + a) * 4 + k``),
and the box from torchvision's ``RandomResizedCrop.get_params`` algorithm (area ~ U(scale) of the image, log aspect
~ U(log ratio), rounded to pixels; up to 10 attempts, the first that fits wins; otherwise the central crop at the
nearest allowed aspect). So a box does not depend on the batch, the rank, the number of processes or which loader
decodes the image: the torchvision path (:meth:`ImageFolderDataset.crop_views`) and the FFCV decoder
(:mod:`dist_awenc.data.ffcv.crops`, the same arithmetic compiled by numba) cut the same boxes.

How the views differ from torchvision's transforms: the box distribution is the same (tests/test_crops.py checks
area and aspect statistics against ``RandomResizedCrop``), the random numbers are not torch's global generator but
the stream above, and the resampling is PIL's bilinear with its reducing filter (torchvision path) or OpenCV's
INTER_AREA (FFCV), then flip and colour are applied to the batch on the device (:mod:`dist_awenc.data.views`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ATTEMPTS", "CropSpec", "MAX_VIEWS", "crop_boxes", "crop_key", "crop_uniforms"]

ATTEMPTS = 10  # as torchvision's RandomResizedCrop
MAX_VIEWS = 64  # counter stride per image; views per image above this are refused
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class CropSpec:
    """What a loader needs to cut decode-time views.

    Attributes:
        size: output side S of every view.
        n_views: views per image.
        seed: the run seed (boxes of epoch e use ``crop_key(seed, e)``).
        scale: area fraction range of the box, in (0, 1].
        ratio: aspect ratio (width / height) range of the box.
        full_decode: decode every image whole at full resolution before cutting its boxes (the reference path);
            by default a JPEG is decoded only as finely as its boxes need (:mod:`dist_awenc.data.box_decode`,
            and the DCT scaling of :mod:`dist_awenc.data.ffcv.crops`). The boxes are the same either way.
    """

    size: int
    n_views: int
    seed: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    full_decode: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.n_views <= MAX_VIEWS:
            raise ValueError(f"decode-time crops make 1 to {MAX_VIEWS} views per image; got {self.n_views}")
        if self.size < 1:
            raise ValueError(f"the view size must be positive; got {self.size}")

    def key(self, epoch: int) -> int:
        return crop_key(self.seed, epoch)


def crop_key(seed: int, epoch: int) -> int:
    """The 64-bit key of epoch ``epoch``'s boxes (a stable hash of ``(seed, "crops", epoch)``)."""
    from .splits import derive_seed

    return derive_seed(seed, "crops", epoch)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def crop_uniforms(key: int, positions: np.ndarray, n_views: int) -> np.ndarray:
    """Uniforms in [0, 1) for the boxes of ``positions`` (n,): float64 (n, n_views, ATTEMPTS, 4).

    Element ``[i, v, a, k]`` is output number ``c = ((p * MAX_VIEWS + v) * ATTEMPTS + a) * 4 + k`` of splitmix64
    seeded with ``key`` (``p = positions[i]``), as its top 53 bits over 2**53.
    """
    p = np.asarray(positions, dtype=np.uint64).reshape(-1, 1, 1, 1)
    v = np.arange(n_views, dtype=np.uint64).reshape(1, -1, 1, 1)
    a = np.arange(ATTEMPTS, dtype=np.uint64).reshape(1, 1, -1, 1)
    k = np.arange(4, dtype=np.uint64).reshape(1, 1, 1, -1)
    counter = ((p * np.uint64(MAX_VIEWS) + v) * np.uint64(ATTEMPTS) + a) * np.uint64(4) + k
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        z = _splitmix(np.uint64(key & _MASK64) + (counter + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale: tuple[float, float],
               ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop boxes from uniforms ``u`` (n, V, ATTEMPTS, 4) and image sizes (n,).

    Attempt a draws the area ``H*W*U(scale)`` (``u[..., 0]``), the log aspect ``U(log ratio)`` (``u[..., 1]``),
    ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``; it fits when ``0 < w <= W`` and
    ``0 < h <= H``, and then ``i = floor(u[..., 2] * (H - h + 1))``, ``j = floor(u[..., 3] * (W - w + 1))``. The first
    attempt that fits wins; if none does, the central crop of the whole image clamped to the aspect range.

    Returns:
        int64 (n, V, 4): ``(i, j, h, w)`` (top, left, height, width) of each box, in pixels.
    """
    H = np.asarray(heights, dtype=np.float64).reshape(-1, 1, 1)
    W = np.asarray(widths, dtype=np.float64).reshape(-1, 1, 1)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w = np.rint(np.sqrt(area * aspect))  # round half to even, as Python's round() in torchvision
    h = np.rint(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    i = np.floor(u[..., 2] * (H - h + 1))
    j = np.floor(u[..., 3] * (W - w + 1))
    first = fits.argmax(axis=-1)[..., None]  # the first attempt that fits (0 when none does)
    pick = lambda t: np.take_along_axis(t, first, axis=-1)[..., 0]  # noqa: E731
    box = np.stack([pick(i), pick(j), pick(h), pick(w)], axis=-1)
    # fallback (no attempt fits): torchvision's central crop at the nearest allowed aspect
    Hs, Ws = H[..., 0], W[..., 0]
    in_ratio = Ws / Hs
    fw = np.where(in_ratio < ratio[0], Ws, np.where(in_ratio > ratio[1], np.rint(Hs * ratio[1]), Ws))
    fh = np.where(in_ratio < ratio[0], np.rint(Ws / ratio[0]), Hs)
    fallback = np.stack([np.floor((Hs - fh) / 2), np.floor((Ws - fw) / 2), fh, fw], axis=-1)
    none = ~fits.any(axis=-1)
    box = np.where(none[..., None], np.broadcast_to(fallback, box.shape), box)
    return box.astype(np.int64)
