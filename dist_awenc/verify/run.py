"""Stage: verify one suspect (``awenc verify --mode whitebox|blackbox_score|blackbox_label|blackbox_collapse``).

The secret's plan (``dist_awenc.verify.plan``) fixes n, alpha, the hold-out
images and, once calibrated, the calibration: a request that deviates is
refused unless ``verify.exploratory=true``, and then every verdict says so.
White-box verification runs two tests, the margin test (sign test against
the calibrated margin) and, when the plan has alternative secrets, the
exact secret-permutation test; ``verdict.json`` holds both and the overall
decision across them (Holm).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from dist_awenc.config import VerifyConfig, VerifySection
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.encoders.io import atomic_write_text
from dist_awenc.encoders.thirdparty import declared, load_suspect
from dist_awenc.errors import ConfigError
from dist_awenc.evaluate.downstream import load_downstream
from dist_awenc.log import info, warn
from dist_awenc.runs import open_run
from dist_awenc.verify import plan as P
from dist_awenc.verify.evidence import start_bundle, write_report
from dist_awenc.verify.core import (DEFAULT_N, LABEL_MODES, MODES, Verdict, images_for, overall_verdict,
                                    verify_blackbox_collapse, verify_blackbox_label, verify_blackbox_score,
                                    verify_whitebox)
from dist_awenc.verify.permutation import (BLACKBOX_PERMUTATION, permutation_queries, score_statistic,
                                           verify_blackbox_permutation, verify_permutation)
from dist_awenc.verify.resize import Resized, mark_resolution, plan_resize, resizing, weights_at
from dist_awenc.watermark.draw import load_plan_alternatives
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, load_secret

DEFAULT_ALPHA = 1e-3
LABEL_NAMES_SHOWN = 8  # string labels listed in a verdict's details


@dataclass
class Settings:
    """What one verification uses, resolved from the request, the plan and the calibration."""

    n: int
    alpha: float
    tau: float
    threshold_source: str
    calibration_sha256: Optional[str] = None
    exploratory: bool = False
    deviations: tuple = ()
    calibration_path: Optional[str] = None  # the calibration file read (copied into a black-box evidence bundle)
    classes: Optional[int] = None  # label mode: the class count the owner states for the suspect's task
    calibration: Any = field(default=None, repr=False)  # the Calibration itself (replay reloads it from the bundle)
    after_release: bool = False  # the calibration was bound after release, not sealed into the published plan

    def record(self) -> dict:
        """What replaying a verification needs to rebuild these settings (the calibration file's path aside)."""
        return {"n": self.n, "alpha": self.alpha, "tau": self.tau, "threshold_source": self.threshold_source,
                "calibration_sha256": self.calibration_sha256, "exploratory": self.exploratory,
                "deviations": list(self.deviations), "classes": self.classes, "after_release": self.after_release}

    def stamp(self, v: Verdict) -> Verdict:
        """Record where the verdict's numbers came from; a calibrated margin test gets its encoder-level p here."""
        v.exploratory, v.plan_deviations = self.exploratory, list(self.deviations)
        if v.threshold is None:  # the permutation test: its p is encoder-level already
            return v
        v.threshold_source, v.calibration_sha256 = self.threshold_source, self.calibration_sha256
        if self.calibration is not None:
            calibrated_p(v, self.calibration, self.after_release)
        return v


def calibrated_p(v: Verdict, cal, after_release: bool = False) -> None:
    """A margin test's conformal encoder-level p from the calibration, the threshold it is measured against and
    the held-out bound beside it (label modes: the largest over calibrated class counts >= the labels seen)."""
    from dist_awenc.verify.calibration import mode_test, tau_star

    keys = [v.mode]
    if v.mode in LABEL_MODES and cal.label_classes(v.mode):
        seen = max(2, int(v.details.get("labels_seen", 0)))
        keys = cal.eligible_label_keys(v.mode, seen)
        if not keys:
            v.no_decision = v.no_decision or (f"the suspect answered with {seen} distinct labels, more than any class "
                                              f"count calibration {cal.sha256[:12]}... has thresholds for")
            return
    key = max(keys, key=lambda k: cal.thresholds[k])
    if cal.thresholds[key] != v.threshold:  # the image-level test at the threshold that applies after all
        r = mode_test(v.mode, v.samples, cal.thresholds[key])
        v.threshold, v.image_p = cal.thresholds[key], r.p_value
        v.threshold_source += f"; after the answers: {key}'s, the largest over class counts >= labels seen"
    t = tau_star(v.mode, v.samples, v.alpha)
    ps = [cal.encoder_p(k, t) for k in keys]
    v.p_value, v.p_floor = max(p for p, _ in ps), max(f for _, f in ps)
    v.p_source = (f"conformal over the {round(1 / v.p_floor) - 1} calibration families of calibration "
                  f"{cal.sha256[:12]}...: tau* {t:.4g}")
    bounds = [b for b in (cal.heldout_bound(k) for k in keys) if b is not None]
    v.heldout_fpr_upper_95 = max(bounds) if bounds else None
    v.details["tau_star"] = t
    if after_release:
        v.details["calibration_chosen"] = ("after release: bound in secret.json, not sealed into the plan the "
                                           "published hash covers")


def default_settings(v: VerifySection, mode: str, plan: Optional[dict] = None) -> Settings:
    """Settings from the request and the plan alone (no calibration): the demo-default margins."""
    n, alpha = P.resolve(plan or {}, mode, v.n, v.alpha, DEFAULT_N, DEFAULT_ALPHA)
    tau = {"whitebox": v.tau_whitebox, "blackbox_score": v.tau_score, "blackbox_label": v.tau_label,
           "blackbox_collapse": v.tau_collapse}[mode]
    return Settings(n=n, alpha=alpha, tau=tau, threshold_source="demo default margin (not calibrated)",
                    classes=v.classes if mode in LABEL_MODES else None)


def query_images(holdout: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """The hold-out images a mode's budget ``n`` pays for."""
    if mode not in MODES:
        raise ConfigError(f"unknown verify.mode '{mode}'; valid: {', '.join(MODES)}")
    try:
        k = images_for(mode, n)
    except ValueError as e:
        raise ConfigError(f"verify.n: {e}") from None
    if k > len(holdout):
        raise ConfigError(f"verify.n asks for {k} hold-out images for {mode}, but the hold-out split has {len(holdout)}")
    return holdout[:k]


def verify_model(model: torch.nn.Module, secret: Secret, holdout: torch.Tensor, s: Settings, mode: str,
                 alternatives: Optional[AlternativeSecrets] = None, input_size: Optional[int] = None) -> list[Verdict]:
    """Verdicts on an in-process suspect: an encoder (white-box: margin + permutation) or a downstream model
    (black-box: the mode's margin test, and its permutation test when ``alternatives`` are given).

    ``input_size``: the suspect's, when it is not the secret's: queries are made at the secret's resolution and
    resized to it as the plan says (:mod:`dist_awenc.verify.resize`); the margin tests then draw no decision.
    White-box reads weights that take the secret's resolution at it instead (:func:`weights_at`).
    """
    x = query_images(holdout, s.n, mode)
    method, note = plan_resize(secret.plan)
    size = input_size or secret.image_size
    if mode == "whitebox":  # the weights at the secret's resolution where they take it (weights_at)
        model, measured = weights_at(model, size, secret.image_size, method)
        out = [verify_whitebox(model, secret, x, tau=s.tau, alpha=s.alpha)]
        if alternatives is not None and len(alternatives):
            out.append(verify_permutation(model, secret, alternatives, x, alpha=s.alpha))
        out = [s.stamp(v) for v in out]
        if measured != size:  # a suspect at another size whose weights take the secret's: nothing was resized
            method, note = "none", (f"the weights take {measured} px inputs, the secret's: measured there, where "
                                    "the mark was embedded, not at the suspect's stated size")
            info(f"white-box: the suspect states {size} px inputs; its weights take the secret's {measured} px and "
                 "are measured there (no resize)")
    else:
        if size != secret.image_size:
            model = Resized(model, size, method)
        model.eval()
        labels = lambda b: model(b).argmax(1)  # noqa: E731
        predict = model.predict_proba if mode == "blackbox_score" else labels
        out = _blackbox_verdicts(predict, secret, x, s, mode, alternatives)
    mark_resolution(out, secret.image_size, size, method, note)
    return out


def _blackbox_verdicts(predict, secret: Secret, x: torch.Tensor, s: Settings, mode: str,
                       alternatives: Optional[AlternativeSecrets]) -> list[Verdict]:
    """A black-box mode's margin verdict, then its permutation verdict where the alternatives were granted."""
    if mode == "blackbox_score":
        out = [verify_blackbox_score(predict, secret, x, tau=s.tau, alpha=s.alpha)]
    elif mode == "blackbox_collapse":
        out = [verify_blackbox_collapse(predict, secret, x, tau=s.tau, alpha=s.alpha, classes=s.classes)]
    else:
        out = [verify_blackbox_label(predict, secret, x, tau=s.tau, alpha=s.alpha, classes=s.classes)]
    if alternatives is not None and len(alternatives) and mode in BLACKBOX_PERMUTATION:
        out.append(verify_blackbox_permutation(mode, predict, secret, alternatives, x, alpha=s.alpha))
    return [s.stamp(v) for v in out]


def verify_remote(remote, secret: Secret, holdout: torch.Tensor, s: Settings, mode: str,
                  alternatives: Optional[AlternativeSecrets] = None) -> list[Verdict]:
    """Black-box verdicts on a live prediction API (a :class:`~dist_awenc.verify.endpoint.RemoteModel`)."""
    x = query_images(holdout, s.n, mode)
    predict = remote.predict_proba if mode == "blackbox_score" else remote.predict_label
    size, (method, note) = remote.info.get("input_size"), plan_resize(secret.plan)
    size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    if size is not None and size != secret.image_size:  # the API states its input size: resized before sending
        predict = resizing(predict, size, method)
    verdicts = _blackbox_verdicts(predict, secret, x, s, mode, alternatives)
    mark_resolution(verdicts, secret.image_size, size, method, note)
    for v in verdicts:
        v.details["endpoint"] = remote.summary()
        if remote.label_names:  # string labels: a few of the names answered, for the report
            v.details["label_names"] = [n[:40] for n in sorted(remote.label_names.values())[:LABEL_NAMES_SHOWN]]
            v.details["label_names_seen"] = len(remote.label_names)
    return verdicts


def blackbox_alternatives(alternatives: Optional[AlternativeSecrets], mode: str, n: int, budget: int,
                          plan: Optional[dict] = None) -> tuple[Optional[AlternativeSecrets], int]:
    """The alternatives a black-box permutation test may use under ``verify.permutation_queries``, and its queries.

    Each alternative needs its own marked queries (the owner's are the margin test's; ``plan``'s score statistic
    says what else each asks); a test that would send more than the budget is not run (said in one line), and the
    mode's margin test runs alone.
    """
    if alternatives is None or not len(alternatives) or mode not in BLACKBOX_PERMUTATION:
        return None, 0
    need = permutation_queries(mode, images_for(mode, n), len(alternatives), beside_margin_test=True,
                               statistic=score_statistic(plan))
    if need > budget:
        warn(f"{BLACKBOX_PERMUTATION[mode]} not run: it needs {need} queries beyond the margin test's for "
             f"J = {len(alternatives)} alternatives, over verify.permutation_queries={budget}; raise it to run the "
             "exact test")
        return None, 0
    return alternatives, need


def margins_set_by_hand(v: VerifySection) -> tuple[str, ...]:
    """The ``verify.tau_*`` margins that differ from the demo defaults (a margin no plan or calibration fixed)."""
    defaults = {f.name: f.default for f in fields(VerifySection) if f.name.startswith("tau_")}
    return tuple(f"verify.{k}={getattr(v, k):g}" for k, d in defaults.items() if getattr(v, k) != d)


def resolve_settings(v: VerifySection, secret: Secret, mode: str, *, dataset: str, dataset_size: int, split_seed: int,
                     holdout_indices, access: Optional[str] = None) -> Settings:
    """Check the request against the plan and the calibration's conditions; refuse a deviation unless exploratory.

    ``access`` (weights, probabilities, labels) is a single suspect's: its mode must be the plan's primary for
    that access. Grids that verify every mode (the demo, robustness) pass None and decide by Holm over all.
    """
    plan = secret.plan
    s = default_settings(v, mode, plan)
    sealed = P.sealed_calibration(plan)
    bound = (secret.record.get("calibration") or {}) if secret.record else {}
    fixed = sealed["sha256"] if sealed else bound.get("sha256")
    s.after_release = bool(fixed and not sealed)
    calibration = v.calibration or bound.get("path")
    cal = None
    if calibration:
        from dist_awenc.verify.calibration import check_conditions, load_calibration

        cal = load_calibration(calibration)
        if mode not in cal.thresholds:
            raise ConfigError(f"calibration {cal.path} has no threshold for {mode} (it was made before that mode "
                              "existed); run awenc calibrate again")
        made_for = cal.conditions.get("secret_sha256")
        check_conditions(cal, secret_sha256=made_for if made_for in P.secret_identities(secret.sha256, plan)
                         else secret.sha256, alpha=s.alpha, n={mode: s.n}, dataset=dataset,
                         split_seed=split_seed, holdout_indices=holdout_indices, dataset_size=dataset_size)
        key, which = cal.key_for(mode, v.classes)
        s.tau, s.calibration_sha256, s.calibration_path, s.calibration = cal.thresholds[key], cal.sha256, str(cal.path), cal
        when = ("chosen after release, bound in secret.json; " if s.after_release and cal.sha256 == fixed
                else "sealed in the plan; " if sealed and cal.sha256 == fixed else "")
        s.threshold_source = (f"calibration {cal.sha256[:12]}... ({when}{which + '; ' if which else ''}"
                              f"{cal.summary(key)})")
    devs = P.deviations(plan, mode=mode, n=v.n, alpha=v.alpha, dataset=dataset, dataset_size=dataset_size,
                        split_seed=split_seed, holdout_indices=holdout_indices,
                        calibration_sha256=cal.sha256 if cal else None, bound_calibration_sha256=fixed,
                        access=access, margins_by_hand=margins_set_by_hand(v))
    failed = cal.heldout_failure(key) if cal else None
    if failed and not v.exploratory:  # a threshold shown to pass independent encoders never decides ownership
        raise ConfigError(failed + " (rerun with verify.exploratory=true to run it anyway, marked exploratory)")
    P.refuse_or_mark(devs, v.exploratory)
    devs += [failed] if failed else []
    s.exploratory, s.deviations = bool(devs), tuple(devs)
    for d in devs:
        warn(f"exploratory verification: {d}")
    return s


def verify(cfg: VerifyConfig) -> list[Verdict]:
    """Load suspect and secret, test on the owner's hold-out images, write ``verdict.json``."""
    mode, v = cfg.verify.mode, cfg.verify
    if mode not in MODES:
        raise ConfigError(f"unknown verify.mode '{mode}'; valid: {', '.join(MODES)}")
    if v.classes is not None and (mode not in LABEL_MODES or v.classes < 2):
        raise ConfigError(f"verify.classes={v.classes}: the suspect task's number of classes (2 or more) is for "
                          "--mode blackbox_label or blackbox_collapse only")
    if mode != "whitebox" and declared(cfg.suspect_card):
        raise ConfigError("suspect_card.* describes an encoder's weights file, which is verified white-box "
                          "(--mode whitebox); black-box modes query a downstream model or an endpoint")
    secret = load_secret(cfg.secret)
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=secret.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    splits = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "verify", "holdout")
    settings = lambda access: resolve_settings(v, secret, mode, dataset=cfg.data.name,  # noqa: E731
                                               dataset_size=len(dataset), split_seed=cfg.data.split_seed,
                                               holdout_indices=splits["holdout"], access=access)
    remote = None
    if v.endpoint:
        if mode == "whitebox":
            raise ConfigError("verify.endpoint is for black-box modes; white-box needs the encoder (suspect=...)")
        if cfg.suspect:
            raise ConfigError("give suspect= (a saved model) or verify.endpoint= (a live API), not both")
        from dist_awenc.verify.adapter import load_adapter
        from dist_awenc.verify.endpoint import RemoteModel

        adapter = load_adapter(v.adapter)
        # before the API is contacted; whether it answers labels only, its /health says (checked below)
        s = settings("labels" if adapter.probabilities is None else None)
        alternatives, extra = blackbox_alternatives(load_plan_alternatives(cfg.secret, secret), mode, s.n,
                                                    v.permutation_queries, secret.plan)
        remote = RemoteModel(v.endpoint, query_budget=s.n + extra, timeout=v.endpoint_timeout, retries=v.endpoint_retries,
                             batch_size=v.endpoint_batch_size, adapter=adapter)
        card = {"input_size": remote.info.get("input_size", secret.image_size)}  # probes /health
        if adapter.probabilities is not None:  # now the access is known: the plan's primary for it applies
            s = settings(access_of(mode, remote))
        if mode == "blackbox_score" and (remote.info.get("labels_only") or adapter.probabilities is None):
            raise ConfigError(f"{remote.url} serves labels only; use --mode blackbox_label")
    elif mode == "whitebox":
        model, card = load_suspect(cfg.suspect, cfg.suspect_card)
    else:
        model, full = load_downstream(cfg.suspect)
        card = full["encoder"]
    s = s if remote is not None else settings("weights" if mode == "whitebox" else "probabilities")
    query_images(torch.empty(len(splits["holdout"]), 0), s.n, mode)  # checks n before anything is written
    if remote is None:
        alternatives = load_plan_alternatives(cfg.secret, secret)
        if mode != "whitebox":
            alternatives, _ = blackbox_alternatives(alternatives, mode, s.n, v.permutation_queries, secret.plan)
    holdout, _ = dataset.get_batch(splits["holdout"][: images_for(mode, s.n)])
    with open_run(cfg, "verify") as run_dir:
        if remote is not None:
            remote.log = start_bundle(run_dir, mode=mode, endpoint=remote.url, endpoint_info=remote.info,
                                      secret_sha256=secret.sha256, plan=secret.plan, settings=s.record(),
                                      data={"dataset": cfg.data.name, "size": len(dataset),
                                            "split_seed": cfg.data.split_seed},
                                      calibration_path=s.calibration_path, adapter=remote.adapter.record())
            verdicts = verify_remote(remote, secret, holdout, s, mode, alternatives)
        else:
            verdicts = verify_model(model, secret, holdout, s, mode, alternatives, input_size=card["input_size"])
        if remote is None:
            hashed = card.get("sha256")
            note = hashed or "none: the suspect's card records no SHA-256, so its weights were not checked against one"
            for x in verdicts:
                x.details["suspect_sha256"] = note
            if not hashed:
                warn(f"{cfg.suspect}: {note}")
        overall = overall_verdict(verdicts, s.alpha)  # the one decision: every report below shows it
        suspect = cfg.suspect or remote.url
        primary = verdicts[0].to_dict()
        doc = {"suspect": suspect, **primary, "decision": overall["decision"],
               "primary_mode": P.primaries(secret.plan).get(access_of(mode, remote)),
               "tests": [x.to_dict() for x in verdicts], "overall": overall}
        if remote is not None:
            doc["evidence"] = remote.log.summary()
            write_report(run_dir, doc)
        atomic_write_text(run_dir / "verdict.json", json.dumps(doc, indent=2))
        for x in verdicts:
            info(x.line())
        info(overall_line(overall))
    return verdicts


def access_of(mode: str, remote=None) -> str:
    """The access a verification has: weights (white-box), or a model's probabilities or labels only."""
    if mode == "whitebox":
        return "weights"
    if remote is not None and (remote.adapter.probabilities is None or remote.info.get("labels_only")):
        return "labels"
    return "probabilities"


def overall_line(overall: dict) -> str:
    """The verdict line: the one decision, what decided it and what could not."""
    word = "OWNERSHIP EVIDENCE" if overall["decision"] else "no evidence"
    fam = ", ".join(overall["family"]) or "none"
    out = f"verdict (Holm at alpha {overall['alpha']:g} over encoder-level p-values of: {fam}) -> {word}"
    if not overall["family"]:
        out += "  [no test here can reach alpha: " + "; ".join(f"{m}: {w}" for m, w in overall["left_out"].items()) + "]"
    return out + ("  [EXPLORATORY]" if overall["exploratory"] else "")
