"""Stage: calibrate each mode's margin on a null population (``awenc calibrate``).

A null trial is a pair (encoder, secret) where the encoder never had that
secret embedded: independently pre-trained encoders (other seeds, SSL methods,
widths, normalisations) and the owner's clean f0, each tested with the owner's
secret and with secrets generated independently on other null encoders.

For every trial and mode, ``tau*`` is the margin at which that trial's test
would just reach ``p = alpha``: a larger margin makes it negative. The
calibrated margin is the largest ``tau*`` over the calibration trials, so no
calibration trial is positive; the null encoders held out of that choice
check it, and the report gives the observed false positives with the exact
Clopper-Pearson 95% upper bound on the false-positive rate for both.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dist_awenc.config import CalibrateConfig, EncoderSection, PretrainConfig, RunSection, WatermarkConfig
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import atomic_write_text, load_encoder
from dist_awenc.engine.log import info
from dist_awenc.errors import ConfigError
from dist_awenc.evaluate.downstream import evaluate_encoder
from dist_awenc.runs import open_run, reuse_or_run
from dist_awenc.verify.core import (DEFAULT_N, MODES, blackbox_score_differences, images_for, label_hits,
                                    whitebox_scores)
from dist_awenc.verify.stats import TestResult, clopper_pearson_upper, margin_wilcoxon, paired_proportion_margin
from dist_awenc.watermark.secret import Secret, load_secret

CALIBRATION_FORMAT = "dist_awenc.calibration/1"


# ------------------------------------------------------------------ statistics


def mode_test(mode: str, samples: Any, tau: float) -> TestResult:
    """The mode's test on raw samples: score arrays (white-box, score) or (hits_marked, hits_control)."""
    if mode == "blackbox_label":
        return paired_proportion_margin(samples[0], samples[1], tau)
    return margin_wilcoxon(samples, tau)


def tau_star(mode: str, samples: Any, alpha: float, iters: int = 40) -> float:
    """The margin at which the trial's p-value reaches ``alpha`` (p is non-decreasing in tau).

    Returns the lower end of the search range when the trial is negative at
    every margin, the upper end when it is positive at every margin.
    """
    lo, hi = (0.0, 0.999) if mode == "blackbox_label" else (-2.0, 2.0)
    if mode_test(mode, samples, lo).p_value >= alpha:
        return lo
    if mode_test(mode, samples, hi).p_value < alpha:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mode_test(mode, samples, mid).p_value < alpha:
            lo = mid
        else:
            hi = mid
    return hi


def collect_samples(mode: str, encoder: torch.nn.Module, downstream: torch.nn.Module, secret: Secret,
                    images: torch.Tensor) -> Any:
    """Raw samples of one verification (the same computations as :mod:`dist_awenc.verify.core`)."""
    if mode == "whitebox":
        return whitebox_scores(encoder, secret, images)
    if mode == "blackbox_score":
        return blackbox_score_differences(downstream.predict_proba, secret, images)
    hm, hr, _ = label_hits(lambda b: downstream(b).argmax(1), secret, images)
    return hm, hr


def threshold_from_null(tau_stars: list[float], floor: float) -> float:
    """The calibrated margin: no calibration trial positive, never below ``floor``."""
    return float(max([floor, *tau_stars])) + 1e-6


@dataclass
class NullTrial:
    encoder: str
    secret: str
    own_secret: bool  # the secret was generated on this very encoder (the hardest null)
    samples: dict[str, Any]


# ------------------------------------------------------------------ the stage


def null_encoder_configs(cfg: CalibrateConfig, root: Path) -> list[PretrainConfig]:
    """One pre-training config per (method, width, norm, seed) of the population."""
    p = cfg.population
    out = []
    for method, width, norm, seed in itertools.product(p.methods, p.widths, p.norms, range(p.seeds)):
        enc = EncoderSection(**{**cfg.encoder.__dict__, "width": width, "norm": norm,
                                "head_norm": "batch" if method == "byol" else cfg.encoder.head_norm})
        ssl = type(cfg.ssl)(**{**cfg.ssl.__dict__, "method": method})
        out.append(PretrainConfig(run=RunSection(name=f"{method}_w{width}_{norm}_s{seed}", out_dir=str(root), seed=1000 + seed),
                                  data=cfg.data, views=cfg.views, encoder=enc, ssl=ssl, optim=cfg.optim, train=cfg.pretrain))
    return out


