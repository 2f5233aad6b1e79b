"""The secret-permutation tests: the owner's statistic ranked among J alternative secrets.

Stage 1 generated J + 1 secrets by one procedure on f0 and a draw picked the owner's (METHOD.md, stage 1), so under
H0 (the suspect is independent of f0, and so of every secret generated on it) the J + 1 statistics measured on the
same images are exchangeable and the rank of the owner's is uniform: ``p = (1 + #{alternatives >= owner}) / (J + 1)``
is exact, needs no margin and no null population, and can reach ``alpha`` only when ``J + 1 >= 1 / alpha``.

White-box (an encoder): the statistic the plan names (``plan.whitebox_statistic``, :data:`WHITEBOX_STATISTICS`):
since 2026-12-07 the mean white-box score itself (``score``); plans made before it keep the score minus the clean
f0's response to the same secret, where stage 1 recorded it (``f0_excess``). Black-box (a model's outputs):
probabilities, the statistic the plan names (``plan.score_statistic``, :data:`SCORE_STATISTICS`): since 2026-12-07
how far the marked answers move towards the key's own answer (``key_tv``), the black-box image of the white-box
score; plans made before it keep the margin test's shift from the clean answer (``clean_tv``). Labels
(``plan.label_statistic``, :data:`LABEL_STATISTICS`): the label margin test's hit rate on the key's label, since
2026-12-07 with its ties broken by the shift of the marked answers' label histogram (``key_hits_shift``). The
statistics are sealed with the secret, so no verifier picks one after seeing a suspect. Each alternative needs its
own queries, which :func:`permutation_queries` counts before anything is sent.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dist_awenc.errors import ArtifactError
from dist_awenc.verify.core import Verdict, _batched
from dist_awenc.verify.stats import permutation_p
from dist_awenc.watermark.secret import AlternativeSecrets, Secret

PERMUTATION = "whitebox_permutation"  # the margin-free white-box test (needs the alternative secrets)
SCORE_PERMUTATION = "blackbox_score_permutation"  # the same over output probabilities (queries per alternative)
LABEL_PERMUTATION = "blackbox_label_permutation"  # the same over top-1 labels
BLACKBOX_PERMUTATION = {"blackbox_score": SCORE_PERMUTATION, "blackbox_label": LABEL_PERMUTATION}
# the probabilities' permutation statistic, per secret j over the queries x_i (TV: total-variation distance)
KEY_TV = "key_tv"
CLEAN_TV = "clean_tv"
SCORE_STATISTICS = {
    KEY_TV: "mean TV(g(x+r), g(k)) - TV(g(x+delta), g(k)) over the queries: marked answers pulled towards the key's",
    CLEAN_TV: "mean TV(g(x), g(x+delta)) - TV(g(x), g(x+r)) over the queries",
}
DEFAULT_SCORE_STATISTIC = KEY_TV  # what `awenc watermark` seals into new plans
# the weights' permutation statistic, per secret j: T_j, the mean white-box score (whitebox_statistics)
SCORE, F0_EXCESS = "score", "f0_excess"
WHITEBOX_STATISTICS = {
    SCORE: "mean white-box score s",
    F0_EXCESS: "mean white-box score s minus the clean f0's with the same secret (recorded at stage 1)",
}
DEFAULT_WHITEBOX_STATISTIC = SCORE  # what `awenc watermark` seals into new plans
# the labels' permutation statistic, per secret j (blackbox_label_statistics)
KEY_HITS, KEY_HITS_SHIFT = "key_hits", "key_hits_shift"
LABEL_STATISTICS = {
    KEY_HITS: "share of marked queries answered with the key's label minus the share of control queries",
    KEY_HITS_SHIFT: "key_hits, its ties broken by how far the marked answers' label histogram moves from the "
                    "controls' (total variation)",
}
DEFAULT_LABEL_STATISTIC = KEY_HITS_SHIFT  # what `awenc watermark` seals into new plans
# permutation statistics closer than this to the owner's are ties (float32 rounding of means of cosines is ~1e-8)
PERMUTATION_TIE = 1e-6


def _sealed(plan: dict | None, key: str, made_with: str, valid: dict[str, str], what: str) -> str:
    """The statistic a plan seals under ``key``; a plan without one was made with ``made_with``."""
    name = (plan or {}).get(key, made_with)
    if name not in valid:
        raise ArtifactError(f"the secret's plan names {what} statistic '{name}'; valid: {', '.join(valid)}")
    return name


def score_statistic(plan: dict | None) -> str:
    """The probabilities' permutation statistic a plan seals (a plan without one: ``clean_tv``, what it was made with)."""
    return _sealed(plan, "score_statistic", CLEAN_TV, SCORE_STATISTICS, "score")


