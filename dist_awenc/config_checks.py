"""Checks of the config sections whose vocabulary a room above config implements: ``robust.*`` (the transforms of
:mod:`dist_awenc.watermark.transforms`) and ``shadow.*`` (stage 2's shadow student, an encoder name); and of an
attack's strength (an integer count or a fraction), shared by the attacks and the serving path's query transforms.

They live in the config layer so that a section is checked where it is built (``__post_init__``, before a run
folder exists) without config importing :mod:`dist_awenc.watermark`; the watermark modules import the names and
ranges from here.
"""
from __future__ import annotations

import math
from typing import Any

from dist_awenc.errors import ConfigError

TRANSFORMS = ("jpeg", "resize", "crop", "noise", "blur")  # robust.transforms; their codes index this tuple
LR_SCALINGS = ("none", "linear", "sqrt")  # optim.lr_scaling (engine/plan.py resolves it)
LR_SCALINGS = ("none", "linear", "sqrt")  # optim.lr_scaling: optim.lr per 256 images of the optimiser's batch, or absolute

# robust.<field> -> (low bound, high bound, whether the bound is included, what the field is); ranges are [lo, hi]
ROBUST_RANGES = {
    "jpeg_quality": (1, 100, True, "JPEG quality"),
    "resize_scale": (0.0, 1.0, False, "down-and-up resize factor of the side"),
    "crop_area": (0.0, 1.0, False, "kept area fraction of the crop"),
    "noise_std": (0.0, 1.0, True, "Gaussian noise std in [0, 1] pixel units"),
    "blur_sigma": (0.0, 10.0, True, "Gaussian blur sigma in pixels"),
}


def check_robust(section: Any) -> None:
    """One-line ConfigError naming the ``robust.*`` field and what it expects."""
    for t in section.transforms:
        if t not in TRANSFORMS:
            raise ConfigError(f"robust.transforms: unknown transform '{t}'; valid: {', '.join(TRANSFORMS)}")
    if len(set(section.transforms)) != len(section.transforms):
        raise ConfigError(f"robust.transforms lists a transform twice: {list(section.transforms)}")
    for name, (lo, hi, closed, what) in ROBUST_RANGES.items():
        value = list(getattr(section, name))
        low_ok = (lambda v: v >= lo) if closed else (lambda v: v > lo)
        ok = len(value) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        ok = ok and low_ok(value[0]) and value[0] <= value[1] <= hi
        if ok and name == "jpeg_quality":
            ok = all(float(v).is_integer() for v in value)
        if not ok:
            rng = f"{lo} {'<=' if closed else '<'} low <= high <= {hi}" + (", integers" if name == "jpeg_quality" else "")
            raise ConfigError(f"robust.{name} must be [low, high] ({what}) with {rng}; got {value}")
    if not 0.0 <= section.p_identity <= 1.0:
        raise ConfigError(f"robust.p_identity is a probability and must be in [0, 1]; got {section.p_identity}")


def check_optim(section: Any) -> None:
    """One-line ConfigError for an optimiser section (``optim:``, the demo's ``embed_optim:``): the lr's scaling rule,
    and the warm-up set in steps or in epochs, not both."""
    if section.lr_scaling not in LR_SCALINGS:
        raise ConfigError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)} (none: lr is the learning rate; "
                          f"linear/sqrt: lr is the rate at 256 images a step); got {section.lr_scaling!r}")
    if not section.lr > 0:
        raise ConfigError(f"lr must be > 0; got {section.lr}")
    if section.warmup_steps < 0 or (section.warmup_epochs is not None and section.warmup_epochs < 0):
        raise ConfigError(f"warmup_steps and warmup_epochs must be >= 0; got {section.warmup_steps}, "
                          f"{section.warmup_epochs}")
    if section.warmup_epochs is not None and section.warmup_steps:
        raise ConfigError(f"warmup_steps={section.warmup_steps} and warmup_epochs={section.warmup_epochs} are both "
                          "set; set one (warmup_steps=0 or warmup_epochs=null)")


