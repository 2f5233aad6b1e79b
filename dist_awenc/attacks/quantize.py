"""Quantisation attack: a symmetric integer round trip of every conv / linear weight."""
from __future__ import annotations

import torch

from dist_awenc.attacks.base import AttackData, AttackOptions, as_count, register_attack, weight_modules
from dist_awenc.encoders.io import Encoder
from dist_awenc.errors import ConfigError


def quantize_symmetric(w: torch.Tensor, bits: int, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric uniform quantisation round trip.

    ``qmax = 2**(bits-1) - 1``; ``scale = max|w| / qmax`` per output channel
    (dim 0) or per tensor; ``q = clamp(round(w / scale), -qmax, qmax)``;
    returns ``q * scale`` and the scale. An all-zero channel keeps scale 1.

    Shape:
        w: (out, ...) -> (out, ...) and scale (out, 1, ..., 1) or a 0-dim tensor.
    """
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        amax = w.detach().abs().flatten(1).amax(1).view(-1, *([1] * (w.dim() - 1)))  # (out, 1, ...)
    else:
        amax = w.detach().abs().amax()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(w.detach() / scale).clamp_(-qmax, qmax)
    return q * scale, scale


@register_attack("quantize_int8", strengths=[8])
def quantize_int8(encoder: Encoder, card: dict, strength: float, data: AttackData,
                  options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Round every conv / linear weight to a symmetric ``strength``-bit grid (8 = int8; 6 and 4 also work).

    Per output channel unless ``options.quant_per_channel`` is false. Biases and
    normalisation parameters stay in float, as in int8 inference engines.
    """
    bits = as_count(strength, "quantize_int8", "the number of bits", minimum=2)
    if bits > 16:
        raise ConfigError(f"attack quantize_int8: strength is the number of bits, 2..16; got {bits}")
    modules = weight_modules(encoder.backbone)
    err_sq = total_sq = 0.0
    with torch.no_grad():
        for m in modules:
            w_q, _ = quantize_symmetric(m.weight, bits, options.quant_per_channel)
            err_sq += float((w_q - m.weight).pow(2).sum())
            total_sq += float(m.weight.pow(2).sum())
            m.weight.copy_(w_q)
    return encoder, {"bits": bits, "levels": 2 ** bits - 1, "per_channel": options.quant_per_channel,
                     "n_layers": len(modules), "rel_quant_error": (err_sq / total_sq) ** 0.5 if total_sq else 0.0}