def calibrate(cfg: CalibrateConfig) -> dict:
    from dist_awenc.ssl.pretrain import pretrain
    from dist_awenc.watermark.generate import watermark

    v = cfg.verify
    owner_secret = load_secret(cfg.secret)
    if cfg.population.n_secrets < 1:
        raise ConfigError("population.n_secrets must be >= 1 (the owner's secret)")
    if not 0 <= cfg.population.holdout_fraction < 1:
        raise ConfigError("population.holdout_fraction must be in [0, 1)")
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=owner_secret.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    splits = make_splits(len(dataset), cfg.data.split_seed)
    holdout, _ = dataset.get_batch(splits["holdout"])
    down_x, down_y = dataset.get_batch(splits["downstream"])
    with open_run(cfg, "calibrate") as run_dir:
        pop = run_dir / "population"
        configs = null_encoder_configs(cfg, pop)
        info(f"null population: {len(configs)} encoders to pre-train (+ {len(cfg.population.extra_encoders)} given"
             f"{' + the owner f0' if cfg.owner_encoder else ''}) x {cfg.population.n_secrets} secrets")
        encoder_paths = {c.run.name: reuse_or_run(c, pretrain, "encoder.safetensors")
                         for c in tqdm(configs, desc="null encoders", dynamic_ncols=True)}
        encoder_paths.update({Path(p).stem if Path(p).is_file() else Path(p).name: Path(p) for p in cfg.population.extra_encoders})
        if cfg.owner_encoder:
            encoder_paths["owner_f0"] = Path(cfg.owner_encoder)
        if not encoder_paths:
            raise ConfigError("the null population is empty: give population.seeds >= 1 or population.extra_encoders")
        # secrets: the owner's, then independent ones generated on null encoders (round robin)
        secrets: dict[str, tuple[Secret, str]] = {"owner": (owner_secret, "owner_f0")}
        names = list(encoder_paths)
        for i in range(cfg.population.n_secrets - 1):
            on = names[i % len(names)]
            wcfg = WatermarkConfig(run=RunSection(name=f"secret_{i}", out_dir=str(pop), seed=5000 + i),
                                   encoder=str(encoder_paths[on]), data=cfg.data, generation=cfg.generation)
            secrets[f"secret_{i}"] = (load_secret(reuse_or_run(wcfg, watermark, "secret.safetensors")), on)
        trials = _run_trials(encoder_paths, secrets, holdout, down_x, down_y, dataset.num_classes, cfg)
        report = summarise(trials, v.alpha, {"whitebox": v.tau_whitebox, "blackbox_score": v.tau_score,
                                             "blackbox_label": v.tau_label}, cfg.population.holdout_fraction, cfg.run.seed)
        report.update({"format": CALIBRATION_FORMAT, "owner_secret_sha256": owner_secret.sha256,
                       "population": {"encoders": names, "secrets": list(secrets), "trials": len(trials)}})
        atomic_write_text(run_dir / "calibration.json", json.dumps(report, indent=2))
        plot_null(report, run_dir / "calibration.png")
        for mode, m in report["modes"].items():
            info(f"{mode:<15} threshold {m['threshold']:.4f}  false positives {m['false_positives']}/{m['trials']}  "
                 f"FPR <= {m['fpr_upper_95']:.4f} (95% CP)  held-out {m['heldout']['false_positives']}/{m['heldout']['trials']}")
    return report


