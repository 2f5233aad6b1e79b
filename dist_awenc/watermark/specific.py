"""Specificity in stage 2: f's response to other secrets held at f0's, so the owner's secret stands out.

The secret-permutation test ranks the owner's secret among J alternatives made by the same procedure, by each
secret's excess white-box score over the clean f0's (:mod:`dist_awenc.verify.permutation`). Embedding one universal
perturbation also makes f respond to many others of f0 (measured: results/permutation_j999/), so on a derivative a
few alternatives can outrank the owner's. With ``specific.weight`` > 0, every step draws ``specific.secrets`` of the
plan's alternatives and adds

    L_specific = mean_j relu( T_f(delta_j) - (1 - s) T_f0(delta_j) ),
    T_e(delta_j) = mean_i [cos(e(x_i + delta_j), e(k_j)) - cos(e(x_i + r_j), e(k_j))]

over the first ``specific.images`` clean images of the batch (r_j: alternative j's control; s: ``specific.suppress``):
with s = 0 f is held to f0's response for every alternative, the test's own statistic; with s = 1 to its
controls' (the alternatives then act on f no more than random noise of their strength, and f0 is not asked). It is
valid for the test: under H0 the suspect is independent of everything the owner did, this embedding included, so
the owner's secret is still uniformly placed among the J + 1 candidates; it only gives the test power where the
suspect does descend from f.
The draw of alternatives depends on (run seed, micro-step) only, so ranks agree and a resumed run draws the same.
"""
from __future__ import annotations

import torch
from torch import nn

from dist_awenc.data.splits import derive_seed
from dist_awenc.errors import ConfigError
from dist_awenc.watermark.secret import AlternativeSecrets
from dist_awenc.watermark.shadow import row_cos


def draw_alternatives(seed: int, micro_step: int, total: int, count: int) -> torch.Tensor:
    """``count`` distinct indices of ``total`` alternatives, from (seed, micro-step) only."""
    g = torch.Generator().manual_seed(derive_seed(seed, "specific", micro_step))
    return torch.randperm(total, generator=g)[:count]


class Specificity(nn.Module):
    """The plan's alternatives (keys, deltas, controls) and the term of the module docstring; which ones a step
    holds is :func:`draw_alternatives`' (the stage's inputs draw them on the host)."""

    def __init__(self, alternatives: AlternativeSecrets, secrets: int, images: int, suppress: float = 0.0) -> None:
        super().__init__()
        if not len(alternatives):
            raise ConfigError("specific.weight > 0 needs the plan's alternative secrets (plan.alternatives > 0)")
        if secrets < 1 or images < 1:
            raise ConfigError(f"specific.secrets and specific.images must be >= 1, got {secrets} and {images}")
        # plain tensors on the host, not buffers: DDP would broadcast J images x 3 every step (1.8 GB at J = 999,
        # 224 px); each step moves the few it draws
        self.keys, self.deltas, self.controls = alternatives.keys, alternatives.deltas, alternatives.controls()
        self.secrets, self.images = min(secrets, len(alternatives)), images
        self.keep = 1.0 - suppress  # the share of f0's response the target keeps

    def term(self, f: nn.Module, f0: nn.Module, clean: torch.Tensor, picked: torch.Tensor) -> dict[str, torch.Tensor]:
        """``specific`` (the loss, with f's graph) and ``specific_excess`` (mean T_f - target now, for the log).

        Shapes: clean (b, 3, S, S) in [0, 1]; picked (m,) indices into the alternatives.
        """
        x = clean[: self.images]
        n, m = len(x), len(picked)
        deltas, controls, keys = (t[picked.cpu()].to(clean.device, clean.dtype) for t in (self.deltas, self.controls, self.keys))
        batch = torch.cat([(x[None] + deltas[:, None]).clamp(0, 1).flatten(0, 1),
                           (x[None] + controls[:, None]).clamp(0, 1).flatten(0, 1), keys])

        def statistic(e: nn.Module) -> torch.Tensor:  # (m,) T_e per picked alternative
            feats = e(batch)
            f_m, f_r, f_k = feats[: n * m], feats[n * m : 2 * n * m], feats[2 * n * m :]
            f_k = f_k.repeat_interleave(n, dim=0)
            return (row_cos(f_m, f_k) - row_cos(f_r, f_k)).view(m, n).mean(dim=1)

        target = 0.0
        if self.keep:  # suppress = 1 holds f at its controls' response: no f0 pass
            with torch.no_grad():
                target = self.keep * statistic(f0)
        excess = statistic(f) - target
        return {"specific": torch.relu(excess).mean(), "specific_excess": excess.detach().mean()}
