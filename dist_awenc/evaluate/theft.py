"""What counts as a theft (METHOD.md, "Calibration, and what 'works' means"; issue #27).

A derivative is a theft when the pirate kept what f0 learned:

- it keeps at least ``share`` (default half) of f0's advantage over a randomly initialised encoder of the
  derivative's own architecture on the pirate's task, on the linear probe AND on kNN:
  ``acc - random >= share * (f0 - random)`` for each (a measure on which f0 is no better than random init has
  no advantage to keep and does not decide);
- and its linear probe is within ``utility_drop`` (default 5 points) of the unattacked watermarked encoder's.

A derivative at random-init utility stole nothing, whatever it carries: on digits a random encoder already probes
at 0.944 against f0's 0.975, so the 5-point rule alone keeps students that learned almost nothing from f0.

Torch-free at import; :func:`random_init_encoder` imports the encoder registry when called.
"""
from __future__ import annotations

import math
from typing import Any

# accuracies are multiples of 1/n_test; a tie computed in floats (0.95 - 0.9 < 0.05) must count as kept
EPS = 1e-9


def advantage_kept(acc: float, f0: float, random: float) -> float:
    """The share of f0's advantage over random init that ``acc`` keeps: 1 = f0's accuracy, 0 = random init's.

    NaN when f0 is no better than random init (there is no advantage to keep).
    """
    gap = f0 - random
    return (acc - random) / gap if gap > EPS else float("nan")


def keeps_advantage(acc: float, f0: float, random: float, share: float = 0.5) -> bool:
    """``acc - random >= share * (f0 - random)``: at least ``share`` of f0's advantage over random init kept.

    Where f0 is no better than random init on this measure there is no advantage to keep, and the measure does
    not decide (True): otherwise f0 itself would fail its own rule.
    """
    if any(math.isnan(v) for v in (acc, f0, random)):
        return False
    if f0 - random <= EPS:
        return True
    return acc - random >= share * (f0 - random) - EPS


def theft_decision(*, linear_probe: float, knn: float, unattacked_linear_probe: float, f0_linear_probe: float,
                   f0_knn: float, random_linear_probe: float, random_knn: float, share: float = 0.5,
                   utility_drop: float = 0.05) -> dict[str, Any]:
    """Decide whether one derivative is a theft, and return the numbers it was decided on.

    Args:
        linear_probe, knn: the derivative's accuracies on the pirate's task (one seeded train/test split).
        unattacked_linear_probe: the unattacked watermarked encoder's probe on the same split.
        f0_linear_probe, f0_knn: the clean parent f0's, on the same split.
        random_linear_probe, random_knn: a randomly initialised encoder of the derivative's architecture, same split.
        share: the share of f0's advantage a theft keeps on each measure (0.5: half).
        utility_drop: the largest probe loss against the unattacked encoder a theft may have (0.05: 5 points).

    Returns:
        ``theft`` (bool), ``probe_advantage_kept`` and ``knn_advantage_kept`` (shares of f0's advantage, 1 = f0),
        ``accuracy_change`` (probe against the unattacked encoder) and ``not_theft_because`` ("" for a theft, else
        which conditions failed).
    """
    change = linear_probe - unattacked_linear_probe
    failed = []
    if not keeps_advantage(linear_probe, f0_linear_probe, random_linear_probe, share):
        failed.append(f"probe keeps under {share:g} of f0's advantage over random init")
    if not keeps_advantage(knn, f0_knn, random_knn, share):
        failed.append(f"kNN keeps under {share:g} of f0's advantage over random init")
    if not (change >= -utility_drop - EPS):  # NaN (no unattacked row for this seed) fails too
        failed.append(f"probe more than {100 * utility_drop:g} points under the unattacked encoder")
    return {"theft": not failed,
            "probe_advantage_kept": advantage_kept(linear_probe, f0_linear_probe, random_linear_probe),
            "knn_advantage_kept": advantage_kept(knn, f0_knn, random_knn), "accuracy_change": change,
            "not_theft_because": "; ".join(failed)}


def random_init_encoder(arch: str, arch_kwargs: dict, mean: list[float], std: list[float], input_size: int, seed: int):
    """A randomly initialised encoder of ``arch`` (``torch.manual_seed(seed)``, then the registry's init).

    With the demo's ``run.seed`` this is the demo's "random init (same architecture)" encoder. The global RNG is
    restored afterwards.
    """
    import torch

    from dist_awenc.encoders.io import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(arch, dict(arch_kwargs), list(mean), list(std), input_size).eval()
