"""The pirate's serving path: an encoder whose every query passes a transform first (JPEG, noise, resize, crop,
purification) before the weights see it.

A query-side attack (``attacks/query.py``) records such a transform in the suspect's card as
``query_transform``; :func:`with_recorded_transform` puts it back when the pirate's deployed downstream model is
built, which is what black-box verification queries. The weights are untouched: white-box verification sees the
suspect itself. :class:`TransformedEncoder` is an :class:`~dist_awenc.encoders.io.Encoder` over the same backbone
with the transform in front, so ``save_encoder`` writes the suspect's weights and a downstream model over it has
the usual state_dict keys. Lives in ``evaluate/`` (what a deployed model does), so measuring never imports attacks.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.config_checks import as_count, as_fraction
from dist_awenc.data.splits import derive_seed
from dist_awenc.data.views import gaussian_blur
from dist_awenc.encoders.io import Encoder
from dist_awenc.errors import ConfigError


QUERY_KINDS = ("jpeg", "noise", "resize", "crop", "purify")
PURIFY_JPEG_QUALITY = 75  # query_purify: the JPEG step before the blur and the median filter


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress and decode each image at ``quality`` (1..100) on the CPU.

    Shape: (b, 3, S, S) in [0, 1] -> (b, 3, S, S) in [0, 1], same device and dtype.
    """
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg  # not at import: a second of start-up

    u8 = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    with warnings.catch_warnings():  # torchvision >= 0.29 flags its image codecs as deprecated in favour of torchcodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        decoded = decode_jpeg(encode_jpeg(list(u8), quality=quality), mode=ImageReadMode.RGB)
    return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255