def check_train(section: Any) -> None:
    """One-line ConfigError for the checkpoint interval of a training section (``train:``, the demo's ``pretrain:``
    and ``embed:``), set in steps or in epochs, not both."""
    steps, epochs = section.checkpoint_every, section.checkpoint_every_epochs
    if (steps is not None and steps < 1) or (epochs is not None and not epochs > 0):
        raise ConfigError(f"checkpoint_every must be >= 1 step and checkpoint_every_epochs > 0; got {steps}, {epochs}")
    if steps is not None and epochs is not None:
        raise ConfigError(f"checkpoint_every={steps} and checkpoint_every_epochs={epochs} are both set; set one "
                          "(the other to null)")


def check_scales(scales: Any) -> None:
    """One-line ConfigError for ``loss.scales`` (stage 2's extra input-size factors) that are not factors > 0, not 1."""
    bad = [s for s in scales if not (isinstance(s, (int, float)) and s > 0 and s != 1)]
    if bad or len(set(scales)) != len(scales):
        raise ConfigError(f"loss.scales: need distinct input-size factors > 0 other than 1 (e.g. [2]); got {list(scales)}")


def check_specific(section: Any) -> None:
    """One-line ConfigError for ``specific.*`` out of range."""
    if not section.weight >= 0 or section.secrets < 1 or section.images < 1:
        raise ConfigError(f"specific: need weight >= 0 (0: off), secrets >= 1 and images >= 1; got {section.weight}, "
                          f"{section.secrets}, {section.images}")
    if not 0 <= section.suppress <= 1:
        raise ConfigError(f"specific.suppress: need a share in [0, 1] of f0's response to take off the target "
                          f"(0: hold at f0's, 1: at the controls'); got {section.suppress}")


def check_shadow(section: Any) -> None:
    """One-line ConfigError for ``shadow.*`` out of range (before a run folder exists)."""
    if not section.weight >= 0:
        raise ConfigError(f"shadow.weight must be >= 0 (0: off); got {section.weight}")
    if section.refresh < 0:
        raise ConfigError(f"shadow.refresh must be >= 0 steps (0: never restart the shadow); got {section.refresh}")
    if section.arch:
        import dist_awenc.encoders.backbones  # noqa: F401  (registers the backbones; torchvision, so only when named)
        from dist_awenc.encoders.registry import ENCODERS

        if section.arch not in ENCODERS:
            raise ConfigError(f"shadow.arch: unknown encoder '{section.arch}'; valid: {', '.join(sorted(ENCODERS))} "
                              "('' for f0's own)")


def check_targets(section: Any) -> None:
    """One-line ConfigError for ``targets.*`` (awenc ablation) out of range."""
    for name in ("probe_points", "knn_points"):
        if getattr(section, name) < 0:
            raise ConfigError(f"targets.{name} must be >= 0 (points of accuracy the watermark may cost), "
                              f"got {getattr(section, name)}")
    for name in ("whitebox_tpr", "blackbox_tpr", "label_tpr"):
        if not 0 <= getattr(section, name) <= 1:
            raise ConfigError(f"targets.{name} must be a rate in [0, 1], got {getattr(section, name)}")


def check_ablation(section: Any) -> None:
    if section.utility_splits < 1:
        raise ConfigError(f"utility_splits must be >= 1 (seeded train/test splits to probe utility on), got "
                          f"{section.utility_splits}")


def as_count(strength: float, name: str, what: str, minimum: int = 0) -> int:
    """An integer-valued strength (epochs, bits, quality) as an int >= ``minimum``."""
    if strength != int(strength) or strength < minimum:
        raise ConfigError(f"attack {name}: strength is {what}, an integer >= {minimum}; got {strength}")
    return int(strength)


def as_fraction(strength: float, name: str, what: str, *, allow_zero: bool = True, allow_one: bool = True) -> float:
    """A strength in [0, 1] (bounds optionally excluded)."""
    lo_ok = strength > 0 or (allow_zero and strength == 0)
    hi_ok = strength < 1 or (allow_one and strength == 1)
    if not (lo_ok and hi_ok):
        lo, hi = "[" if allow_zero else "(", "]" if allow_one else ")"
        raise ConfigError(f"attack {name}: strength is {what}, in {lo}0, 1{hi}; got {strength}")
    return float(strength)
