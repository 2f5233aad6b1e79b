"""Stage: verify one suspect (``awenc verify --mode whitebox|blackbox_score|blackbox_label``)."""
from __future__ import annotations

import json

import torch

from dist_awenc.config import VerifyConfig, VerifySection
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import atomic_write_text, load_encoder
from dist_awenc.engine.log import info
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.evaluate.downstream import load_downstream
from dist_awenc.runs import open_run
from dist_awenc.verify.core import (DEFAULT_N, MODES, Verdict, images_for, verify_blackbox_label,
                                    verify_blackbox_score, verify_whitebox)
from dist_awenc.watermark.secret import Secret, load_secret


def query_images(holdout: torch.Tensor, v: VerifySection, mode: str) -> torch.Tensor:
    """The hold-out images a mode's budget ``verify.n`` pays for."""
    if mode not in MODES:
        raise ConfigError(f"unknown verify.mode '{mode}'; valid: {', '.join(MODES)}")
    try:
        k = images_for(mode, v.n if v.n is not None else DEFAULT_N[mode])
    except ValueError as e:
        raise ConfigError(f"verify.n: {e}") from None
    if k > len(holdout):
        raise ConfigError(f"verify.n asks for {k} hold-out images for {mode}, but the hold-out split has {len(holdout)}")
    return holdout[:k]


def verify_model(model: torch.nn.Module, secret: Secret, holdout: torch.Tensor, v: VerifySection, mode: str) -> Verdict:
    """One verdict on an in-process suspect: an encoder (white-box) or a downstream model (black-box)."""
    x, tau = query_images(holdout, v, mode), margins(v)[mode]
    if mode == "whitebox":
        return verify_whitebox(model, secret, x, tau=tau, alpha=v.alpha)
    model.eval()
    if mode == "blackbox_score":
        return verify_blackbox_score(model.predict_proba, secret, x, tau=tau, alpha=v.alpha)
    return verify_blackbox_label(lambda b: model(b).argmax(1), secret, x, tau=tau, alpha=v.alpha)


def verify_remote(remote, secret: Secret, holdout: torch.Tensor, v: VerifySection, mode: str) -> Verdict:
    """One black-box verdict on a live prediction API (a :class:`~dist_awenc.verify.endpoint.RemoteModel`)."""
    x, tau = query_images(holdout, v, mode), margins(v)[mode]
    if mode == "blackbox_score":
        verdict = verify_blackbox_score(remote.predict_proba, secret, x, tau=tau, alpha=v.alpha)
    else:
        verdict = verify_blackbox_label(remote.predict_label, secret, x, tau=tau, alpha=v.alpha)
    verdict.details["endpoint"] = remote.summary()
    return verdict


def margins(v: VerifySection) -> dict[str, float]:
    """Each mode's margin: from ``verify.calibration`` when given, else the ``tau_*`` defaults."""
    if v.calibration:
        from dist_awenc.verify.calibrate import load_thresholds

        return load_thresholds(v.calibration)
    return {"whitebox": v.tau_whitebox, "blackbox_score": v.tau_score, "blackbox_label": v.tau_label}


def verify(cfg: VerifyConfig) -> Verdict:
    """Load suspect and secret, test on the owner's hold-out images, write ``verdict.json``."""
    mode = cfg.verify.mode
    if mode not in MODES:
        raise ConfigError(f"unknown verify.mode '{mode}'; valid: {', '.join(MODES)}")
    secret = load_secret(cfg.secret)
    v = cfg.verify
    remote = None
    if v.endpoint:
        if mode == "whitebox":
            raise ConfigError("verify.endpoint is for black-box modes; white-box needs the encoder (suspect=...)")
        if cfg.suspect:
            raise ConfigError("give suspect= (a saved model) or verify.endpoint= (a live API), not both")
        from dist_awenc.verify.endpoint import RemoteModel

        remote = RemoteModel(v.endpoint, query_budget=v.n if v.n is not None else DEFAULT_N[mode],
                             timeout=v.endpoint_timeout, retries=v.endpoint_retries, batch_size=v.endpoint_batch_size)
        card = {"input_size": remote.info.get("input_size", secret.image_size)}  # probes /health
        if mode == "blackbox_score" and remote.info.get("labels_only"):
            raise ConfigError(f"{remote.url} serves labels only; use --mode blackbox_label")
    elif mode == "whitebox":
        model, card = load_encoder(cfg.suspect)
    else:
        model, full = load_downstream(cfg.suspect)
        card = full["encoder"]
    if card["input_size"] != secret.image_size:
        raise ArtifactError(f"suspect takes {card['input_size']} px inputs but the secret is {secret.image_size} px")
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=secret.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    holdout, _ = dataset.get_batch(make_splits(len(dataset), cfg.data.split_seed)["holdout"])
    with open_run(cfg, "verify") as run_dir:
        if remote is not None:
            verdict = verify_remote(remote, secret, holdout, v, mode)
        else:
            verdict = verify_model(model, secret, holdout, v, mode)
        suspect = cfg.suspect or remote.url
        atomic_write_text(run_dir / "verdict.json", json.dumps({"suspect": suspect, **verdict.to_dict()}, indent=2))
        info(verdict.line())
    return verdict
