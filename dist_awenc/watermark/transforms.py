"""Random differentiable transforms of marked images: expectation over transformation (METHOD.md,
"Robust embedding").

With ``robust.transforms`` set, stage 1 and the watermark terms of stage 2 see
``T(x + delta)`` instead of ``x + delta``, T drawn per image from: ``jpeg`` (a
differentiable JPEG: YCbCr, 4:2:0 chroma, 8x8 block DCT, the IJG tables scaled
by quality, straight-through rounding), ``resize`` (down and up, bilinear),
``crop`` (random crop resized back), ``noise`` (Gaussian) and ``blur``
(Gaussian, depthwise), or the identity with probability ``p_identity``.

As with the views (:mod:`dist_awenc.data.views`), parameters are drawn on the
CPU from an explicit generator (:func:`sample_transforms`, every value for
every image in a fixed order) and applied on the images' device
(:func:`apply_drawn`); :func:`draws_for_rank` draws for the global batch from
``(seed, step)`` and returns this rank's slice, so the draws do not depend on
the number of processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_awenc.config_checks import ROBUST_RANGES as _RANGES, TRANSFORMS, check_robust
from dist_awenc.data.splits import derive_seed

IDENTITY = -1  # the ``op`` code of an untransformed image; others index TRANSFORMS

# IJG (libjpeg) standard tables, ITU-T T.81 Annex K, row-major 8x8
_LUMA_Q = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
           14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
           49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_Q = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
             47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32
# JFIF full-range RGB <-> YCbCr (what libjpeg uses)
_RGB_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_YCC_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


@dataclass(frozen=True)
class TransformParams:
    """The transform family (``robust:`` section). ``transforms`` empty: off (every T is the identity)."""

    transforms: tuple[str, ...] = ()
    jpeg_quality: tuple[int, int] = (50, 95)
    resize_scale: tuple[float, float] = (0.5, 1.0)
    crop_area: tuple[float, float] = (0.8, 1.0)
    noise_std: tuple[float, float] = (0.0, 0.03)
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    p_identity: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "transforms", tuple(str(t) for t in self.transforms))
        check_robust(self)
        for name in _RANGES:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "jpeg_quality", tuple(int(q) for q in self.jpeg_quality))

    @classmethod
    def of(cls, section: Any) -> "TransformParams":
        """From a ``robust:`` config section (any object with these fields), or return ``section`` itself."""
        if isinstance(section, cls):
            return section
        return cls(**{k: getattr(section, k) for k in cls.__dataclass_fields__})

    @property
    def enabled(self) -> bool:
        return bool(self.transforms)

    def record(self) -> dict[str, Any]:
        """JSON-able settings, as a secret records how it was made."""
        return {"transforms": list(self.transforms), **{k: list(getattr(self, k)) for k in _RANGES},
                "p_identity": float(self.p_identity)}


# --------------------------------------------------------------------------- draws


def _uniform(n: int, lohi: tuple[float, float], gen: torch.Generator) -> Tensor:
    return lohi[0] + (lohi[1] - lohi[0]) * torch.rand(n, generator=gen, dtype=torch.float64)


def sample_transforms(params: TransformParams, n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Per-image transform parameters for ``n`` images, drawn on the CPU from ``generator``.

    Every value is drawn for every image in a fixed order, so the first k
    images' draws depend only on the generator's state (rank slices of a
    global draw equal the 1-process draw).

    Returns:
        CPU tensors of shape (n,): ``op`` (long: IDENTITY or an index into
        TRANSFORMS), ``quality`` (long), ``scale``, ``area``, ``cx``, ``cy``
        (crop centre offset in [-1, 1]), ``std``, ``sigma`` (float64),
        ``noise_seed`` (long) and ``blur_radius`` (long, the same for all).
    """
    m = max(1, len(params.transforms))
    identity = torch.rand(n, generator=generator) < params.p_identity
    choice = torch.randint(m, (n,), generator=generator)
    codes = torch.tensor([TRANSFORMS.index(t) for t in params.transforms] or [IDENTITY])
    op = torch.where(identity | (not params.enabled), torch.full((n,), IDENTITY), codes[choice])
    q = params.jpeg_quality
    draws = {
        "op": op,
        "quality": torch.randint(q[0], q[1] + 1, (n,), generator=generator),
        "scale": _uniform(n, params.resize_scale, generator),
        "area": _uniform(n, params.crop_area, generator),
        "cx": _uniform(n, (-1.0, 1.0), generator),
        "cy": _uniform(n, (-1.0, 1.0), generator),
        "std": _uniform(n, params.noise_std, generator),
        "noise_seed": torch.randint(0, 2**62, (n,), generator=generator),
        "sigma": _uniform(n, params.blur_sigma, generator),
    }
    draws["blur_radius"] = torch.full((n,), max(1, math.ceil(3 * params.blur_sigma[1])), dtype=torch.long)
    return draws