def whitebox_statistic(plan: dict | None) -> str:
    """The weights' permutation statistic a plan seals (a plan without one: ``f0_excess``, what it was made with)."""
    return _sealed(plan, "whitebox_statistic", F0_EXCESS, WHITEBOX_STATISTICS, "white-box")


def label_statistic(plan: dict | None) -> str:
    """The labels' permutation statistic a plan seals (a plan without one: ``key_hits``, what it was made with)."""
    return _sealed(plan, "label_statistic", KEY_HITS, LABEL_STATISTICS, "label")


def permutation_queries(mode: str, images: int, alternatives: int, *, beside_margin_test: bool = False,
                        statistic: str = DEFAULT_SCORE_STATISTIC) -> int:
    """Queries a black-box permutation test asks for ``images`` hold-out images and J ``alternatives``.

    Score with ``clean_tv``: g(x) once per image, then g(x + delta_j) and g(x + r_j) for each of the J + 1 secrets;
    with ``key_tv``: each secret's key once, then x + delta_j and x + r_j. Label: as ``key_tv``.
    ``beside_margin_test``: only those the mode's margin test has not asked already (its clean, marked and control
    queries, and in label mode the owner's key, are the owner's secret's here too, and a verification's query log
    answers a repeated image without sending it again).
    """
    secrets = alternatives if beside_margin_test else alternatives + 1
    if mode == "blackbox_score" and statistic == CLEAN_TV:
        return (0 if beside_margin_test else images) + 2 * images * secrets
    if mode == "blackbox_score":  # key_tv: the score margin test never asks the owner's key
        return secrets * (1 + 2 * images) + (1 if beside_margin_test else 0)
    if mode == "blackbox_label":
        return secrets * (1 + 2 * images)
    raise ValueError(f"no black-box permutation test for mode '{mode}'; valid: {', '.join(BLACKBOX_PERMUTATION)}")


