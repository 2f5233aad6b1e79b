"""Stage: calibrate each mode's margin on a null population (``awenc calibrate``).

Null encoders are encoders trained independently of the owner's: every
(architecture, SSL method, norm, seed) of ``population``, on the owner's data
with the owner's training budget by default (read from the owner's f0 run),
plus one attacked copy of each (the attacks a pirate would apply, round
robin over ``population.attacks``) and any ``extra_encoders`` (an attacked
copy among them joins its listed parent's family). The owner's f0 is not a
null (a suspect behaving like f0 can only come from the owner): it is
measured and reported as the owner's reference.

Each encoder is tested with the owner's secret (the trial that counts) and
with secrets generated on other null encoders (reported to widen the
picture, never counted as extra evidence). Thresholds, false positives and
bounds are computed per encoder family in :mod:`dist_awenc.verify.calibration`.
Per-encoder results are cached under ``trials/``, so an interrupted
calibration resumes; a finished one binds itself to the owner's secret
(its hash and path go into ``secret.json``), which ``verify`` then requires.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dist_awenc.evaluate.serving import with_recorded_transform
from dist_awenc.config import (CalibrateConfig, EncoderSection, PlanSection, PretrainConfig, RunSection,
                               WatermarkConfig, load_config)
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.encoders.io import atomic_write_text, load_card, load_encoder, resolve_encoder_path, sha256_file
from dist_awenc.encoders.registry import parse_arch
from dist_awenc.errors import ConfigError
from dist_awenc.evaluate.downstream import evaluate_encoder, group_labels, probe_options, task_classes
from dist_awenc.log import info, warn
from dist_awenc.runs import open_run, reuse_or_run
from dist_awenc.verify import plan as P
from dist_awenc.verify.calibration import (CALIBRATION_FORMAT, MODES, NullEncoder, conditions, label_key, markdown,
                                           mode_test, plot_null, summarise, tau_star, test_mode)
from dist_awenc.verify.core import (DEFAULT_N, LABEL_MODES, blackbox_score_differences, collapse_hits, images_for,
                                    label_hits, round_up, whitebox_scores)
from dist_awenc.watermark.secret import Secret, load_secret, seal_calibration

ATTACK_SEP = "__"


def collect_samples(mode: str, encoder: torch.nn.Module, downstream: torch.nn.Module, secret: Secret,
                    images: torch.Tensor) -> Any:
    """Raw samples of one verification (the same computations as :mod:`dist_awenc.verify.core`)."""
    if mode == "whitebox":
        return whitebox_scores(encoder, secret, images)
    if mode == "blackbox_score":
        return blackbox_score_differences(downstream.predict_proba, secret, images)
    if mode == "blackbox_collapse":
        hm, hr, _, _ = collapse_hits(lambda b: downstream(b).argmax(1), secret, images)
        return hm, hr
    hm, hr, _ = label_hits(lambda b: downstream(b).argmax(1), secret, images)
    return hm, hr


def parse_attack(spec: str) -> tuple[str, float]:
    """``name:strength`` -> (name, strength); the attack must be registered (checked before any pre-training)."""
    from dist_awenc.attacks import ATTACKS

    name, _, strength = spec.partition(":")
    if name not in ATTACKS:
        raise ConfigError(f"population.attacks: unknown attack '{name}' in '{spec}'; valid: {', '.join(sorted(ATTACKS))}")
    try:
        return name, float(strength)
    except ValueError:
        raise ConfigError(f"population.attacks: '{spec}' is not name:strength (e.g. prune_global:0.5)") from None


def owner_budget(cfg: CalibrateConfig) -> CalibrateConfig:
    """With ``population.owner_budget``, null encoders train like the owner's f0 (its run's config.yaml)."""
    if not cfg.population.owner_budget or not cfg.owner_encoder:
        return cfg
    p = Path(cfg.owner_encoder)
    run_cfg = (p if p.is_dir() else p.parent) / "config.yaml"
    if not run_cfg.exists():
        warn(f"population.owner_budget: {run_cfg} not found; null encoders use the pretrain/optim/views sections")
        return cfg
    owner = load_config(PretrainConfig, run_cfg)
    return replace(cfg, pretrain=replace(owner.train, progress=False), optim=owner.optim, views=owner.views)


def null_encoder_configs(cfg: CalibrateConfig, root: Path) -> list[PretrainConfig]:
    """One pre-training config per (arch, method, norm, seed) of the population."""
    cfg = owner_budget(cfg)
    p = cfg.population
    out = []
    for spec, method, norm, seed in itertools.product(p.archs, p.methods, p.norms, range(p.seeds)):
        arch, width = parse_arch(spec)
        enc = EncoderSection(**{**cfg.encoder.__dict__, "arch": arch, "width": width, "norm": norm, "stem": None,
                                "head_norm": "batch" if method == "byol" else cfg.encoder.head_norm})
        ssl = type(cfg.ssl)(**{**cfg.ssl.__dict__, "method": method})
        name = f"{method}_{arch}{width or ''}_{norm}_s{seed}"
        out.append(PretrainConfig(run=RunSection(name=name, out_dir=str(root), seed=1000 + seed),
                                  data=cfg.data, views=cfg.views, encoder=enc, ssl=ssl, optim=cfg.optim, train=cfg.pretrain))
    return out


def extra_families(extra_encoders: list[str]) -> dict[str, tuple[Path, str]]:
    """``population.extra_encoders`` as ``{name: (path, family)}``: each its own family, except an attacked copy
    whose card names another listed encoder as its parent (``awenc attack`` writes the parent's hash), which joins
    that encoder's family: a copy is not independent evidence."""
    named = {f"extra_{Path(e).stem if Path(e).is_file() else Path(e).name}": Path(e) for e in extra_encoders}
    cards = {name: load_card(resolve_encoder_path(path)) for name, path in named.items()}
    by_hash = {card.get("sha256"): name for name, card in cards.items() if card.get("sha256")}
    out = {}
    for name, path in named.items():
        family, seen = name, {name}
        while by_hash.get(cards[family].get("parent")) not in (None, *seen):  # up the chain of listed parents
            family = by_hash[cards[family]["parent"]]
            seen.add(family)
        out[name] = (path, family)
    return out


def calibrate(cfg: CalibrateConfig) -> dict:
    from dist_awenc.attacks.stage import PirateData

    cfg = owner_budget(cfg)
    p = cfg.population
    owner_secret = load_secret(cfg.secret)
    if p.n_secrets < 1:
        raise ConfigError("population.n_secrets must be >= 1 (the owner's secret)")
    if not 0 <= p.holdout_fraction < 1:
        raise ConfigError("population.holdout_fraction must be in [0, 1)")
    attacks = [parse_attack(a) for a in p.attacks]
    for spec in p.archs:
        parse_arch(spec)
    n = {m: P.resolve(owner_secret.plan, m, cfg.verify.n, None, DEFAULT_N, 1e-3)[0] for m in MODES}
    alpha = P.resolve(owner_secret.plan, MODES[0], None, cfg.verify.alpha, DEFAULT_N, 1e-3)[1]
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=owner_secret.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    splits = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "calibrate", "holdout")
    devs = P.deviations(owner_secret.plan, mode=MODES[0], n=None, alpha=alpha, dataset=cfg.data.name,
                        dataset_size=len(dataset), split_seed=cfg.data.split_seed, holdout_indices=splits["holdout"],
                        calibration_sha256=None, bound_calibration_sha256=None)
    P.refuse_or_mark(devs, cfg.verify.exploratory)
    holdout, _ = dataset.get_batch(splits["holdout"][: max(images_for(m, n[m]) for m in MODES)])
    pirate = PirateData.load(cfg.data, owner_secret.image_size)
    try:
        label_classes = sorted({task_classes(pirate.num_classes, k) for k in p.label_classes} - {pirate.num_classes})
    except ConfigError as e:
        raise ConfigError(f"population.label_classes: {e}") from None
    with open_run(cfg, "calibrate") as run_dir:
        pop = Path(p.root) if p.root else run_dir / "population"
        configs = null_encoder_configs(cfg, pop)
        info(f"null population: {len(configs)} independent encoders to pre-train, {len(attacks) and len(configs)} "
             f"attacked copies, {len(p.extra_encoders)} given; {p.n_secrets} secret(s) each"
             + ("; the owner's f0 measured as the reference" if cfg.owner_encoder else ""))
        paths: dict[str, tuple[Path, str]] = {}
        for c in tqdm(configs, desc="null encoders", dynamic_ncols=True):
            paths[c.run.name] = (reuse_or_run(c, _pretrain, "encoder.safetensors"), c.run.name)
        for i, c in enumerate(configs if attacks else []):
            name, strength = attacks[i % len(attacks)]
            child = f"{c.run.name}{ATTACK_SEP}{name}{strength:g}"
            paths[child] = (_attacked(paths[c.run.name][0], name, strength, pirate, cfg, pop / child, i), c.run.name)
        paths.update(extra_families(p.extra_encoders))
        if not paths:
            raise ConfigError("the null population is empty: give population.seeds >= 1 or population.extra_encoders")
        secrets = {"owner": owner_secret, **_other_secrets(cfg, paths, pop)}
        ctx = dict(holdout=holdout, pirate=pirate, cfg=cfg, n=n, alpha=alpha, cache=run_dir / "trials",
                   label_classes=label_classes)
        nulls = [_null_encoder(name, path, family, secrets, ctx)
                 for name, (path, family) in tqdm(paths.items(), desc="null trials", dynamic_ncols=True)]
        owner = None
        if cfg.owner_encoder:
            ref = _null_encoder("owner_f0", Path(cfg.owner_encoder), "owner", {"owner": owner_secret}, ctx)
            owner = {m: {"tau_star": ref.tau_star[m], "effect": ref.effect[m]} for m in ref.tau_star}
        report = summarise(nulls, owner, alpha, p.holdout_fraction, cfg.run.seed)
        report.update({
            "format": CALIBRATION_FORMAT,
            "label_classes": {"task": pirate.num_classes, "regrouped": label_classes,
                              "rule": "label y of the pirate's task becomes y mod k"},
            "conditions": conditions(secret_sha256=owner_secret.sha256, alpha=alpha, n=n, dataset=cfg.data.name,
                                     dataset_size=len(dataset), split_seed=cfg.data.split_seed,
                                     holdout_indices=splits["holdout"]),
            "population": {"encoders": list(paths), "families": len({f for _, f in paths.values()}),
                           "secrets": list(secrets), "pretrain": asdict(cfg.pretrain)},
        })
        out = run_dir / "calibration.json"
        atomic_write_text(out, json.dumps(report, indent=2))
        plot_null(report, run_dir / "calibration.png")
        atomic_write_text(run_dir / "calibration.md", markdown(report))
        for mode, m in report["modes"].items():
            h = m["heldout"]
            bound = f"{round_up(h['heldout_fpr_upper_95']):.3f}" if h["heldout_fpr_upper_95"] is not None else "n/a"
            info(f"{mode:<15} threshold {m['threshold']:.4f}  held-out: {h['false_positive_families']}/{h['families']} "
                 f"families positive, FPR <= {bound} (95% Clopper-Pearson); P(new null > threshold), averaged over "
                 f"calibrations, <= {round_up(m['exceed_probability_bound']):.3f}")
        floor = next(iter(report["modes"].values()))["exceed_probability_bound"]
        info(f"encoder-level p of a calibrated margin test: (1 + #calibration families at least as extreme) / "
             f"(m' + 1), at best {floor:.3g} with m' = {len(report['calibration_families'])}"
             + ("" if floor <= alpha * (1 + 1e-9) else f": it cannot reach alpha = {alpha:g} (that needs m' >= "
                f"{int(round(1 / alpha)) - 1}); margin verdicts report it, the permutation test decides"))
        seal_calibration(cfg.secret, sha256_file(out), out)
    return report


