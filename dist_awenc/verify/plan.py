"""The verification plan: fixed when the secret is made, carried in its header (METHOD.md, stage 3).

A plan names everything a verdict could otherwise be shopped over: the
dataset and split seed with a hash of the hold-out indices (so a verdict is
never computed on images the encoder was embedded with), the number of
images or queries per mode, alpha, the number J of alternative secrets and
their file's hash, and the primary mode. Once calibrated, the secret's
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

PLAN_FORMAT = "dist_awenc.plan/1"
PLAN_MODES = ("whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse")


def holdout_sha256(dataset: str, size: int, split_seed: int, indices: np.ndarray) -> str:
    """Hash of the hold-out images' identity: dataset, its size, split seed and the indices themselves."""
    h = hashlib.sha256(f"{dataset}|{size}|{split_seed}|".encode())
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return h.hexdigest()


def make_plan(*, dataset: str, dataset_size: int, image_size: int, split_seed: int, holdout_indices: np.ndarray,
              n: dict[str, int], alpha: float, alternatives: int, alternatives_sha256: Optional[str],
              primary_mode: str, owner_draw: Optional[dict] = None) -> dict[str, Any]:
    """The plan dict stored in the secret's header (plain JSON types only).

    ``owner_draw`` (stage 1 with J > 0): how the owner's secret was drawn among the J + 1 candidates
    (:func:`dist_awenc.watermark.secret.owner_draw_record`); the key is present only when given.
    """
    if primary_mode not in PLAN_MODES:
        raise ConfigError(f"plan.primary_mode '{primary_mode}' is not a mode; valid: {', '.join(PLAN_MODES)}")
    if not 0 < alpha < 1:
        raise ConfigError(f"plan.alpha must be in (0, 1), got {alpha}")
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
            "alternatives_sha256": alternatives_sha256, "primary_mode": primary_mode}
    if owner_draw is not None:
        plan["owner_draw"] = dict(owner_draw)
    return plan


def deviations(plan: dict[str, Any], *, mode: str, n: Optional[int], alpha: Optional[float], dataset: str,
               dataset_size: int, split_seed: int, holdout_indices: np.ndarray,
               calibration_sha256: Optional[str], bound_calibration_sha256: Optional[str]) -> list[str]:
    """What a requested verification changes in the plan, one short phrase each (empty: it follows the plan)."""
    if not plan:
        return ["the secret carries no verification plan (made before plans existed)"]
    out = []
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
        out.append(f"{got} instead of the plan's bound calibration {bound_calibration_sha256[:12]}...")
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
