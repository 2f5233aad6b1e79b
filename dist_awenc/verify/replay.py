"""``awenc verify --replay BUNDLE_DIR``: recompute a black-box verdict from its evidence bundle alone.

No suspect and no network: the verdict is recomputed from the logged answers
(:mod:`dist_awenc.verify.evidence`) and the secret, by the same code that made
it. Checked on the way, each a one-line error naming what changed:

* the secret: its file against its record, its SHA-256 against the one the
  bundle records and, if given, against a published one (a hash, or the
  released encoder's card, which records it);
* the plan (the secret's header) against the bundle's copy and its hash;
* the calibration: the bundle's copy against the SHA-256 the verdict names
  (its threshold is then the margin the replay uses);
* the query log: every entry's hash and its link to the one before, and the
  chain's final digest against the one ``verdict.json`` records;
* the queries themselves, where the owner's hold-out images can be loaded:
  each logged image hash against the query the secret and the plan give;
* the verdict: p-value, effect, n, margin, decision and details, exactly.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from dist_awenc.config import VerifyConfig
from dist_awenc.config_loading import load_config
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.errors import ArtifactError, AwencError, TamperedSecretError
from dist_awenc.files import read_json, sha256_file
from dist_awenc.log import info, warn
from dist_awenc.verify.adapter import load_adapter
from dist_awenc.verify.core import Verdict, images_for, overall_verdict
from dist_awenc.verify.endpoint import RemoteModel
from dist_awenc.verify.evidence import BUNDLE_FORMAT, CALIBRATION_COPY, MANIFEST_NAME, QueryLog, plan_sha256
from dist_awenc.verify.permutation import BLACKBOX_PERMUTATION
from dist_awenc.verify.run import Settings, verify_remote
from dist_awenc.watermark.draw import load_plan_alternatives
from dist_awenc.watermark.secret import load_secret

_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
COMPARED = ("mode", "p_value", "effect", "n", "threshold", "alpha", "decision", "secret_sha256", "threshold_source",
            "calibration_sha256", "exploratory", "plan_deviations", "image_p", "p_source", "p_floor",
            "heldout_fpr_upper_95", "no_decision")


def published_sha256(published: str) -> str:
    """A published secret hash: 64 hex digits, or a released encoder's card (``encoder.json`` or its folder)."""
    if _HEX.match(published.strip()):
        return published.strip().lower()
    p = Path(published)
    p = p / "encoder.json" if p.is_dir() else p
    if not p.is_file():
        raise ArtifactError(f"--published-sha256 '{published}' is neither a SHA-256 (64 hex digits) nor a card file")
    card = read_json(p, ArtifactError, "a released encoder's card")
    digest = card.get("secret_sha256") if isinstance(card, dict) else None
    if not isinstance(digest, str) or not _HEX.match(digest):
        raise ArtifactError(f"{p}: the card records no secret_sha256 (not a watermarked encoder's card)")
    return digest.lower()


def _holdout(cfg: VerifyConfig, manifest: dict, image_size: int, k: int) -> Optional[torch.Tensor]:
    """The owner's hold-out query images, or None where the dataset cannot be loaded here."""
    try:
        dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=image_size, seed=cfg.data.split_seed,
                                size=cfg.data.size)
    except Exception as e:  # noqa: BLE001  (any reason the data is not here: replay goes on without it)
        warn(f"replay: the hold-out images cannot be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
             "the logged image hashes are not checked against the queries")
        return None
    data = manifest.get("data") or {}
    if len(dataset) != data.get("size") or cfg.data.split_seed != data.get("split_seed"):
        raise ArtifactError(f"replay: data {cfg.data.name} ({len(dataset)} images, split seed {cfg.data.split_seed}) "
                            f"is not the bundle's ({data.get('size')} images, split seed {data.get('split_seed')})")
    idx = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "replay", "holdout")["holdout"]
    return dataset.get_batch(idx[:k])[0]


def _same(v: Verdict, recorded: dict) -> None:
    """Refuse a recomputed test that differs from its record in verdict.json in anything it reports."""
    got = json.loads(json.dumps(v.to_dict()))  # as verdict.json holds it (tuples as lists)
    for key in COMPARED:
        if got[key] != recorded.get(key):
            raise ArtifactError(f"replay: {v.mode}'s {key} is {got[key]!r}, verdict.json says {recorded.get(key)!r}; "
                                "the bundle does not reproduce its verdict")
    strip = lambda det: {a: b for a, b in det.items() if a != "endpoint"}  # noqa: E731  (query counters differ)
    if strip(got["details"]) != strip(recorded.get("details") or {}):
        raise ArtifactError(f"replay: {v.mode}'s details differ from verdict.json's; the bundle does not reproduce "
                            "its verdict")


