"""Ownership verification: white-box from an encoder, black-box from a model's outputs.

Each verdict compares marked queries ``x + delta`` with control queries
``x + r`` (``r`` a permutation of delta) and tests, with a margin, that the
watermark's effect exceeds what any encoder shows (METHOD.md, stage 3).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dist_awenc.verify.stats import margin_wilcoxon, paired_proportion_margin
from dist_awenc.watermark.secret import Secret

MODES = ("whitebox", "blackbox_score", "blackbox_label")
DEFAULT_N = {"whitebox": 256, "blackbox_score": 100, "blackbox_label": 100}


def images_for(mode: str, n: int) -> int:
    """How many hold-out images a mode uses for a budget ``n``.

    White-box: n images. Black-box modes count queries to the suspect model:
    score mode asks g(x), g(x+delta), g(x+r) per image (n // 3 images); label
    mode asks the key once and x+delta, x+r per image ((n - 1) // 2 images).
    """
    if mode not in MODES:
        raise ValueError(f"unknown verification mode '{mode}'; valid: {', '.join(MODES)}")
    k = {"whitebox": n, "blackbox_score": n // 3, "blackbox_label": (n - 1) // 2}[mode]
    if k < 2:
        raise ValueError(f"a budget of n={n} leaves {k} image(s) for {mode}; need at least 2")
    return k


@dataclass
class Verdict:
    mode: str
    p_value: float
    effect: float
    n: int
    threshold: float  # the margin tau the effect is tested against
    alpha: float  # p-value below which ownership is claimed
    decision: bool  # True: ownership evidence
    secret_sha256: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        word = "OWNERSHIP EVIDENCE" if self.decision else "no evidence"
        return (f"{self.mode:<15} p={self.p_value:.3g}  effect={self.effect:+.4f} (margin {self.threshold:g})  "
                f"n={self.n}  -> {word}")


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def whitebox_scores(encoder: torch.nn.Module, secret: Secret, images: torch.Tensor) -> np.ndarray:
    """``s_i = cos(f(x_i+delta), f(x_k)) - cos(f(x_i+r), f(x_k))``; Shape: (n, 3, S, S) -> (n,)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    x = images.to(device)
    f_key = encoder(secret.key[None].to(device)).float()
    f_m = _batched(lambda b: encoder(secret.mark(b)).float(), x)
    f_r = _batched(lambda b: encoder(secret.mark_control(b)).float(), x)
    s = F.cosine_similarity(f_m, f_key.expand_as(f_m), dim=1) - F.cosine_similarity(f_r, f_key.expand_as(f_r), dim=1)
    return s.cpu().double().numpy()


def verify_whitebox(encoder: torch.nn.Module, secret: Secret, images: torch.Tensor, *, tau: float = 0.1,
                    alpha: float = 1e-3) -> Verdict:
    """White-box verdict: Wilcoxon signed-rank of ``s - tau`` > 0 (one-sided)."""
    r = margin_wilcoxon(whitebox_scores(encoder, secret, images), tau)
    return Verdict("whitebox", r.p_value, r.effect, r.n, tau, alpha, r.p_value < alpha, secret.sha256, r.extra)


@torch.no_grad()
def blackbox_score_differences(predict_proba: Callable[[torch.Tensor], torch.Tensor], secret: Secret,
                               images: torch.Tensor) -> np.ndarray:
    """``TV(g(x), g(x+delta)) - TV(g(x), g(x+r))`` per query; Shape: (n, 3, S, S) -> (n,)."""
    p = _batched(predict_proba, images).double()
    p_m = _batched(lambda b: predict_proba(secret.mark(b)), images).double()
    p_r = _batched(lambda b: predict_proba(secret.mark_control(b)), images).double()
    tv = lambda a, b: 0.5 * (a - b).abs().sum(dim=1)  # noqa: E731
    return (tv(p, p_m) - tv(p, p_r)).cpu().numpy()


def verify_blackbox_score(predict_proba: Callable[[torch.Tensor], torch.Tensor], secret: Secret, images: torch.Tensor,
                          *, tau: float = 0.1, alpha: float = 1e-3) -> Verdict:
    """Black-box verdict from output probabilities: Wilcoxon on the TV-distance differences."""
    r = margin_wilcoxon(blackbox_score_differences(predict_proba, secret, images), tau)
    return Verdict("blackbox_score", r.p_value, r.effect, r.n, tau, alpha, r.p_value < alpha, secret.sha256,
                   {**r.extra, "queries": 3 * r.n})


@torch.no_grad()
def label_hits(predict_label: Callable[[torch.Tensor], torch.Tensor], secret: Secret,
               images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Whether marked / control queries get the key's label; 2n + 1 queries in all."""
    key_label = int(predict_label(secret.key[None])[0])
    hm = _batched(lambda b: predict_label(secret.mark(b)), images).cpu().numpy() == key_label
    hr = _batched(lambda b: predict_label(secret.mark_control(b)), images).cpu().numpy() == key_label
    return hm, hr, key_label


def verify_blackbox_label(predict_label: Callable[[torch.Tensor], torch.Tensor], secret: Secret, images: torch.Tensor,
                          *, tau: float = 0.3, alpha: float = 1e-3) -> Verdict:
    """Label-only verdict: paired hit-rate difference > tau (Tango's score test)."""
    hm, hr, key_label = label_hits(predict_label, secret, images)
    r = paired_proportion_margin(hm, hr, tau)
    return Verdict("blackbox_label", r.p_value, r.effect, r.n, tau, alpha, r.p_value < alpha, secret.sha256,
                   {**r.extra, "key_label": key_label, "queries": 2 * r.n + 1})