@torch.no_grad()
def whitebox_statistics(encoder: torch.nn.Module, keys: torch.Tensor, deltas: torch.Tensor, controls: torch.Tensor,
                        images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Mean white-box score ``T_j = mean_i s_ij`` for many secrets at once.

    Args:
        keys, deltas, controls: (J, 3, S, S) key images, watermarks and control perturbations.
        images: (n, 3, S, S) hold-out images in [0, 1].

    Returns:
        (J,) float64: ``mean_i [cos(f(x_i+delta_j), f(k_j)) - cos(f(x_i+r_j), f(k_j))]``.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    x = images.to(device)
    f_keys = F.normalize(_batched(lambda b: encoder(b.to(device)).float(), keys, batch_size), dim=1)  # (J, d)
    out = []
    for j in range(len(keys)):
        marked = lambda b: encoder((b + deltas[j].to(device)).clamp(0, 1)).float()  # noqa: E731
        control = lambda b: encoder((b + controls[j].to(device)).clamp(0, 1)).float()  # noqa: E731
        f_m = F.normalize(_batched(marked, x, batch_size), dim=1)
        f_r = F.normalize(_batched(control, x, batch_size), dim=1)
        out.append(float(((f_m - f_r) @ f_keys[j]).double().mean()))
    return np.asarray(out, dtype=np.float64)


def _all_secrets(secret: Secret, alternatives: AlternativeSecrets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, deltas and controls of the owner's secret (index 0) and the J alternatives."""
    keys = torch.cat([secret.key[None], alternatives.keys])
    deltas = torch.cat([secret.delta[None], alternatives.deltas])
    controls = torch.cat([secret.control()[None], alternatives.controls()])
    return keys, deltas, controls


def _permutation_verdict(mode: str, s_owner: float, s_alt: np.ndarray, effect: float, n: int, secret: Secret,
                         alternatives: AlternativeSecrets, alpha: float, statistic: str, **extra) -> Verdict:
    p = permutation_p(s_owner, s_alt, tie=PERMUTATION_TIE)
    j = len(s_alt)
    sd = float(s_alt.std(ddof=1)) if j > 1 else 0.0
    details = {"alternatives": j, "resolution": 1 / (j + 1), "at_resolution_limit": p <= 1 / (j + 1) + 1e-12,
               "can_decide_at_alpha": 1 / (j + 1) <= alpha * (1 + 1e-9),
               "alternatives_needed_for_alpha": max(0, int(np.ceil(1 / alpha - 1e-9)) - 1),
               "owner_statistic": s_owner, "alternatives_max": float(s_alt.max()),
               "alternatives_mean": float(s_alt.mean()), "alternatives_sd": sd,
               "owner_z": (s_owner - float(s_alt.mean())) / sd if sd > 0 else None,
               "alternatives_sha256": alternatives.sha256, "statistic": statistic, **extra}
    return Verdict(mode, p, effect, n, None, alpha, p <= alpha, secret.sha256, details,
                   threshold_source="none: exact permutation test over the alternative secrets",
                   p_source=f"exact permutation test over J={j} alternative secrets", p_floor=1 / (j + 1))


def verify_permutation(encoder: torch.nn.Module, secret: Secret, alternatives: AlternativeSecrets,
                       images: torch.Tensor, *, alpha: float = 1e-3) -> Verdict:
    """The white-box secret-permutation test: the owner's statistic (the one its plan seals) ranked among J
    alternative secrets. ``f0_excess`` without recorded baselines ranks the score itself, and says so."""
    name = whitebox_statistic(secret.plan)
    t_owner = float(whitebox_statistics(encoder, secret.key[None], secret.delta[None], secret.control()[None], images)[0])
    t_alt = whitebox_statistics(encoder, alternatives.keys, alternatives.deltas, alternatives.controls(), images)
    statistic = f"{SCORE}: {WHITEBOX_STATISTICS[SCORE]}"
    s_owner, s_alt = t_owner, t_alt
    if name == F0_EXCESS and alternatives.baselines is not None:  # each secret's excess over f0's own response to it
        s_owner, s_alt = t_owner - alternatives.owner_baseline, t_alt - alternatives.baselines.double().numpy()
        statistic = f"{F0_EXCESS}: {WHITEBOX_STATISTICS[F0_EXCESS]} on {alternatives.baseline_images} hold-out images"
    elif name == F0_EXCESS:
        statistic += f" (the plan names {F0_EXCESS}, but stage 1 recorded no baselines)"
    return _permutation_verdict(PERMUTATION, s_owner, s_alt, t_owner, len(images), secret, alternatives, alpha,
                                statistic)


@torch.no_grad()
def blackbox_score_statistics(predict_proba: Callable[[torch.Tensor], torch.Tensor], keys: torch.Tensor,
                              deltas: torch.Tensor, controls: torch.Tensor, images: torch.Tensor,
                              statistic: str = KEY_TV) -> np.ndarray:
    """Per secret j, the probabilities' statistic (:data:`SCORE_STATISTICS`).

    ``key_tv``: ``mean_i [TV(g(x_i+r_j), g(k_j)) - TV(g(x_i+delta_j), g(k_j))]``, each key asked once: a secret
    whose watermark moves answers without moving them towards its own key's scores nothing, which the shift from
    the clean answer (``clean_tv``: ``mean_i [TV(g(x_i), g(x_i+delta_j)) - TV(g(x_i), g(x_i+r_j))]``, g(x) asked
    once) cannot tell from the owner's mark.
    """
    tv = lambda a, b: 0.5 * (a - b).abs().sum(dim=-1)  # noqa: E731
    ask = lambda x: _batched(predict_proba, x).double()  # noqa: E731
    clean = ask(images) if statistic == CLEAN_TV else None
    out = []
    for k, d, r in zip(keys, deltas, controls):
        ref = clean if clean is not None else ask(k[None])  # (n, C) or (1, C)
        p_m = _batched(lambda b: predict_proba((b + d.to(b.device, b.dtype)).clamp(0, 1)), images).double()
        p_r = _batched(lambda b: predict_proba((b + r.to(b.device, b.dtype)).clamp(0, 1)), images).double()
        gap = tv(ref, p_m) - tv(ref, p_r) if clean is not None else tv(p_r, ref) - tv(p_m, ref)
        out.append(float(gap.mean()))
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def blackbox_label_statistics(predict_label: Callable[[torch.Tensor], torch.Tensor], keys: torch.Tensor,
                              deltas: torch.Tensor, controls: torch.Tensor, images: torch.Tensor,
                              statistic: str = KEY_HITS_SHIFT) -> np.ndarray:
    """Per secret j, the labels' statistic (:data:`LABEL_STATISTICS`).

    ``key_hits``: the share of marked queries answered with key j's label minus the share of control queries.
    Its values are multiples of 1/n, so on a few dozen images an alternative often ties the owner's, and a tie
    counts against the owner. ``key_hits_shift`` breaks those ties, and only those: it adds the total variation
    between the marked and the control answers' label histograms (multiples of 1/(2n), at most 1) scaled by
    1/(2n), under the 1/n step of the hit rate. Both are fixed functions of one secret's answers, so the test stays
    exact.
    """
    key_labels, marked, control = [], [], []
    for k, d, r in zip(keys, deltas, controls):
        key_labels.append(int(predict_label(k[None])[0]))
        marked.append(_batched(lambda b: predict_label((b + d.to(b.device, b.dtype)).clamp(0, 1)), images).long().cpu())
        control.append(_batched(lambda b: predict_label((b + r.to(b.device, b.dtype)).clamp(0, 1)), images).long().cpu())
    return label_statistics(torch.tensor(key_labels), torch.stack(marked), torch.stack(control), statistic)


def label_statistics(key_labels: torch.Tensor, marked: torch.Tensor, control: torch.Tensor,
                     statistic: str = KEY_HITS_SHIFT) -> np.ndarray:
    """The labels' statistic per secret from its answers: ``key_labels`` (J,), ``marked`` and ``control`` (J, n)."""
    hits = (marked == key_labels[:, None]).double().mean(1) - (control == key_labels[:, None]).double().mean(1)
    if statistic == KEY_HITS:
        return hits.numpy()
    seen = torch.cat([marked.flatten(), control.flatten()]).unique()
    shares = lambda a: (a[..., None] == seen).double().mean(1)  # noqa: E731  (J, labels seen)
    shift = 0.5 * (shares(marked) - shares(control)).abs().sum(1)  # the label histograms' total variation
    return (hits + shift / (2 * marked.shape[1])).numpy()


def verify_blackbox_permutation(mode: str, predict: Callable[[torch.Tensor], torch.Tensor], secret: Secret,
                                alternatives: AlternativeSecrets, images: torch.Tensor, *,
                                alpha: float = 1e-3) -> Verdict:
    """A black-box secret-permutation test: ``predict`` answers probabilities (score) or top-1 labels (label)."""
    keys, deltas, controls = _all_secrets(secret, alternatives)
    name = score_statistic(secret.plan) if mode == "blackbox_score" else None
    if mode == "blackbox_score":
        t = blackbox_score_statistics(predict, keys, deltas, controls, images, name)
        statistic = f"{name}: {SCORE_STATISTICS[name]}"
    elif mode == "blackbox_label":
        labels = label_statistic(secret.plan)
        t = blackbox_label_statistics(predict, keys, deltas, controls, images, labels)
        statistic = f"{labels}: {LABEL_STATISTICS[labels]}"
    else:
        raise ValueError(f"no black-box permutation test for mode '{mode}'; valid: {', '.join(BLACKBOX_PERMUTATION)}")
    queries = permutation_queries(mode, len(images), len(alternatives), statistic=name or CLEAN_TV)
    return _permutation_verdict(BLACKBOX_PERMUTATION[mode], float(t[0]), t[1:], float(t[0]), len(images), secret,
                                alternatives, alpha, statistic, queries=queries)
