"""The verification plan: fixed when the secret is made, carried in its header (METHOD.md, stage 3).

A plan names everything a verdict could otherwise be shopped over: the
dataset and split seed with a hash of the hold-out indices (so a verdict is
never computed on images the encoder was embedded with), the number of
images or queries per mode, alpha, the number J of alternative secrets and
their file's hash, the primary mode, the statistic the probabilities'
permutation test ranks, and how queries are resized for a suspect at another
input resolution. Once calibrated, the secret's
record (``secret.json``) names the calibration file's hash and path.

``verify`` compares what it is asked to do with the plan and refuses any
deviation with a one-line error, unless the run is explicitly exploratory,
in which case every verdict says so.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import numpy as np

from dist_awenc.errors import ConfigError
from dist_awenc.verify.permutation import (DEFAULT_LABEL_STATISTIC, DEFAULT_SCORE_STATISTIC,
                                          DEFAULT_WHITEBOX_STATISTIC, LABEL_STATISTICS, SCORE_STATISTICS,
                                          WHITEBOX_STATISTICS)
from dist_awenc.verify.resize import DEFAULT_RESIZE, check_resize

PLAN_FORMAT = "dist_awenc.plan/1"
PLAN_MODES = ("whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse")
# what a verifier can run with each kind of access, and the plan's default primary mode for it
ACCESS_MODES = {"weights": ("whitebox",), "probabilities": ("blackbox_score", "blackbox_label", "blackbox_collapse"),
                "labels": ("blackbox_label", "blackbox_collapse")}
DEFAULT_PRIMARY = {"weights": "whitebox", "probabilities": "blackbox_score", "labels": "blackbox_label"}


def holdout_sha256(dataset: str, size: int, split_seed: int, indices: np.ndarray) -> str:
    """Hash of the hold-out images' identity: dataset, its size, split seed and the indices themselves."""
    h = hashlib.sha256(f"{dataset}|{size}|{split_seed}|".encode())
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return h.hexdigest()


def make_plan(*, dataset: str, dataset_size: int, image_size: int, split_seed: int, holdout_indices: np.ndarray,
              n: dict[str, int], alpha: float, alternatives: int, alternatives_sha256: Optional[str],
              primary_mode: str, primary: Optional[dict[str, str]] = None,
              owner_draw: Optional[dict] = None, resize: str = DEFAULT_RESIZE,
              score_statistic: str = DEFAULT_SCORE_STATISTIC,
              whitebox_statistic: str = DEFAULT_WHITEBOX_STATISTIC,
              label_statistic: str = DEFAULT_LABEL_STATISTIC) -> dict[str, Any]:
    """The plan dict stored in the secret's header (plain JSON types only).

    ``primary``: the primary mode per access (weights, probabilities, labels; default :data:`DEFAULT_PRIMARY`):
    a single-mode verification of another mode is exploratory. ``owner_draw`` (stage 1 with J > 0): how the
    owner's secret was drawn among the J + 1 candidates (:func:`dist_awenc.watermark.draw.owner_draw_record`);
    the key is present only when given. ``resize``: how queries are resized to a suspect that takes another input
    size (:mod:`dist_awenc.verify.resize`). ``score_statistic`` / ``whitebox_statistic`` / ``label_statistic``: what
    the probabilities' / the weights' / the labels' permutation test ranks
    (:data:`dist_awenc.verify.permutation.SCORE_STATISTICS`, ``WHITEBOX_STATISTICS``, ``LABEL_STATISTICS``).
    """
    if primary_mode not in PLAN_MODES:
        raise ConfigError(f"plan.primary_mode '{primary_mode}' is not a mode; valid: {', '.join(PLAN_MODES)}")
    primary = {**DEFAULT_PRIMARY, **(primary or {})}
    for access, mode in primary.items():
        if access not in ACCESS_MODES or mode not in ACCESS_MODES[access]:
            valid = ", ".join(ACCESS_MODES.get(access, ())) or f"none: access is one of {', '.join(ACCESS_MODES)}"
            raise ConfigError(f"plan: primary mode for {access} access '{mode}' is not one that access can run; "
                              f"valid: {valid}")
    if not 0 < alpha < 1:
        raise ConfigError(f"plan.alpha must be in (0, 1), got {alpha}")
    check_resize(resize)
    for key, name, valid in (("score_statistic", score_statistic, SCORE_STATISTICS),
                             ("whitebox_statistic", whitebox_statistic, WHITEBOX_STATISTICS),
                             ("label_statistic", label_statistic, LABEL_STATISTICS)):
        if name not in valid:
            raise ConfigError(f"plan.{key} '{name}' is not one; valid: {', '.join(valid)}")
    if alternatives < 0:
        raise ConfigError(f"plan.alternatives must be >= 0, got {alternatives}")
    for mode in PLAN_MODES:
        if mode not in n:
            raise ConfigError(f"plan: no n for {mode}; a plan fixes n for every mode ({', '.join(PLAN_MODES)})")
        if int(n[mode]) < 2:
            raise ConfigError(f"plan: n for {mode} must be >= 2, got {n[mode]}")
    plan = {"format": PLAN_FORMAT, "dataset": dataset, "dataset_size": int(dataset_size), "image_size": int(image_size),
            "split_seed": int(split_seed),
            "holdout_sha256": holdout_sha256(dataset, dataset_size, split_seed, holdout_indices),
            "n": {m: int(n[m]) for m in PLAN_MODES}, "alpha": float(alpha), "alternatives": int(alternatives),
            "alternatives_sha256": alternatives_sha256, "primary_mode": primary_mode, "primary": primary,
            "resize": resize, "score_statistic": score_statistic, "whitebox_statistic": whitebox_statistic,
            "label_statistic": label_statistic}
    if owner_draw is not None:
        plan["owner_draw"] = dict(owner_draw)
    return plan