def _pretrain(c: PretrainConfig) -> Path:
    from dist_awenc.ssl.pretrain import pretrain

    return pretrain(c)


def _attacked(parent: Path, name: str, strength: float, pirate, cfg: CalibrateConfig, out: Path, i: int) -> Path:
    """An attacked copy of a null encoder (reused when already written)."""
    from dist_awenc.attacks.base import apply_attack
    from dist_awenc.attacks.stage import attacked_card
    from dist_awenc.encoders.io import save_encoder

    path = out / "encoder.safetensors"
    if path.exists():
        return path
    enc, card = load_encoder(parent)
    attacked, details = apply_attack(name, enc, card, strength, pirate.attack_data(cfg.probe.test_fraction, 2000 + i),
                                     progress=False)
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(attacked, out / "encoder", attacked_card(card, details, attacked))
    return path


def _other_secrets(cfg: CalibrateConfig, paths: dict[str, tuple[Path, str]], pop: Path) -> dict[str, Secret]:
    """Secrets generated on null encoders (round robin): they widen the picture, they are not evidence."""
    from dist_awenc.watermark.generate import watermark

    names, out = list(paths), {}
    for i in range(cfg.population.n_secrets - 1):
        on = names[i % len(names)]
        wcfg = WatermarkConfig(run=RunSection(name=f"secret_{i}", out_dir=str(pop), seed=5000 + i),
                               encoder=str(paths[on][0]), data=cfg.data, generation=cfg.generation,
                               plan=PlanSection(alternatives=0))
        out[f"secret_{i}_on_{on}"] = load_secret(reuse_or_run(wcfg, watermark, "secret.safetensors"))
    return out


