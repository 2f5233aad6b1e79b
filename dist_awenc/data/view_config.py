"""The settings of the contrastive views (:class:`ViewConfig`, the ``views:`` section), checked when built.

The operations that draw and apply them are in :mod:`dist_awenc.data.views`, which re-exports these names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

CROP_MODES = ("device", "decode")
# the fields ``views.view2`` may override: what the device applies per view (the crop's distribution is every
# view's alike in SimCLR, MoCo and BYOL; with views.crop=decode the loader cuts it, from the shared fields)
PER_VIEW_FIELDS = ("flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p", "blur_p",
                   "blur_sigma_min", "blur_sigma_max", "solarize_p")


@dataclass
class ViewConfig:
    """Settings of the contrastive views (plain fields: usable as an OmegaConf structured config).

    Attributes:
        n_views: views made per image.
        crop: where the random-resized crop is cut: ``device`` (the default) resamples the loaded S x S image on
            the device (box area and aspect drawn, then clamped to the image); ``decode`` has the loader cut
            torchvision's RandomResizedCrop boxes from the original image and resize them to S
            (:mod:`dist_awenc.data.crops`), and the device only flips and colours (pre-training only).
        crop_scale_min, crop_scale_max: area fraction of the random crop, in (0, 1].
        crop_ratio_min, crop_ratio_max: aspect ratio (width / height) of the crop.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter.
        brightness, contrast, saturation: jitter strength s; factors ~ U(max(0, 1-s), 1+s).
        hue: hue shift ~ U(-hue, hue) in turns, hue in [0, 0.5].
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of gaussian blur (0 skips blurring).
        blur_sigma_min, blur_sigma_max: blur standard deviation range in pixels.
        solarize_p: probability of solarisation (BYOL: ``x -> 1 - x`` where ``x >= 0.5``), after the blur; 0 (the
            default) draws nothing for it, so a config without it draws exactly what it drew before.
        view2: overrides of the second view's settings (:data:`PER_VIEW_FIELDS`), e.g. BYOL's
            ``{blur_p: 0.1, solarize_p: 0.2}`` beside ``blur_p: 1.0``; every other view uses the fields above.
    """

    n_views: int = 2
    crop: str = "device"
    crop_scale_min: float = 0.3
    crop_scale_max: float = 1.0
    crop_ratio_min: float = 3 / 4
    crop_ratio_max: float = 4 / 3
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_p: float = 0.0
    view2: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError(f"views.n_views must be >= 1; got {self.n_views}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"views.crop must be one of {', '.join(CROP_MODES)}; got {self.crop!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"views.{name} is a probability and must be in [0, 1]; got {value}")
        if not 0.0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(
                "views.crop_scale_min/max must satisfy 0 < min <= max <= 1; "
                f"got {self.crop_scale_min}, {self.crop_scale_max}"
            )
        if not 0.0 < self.crop_ratio_min <= self.crop_ratio_max:
            raise ValueError(
                "views.crop_ratio_min/max must satisfy 0 < min <= max; "
                f"got {self.crop_ratio_min}, {self.crop_ratio_max}"
            )
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if value < 0.0:
                raise ValueError(f"views.{name} must be >= 0; got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"views.hue must be in [0, 0.5]; got {self.hue}")
        if not 0.0 < self.blur_sigma_min <= self.blur_sigma_max:
            raise ValueError(
                "views.blur_sigma_min/max must satisfy 0 < min <= max; "
                f"got {self.blur_sigma_min}, {self.blur_sigma_max}"
            )
        if self.view2:
            self.for_view(1)  # checks the keys and the second view's values

    def for_view(self, v: int) -> "ViewConfig":
        """The settings of view ``v`` (0-based): ``view2`` applied to view 1, this config unchanged for the others."""
        if v != 1 or not self.view2:
            return self
        bad = [k for k in self.view2 if k not in PER_VIEW_FIELDS]
        if bad:
            raise ValueError(f"views.view2: '{bad[0]}' cannot differ per view; valid keys: {', '.join(PER_VIEW_FIELDS)}")
        try:
            return dataclasses.replace(self, view2={}, **{k: float(x) for k, x in self.view2.items()})
        except ValueError as e:
            raise ValueError(f"views.view2: {e}") from None


def mild_view_config() -> ViewConfig:
    """Mild augmentation used when embedding the watermark.

    Returns:
        ViewConfig with crop scale 0.8..1, flip 0.5, jitter 0.5 (brightness,
        contrast, saturation 0.2, hue 0.02), no grayscale, no blur.
    """
    return ViewConfig(
        crop_scale_min=0.8,
        crop_scale_max=1.0,
        flip_p=0.5,
        jitter_p=0.5,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        hue=0.02,
        grayscale_p=0.0,
        blur_p=0.0,
    )