def image_seeded_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Gaussian noise of std ``sigma``, drawn per image from ``(seed, the image's bytes)``.

    The same image with the same seed always gets the same noise whatever
    batch it arrives in; different images get independent noise.

    Shape: (b, 3, S, S) -> (b, 3, S, S) noise on x's device.
    """
    host = x.detach().float().cpu().contiguous()
    out = torch.empty_like(host)
    for i in range(len(host)):
        digest = hashlib.blake2b(host[i].numpy().tobytes(), digest_size=8).hexdigest()
        g = torch.Generator().manual_seed(derive_seed(seed, "query_noise", digest))
        out[i] = torch.randn(host[i].shape, generator=g)
    return (sigma * out).to(device=x.device, dtype=x.dtype)


def resize_round_trip(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Downscale by ``factor`` (bilinear, antialiased), then upscale back to the input size."""
    size = x.shape[-1]
    small = max(1, round(size * factor))
    down = F.interpolate(x, size=(small, small), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(size, size), mode="bilinear", align_corners=False)


def center_crop_resize(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Central crop keeping ``keep`` of the side, resized back (bilinear) to the input size."""
    size = x.shape[-1]
    side = max(1, round(size * keep))
    top = (size - side) // 2
    crop = x[..., top : top + side, top : top + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def median3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median filter per channel with reflect padding (a denoiser-like smoothing).

    Shape: (b, C, H, W) -> (b, C, H, W); H, W >= 2.
    """
    patches = F.pad(x, (1, 1, 1, 1), mode="reflect").unfold(2, 3, 1).unfold(3, 3, 1)  # (b, C, H, W, 3, 3)
    return patches.flatten(-2).median(dim=-1).values


def purify(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Input purification: JPEG at quality 75 (straight-through gradient), Gaussian blur of std ``sigma``
    pixels (radius ``ceil(3 sigma)``), then a 3x3 median filter.

    Shape: (b, 3, S, S) in [0, 1] -> (b, 3, S, S) in [0, 1].
    """
    y = x + (jpeg_round_trip(x, PURIFY_JPEG_QUALITY) - x).detach()
    y = gaussian_blur(y, torch.full((len(y),), sigma, device=y.device, dtype=y.dtype), math.ceil(3 * sigma))
    return median3x3(y)


class QueryTransform(nn.Module):
    """A pirate's query pre-processing: ``jpeg`` (strength = quality 1..100), ``noise``
    (Gaussian sigma in pixel units), ``resize`` (down/up factor in (0, 1]), ``crop``
    (central crop keeping a fraction (0, 1] of the side) or ``purify`` (JPEG 75, then
    a Gaussian blur of sigma = strength pixels, then a 3x3 median filter: :func:`purify`).

    JPEG (also inside ``purify``) is applied with a straight-through gradient
    (identity backward); the rest is differentiable. No parameters or buffers.

    Shape: (b, 3, S, S) in [0, 1] -> (b, 3, S, S) in [0, 1].
    """

    def __init__(self, kind: str, strength: float, seed: int = 0) -> None:
        super().__init__()
        if kind not in QUERY_KINDS:
            raise ConfigError(f"unknown query transform '{kind}'; valid: {', '.join(QUERY_KINDS)}")
        name = f"query_{kind}"
        if kind == "jpeg":
            strength = as_count(strength, name, "the JPEG quality", minimum=1)
            if strength > 100:
                raise ConfigError(f"attack {name}: strength is the JPEG quality, 1..100; got {strength}")
        elif kind == "noise":
            if not strength >= 0:
                raise ConfigError(f"attack {name}: strength is the noise sigma, >= 0; got {strength}")
        elif kind == "purify":
            if not strength > 0:
                raise ConfigError(f"attack {name}: strength is the blur sigma in pixels, > 0; got {strength}")
        else:
            strength = as_fraction(strength, name, "the kept fraction of the side", allow_zero=False)
        self.kind = kind
        self.strength = float(strength)
        self.seed = int(seed)

    def spec(self) -> dict[str, Any]:
        """The JSON-able dict :func:`wrap_query_transform` rebuilds this transform from."""
        return {"kind": self.kind, "strength": self.strength, "seed": self.seed}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "jpeg":
            return x + (jpeg_round_trip(x, int(self.strength)) - x).detach()
        if self.kind == "noise":
            out = x + image_seeded_noise(x, self.strength, self.seed)
        elif self.kind == "purify":
            out = purify(x, self.strength)
        elif self.kind == "resize":
            out = resize_round_trip(x, self.strength)
        else:
            out = center_crop_resize(x, self.strength)
        return out.clamp(0, 1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, strength={self.strength}, seed={self.seed}"


class TransformedEncoder(Encoder):
    """``encoder o transform``: an :class:`Encoder` sharing ``encoder``'s backbone, with ``transform`` in front.

    ``backbone``, ``feature_dim``, ``input_size``, ``mean``, ``std`` are those
    of ``encoder``; the state_dict is the encoder's (the transform holds none).

    Shape: (b, 3, S, S) in [0, 1] -> (b, feature_dim).
    """

    def __init__(self, transform: QueryTransform, encoder: Encoder) -> None:
        super().__init__(encoder.backbone, encoder.mean.flatten().tolist(), encoder.std.flatten().tolist(),
                         encoder.input_size)
        self.transform = transform
        self.to(encoder.mean.device)
        self.train(encoder.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.transform(x))


def wrap_query_transform(encoder: Encoder, spec: dict | None) -> Encoder:
    """Put the query transform a card records (``card["query_transform"]``) in front of ``encoder``.

    ``spec`` None (or empty) returns ``encoder`` itself; otherwise a
    :class:`TransformedEncoder` sharing its backbone.

    Raises:
        ConfigError: a spec without ``kind`` / ``strength``, with unknown keys,
            or with an invalid kind or strength.
    """
    if not spec:
        return encoder
    unknown = set(spec) - {"kind", "strength", "seed"}
    if unknown or not {"kind", "strength"} <= set(spec):
        raise ConfigError(f"query_transform must have keys kind, strength[, seed]; got {sorted(spec)}")
    return TransformedEncoder(QueryTransform(spec["kind"], spec["strength"], spec.get("seed", 0)), encoder)


def with_recorded_transform(encoder: Encoder, card: dict[str, Any]) -> Encoder:
    """Put back the query-side transform an attack recorded in the card (``query_transform``).

    Only for building the pirate's deployed downstream model (what black-box
    verification queries): the caller's explicit choice, never part of loading.
    """
    return wrap_query_transform(encoder, card.get("query_transform"))