def _run_trials(encoder_paths: dict[str, Path], secrets: dict[str, tuple[Secret, str]], holdout: torch.Tensor,
                down_x: torch.Tensor, down_y: torch.Tensor, num_classes: int, cfg: CalibrateConfig) -> list[NullTrial]:
    trials: list[NullTrial] = []
    for name, path in tqdm(encoder_paths.items(), desc="null trials", dynamic_ncols=True):
        encoder, card = load_encoder(path)
        downstream, _ = evaluate_encoder(encoder, down_x, down_y, num_classes, cfg.probe, cfg.run.seed)
        for sname, (secret, generated_on) in secrets.items():
            if card["input_size"] != secret.image_size:
                raise ConfigError(f"null encoder {name} takes {card['input_size']} px, the secret {secret.image_size} px")
            samples = {}
            for mode in MODES:
                k = images_for(mode, cfg.verify.n if cfg.verify.n is not None else DEFAULT_N[mode])
                samples[mode] = collect_samples(mode, encoder, downstream, secret, holdout[:k])
            trials.append(NullTrial(name, sname, generated_on == name, samples))
    return trials


def summarise(trials: list[NullTrial], alpha: float, floors: dict[str, float], holdout_fraction: float,
              seed: int) -> dict:
    """Thresholds from the calibration encoders; false positives and CP bounds in- and out-of-sample."""
    encoders = sorted({t.encoder for t in trials})
    rng = np.random.default_rng(seed)
    n_hold = int(math.floor(len(encoders) * holdout_fraction))
    held = set(rng.permutation(encoders)[:n_hold].tolist()) if n_hold < len(encoders) else set()
    modes: dict[str, dict] = {}
    for mode in MODES:
        stars = [tau_star(mode, t.samples[mode], alpha) for t in trials]
        effects = [mode_test(mode, t.samples[mode], floors[mode]).effect for t in trials]
        calib = [s for s, t in zip(stars, trials) if t.encoder not in held]
        threshold = threshold_from_null(calib, floors[mode])
        positives = [mode_test(mode, t.samples[mode], threshold).p_value < alpha for t in trials]
        fp_cal = sum(p for p, t in zip(positives, trials) if t.encoder not in held)
        n_cal = sum(t.encoder not in held for t in trials)
        fp_held = sum(p for p, t in zip(positives, trials) if t.encoder in held)
        n_held = sum(t.encoder in held for t in trials)
        modes[mode] = {
            "threshold": threshold, "alpha": alpha, "default_margin": floors[mode],
            "trials": n_cal, "false_positives": int(fp_cal), "fpr_upper_95": clopper_pearson_upper(int(fp_cal), n_cal),
            "heldout": {"encoders": sorted(held), "trials": n_held, "false_positives": int(fp_held),
                        "fpr_upper_95": clopper_pearson_upper(int(fp_held), n_held) if n_held else None},
            "all": {"trials": len(trials), "false_positives": int(sum(positives)),
                    "fpr_upper_95": clopper_pearson_upper(int(sum(positives)), len(trials))},
            "null": [{"encoder": t.encoder, "secret": t.secret, "own_secret": t.own_secret, "tau_star": s,
                      "effect": e, "positive": bool(p)} for t, s, e, p in zip(trials, stars, effects, positives)],
        }
    return {"modes": modes}


def load_thresholds(path: str | Path) -> dict[str, float]:
    """Per-mode thresholds from a ``calibration.json``."""
    p = Path(path)
    p = p / "calibration.json" if p.is_dir() else p
    if not p.exists():
        raise ConfigError(f"calibration file '{p}' does not exist (run awenc calibrate first)")
    data = json.loads(p.read_text())
    if data.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(f"{p}: not a calibration file (format {data.get('format')!r}, expected {CALIBRATION_FORMAT!r})")
    return {mode: float(m["threshold"]) for mode, m in data["modes"].items()}


def plot_null(report: dict, path: Path) -> None:
    """Per mode: the null trials' tau* and the calibrated threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(4 * len(MODES), 3.2))
    for ax, mode in zip(axes, MODES):
        m = report["modes"][mode]
        ax.hist([t["tau_star"] for t in m["null"]], bins=30, color="tab:gray")
        ax.axvline(m["threshold"], color="tab:red", ls="--", label=f"threshold {m['threshold']:.3f}")
        ax.set_title(f"{mode}: {m['all']['trials']} null trials")
        ax.set_xlabel("tau* (margin where p = alpha)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
