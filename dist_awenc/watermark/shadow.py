"""Derivative robustness in stage 2: a shadow student distilled alongside, and a watermark its distillation teaches.

A pirate's student learns the watermarked encoder f only from f's answers on clean images: it carries the mark
only if those answers teach it. Stage 2 therefore trains a *shadow* student S beside f, as the pirate would
(``distill``: ``1 - cos(S(A(x)), sg f(A(x)))`` on the mild views, from a fresh initialisation), and adds a term
that shapes f's clean answers so that the distillation step they give S moves S towards the watermark. It is the
gradient-matching form of data poisoning (Geiping et al., "Witches' Brew", ICLR 2021), with f's answers as the
poison and the student's watermark effect (white-box verification's score, with the clean view as the control)
as the target:

    g_steal(f) = grad_S  mean(1 - cos(S(A(x)), f(A(x))))           (differentiable in f)
    g_wm       = grad_S  -mean(cos(S(T(A(x) + delta)), S(x_k)) - cos(S(A(x)), S(x_k)))   (a constant)
    L_shadow   = 1 - cos(g_steal(f), g_wm)

so that a pirate's descent step on its distillation loss is, to first order, a descent step on the watermark loss
of the student. The term's gradient reaches f only (S enters through detached copies of its weights); S itself
learns from the distillation term only, with f's answers detached, as a pirate's student does. With ``refresh``
> 0 the shadow restarts from a fresh initialisation every ``refresh`` steps, so students early in their
training (a pirate's starts fresh) are matched too. SSLGuard (Cong et al., CCS 2022) trains a shadow encoder
beside the watermarked one for the same reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dist_awenc.data.splits import derive_seed
from dist_awenc.encoders.io import Encoder, build_encoder
from dist_awenc.encoders.registry import arch_kwargs
from dist_awenc.errors import ConfigError


def build_shadow(f0: Encoder, card: dict, arch: str, seed: int, refresh_index: int = 0) -> Encoder:
    """A fresh student like the pirate's ``distill`` one: ``arch`` ('' for f0's) with f0's normalisation and size,
    its initialisation seeded by ``(seed, refresh_index)``."""
    arch = arch or card["arch"]
    kwargs = arch_kwargs(arch, **dict(card["arch_kwargs"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "shadow", refresh_index))
        student = build_encoder(arch, kwargs, f0.mean.flatten().tolist(), f0.std.flatten().tolist(), f0.input_size)
    if student.feature_dim != f0.feature_dim:
        raise ConfigError(f"shadow.arch: '{arch}' {kwargs} has feature_dim {student.feature_dim} but f0 has "
                          f"{f0.feature_dim}; choose an architecture of f0's feature dimension")
    return student


def row_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine in float32 (features may be bf16 under autocast; cosine_similarity is not an autocast op, so
    it keeps the cast); ``b`` (1, d) is broadcast. Shape: (b, d), (b or 1, d) -> (b,)."""
    return F.cosine_similarity(a.float(), b.float().expand_as(a), dim=1)


class Shadow(nn.Module):
    """The shadow student and its two terms (module docstring). ``forward`` is not used: :meth:`terms` is."""

    def __init__(self, student: Encoder, seed: int, arch: str, card: dict) -> None:
        super().__init__()
        self.student = student
        self.seed, self.arch, self.card = seed, arch, card

    def terms(self, aug: torch.Tensor, f_aug: torch.Tensor, marked: torch.Tensor,
              key: torch.Tensor) -> dict[str, torch.Tensor]:
        """``steal`` (trains S on f's detached answers), ``shadow`` (1 - cos of the two weight gradients; reaches f
        through ``f_aug`` only) and ``shadow_effect`` (the student's watermark effect now, for the log).

        Shapes: aug (b, 3, S, S); f_aug (b, d), with f's graph; marked (b, 3, S, S), already transformed when
        ``robust`` is on; key (1, 3, S, S).
        """
        s = self.student
        steal = (1 - row_cos(s(aug), f_aug.detach())).mean()
        params = {n: p.detach().requires_grad_(True) for n, p in s.named_parameters()}
        buffers = {n: b.clone() for n, b in s.named_buffers()}  # running statistics are not updated twice

        def s_of(x: torch.Tensor) -> torch.Tensor:
            return functional_call(s, (params, buffers), (x,))

        with torch.enable_grad():  # one forward of S serves both gradients (S(A(x)) is the control and the student)
            s_m, s_c, s_k = s_of(torch.cat([marked.detach(), aug.detach(), key])).split([len(marked), len(aug), 1])
            effect = (row_cos(s_m, s_k) - row_cos(s_c, s_k)).mean()
            g_wm = torch.autograd.grad(-effect, list(params.values()), retain_graph=True)
            distill = (1 - row_cos(s_c, f_aug)).mean()
            g_steal = torch.autograd.grad(distill, list(params.values()), create_graph=True)
        flat_steal = torch.cat([g.flatten() for g in g_steal]).float()
        flat_wm = torch.cat([g.flatten() for g in g_wm]).float()
        shadow = 1 - F.cosine_similarity(flat_steal, flat_wm, dim=0)
        return {"steal": steal, "shadow": shadow, "shadow_effect": effect.detach()}

    @torch.no_grad()
    def restart(self, refresh_index: int) -> None:
        """Re-initialise S in place (seeded by ``refresh_index``); the optimiser's moments for it carry over."""
        fresh = build_shadow(self.student, self.card, self.arch, self.seed, refresh_index)
        self.student.load_state_dict(fresh.to(next(self.student.parameters()).device).state_dict())