def primaries(plan: dict[str, Any]) -> dict[str, str]:
    """The plan's primary mode per access (a plan from before per-access primaries: the defaults)."""
    return {**DEFAULT_PRIMARY, **((plan or {}).get("primary") or {})}


def sealed_calibration(plan: dict[str, Any]) -> Optional[dict[str, str]]:
    """The calibration sealed into the plan (``{"sha256", "sealed_from"}``), or None when none was sealed."""
    return (plan or {}).get("calibration") or None


def secret_identities(secret_sha256: str, plan: dict[str, Any]) -> set[str]:
    """The hashes a calibration of this secret may name: its own, and the unsealed one a sealed plan records."""
    sealed = sealed_calibration(plan)
    return {secret_sha256, *([sealed["sealed_from"]] if sealed else [])}


def deviations(plan: dict[str, Any], *, mode: str, n: Optional[int], alpha: Optional[float], dataset: str,
               dataset_size: int, split_seed: int, holdout_indices: np.ndarray,
               calibration_sha256: Optional[str], bound_calibration_sha256: Optional[str],
               access: Optional[str] = None, margins_by_hand: tuple[str, ...] = ()) -> list[str]:
    """What a requested verification changes in the plan, one short phrase each (empty: it follows the plan).

    ``bound_calibration_sha256``: the calibration sealed into the plan, else the one bound to the secret after
    release; a calibration that is neither is a deviation. ``access`` (weights, probabilities, labels): a
    single-suspect verification's access; its mode must be the plan's primary for it. ``margins_by_hand``: the
    margins set on the command line (``verify.tau_*``), which no plan fixes.
    """
    if not plan:
        return ["the secret carries no verification plan (made before plans existed)"]
    out = []
    if access is not None and primaries(plan).get(access) != mode:
        out.append(f"{mode} is not the plan's primary mode for {access} access ({primaries(plan).get(access)}): "
                   "a non-primary mode run on its own is exploratory")
    out += [f"{m} set by hand (the plan's margins come from its calibration)" for m in margins_by_hand]
    if dataset != plan["dataset"] or dataset_size != plan["dataset_size"]:
        out.append(f"dataset {dataset} ({dataset_size} images) instead of the plan's {plan['dataset']} "
                   f"({plan['dataset_size']})")
    if split_seed != plan["split_seed"]:
        out.append(f"data.split_seed={split_seed} instead of the plan's {plan['split_seed']} "
                   "(the hold-out would include images used for embedding)")
    elif holdout_sha256(dataset, dataset_size, split_seed, holdout_indices) != plan["holdout_sha256"]:
        out.append("the hold-out images differ from the plan's (hold-out hash mismatch)")
    if mode not in plan.get("n", {}):
        out.append(f"the plan fixes no n for {mode} (the secret was made before that mode existed)")
    elif n is not None and int(n) != plan["n"][mode]:
        out.append(f"verify.n={n} instead of the plan's {plan['n'][mode]} for {mode}")
    if alpha is not None and float(alpha) != plan["alpha"]:
        out.append(f"verify.alpha={alpha:g} instead of the plan's {plan['alpha']:g}")
    if bound_calibration_sha256 and calibration_sha256 != bound_calibration_sha256:
        got = f"calibration {calibration_sha256[:12]}..." if calibration_sha256 else "no calibration"
        out.append(f"{got} instead of the plan's calibration {bound_calibration_sha256[:12]}...")
    elif calibration_sha256 and not bound_calibration_sha256:
        out.append(f"calibration {calibration_sha256[:12]}... is neither sealed in the plan nor bound to the secret "
                   "(awenc calibrate secret=... seals or binds the one it makes)")
    return out


def resolve(plan: dict[str, Any], mode: str, n: Optional[int], alpha: Optional[float],
            default_n: dict[str, int], default_alpha: float) -> tuple[int, float]:
    """The n and alpha a verification uses: the explicit ones, else the plan's, else the defaults."""
    n_used = n if n is not None else (plan.get("n", {}).get(mode) if plan else None) or default_n[mode]
    alpha_used = alpha if alpha is not None else (plan.get("alpha") if plan else None) or default_alpha
    return int(n_used), float(alpha_used)


def refuse_or_mark(devs: list[str], exploratory: bool) -> None:
    """Raise a one-line ConfigError for a deviation unless the run is exploratory."""
    if devs and not exploratory:
        raise ConfigError("verification deviates from the secret's plan: " + "; ".join(devs)
                          + " (rerun with verify.exploratory=true to run it anyway, marked exploratory)")