def draws_for_rank(params: TransformParams, local_batch: int, seed: int, step: int, rank: int = 0,
                   world_size: int = 1) -> dict[str, Tensor]:
    """This rank's rows of the draws for the global batch (``local_batch * world_size`` images).

    The generator is seeded by ``(seed, "robust", step)``, as :func:`~dist_awenc.data.views.make_views`
    seeds the views by ``(seed, "views", stream, step)``; rank r takes rows ``[r*b : (r+1)*b]``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "robust", step))
    draws = sample_transforms(params, local_batch * world_size, gen)
    return {k: v[rank * local_batch : (rank + 1) * local_batch] for k, v in draws.items()}


# --------------------------------------------------------------------------- operations


def _dct_matrix(device, dtype) -> Tensor:
    """The 2-D orthonormal 8x8 DCT-II as one (64, 64) matrix K: for a row-major flattened block b,
    ``K @ b`` is ``D @ B @ D.T`` flattened, D the 1-D DCT matrix; K is orthogonal (inverse K.T)."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return torch.kron(d, d).to(device=device, dtype=dtype)


def quant_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """libjpeg's tables at integer ``quality`` (m,): base * (5000/q if q < 50 else 200 - 2q) / 100, in 1..255.

    Returns (m, 8, 8) luminance and chrominance tables, float64 on the CPU.
    """
    q = quality.to(torch.float64).clamp(1, 100)
    scale = torch.where(q < 50, torch.floor(5000 / q), 200 - 2 * q)[:, None]
    tables = []
    for base in (_LUMA_Q, _CHROMA_Q):
        t = torch.floor((torch.tensor(base, dtype=torch.float64)[None] * scale + 50) / 100).clamp(1, 255)
        tables.append(t.view(-1, 8, 8))
    return tables[0], tables[1]


def _round_ste(x: Tensor) -> Tensor:
    """Forward: round; backward: identity (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _quantise(plane: Tensor, table: Tensor) -> Tensor:
    """DCT-quantise-dequantise-IDCT of each 8x8 block. plane (m, c, H, W), H, W multiples of 8; table (m, 8, 8)."""
    m, c, h, w = plane.shape
    k = _dct_matrix(plane.device, plane.dtype)
    blocks = plane.reshape(m, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(m, -1, 64)
    t = table.to(plane.device, plane.dtype).reshape(m, 1, 64)
    blocks = (_round_ste((blocks @ k.T) / t) * t) @ k  # one GEMM each way
    return blocks.reshape(m, c, h // 8, w // 8, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(m, c, h, w)


def jpeg(x: Tensor, quality: Tensor) -> Tensor:
    """Differentiable JPEG round trip at per-image integer ``quality`` (m,), as libjpeg's baseline defaults
    (PIL, torchvision): JFIF YCbCr in 8-bit samples, 4:2:0 chroma (2x2 mean down, bilinear up = libjpeg's
    "fancy" upsampling), IJG tables scaled by quality, rounding of the quantised coefficients; every rounding
    has a straight-through gradient (forward: round, backward: identity).
    The image is padded to a multiple of 16 by edge replication, as the encoder pads its MCUs.

    Shape: (m, 3, H, W) in [0, 1] -> (m, 3, H, W) in [0, 1].
    """
    m, _, h, w = x.shape
    xp = F.pad(x, (0, (-w) % 16, 0, (-h) % 16), mode="replicate") * 255
    ycc = torch.einsum("ij,mjhw->mihw", torch.tensor(_RGB_TO_YCC, device=x.device, dtype=x.dtype), xp)
    luma_t, chroma_t = quant_tables(quality.cpu())
    y = _quantise(_round_ste(ycc[:, :1]) - 128, luma_t) + 128  # libjpeg codes 8-bit samples (rounded, straight-through)
    c = _quantise(_round_ste(F.avg_pool2d(_round_ste(ycc[:, 1:]), 2)), chroma_t)
    c = F.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
    rgb = torch.einsum("ij,mjhw->mihw", torch.tensor(_YCC_TO_RGB, device=x.device, dtype=x.dtype), torch.cat([y, c], 1))
    return (rgb[..., :h, :w] / 255).clamp(0, 1)


def resize(x: Tensor, scale: Tensor) -> Tensor:
    """Down to ``round(scale * side)`` (bilinear, antialiased) and back up (bilinear), per image (m,)."""
    h, w = x.shape[-2:]
    sizes = [(max(1, round(float(s) * h)), max(1, round(float(s) * w))) for s in scale]
    out = x.clone()
    for size in sorted(set(sizes)):
        idx = torch.tensor([i for i, s in enumerate(sizes) if s == size], device=x.device)
        down = F.interpolate(x[idx], size=size, mode="bilinear", antialias=True, align_corners=False)
        out[idx] = F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)
    return out


def crop(x: Tensor, area: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
    """A square crop of ``area`` of the image (side sqrt(area)) centred at ``(1 - side) * (cx, cy)`` in [-1, 1]
    coordinates, resized back to the input size: one batched affine ``grid_sample`` (bilinear)."""
    side = area.sqrt()
    theta = torch.zeros(len(area), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, 0, 2], theta[:, 1, 2] = (1 - side) * cx, (1 - side) * cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def noise(x: Tensor, std: Tensor, seeds: Tensor) -> Tensor:
    """``x + std * N(0, 1)``; image i's noise comes from its own CPU generator seeded by ``seeds[i]``."""
    z = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return x + (std.view(-1, 1, 1, 1) * z.to(torch.float64)).to(x.device, x.dtype)


def blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with per-image sigma (m,) (0: the identity): two depthwise convolutions, reflect
    padding, kernel half-width ``radius`` (at most the side - 1)."""
    m, c, h, w = x.shape
    r = max(1, min(radius, h - 1, w - 1))
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (taps[None] / sigma.to(torch.float64).clamp(min=1e-3)[:, None]) ** 2)  # 1e-3: one tap
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.device, x.dtype)  # (m*c, 2r+1)
    y = F.pad(x.reshape(1, m * c, h, w), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(m * c, 1, 1, -1), groups=m * c)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    return F.conv2d(y, k.view(m * c, 1, -1, 1), groups=m * c).reshape(m, c, h, w)


def apply_drawn(x: Tensor, draws: dict[str, Tensor]) -> Tensor:
    """Apply drawn parameters (from :func:`sample_transforms`) to the images ``x``, on x's device.

    Computed in float32 outside autocast (JPEG rounding needs the precision)
    and returned in x's dtype, clamped to [0, 1]; differentiable in ``x``.

    Shape: (n, 3, H, W) -> (n, 3, H, W).
    """
    d = {k: v.cpu() for k, v in draws.items()}  # a DDP wrapper may have moved them to the device
    if len(d["op"]) != len(x):
        raise ValueError(f"transform draws are for {len(d['op'])} images but the batch has {len(x)}")
    if bool((d["op"] == IDENTITY).all()):
        return x
    with torch.autocast(x.device.type, enabled=False):
        y = x.float()
        out = y.clone()
        for code, name in enumerate(TRANSFORMS):
            sel = (d["op"] == code).nonzero().flatten()
            if not len(sel):
                continue
            p = {k: v[sel] for k, v in d.items()}
            sub = y[sel.to(x.device)]
            if name == "jpeg":
                sub = jpeg(sub, p["quality"])
            elif name == "resize":
                sub = resize(sub, p["scale"])
            elif name == "crop":
                sub = crop(sub, p["area"], p["cx"], p["cy"])
            elif name == "noise":
                sub = noise(sub, p["std"], p["noise_seed"])
            else:
                sub = blur(sub, p["sigma"], int(p["blur_radius"].max()))
            out[sel.to(x.device)] = sub
        return out.clamp(0, 1).to(x.dtype)


def apply_transforms(x: Tensor, cfg_or_params: Any, generator: torch.Generator) -> Tensor:
    """Draw one transform per image from ``generator`` (CPU) and apply it: ``T(x)``.

    Args:
        x: (n, 3, H, W) images in [0, 1], any device.
        cfg_or_params: a :class:`TransformParams` or a ``robust:`` config section.
        generator: the only source of randomness (consumed).
    """
    params = TransformParams.of(cfg_or_params)
    if not params.enabled:
        return x
    return apply_drawn(x, sample_transforms(params, len(x), generator))


class RandomTransform:
    """``T(images, generator)``: each image draws its transform from ``generator`` (the stage-1 callable).

    ``draw`` and ``apply`` split the two halves, so that several generators' draws (one per secret) can be
    concatenated and applied to their images in one pass (:func:`cat_draws`).
    """

    def __init__(self, params: TransformParams) -> None:
        self.params = params

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return sample_transforms(self.params, n, generator)

    def apply(self, images: Tensor, draws: dict[str, Tensor]) -> Tensor:
        return apply_drawn(images, draws)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(images, self.draw(len(images), generator))

    def __repr__(self) -> str:
        return f"RandomTransform({self.params.record()})"


def cat_draws(draws: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The draws of several batches, as one batch's (in order)."""
    return {k: torch.cat([d[k] for d in draws]) for k in draws[0]}


def make_transform(cfg_or_params: Any) -> Optional[RandomTransform]:
    """The ``(images, generator) -> images`` callable stage 1 takes, or None when the family is off."""
    params = TransformParams.of(cfg_or_params)
    return RandomTransform(params) if params.enabled else None
