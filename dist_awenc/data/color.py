"""Device-side colour and blur operations of the contrastive views (per-sample parameters, any device)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["blend", "gaussian_blur", "hue_matrices", "luma", "solarize"]

# ITU-R 601 luma weights (as torchvision's rgb_to_grayscale).
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ; the hue is shifted by rotating the (I, Q) chroma plane.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)



def luma(x: Tensor) -> Tensor:
    """(m, 3, H, W) -> (m, 1, H, W) grayscale."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``factor * a + (1 - factor) * b`` per sample, clamped to [0, 1]."""
    f = factor.reshape(-1, 1, 1, 1)
    return (f * a + (1.0 - f) * b).clamp(0.0, 1.0)


def hue_matrices(hue: Tensor) -> Tensor:
    """Per-sample 3x3 RGB matrices rotating the YIQ chroma plane by ``2*pi*hue``: (m,) -> (m, 3, 3), float64 CPU."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    angle = 2.0 * math.pi * hue.to(torch.float64)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(hue.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    """BYOL's solarisation (Grill et al. 2020, Appendix B): ``x`` below ``threshold``, ``1 - x`` from it on (as
    torchvision's ``RandomSolarize`` with its threshold at the middle of the range). Shape: any, values in [0, 1]."""
    return torch.where(x < threshold, x, 1.0 - x)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable gaussian blur with a per-sample sigma and reflect padding.

    Shape: x (m, C, H, W), sigma (m,) on x's device -> (m, C, H, W).
    """
    m, c, h, w = x.shape
    radius = max(1, min(radius, h - 1, w - 1))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.reshape(-1, 1).to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*C, k)
    k = kernel.shape[1]
    y = x.reshape(1, m * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(m * c, 1, 1, k), groups=m * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(m * c, 1, k, 1), groups=m * c)
    return y.reshape(m, c, h, w)