def replay(bundle: str | Path, overrides: Optional[list[str]] = None, published: Optional[str] = None) -> Verdict:
    """Recompute the verdict of the evidence bundle ``bundle``; raises a one-line error where anything differs."""
    d = Path(bundle)
    manifest = read_json(d / MANIFEST_NAME, ArtifactError, "an evidence bundle's manifest: give a black-box verify run folder")
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"{d / MANIFEST_NAME}: not an evidence bundle of this version (expected {BUNDLE_FORMAT})")
    recorded = read_json(d / "verdict.json", ArtifactError, "the verdict: the verification did not finish; rerun it")
    cfg = load_config(VerifyConfig, d / "config.yaml", overrides or [])
    secret = load_secret(cfg.secret)  # a file that no longer matches its own record is refused here
    where = Path(cfg.secret)
    if secret.sha256 != manifest["secret_sha256"]:
        raise TamperedSecretError(f"{where}: the secret's SHA-256 {secret.sha256[:16]}... is not the bundle's "
                                  f"{manifest['secret_sha256'][:16]}...; it is not the secret this verification used")
    if published is not None:
        want = published_sha256(published)
        if want != secret.sha256:
            raise TamperedSecretError(f"{where}: the secret's SHA-256 {secret.sha256[:16]}... is not the published "
                                      f"{want[:16]}...")
    if plan_sha256(secret.plan) != manifest["plan_sha256"] or secret.plan != manifest["plan"]:
        raise ArtifactError(f"{d / MANIFEST_NAME}: its plan is not the secret's (plan hash differs)")
    rec = manifest["settings"]
    s = Settings(n=rec["n"], alpha=rec["alpha"], tau=rec["tau"], threshold_source=rec["threshold_source"],
                 calibration_sha256=rec["calibration_sha256"], exploratory=rec["exploratory"],
                 deviations=tuple(rec["deviations"]), classes=rec.get("classes"),
                 after_release=bool(rec.get("after_release")))
    mode = manifest["mode"]
    if manifest.get("calibration"):
        from dist_awenc.verify.calibration import load_calibration

        copy = d / CALIBRATION_COPY
        if not copy.is_file():
            raise ArtifactError(f"{copy}: missing from the bundle (the verdict names calibration "
                                f"{s.calibration_sha256[:16]}...)")
        digest = sha256_file(copy)
        if digest != s.calibration_sha256 or digest != recorded.get("calibration_sha256"):
            raise ArtifactError(f"{copy}: SHA-256 {digest[:16]}... is not the calibration the verdict names "
                                f"({str(recorded.get('calibration_sha256'))[:16]}...); the copy was changed")
        cal = load_calibration(copy)
        s.tau, s.calibration = cal.thresholds[cal.key_for(mode, s.classes)[0]], cal
    log = QueryLog(d / manifest["query_log"])
    head = (recorded.get("evidence") or {}).get("chain_sha256")
    if log.head != head:
        raise ArtifactError(f"{log.path}: the chain's final digest {log.head[:16]}... is not the one verdict.json "
                            f"records ({str(head)[:16]}...): entries were added, removed or re-chained")
    k = images_for(mode, s.n)
    holdout = _holdout(cfg, manifest, secret.image_size, k)
    checked = holdout is not None
    if holdout is None:
        holdout = torch.zeros(k, 3, secret.image_size, secret.image_size)
    remote = RemoteModel.replaying(manifest["endpoint"], manifest["endpoint_info"], log, check_images=checked,
                                   adapter=load_adapter(manifest.get("adapter")))
    recorded_tests = recorded.get("tests") or [recorded]
    # the permutation test ran beside the margin test: its queries are in the log, after the margin test's
    alternatives = (load_plan_alternatives(cfg.secret, secret)
                    if any(t.get("mode") in BLACKBOX_PERMUTATION.values() for t in recorded_tests) else None)
    try:
        verdicts = verify_remote(remote, secret, holdout, s, mode, alternatives)
    except AwencError as e:
        raise type(e)(f"replay: {e}") from None
    overall = overall_verdict(verdicts, s.alpha)  # the decision, made as verify made it
    if overall["decision"] != recorded.get("decision"):
        raise ArtifactError(f"replay: the decision is {overall['decision']!r}, verdict.json says "
                            f"{recorded.get('decision')!r}; the bundle does not reproduce its verdict")
    if len(verdicts) != len(recorded_tests):
        raise ArtifactError(f"replay: {len(verdicts)} tests, verdict.json records {len(recorded_tests)}; the bundle "
                            "does not reproduce its verdict")
    for v, rec in zip(verdicts, recorded_tests):
        _same(v, rec)
    for x in verdicts:
        info(x.line())
    info(f"replay: {len(log)} logged queries reproduce verdict.json exactly (chain {log.head[:16]}..., secret "
         f"{secret.sha256[:16]}..., " + ("queries checked against the hold-out images)" if checked else
                                          "hold-out images unavailable: query hashes not checked)"))
    return verdicts[0]
