"""The ablation's config (`awenc ablation`): its variants and the targets a robust watermark must reach.

Kept beside :mod:`dist_awenc.config` (which holds every stage's sections) so that module stays one screenful per
stage; loaded the same way, through :func:`dist_awenc.config_loading.load_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dist_awenc.config import RunSection
from dist_awenc.config_checks import check_ablation, check_targets


@dataclass
class VariantSection:
    """One watermark variant of `awenc ablation`."""

    robustness: str = ""  # a finished `awenc robustness` run folder
    stages: list[str] = field(default_factory=list)  # run folders whose seconds are the variant's cost


@dataclass
class TargetsSection:
    """What a robust watermark must reach (issue #11's targets by default); `awenc ablation` says, per variant, which
    hold. A TPR counts only where no held-out null family was detected in that mode."""

    probe_points: float = 0.5  # the linear probe may lose at most this many points against the clean f0
    knn_points: float = 1.0  # likewise kNN
    whitebox_tpr: float = 0.95
    blackbox_tpr: float = 0.95  # the best black-box mode's
    label_tpr: float = 0.8  # the best label-only mode's

    def __post_init__(self) -> None:
        check_targets(self)


@dataclass
class AblationConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="ablation"))
    clean: str = ""  # the owner's clean f0 run folder (utility reference; its seconds are the pre-training cost)
    # utility: f0 and each variant's watermarked encoder probed on the same seeded train/test splits (0..n-1) of the
    # pirate data, with the data and probe settings of the variants' robustness runs; a change is the paired mean
    utility_splits: int = 5
    variants: dict[str, VariantSection] = field(default_factory=dict)
    targets: TargetsSection = field(default_factory=TargetsSection)
    # an earlier run's ablation.json: render its table, targets and plot again without measuring anything
    report: str = ""

    def __post_init__(self) -> None:
        check_ablation(self)
