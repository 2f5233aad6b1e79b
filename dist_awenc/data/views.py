"""Batched, device-agnostic contrastive view augmentations.

Random parameters are drawn on the CPU from an explicit ``torch.Generator``
(:func:`sample_params`) and then applied to a batch on whatever device it
lives on (:func:`apply_params`): random-resized crop + horizontal flip as one
affine resampling, colour jitter, random grayscale, gaussian blur.

:func:`make_views` draws the parameters of the *global* batch from
``(seed, step)`` and applies this rank's slice, so the views of a run do not
depend on how many processes share the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .splits import derive_seed

__all__ = ["ViewConfig", "apply_params", "gaussian_blur", "make_views", "mild_view_config", "sample_params"]

# ITU-R 601 luma weights (as torchvision's rgb_to_grayscale).
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ; the hue is shifted by rotating the (I, Q) chroma plane.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)


@dataclass
class ViewConfig:
    """Settings of the contrastive views (plain fields: usable as an OmegaConf structured config).

    Attributes:
        n_views: views made per image.
        crop_scale_min, crop_scale_max: area fraction of the random crop, in (0, 1].
        crop_ratio_min, crop_ratio_max: aspect ratio (width / height) of the crop.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter.
        brightness, contrast, saturation: jitter strength s; factors ~ U(max(0, 1-s), 1+s).
        hue: hue shift ~ U(-hue, hue) in turns, hue in [0, 0.5].
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of gaussian blur (0 skips blurring).
        blur_sigma_min, blur_sigma_max: blur standard deviation range in pixels.
    """

    n_views: int = 2
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

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError(f"views.n_views must be >= 1; got {self.n_views}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
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


# --------------------------------------------------------------------------- parameters


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _flag(n: int, p: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen) < p


def sample_params(cfg: ViewConfig, n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Draw per-sample augmentation parameters for ``n`` images, on the CPU.

    Every value is drawn for every sample whatever the probabilities, in a
    fixed order, so the parameters of the first k samples do not depend on
    anything but the generator state.

    Args:
        cfg: view settings.
        n: number of images.
        generator: CPU generator (consumed).

    Returns:
        dict of CPU tensors, each of shape (n,):
        ``crop_w``, ``crop_h`` (box size as a fraction of the image side),
        ``crop_cx``, ``crop_cy`` (box centre in [-1, 1] coordinates),
        ``flip`` (bool), ``jitter`` (bool), ``brightness``, ``contrast``,
        ``saturation`` (multiplicative factors), ``hue`` (shift in turns),
        ``gray`` (bool), ``blur`` (bool), ``blur_sigma`` (pixels),
        ``blur_radius`` (long, kernel half-width, same for all samples).
    """
    log_r = _uniform(n, math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max), generator)
    scale = _uniform(n, cfg.crop_scale_min, cfg.crop_scale_max, generator)
    ratio = log_r.exp()
    crop_w = (scale * ratio).sqrt().clamp(max=1.0)
    crop_h = (scale / ratio).sqrt().clamp(max=1.0)
    crop_cx = (1.0 - crop_w) * _uniform(n, -1.0, 1.0, generator)
    crop_cy = (1.0 - crop_h) * _uniform(n, -1.0, 1.0, generator)
    flip = _flag(n, cfg.flip_p, generator)

    jitter = _flag(n, cfg.jitter_p, generator)
    brightness = _uniform(n, max(0.0, 1.0 - cfg.brightness), 1.0 + cfg.brightness, generator)
    contrast = _uniform(n, max(0.0, 1.0 - cfg.contrast), 1.0 + cfg.contrast, generator)
    saturation = _uniform(n, max(0.0, 1.0 - cfg.saturation), 1.0 + cfg.saturation, generator)
    hue = _uniform(n, -cfg.hue, cfg.hue, generator)

    gray = _flag(n, cfg.grayscale_p, generator)
    blur = _flag(n, cfg.blur_p, generator)
    blur_sigma = _uniform(n, cfg.blur_sigma_min, cfg.blur_sigma_max, generator)
    blur_radius = torch.full((n,), max(1, math.ceil(3.0 * cfg.blur_sigma_max)), dtype=torch.long)
    return {
        "crop_w": crop_w, "crop_h": crop_h, "crop_cx": crop_cx, "crop_cy": crop_cy, "flip": flip,
        "jitter": jitter, "brightness": brightness, "contrast": contrast,
        "saturation": saturation, "hue": hue,
        "gray": gray, "blur": blur, "blur_sigma": blur_sigma, "blur_radius": blur_radius,
    }


# --------------------------------------------------------------------------- operations


