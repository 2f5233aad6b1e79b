"""Batched, device-agnostic contrastive view augmentations.

Random parameters are drawn on the CPU from an explicit ``torch.Generator``
(:func:`sample_params`) and then applied to a batch on whatever device it
lives on (:func:`apply_params`): random-resized crop + horizontal flip as one
affine resampling, colour jitter, random grayscale, gaussian blur, solarisation (in that order, BYOL's). Each view
is drawn from its own settings (``views.view2`` overrides the second view's: :meth:`ViewConfig.for_view`).

:func:`make_views` draws the parameters of the *global* batch from
``(seed, step)`` and applies this rank's slice, so the views of a run do not
depend on how many processes share the batch.

Nothing waits for the device: everything derived from the draws (the crop's affine matrix, the hue rotation, the
indices of the images each colour operation touches) is computed on the host and packed into one float32 tensor
(:func:`draw_views`), which reaches the device in one non-blocking copy
(:func:`~dist_awenc.data.transfer.to_device_once`; the training loop moves a step's draws with its batch, before
the step, :func:`~dist_awenc.data.transfer.move_step`); which images are flagged stays on the host, so no step
reads a device value.

With ``views.crop=decode`` the loader has already cut each view from the original image
(:mod:`dist_awenc.data.crops`) and the batch is (b, V, 3, S, S): the device flips and colours them only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .color import blend, gaussian_blur, hue_matrices, luma, solarize
from .splits import derive_seed
from .transfer import to_device_once
from .view_config import CROP_MODES, PER_VIEW_FIELDS, ViewConfig, mild_view_config  # noqa: F401  (re-exported)

__all__ = ["ViewConfig", "ViewDraw", "apply_params", "draw_views", "gaussian_blur", "make_views", "mild_view_config",
           "sample_params"]


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
        ``blur_radius`` (long, kernel half-width, same for all samples), ``solarize`` (bool; drawn last, and only
        where ``solarize_p > 0``: all False otherwise, and the generator is not consumed for it).
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
    solarize = _flag(n, cfg.solarize_p, generator) if cfg.solarize_p > 0 else torch.zeros(n, dtype=torch.bool)
    return {
        "crop_w": crop_w, "crop_h": crop_h, "crop_cx": crop_cx, "crop_cy": crop_cy, "flip": flip,
        "jitter": jitter, "brightness": brightness, "contrast": contrast,
        "saturation": saturation, "hue": hue,
        "gray": gray, "blur": blur, "blur_sigma": blur_sigma, "blur_radius": blur_radius, "solarize": solarize,
    }


# --------------------------------------------------------------------------- packing (host side)

# Columns of the packed parameters of one view, (n, _K) float32, one row per image.
_THETA = slice(0, 6)  # the 2x3 affine matrix of crop + flip, row-major
_BRIGHT, _CONTRAST, _SAT = 6, 7, 8  # colour-jitter factors
_HUE = slice(9, 18)  # the 3x3 RGB hue rotation, row-major
_SIGMA = 18  # blur sigma in pixels
# jitter, gray, blur, solarize: the indices of the flagged images, first (exact in float32 below 2**24)
_ROWS = (19, 20, 21, 22)
_K = 23
_FLAGS = ("jitter", "gray", "blur", "solarize")


def _pack(p: dict[str, Tensor], crop: bool = True) -> tuple[Tensor, Tensor, int]:
    """:func:`sample_params` output for n images -> (packed (n, _K) float32, flags (n, 4) bool, blur radius), on the CPU.

    ``crop=False`` (the loader cut the crop): the affine matrix is the flip alone.
    """
    n = p["flip"].shape[0]
    packed = torch.zeros(n, _K)
    packed[:, 0] = (p["crop_w"] if crop else 1.0) * (1.0 - 2.0 * p["flip"].to(torch.float32))
    if crop:
        packed[:, 2], packed[:, 4], packed[:, 5] = p["crop_cx"], p["crop_h"], p["crop_cy"]
    else:
        packed[:, 4] = 1.0
    packed[:, _BRIGHT], packed[:, _CONTRAST], packed[:, _SAT] = p["brightness"], p["contrast"], p["saturation"]
    packed[:, _HUE] = hue_matrices(p["hue"]).reshape(n, 9).to(torch.float32)
    packed[:, _SIGMA] = p["blur_sigma"]
    flags = torch.stack([p[k].bool() if k in p else torch.zeros(n, dtype=torch.bool) for k in _FLAGS], dim=1)
    for col, flag in zip(_ROWS, flags.unbind(1)):
        rows = flag.nonzero().flatten()
        packed[: rows.numel(), col] = rows.to(torch.float32)
    return packed, flags, int(p["blur_radius"].max()) if n else 1


@dataclass
class ViewDraw:
    """The parameters of V views of b images, drawn and prepared on the host (:func:`draw_views`).

    Attributes:
        packed: (V, b, _K) float32 CPU tensor, what the device needs; move it with
            :func:`~dist_awenc.data.transfer.to_device_once` (one copy for all the draws of a step).
        flags: (V, b, 4) bool CPU tensor (jitter, grayscale, blur, solarise per image); never leaves the host.
        radius: blur kernel half-width (the largest of the views', where ``views.view2`` sets another sigma).
        crop: whether the views are cut here (``views.crop=device``) or were cut by the loader (``decode``).
    """

    packed: Tensor
    flags: Tensor
    radius: int
    crop: bool = True

    def apply(self, x: Tensor, packed: Tensor) -> list[Tensor]:
        """The V views of ``x`` given ``packed`` = ``self.packed`` on x's device.

        ``x`` is the batch (b, 3, H, W), or with ``views.crop=decode`` the loader's crops (b, V, 3, S, S).
        """
        V = self.packed.shape[0]
        if not self.crop:
            if x.dim() != 5 or x.shape[1] != V:
                raise ValueError(f"views.crop=decode expects the loader's {V} crops per image, (b, {V}, 3, S, S); "
                                 f"got a batch of shape {tuple(x.shape)}")
            parts = x.unbind(1)
            for part in parts:
                _check_images(part, self.packed.shape[1])
            return [_apply_packed(parts[v], packed[v], self.flags[v], self.radius, crop=False) for v in range(V)]
        _check_images(x, self.packed.shape[1])
        return [_apply_packed(x, packed[v], self.flags[v], self.radius) for v in range(V)]


# --------------------------------------------------------------------------- operations (device side)


def _color_jitter(x: Tensor, rows: Tensor) -> Tensor:
    """Brightness, contrast, saturation, hue (in that order) with per-sample factors.

    Shape: x (m, 3, H, W) in [0, 1]; rows (m, _K), the packed parameters of these images, on x's device.
    """
    x = blend(x, torch.zeros_like(x), rows[:, _BRIGHT])
    mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x = blend(x, mean.expand_as(x), rows[:, _CONTRAST])
    x = blend(x, luma(x).expand_as(x), rows[:, _SAT])
    mat = rows[:, _HUE].reshape(-1, 3, 3).to(x.dtype)
    return torch.einsum("mij,mjhw->mihw", mat, x).clamp(0.0, 1.0)


def _on_subset(x: Tensor, rows: Tensor, flag: Tensor, col: int, fn) -> Tensor:
    """``fn(x[i], rows[i])`` on the flagged images only; flag is a CPU bool tensor, the indices come from ``rows[:, col]``."""
    k = int(flag.sum())  # a host value: the flags never left the CPU
    if k == 0:
        return x
    if k == x.shape[0]:
        return fn(x, rows)
    idx = rows[:k, col].long()  # on x's device, from the one copy
    return x.index_copy(0, idx, fn(x.index_select(0, idx), rows.index_select(0, idx)))


def _apply_packed(x: Tensor, rows: Tensor, flags: Tensor, radius: int, crop: bool = True) -> Tensor:
    """One view: crop + flip as one affine ``grid_sample`` (``crop=False``: the flip alone, as a masked select), then
    jitter, grayscale, blur and solarisation on the flagged images."""
    if crop:
        theta = rows[:, _THETA].reshape(-1, 2, 3).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:  # rows[:, 0] is -1 where the image is flipped: a device-side mask, no host read
        out = torch.where((rows[:, 0] < 0).reshape(-1, 1, 1, 1), x.flip(-1), x)
    out = _on_subset(out, rows, flags[:, 0], _ROWS[0], _color_jitter)
    out = _on_subset(out, rows, flags[:, 1], _ROWS[1], lambda sub, r: luma(sub).expand_as(sub).contiguous())
    out = _on_subset(out, rows, flags[:, 2], _ROWS[2], lambda sub, r: gaussian_blur(sub, r[:, _SIGMA], radius))
    out = out.clamp(0.0, 1.0)  # solarising inverts around 0.5: on the clamped values, as on an image
    return _on_subset(out, rows, flags[:, 3], _ROWS[3], lambda sub, r: solarize(sub))


def _check_images(x: Tensor, n: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"views expect images of shape (n, 3, H, W); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"views expect float images in [0, 1]; got dtype {x.dtype}")
    if n != x.shape[0]:
        raise ValueError(f"params are for {n} images but the batch has {x.shape[0]}")


def apply_params(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Apply per-sample augmentation parameters to a batch.

    Crop + flip (one affine ``grid_sample``, bilinear, ``align_corners=False``),
    then colour jitter, grayscale, blur and solarisation on the flagged samples only; the
    result is clamped to [0, 1]. The parameters reach ``x``'s device in one copy.

    Args:
        x: float images in [0, 1], any device.
        params: output of :func:`sample_params` for ``n`` images (CPU tensors).

    Shape:
        x: (n, 3, H, W) -> (n, 3, H, W).

    Returns:
        The augmented batch, same device and dtype as ``x``.
    """
    _check_images(x, params["flip"].shape[0])
    packed, flags, radius = _pack({k: v.cpu() for k, v in params.items()})
    (rows,) = to_device_once([packed], x.device)
    return _apply_packed(x, rows, flags, radius)


def draw_views(cfg: ViewConfig, b: int, seed: int, step: int, rank: int = 0, world_size: int = 1, *,
               stream: int = 0) -> ViewDraw:
    """The host half of :func:`make_views`: this rank's parameters of ``cfg.n_views`` views of ``b`` images.

    Drawn for the global batch (``b * world_size`` images, rank r takes rows ``[r*b : (r+1)*b]``) from a CPU
    generator seeded by ``(seed, stream, step)``; the same values :func:`make_views` applies.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "views", stream, step))
    parts = []
    crop = cfg.crop == "device"
    for v in range(cfg.n_views):
        params = sample_params(cfg.for_view(v), b * world_size, gen)
        parts.append(_pack({k: x[rank * b : (rank + 1) * b] for k, x in params.items()}, crop))
    return ViewDraw(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), max(p[2] for p in parts), crop)


def make_views(x: Tensor, cfg: ViewConfig, seed: int, step: int, rank: int = 0, world_size: int = 1, *,
               stream: int = 0) -> list[Tensor]:
    """Make ``cfg.n_views`` augmented views of this rank's slice of a global batch.

    The parameters are drawn for the global batch (``b * world_size`` images)
    from a CPU generator seeded by ``(seed, stream, step)`` and this rank uses
    rows ``[rank*b : (rank+1)*b]``; so concatenating the views of all ranks
    gives the views a single process makes of the concatenated batch. They
    reach the device in one copy (a step that makes several sets of views can
    move all their :func:`draw_views` in one, see :meth:`ViewDraw.apply`).

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
    draw = draw_views(cfg, x.shape[0], seed, step, rank, world_size, stream=stream)
    _check_images(x, x.shape[0])
    (packed,) = to_device_once([draw.packed], x.device)
    return draw.apply(x, packed)
