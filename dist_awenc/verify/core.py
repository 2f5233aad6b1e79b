"""Ownership verification: white-box from an encoder, black-box from a model's outputs.

Each verdict compares marked queries ``x + delta`` with control queries
``x + r`` (``r`` a permutation of delta) and tests, with a margin, that the
watermark's effect exceeds what any encoder shows (METHOD.md, stage 3). The
secret-permutation tests (:mod:`dist_awenc.verify.permutation`) need no
margin: they rank the owner's statistic among J alternative secrets.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dist_awenc.verify.stats import holm, margin_sign_test, paired_proportion_margin, round_up  # noqa: F401
from dist_awenc.watermark.secret import Secret

MODES = ("whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse")
LABEL_MODES = ("blackbox_label", "blackbox_collapse")  # top-1 labels only: the paired hit-rate test
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
    """One test's verdict on one suspect, with its two kinds of number kept apart.

    ``p_value`` is ENCODER-LEVEL: the probability that an encoder not derived from the owner's would score at
    least this (the secret-permutation p, or a calibrated margin test's conformal p over the calibration's null
    families); only it decides, at ``p <= alpha``, and only through :func:`overall_verdict`. ``image_p`` is the
    IMAGE-LEVEL p of a margin test (sign test or Tango's test given the margin): how strong the effect is on
    this one encoder, never a false-positive rate. An uncalibrated margin has no encoder-level p (None).
    """

    mode: str
    p_value: Optional[float]  # encoder-level p (None: this test has none, e.g. an uncalibrated margin)
    effect: float
    n: int
    threshold: Optional[float]  # the margin tau the effect is tested against (None: the permutation test)
    alpha: float  # an encoder-level p <= alpha is ownership evidence (Holm across a suspect's tests)
    decision: bool  # True: ownership evidence (set by overall_verdict, the one place decisions are made)
    secret_sha256: str
    details: dict = field(default_factory=dict)
    threshold_source: str = "demo default margin (not calibrated)"  # where the margin came from
    calibration_sha256: Optional[str] = None  # the calibration file that set the margin, if any
    exploratory: bool = False  # run outside the secret's verification plan
    plan_deviations: list = field(default_factory=list)
    image_p: Optional[float] = None  # image-level p of the margin test: strength of the effect on this encoder
    p_source: str = "none: the margin is not calibrated, so no encoder-level p-value"
    p_floor: Optional[float] = None  # the smallest encoder-level p this test can give: 1/(J+1) or 1/(m'+1)
    heldout_fpr_upper_95: Optional[float] = None  # calibrated margins: the held-out families' exact 95% bound
    no_decision: Optional[str] = None  # why this test decides nothing whatever its p (e.g. classes contradicted)
    samples: Any = field(default=None, repr=False, compare=False)  # the raw per-query outcomes (not serialised)

    @property
    def reaches_alpha(self) -> bool:
        """Whether this test's encoder-level p can be <= alpha at all (fixed by J or m' before any suspect)."""
        return self.p_value is not None and self.p_floor is not None and self.p_floor <= self.alpha * (1 + 1e-9)

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "samples"}

    def encoder_level(self) -> str:
        """The encoder-level p in words, with what it can and cannot reach."""
        if self.p_value is None:
            return f"encoder-level p: none ({self.p_source.removeprefix('none: ')})"
        text = f"encoder-level p={self.p_value:.3g} ({self.p_source})"
        if not self.reaches_alpha:
            text += (f" [cannot reach alpha={self.alpha:g}: its smallest possible p is {self.p_floor:.3g}, so it "
                     "decides nothing at this alpha]")
        return text

    def line(self) -> str:
        if self.decision:
            word = "OWNERSHIP EVIDENCE"
        elif self.no_decision:
            word = "no decision"
        else:
            word = "no evidence"
        parts = [f"{self.mode:<26}", self.encoder_level()]
        if self.image_p is not None:
            parts.append(f"image-level p={self.image_p:.3g} at margin {self.threshold:.4g} ({self.threshold_source}; "
                         "strength on this encoder, not a false-positive rate)")
        if self.heldout_fpr_upper_95 is not None:
            parts.append(f"held-out FPR <= {round_up(self.heldout_fpr_upper_95):.3f} (95%)")
        parts.append(f"effect={self.effect:+.4f}  n={self.n}  -> {word}")
        tag = "  [EXPLORATORY: outside the plan]" if self.exploratory else ""
        if self.no_decision:
            tag += f"  [{self.no_decision}]"
        return "  ".join(parts) + tag


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
    """White-box margin test: the exact sign test of H0: median(s) <= tau (one-sided), an image-level p.

    Its encoder-level p comes from a calibration (:meth:`dist_awenc.verify.run.Settings.stamp`); without one
    the verdict has none and decides nothing.
    """
    s = whitebox_scores(encoder, secret, images)
    r = margin_sign_test(s, tau)
    return _margin_verdict("whitebox", r, tau, alpha, secret, r.extra, s)


def _margin_verdict(mode: str, r, tau: float, alpha: float, secret: Secret, details: dict, samples: Any) -> Verdict:
    """A margin test's verdict before calibration: its image-level p, no encoder-level p yet, no decision."""
    return Verdict(mode, None, r.effect, r.n, tau, alpha, False, secret.sha256, details, image_p=r.p_value,
                   samples=samples)


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
    d = blackbox_score_differences(predict_proba, secret, images)
    r = margin_sign_test(d, tau)
    return _margin_verdict("blackbox_score", r, tau, alpha, secret, {**r.extra, "queries": 3 * r.n}, d)


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
                   secret: Secret, hits: tuple[np.ndarray, np.ndarray]) -> Verdict:
    """A label-only verdict; no decision when the answers contradict the stated class count (``classes``)."""
    details = {**r.extra, **details, "labels_seen": len(seen)}
    v = _margin_verdict(mode, r, tau, alpha, secret, details, hits)
    if classes is not None:
        details["classes_stated"] = classes
        if len(seen) > classes:
            details["classes_contradicted"] = (f"the suspect answered with {len(seen)} distinct labels, more than the "
                                               f"{classes} classes stated (verify.classes): the {classes}-class "
                                               "threshold does not apply, so no decision is drawn")
            v.no_decision = details["classes_contradicted"]
    return v


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
                          tau, alpha, classes, secret, (hm, hr))


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
    return _label_verdict("blackbox_collapse", r, observed.seen, details, tau, alpha, classes, secret, (hm, hr))


