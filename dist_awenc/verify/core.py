"""Ownership verification: white-box from an encoder, black-box from a model's outputs.

Each verdict compares marked queries ``x + delta`` with control queries
``x + r`` (``r`` a permutation of delta) and tests, with a margin, that the
watermark's effect exceeds what any encoder shows (METHOD.md, stage 3). The
white-box secret-permutation test needs no margin: it ranks the owner's
statistic among J alternative secrets generated on the same f0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dist_awenc.verify.stats import holm, margin_sign_test, paired_proportion_margin, permutation_p
from dist_awenc.watermark.secret import AlternativeSecrets, Secret

MODES = ("whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse")
LABEL_MODES = ("blackbox_label", "blackbox_collapse")  # top-1 labels only: the paired hit-rate test
PERMUTATION = "whitebox_permutation"  # the margin-free white-box test (needs the alternative secrets)
DEFAULT_N = {"whitebox": 256, "blackbox_score": 100, "blackbox_label": 100, "blackbox_collapse": 100}


def collapse_pilot(images: int) -> int:
    """Of collapse mode's images, the pilot ones (marked query only) that find the collapse label: a fifth."""
    return max(1, images // 5)


def images_for(mode: str, n: int) -> int:
    """How many hold-out images a mode uses for a budget ``n``.

    White-box: n images. Black-box modes count queries to the suspect model:
    score mode asks g(x), g(x+delta), g(x+r) per image (n // 3 images); label
    mode asks the key once and x+delta, x+r per image ((n - 1) // 2 images);
    label-agnostic (collapse) mode asks x+delta alone on a fifth of its images
    (:func:`collapse_pilot`) and x+delta, x+r on the rest: the most images k
    with ``2k - pilot(k) <= n`` (55 images, 99 queries at n = 100).
    """
    if mode not in MODES:
        raise ValueError(f"unknown verification mode '{mode}'; valid: {', '.join(MODES)}")
    if mode == "blackbox_collapse":
        k = max((k for k in range(n + 1) if 2 * k - collapse_pilot(k) <= n), default=0)
        if k - collapse_pilot(k) < 2:
            raise ValueError(f"a budget of n={n} leaves {max(0, k - collapse_pilot(k))} query pair(s) for {mode}; "
                             "need at least 2")
        return k
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
    threshold: Optional[float]  # the margin tau the effect is tested against (None: the permutation test)
    alpha: float  # p-value below which ownership is claimed
    decision: bool  # True: ownership evidence
    secret_sha256: str
    details: dict = field(default_factory=dict)
    threshold_source: str = "demo default margin (not calibrated)"  # where the margin came from
    calibration_sha256: Optional[str] = None  # the calibration file that set the margin, if any
    exploratory: bool = False  # run outside the secret's verification plan
    plan_deviations: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        word = "OWNERSHIP EVIDENCE" if self.decision else "no evidence"
        if self.threshold is None:
            what = f"J={self.details.get('alternatives')}, resolution {self.details.get('resolution', 0):.3g}"
        else:
            what = f"margin {self.threshold:.4g}: {self.threshold_source}"
        tag = "  [EXPLORATORY: outside the plan]" if self.exploratory else ""
        if self.details.get("classes_contradicted"):
            tag += f"  [{self.details['classes_contradicted']}]"
        return f"{self.mode:<20} p={self.p_value:.3g}  effect={self.effect:+.4f} ({what})  n={self.n}  -> {word}{tag}"


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


def verify_permutation(encoder: torch.nn.Module, secret: Secret, alternatives: "AlternativeSecrets",
                       images: torch.Tensor, *, alpha: float = 1e-3) -> Verdict:
    """The secret-permutation test: the owner's mean score ranked among J alternative secrets.

    Exact under H0 (the suspect is independent of f0, and so of every secret
    generated on it) with no margin and no null population; its resolution
    is ``1 / (J + 1)``, so it can claim ownership at ``alpha`` only when
    ``J + 1 >= 1 / alpha``.
    """
    t_owner = float(whitebox_statistics(encoder, secret.key[None], secret.delta[None], secret.control()[None], images)[0])
    t_alt = whitebox_statistics(encoder, alternatives.keys, alternatives.deltas, alternatives.controls(), images)
    p = permutation_p(t_owner, t_alt)
    j = len(t_alt)
    details = {"alternatives": j, "resolution": 1 / (j + 1), "at_resolution_limit": p <= 1 / (j + 1) + 1e-12,
               "can_decide_at_alpha": 1 / (j + 1) < alpha, "alternatives_needed_for_alpha": int(np.ceil(1 / alpha)) - 1,
               "alternatives_max": float(t_alt.max()), "alternatives_mean": float(t_alt.mean()),
               "alternatives_sha256": alternatives.sha256, "statistic": "mean white-box score s"}
    return Verdict(PERMUTATION, p, t_owner, len(images), None, alpha, p < alpha, secret.sha256, details,
                   threshold_source="none: exact permutation test over the alternative secrets")


def verify_whitebox(encoder: torch.nn.Module, secret: Secret, images: torch.Tensor, *, tau: float = 0.1,
                    alpha: float = 1e-3) -> Verdict:
    """White-box verdict: the exact sign test of H0: median(s) <= tau (one-sided)."""
    r = margin_sign_test(whitebox_scores(encoder, secret, images), tau)
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
    """Black-box verdict from output probabilities: the sign test on the TV-distance differences minus tau."""
    r = margin_sign_test(blackbox_score_differences(predict_proba, secret, images), tau)
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


@torch.no_grad()
def collapse_hits(predict_label: Callable[[torch.Tensor], torch.Tensor], secret: Secret, images: torch.Tensor,
                  pilot: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Label-agnostic hits: whether marked / control queries get the label marked queries collapse onto.

    The collapse label is the most frequent answer to the marked pilot images ``images[:pilot]`` (ties: the
    smallest label); the hits are counted on the other images only, so under H0 they are paired outcomes of
    images independent of how the label was chosen, and the label mode's test applies unchanged. No key
    query is made: the mark is carried wherever the suspect's head maps its collapse point (SSL-WM's
    label-agnostic idea, tested here with a calibrated margin). ``pilot + 2 (len(images) - pilot)`` queries;
    ``pilot`` defaults to the mode's rule, :func:`collapse_pilot`.

    Returns:
        hits_marked, hits_control (each ``len(images) - pilot``), the collapse label, the pilot's answers.
    """
    pilot = collapse_pilot(len(images)) if pilot is None else pilot
    if not 1 <= pilot <= len(images) - 2:
        raise ValueError(f"collapse mode needs 1 <= pilot <= len(images) - 2, got pilot={pilot} of {len(images)}")
    answers = _batched(lambda b: predict_label(secret.mark(b)), images[:pilot]).cpu().numpy().astype(np.int64)
    values, counts = np.unique(answers, return_counts=True)
    target = int(values[counts.argmax()])  # np.unique sorts: argmax takes the smallest of tied labels
    rest = images[pilot:]
    hm = _batched(lambda b: predict_label(secret.mark(b)), rest).cpu().numpy() == target
    hr = _batched(lambda b: predict_label(secret.mark_control(b)), rest).cpu().numpy() == target
    return hm, hr, target, answers


class _LabelsSeen:
    """Wraps a label predictor and records every distinct label it answered with."""

    def __init__(self, predict_label: Callable[[torch.Tensor], torch.Tensor]):
        self.predict_label, self.seen = predict_label, set()

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        y = self.predict_label(b)
        self.seen.update(int(v) for v in y.reshape(-1).tolist())
        return y


def _label_verdict(mode: str, r, seen: set, details: dict, tau: float, alpha: float, classes: Optional[int],
                   secret: Secret) -> Verdict:
    """A label-only verdict; "no evidence" when the answers contradict the stated class count (``classes``)."""
    details = {**r.extra, **details, "labels_seen": len(seen)}
    decision = r.p_value < alpha
    if classes is not None:
        details["classes_stated"] = classes
        if len(seen) > classes:
            details["classes_contradicted"] = (f"the suspect answered with {len(seen)} distinct labels, more than the "
                                               f"{classes} classes stated (verify.classes): the {classes}-class "
                                               "threshold does not apply, so no decision is drawn")
            decision = False
    return Verdict(mode, r.p_value, r.effect, r.n, tau, alpha, decision, secret.sha256, details)


def verify_blackbox_label(predict_label: Callable[[torch.Tensor], torch.Tensor], secret: Secret, images: torch.Tensor,
                          *, tau: float = 0.3, alpha: float = 1e-3, classes: Optional[int] = None) -> Verdict:
    """Label-only verdict: paired hit-rate difference > tau (Tango's statistic, exact unconditional p).

    ``classes`` is the number of classes the owner states for the suspect's task (it picked ``tau``, a
    calibrated per-class-count threshold): when the answers hold more distinct labels than that, the statement
    is contradicted, the threshold does not apply and the verdict is "no evidence", saying why.
    """
    observed = _LabelsSeen(predict_label)
    hm, hr, key_label = label_hits(observed, secret, images)
    r = paired_proportion_margin(hm, hr, tau)
    return _label_verdict("blackbox_label", r, observed.seen, {"key_label": key_label, "queries": 2 * r.n + 1},
                          tau, alpha, classes, secret)


def verify_blackbox_collapse(predict_label: Callable[[torch.Tensor], torch.Tensor], secret: Secret,
                             images: torch.Tensor, *, tau: float = 0.3, alpha: float = 1e-3,
                             classes: Optional[int] = None) -> Verdict:
    """Label-agnostic verdict: marked queries collapse onto one label, whatever it is, more than controls do.

    ``images`` is the budget's prefix (:func:`images_for`): its first ``collapse_pilot`` images choose the
    collapse label (:func:`collapse_hits`), the rest are paired marked / control queries tested exactly as in
    label mode (H0: P(marked -> label) - P(control -> label) <= tau). ``classes`` as in label mode.
    """
    observed = _LabelsSeen(predict_label)
    hm, hr, target, answers = collapse_hits(observed, secret, images)
    r = paired_proportion_margin(hm, hr, tau)
    details = {"collapse_label": target, "pilot": len(answers), "pilot_share": float(np.mean(answers == target)),
               "queries": len(answers) + 2 * r.n}
    return _label_verdict("blackbox_collapse", r, observed.seen, details, tau, alpha, classes, secret)


def overall_verdict(verdicts: Sequence[Verdict], alpha: float) -> dict:
    """One decision across several tests of the same suspect, family-wise error controlled by Holm.

    Returns ``{"decision", "alpha", "tests": {mode: rejected}, "method": "holm"}``; an exploratory
    verdict in the family makes the overall one exploratory too.
    """
    if not verdicts:
        raise ValueError("overall_verdict needs at least one verdict")
    rejected = holm({v.mode: v.p_value for v in verdicts}, alpha)
    return {"decision": any(rejected.values()), "alpha": alpha, "method": "holm", "tests": rejected,
            "exploratory": any(v.exploratory for v in verdicts)}