def _null_encoder(name: str, path: Path, family: str, secrets: dict[str, Secret], ctx: dict) -> NullEncoder:
    """tau* per mode with every secret (cached in ``trials/<name>.json`` by encoder and secret hashes)."""
    path = resolve_encoder_path(path)  # a run folder names its encoder.safetensors (owner_encoder may be either)
    cache = ctx["cache"] / f"{name}.json"
    key = {"encoder_sha256": sha256_file(path), "secrets": {k: s.sha256 for k, s in secrets.items()},
           "n": ctx["n"], "alpha": ctx["alpha"]}
    label_classes = ctx.get("label_classes", [])
    if label_classes:
        key["label_classes"] = label_classes
    transform = load_card(path).get("query_transform")
    if transform:  # the same weights under another serving path are another trial
        key["query_transform"] = transform
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return NullEncoder(**saved["result"])
    cfg, pirate = ctx["cfg"], ctx["pirate"]
    encoder, card = load_encoder(path)
    # a query-side attack (query_*): the deployed downstream model applies the recorded transform; white-box
    # verification measures the weights alone, as for any suspect
    deployed = with_recorded_transform(encoder, card)
    downstream, _ = evaluate_encoder(deployed, pirate.images, pirate.labels, pirate.num_classes, seed=cfg.run.seed,
                                     **probe_options(cfg.probe))
    # the label-only modes again on the pirate's task regrouped into k classes: its own downstream model per k
    regrouped = {k: evaluate_encoder(deployed, pirate.images, *group_labels(pirate.labels, pirate.num_classes, k),
                                     seed=cfg.run.seed, **probe_options(cfg.probe))[0] for k in label_classes}
    trials = [(m, downstream) for m in MODES] + [(label_key(k, m), model) for m in LABEL_MODES
                                                 for k, model in regrouped.items()]
    stars: dict[str, dict[str, float]] = {}
    effects: dict[str, float] = {}
    kept: dict[str, Any] = {}
    for sname, secret in secrets.items():
        stars[sname] = {}
        for key_, model in trials:
            mode = test_mode(key_)
            samples = collect_samples(mode, encoder, model, secret, ctx["holdout"][: images_for(mode, ctx["n"][mode])])
            stars[sname][key_] = tau_star(key_, samples, ctx["alpha"])
            if sname == "owner":
                effects[key_] = mode_test(key_, samples, 0.0).effect
                kept[key_] = ([np.asarray(h).astype(int).tolist() for h in samples] if mode in LABEL_MODES
                              else np.asarray(samples, dtype=float).tolist())
    others = {m: max((stars[s][m] for s in stars if s != "owner"), default=None) for m, _ in trials}
    result = NullEncoder(name=name, family=family, tau_star=stars["owner"], tau_star_other_secrets=others, effect=effects,
                         samples=kept)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"key": key, "result": asdict(result)}, indent=2))
    return result