def _crop_flip(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """Random-resized crop + flip as one batched affine resampling (output size = input size)."""
    n = x.shape[0]
    sign = 1.0 - 2.0 * p["flip"].to(torch.float32)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = p["crop_w"] * sign
    theta[:, 0, 2] = p["crop_cx"]
    theta[:, 1, 1] = p["crop_h"]
    theta[:, 1, 2] = p["crop_cy"]
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _luma(x: Tensor) -> Tensor:
    """(m, 3, H, W) -> (m, 1, H, W) grayscale."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``factor * a + (1 - factor) * b`` per sample, clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1.0 - f) * b).clamp(0.0, 1.0)


def _hue_matrices(hue: Tensor) -> Tensor:
    """Per-sample 3x3 RGB matrices rotating the YIQ chroma plane by ``2*pi*hue``: (m,) -> (m, 3, 3)."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    angle = 2.0 * math.pi * hue.to(torch.float64)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(hue.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def _color_jitter(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """Brightness, contrast, saturation, hue (in that order) with per-sample factors.

    Shape: x (m, 3, H, W) in [0, 1]; every tensor of ``p`` is (m,), on x's device,
    except ``hue`` which stays on the CPU.
    """
    x = _blend(x, torch.zeros_like(x), p["brightness"])
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x = _blend(x, mean.expand_as(x), p["contrast"])
    x = _blend(x, _luma(x).expand_as(x), p["saturation"])
    mat = _hue_matrices(p["hue"]).to(device=x.device, dtype=x.dtype)
    return torch.einsum("mij,mjhw->mihw", mat, x).clamp(0.0, 1.0)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable gaussian blur with a per-sample sigma and reflect padding.

    Shape: x (m, C, H, W), sigma (m,) on x's device -> (m, C, H, W).
    """
    m, c, h, w = x.shape
    radius = max(1, min(radius, h - 1, w - 1))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*C, k)
    k = kernel.shape[1]
    y = x.reshape(1, m * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(m * c, 1, 1, k), groups=m * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(m * c, 1, k, 1), groups=m * c)
    return y.reshape(m, c, h, w)


def _on_subset(x: Tensor, flag: Tensor, fn) -> Tensor:
    """Apply ``fn(x[idx], idx_cpu)`` to the flagged samples only (flag is a CPU bool tensor)."""
    idx = flag.nonzero().flatten()
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, idx)
    dev_idx = idx.to(x.device)
    x = x.clone()
    x[dev_idx] = fn(x[dev_idx], idx)
    return x


def apply_params(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Apply per-sample augmentation parameters to a batch.

    Crop + flip (one affine ``grid_sample``, bilinear, ``align_corners=False``),
    then colour jitter, grayscale and blur on the flagged samples only; the
    result is clamped to [0, 1]. Parameters are moved to ``x``'s device.

    Args:
        x: float images in [0, 1], any device.
        params: output of :func:`sample_params` for ``n`` images (CPU tensors).

    Shape:
        x: (n, 3, H, W) -> (n, 3, H, W).

    Returns:
        The augmented batch, same device and dtype as ``x``.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"views expect images of shape (n, 3, H, W); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"views expect float images in [0, 1]; got dtype {x.dtype}")
    n = x.shape[0]
    if params["flip"].shape[0] != n:
        raise ValueError(f"params are for {params['flip'].shape[0]} images but the batch has {n}")
    p = {k: v.cpu() for k, v in params.items()}

    out = _crop_flip(x, p)

    def jitter(sub: Tensor, idx: Tensor) -> Tensor:
        sel = {k: p[k][idx] for k in ("brightness", "contrast", "saturation", "hue")}
        sel.update({k: sel[k].to(x.device) for k in ("brightness", "contrast", "saturation")})
        return _color_jitter(sub, sel)

    out = _on_subset(out, p["jitter"], jitter)
    out = _on_subset(out, p["gray"], lambda sub, idx: _luma(sub).expand_as(sub).contiguous())

    def blur(sub: Tensor, idx: Tensor) -> Tensor:
        return gaussian_blur(sub, p["blur_sigma"][idx].to(x.device), int(p["blur_radius"][idx].max()))

    out = _on_subset(out, p["blur"], blur)
    return out.clamp(0.0, 1.0)


def make_views(
    x: Tensor,
    cfg: ViewConfig,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    stream: int = 0,
) -> list[Tensor]:
    """Make ``cfg.n_views`` augmented views of this rank's slice of a global batch.

    The parameters are drawn for the global batch (``b * world_size`` images)
    from a CPU generator seeded by ``(seed, stream, step)`` and this rank uses
    rows ``[rank*b : (rank+1)*b]``; so concatenating the views of all ranks
    gives the views a single process makes of the concatenated batch.

    Args:
        x: this rank's local batch, float in [0, 1], any device.
        cfg: view settings.
        seed: run seed.
        step: global training step (different steps -> different views).
        rank: this process's rank.
        world_size: number of processes sharing the global batch.
        stream: independent parameter stream for the same (seed, step), e.g.
            to keep the watermark views apart from the contrastive views.

    Shape:
        x: (b, 3, H, W) -> list of ``cfg.n_views`` tensors (b, 3, H, W).

    Returns:
        The list of views.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    b = x.shape[0]
    gen = torch.Generator().manual_seed(derive_seed(seed, "views", stream, step))
    views = []
    for _ in range(cfg.n_views):
        params = sample_params(cfg, b * world_size, gen)
        local = {k: v[rank * b : (rank + 1) * b] for k, v in params.items()}
        views.append(apply_params(x, local))
    return views