def overall_verdict(verdicts: Sequence[Verdict], alpha: float) -> dict:
    """THE decision on one suspect, made here and only here: Holm at ``alpha`` over encoder-level p-values.

    The family is every test of this suspect whose encoder-level p exists and can reach ``alpha`` (a test whose
    smallest possible p exceeds alpha never rejects at any Holm step, so leaving it out changes no decision; which
    tests those are is fixed by J and m' before any suspect is seen) and that no override (e.g. contradicted class
    counts) has ruled out. Each verdict's ``decision`` is set to its Holm rejection, so every report shows the
    same decision. Returns ``{"decision", "alpha", "method", "tests": {mode: rejected}, "family": [...],
    "left_out": {mode: why}, "exploratory"}``.
    """
    if not verdicts:
        raise ValueError("overall_verdict needs at least one verdict")
    family, left_out = {}, {}
    for v in verdicts:
        if v.p_value is None:
            left_out[v.mode] = "no encoder-level p-value (uncalibrated margin)"
        elif v.no_decision:
            left_out[v.mode] = v.no_decision
        elif not v.reaches_alpha:
            left_out[v.mode] = f"its smallest possible p, {v.p_floor:.3g}, exceeds alpha"
        else:
            family[v.mode] = v.p_value
    rejected = holm(family, alpha) if family else {}
    for v in verdicts:
        v.decision = bool(rejected.get(v.mode, False))
    return {"decision": any(rejected.values()), "alpha": alpha, "method": "holm over encoder-level p-values",
            "tests": {v.mode: v.decision for v in verdicts}, "family": sorted(family), "left_out": left_out,
            "exploratory": any(v.exploratory for v in verdicts)}
