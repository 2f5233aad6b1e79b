"""Stage: attack x strength x verification mode on one machine (``awenc robustness``).

The unit of work is one (attack, strength, seed) task that writes its own
result file (``tasks/<id>.json``, atomically); the SLURM sweep distributes the
same tasks. Tasks whose file exists are skipped, so an interrupted grid
resumes. Collection writes ``robustness.csv``, ``robustness.json`` (TPR per
mode among the derivatives that are thefts) and the plots.

A theft (:mod:`dist_awenc.evaluate.theft`) keeps at least half of f0's advantage
over a randomly initialised encoder of its own architecture, on the linear probe
and on kNN, and probes within 5 points of the unattacked watermarked encoder. So
each task also measures, once per seed (``baselines/``), f0 (the clean parent)
and a seeded random init of the derivative's architecture on the same split, and
its row carries those numbers; rows that are not thefts are listed as such.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from dist_awenc.attacks import ATTACK_STRENGTHS, ATTACKS, AttackOptions, apply_attack
from dist_awenc.attacks.stage import PirateData
from dist_awenc.config import DataSection, ProbeSection, RunSection, VerifySection
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.encoders.io import load_encoder
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
from dist_awenc.evaluate.theft import theft_decision
from dist_awenc.files import atomic_path, atomic_write_text, save_figure
from dist_awenc.log import info
from dist_awenc.runs import open_run
from dist_awenc.stages.calibrate import collect_samples
from dist_awenc.stages.theft import load_clean, theft_baselines
from dist_awenc.verify.calibration import load_calibration, mode_test, tau_star
from dist_awenc.verify.core import MODES, images_for
from dist_awenc.verify.permutation import BLACKBOX_PERMUTATION, verify_blackbox_permutation, verify_permutation
from dist_awenc.verify.resize import fed_at, plan_resize, resolution_reason, weights_at
from dist_awenc.verify.run import Settings, load_plan_alternatives, query_images, resolve_settings
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, load_secret


@dataclass
class GridSection:
    attacks: list[str] = field(default_factory=list)  # empty: every registered attack
    strengths: dict[str, list[float]] = field(default_factory=dict)  # per attack; default: its registered grid
    seeds: list[int] = field(default_factory=lambda: [0])
    utility_drop: float = 0.05  # a theft probes within this of the unattacked encoder (METHOD.md)
    advantage_kept: float = 0.5  # ... and keeps this share of f0's advantage over random init, probe and kNN

    def __post_init__(self) -> None:
        if not 0 <= self.advantage_kept <= 1:
            raise ConfigError(f"grid.advantage_kept must be in [0, 1] (the share of f0's advantage over a random "
                              f"encoder a theft keeps), got {self.advantage_kept}")


@dataclass
class RobustnessConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="robustness"))
    encoder: str = ""  # the watermarked encoder
    secret: str = ""
    # f0, the clean parent the theft rule measures against (file or run folder); "": the encoder's card's (its
    # embedding config's encoder, checked against the card's parent hash), or the encoder itself if it has none
    clean: str = ""
    data: DataSection = field(default_factory=DataSection)
    grid: GridSection = field(default_factory=GridSection)
    options: AttackOptions = field(default_factory=AttackOptions)
    probe: ProbeSection = field(default_factory=ProbeSection)
    verify: VerifySection = field(default_factory=VerifySection)


@dataclass(frozen=True)
class Task:
    attack: str  # "none" is the unattacked watermarked encoder
    strength: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.attack}__{self.strength:g}__s{self.seed}"


def expand_grid(grid: GridSection) -> list[Task]:
    """Every (attack, strength, seed) of the grid, preceded by the unattacked baseline per seed."""
    names = list(grid.attacks) or sorted(ATTACKS)
    unknown = [n for n in [*names, *grid.strengths] if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack '{unknown[0]}'; valid: {', '.join(sorted(ATTACKS))}")
    tasks = [Task("none", 0.0, s) for s in grid.seeds]
    for name in names:
        for strength in grid.strengths.get(name, ATTACK_STRENGTHS[name]):
            tasks += [Task(name, float(strength), s) for s in grid.seeds]
    return tasks


@dataclass
class Context:
    """What every task of one grid shares: loaded once per process."""

    encoder: torch.nn.Module
    card: dict
    secret: Secret
    holdout: torch.Tensor
    pirate: PirateData
    options: AttackOptions
    probe: ProbeSection
    verify: VerifySection
    settings: dict[str, Settings] = field(default_factory=dict)  # per mode: n, alpha, margin (plan + calibration)
    alternatives: Optional[AlternativeSecrets] = None  # the plan's J alternatives: the permutation test per task
    clean: Optional[torch.nn.Module] = None  # f0, the theft rule's reference (None: the encoder itself)

    @classmethod
    def load(cls, encoder: str, secret: str, data: DataSection, options: AttackOptions, probe: ProbeSection,
             verify: VerifySection, clean: str = "") -> "Context":
        enc, card = load_encoder(encoder)
        f0 = load_clean(card, clean)
        sec = load_secret(secret)
        if card["input_size"] != sec.image_size:
            raise ArtifactError(f"encoder takes {card['input_size']} px but the secret is {sec.image_size} px")
        dataset = build_dataset(data.name, root=data.root, image_size=sec.image_size, seed=data.split_seed, size=data.size)
        splits = splits_for(len(dataset), data.split_seed, data.splits, "robustness", "holdout")
        settings = {m: resolve_settings(verify, sec, m, dataset=data.name, dataset_size=len(dataset),
                                        split_seed=data.split_seed, holdout_indices=splits["holdout"]) for m in MODES}
        # only the hold-out images some mode's budget pays for are decoded (every mode takes a prefix)
        holdout, _ = dataset.get_batch(splits["holdout"][: max(images_for(m, s.n) for m, s in settings.items())])
        return cls(enc, card, sec, holdout, PirateData.load(data, sec.image_size), options, probe, verify, settings,
                   load_plan_alternatives(secret, sec), f0)


def run_task(ctx: Context, task: Task, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Attack, measure the pirate's accuracy, verify in every mode; write ``tasks/<id>.json``."""
    path = out_dir / "tasks" / f"{task.id}.json"
    if path.exists():
        return json.loads(path.read_text())
    if task.attack == "none":
        attacked, details = ctx.encoder, {"attack": "none", "strength": 0.0, "seconds": 0.0}
    else:
        attacked, details = apply_attack(task.attack, ctx.encoder, ctx.card, task.strength,
                                         ctx.pirate.attack_data(ctx.probe.test_fraction, task.seed), ctx.options, progress=progress)
    # a derivative at another input resolution (finetune_resolution) is fed the S px images resized to its own
    # size, as the pirate's pipeline and the verifier (plan.resize) do; its margin tests then draw no decision
    size, secret_size = getattr(attacked, "input_size", ctx.secret.image_size), ctx.secret.image_size
    method = plan_resize(ctx.secret.plan)[0]
    # ... while the white-box tests read its weights at the secret's size where they take it (verify.resize.weights_at)
    weights, whitebox_px = weights_at(attacked, size, secret_size, method)
    attacked = fed_at(attacked, size, secret_size, method)
    model, metrics = evaluate_encoder(attacked, ctx.pirate.images, ctx.pirate.labels, ctx.pirate.num_classes,
                                      seed=task.seed, **probe_options(ctx.probe))
    row: dict[str, Any] = {**asdict(task), "linear_probe": metrics["linear_probe"], "knn": metrics["knn"],
                           "attack_seconds": details["seconds"],
                           "rel_weight_change": details.get("rel_weight_change", float("nan"))}
    arch, kwargs = details.get("arch", ctx.card["arch"]), details.get("arch_kwargs", ctx.card["arch_kwargs"])
    row["arch"], row["arch_kwargs"] = arch, json.dumps(kwargs, sort_keys=True)
    f0 = ctx.clean if ctx.clean is not None else ctx.encoder
    row.update(theft_baselines(f0, ctx.card, ctx.pirate, ctx.probe, out_dir / "baselines", arch, kwargs, task.seed))
    # a query-side attack changes what the deployed model sees, not the weights the owner inspects
    weights_only = ctx.encoder if details.get("query_transform") else weights
    row["secret_sha256"] = ctx.secret.sha256
    row["input_size"], row["whitebox_px"] = size, whitebox_px
    row["margin_no_decision"] = resolution_reason(secret_size, size) if size != secret_size else ""
    for mode in MODES:
        s = ctx.settings[mode]
        samples = collect_samples(mode, weights_only if mode == "whitebox" else attacked, model, ctx.secret,
                                  query_images(ctx.holdout, s.n, mode))
        result = mode_test(mode, samples, s.tau)
        row[f"p_{mode}"] = result.p_value
        row[f"effect_{mode}"] = result.effect
        # image-level, at the margin: a measurement (none at another resolution, as in `awenc verify`)
        row[f"decision_{mode}"] = bool(result.p_value <= s.alpha) and not row["margin_no_decision"]
        row[f"tau_star_{mode}"] = tau_star(mode, samples, s.alpha)
        row[f"n_{mode}"], row[f"alpha_{mode}"] = s.n, s.alpha
    if ctx.alternatives is not None and len(ctx.alternatives):  # margin-free: ranks the owner among J secrets
        s = ctx.settings["whitebox"]
        v = verify_permutation(weights_only, ctx.secret, ctx.alternatives, query_images(ctx.holdout, s.n, "whitebox"))
        row["p_permutation"], row["permutation_at_limit"] = v.p_value, v.details["at_resolution_limit"]
        row["permutation_alternatives"] = v.details["alternatives"]
        for mode in BLACKBOX_PERMUTATION:  # the pirate's product, asked for probabilities or labels
            predict = model.predict_proba if mode == "blackbox_score" else (lambda b: model(b).argmax(1))
            v = verify_blackbox_permutation(mode, predict, ctx.secret, ctx.alternatives,
                                            query_images(ctx.holdout, ctx.settings[mode].n, mode))
            row[f"p_permutation_{mode}"] = v.p_value
            row[f"permutation_at_limit_{mode}"] = v.details["at_resolution_limit"]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(row, indent=2))
    return row


def collect(out_dir: Path, utility_drop: float, null_path: Optional[str] = None,
            advantage_kept: float = 0.5) -> dict[str, Any]:
    """Gather every task file into ``robustness.csv``; which rows are thefts; TPR per mode over the thefts; plots.

    ``keeps_utility`` (probe within ``utility_drop`` of the unattacked encoder, the rule before #27) stays in the
    table for comparison; ``theft`` is the rule every count uses.
    """
    rows = [json.loads(p.read_text()) for p in sorted((out_dir / "tasks").glob("*.json"))]
    if not rows:
        raise ConfigError(f"no task results under {out_dir / 'tasks'}")
    old = [r for r in rows if "random_linear_probe" not in r]
    if old:
        first = Task(old[0]["attack"], old[0]["strength"], old[0]["seed"]).id
        raise ConfigError(f"{out_dir / 'tasks'}: {len(old)} task file(s) (first {first}.json) were written before the "
                          "theft rule and lack f0's and a random init's accuracies; delete them and run the grid "
                          "again to remeasure those tasks")
    base = {r["seed"]: r["linear_probe"] for r in rows if r["attack"] == "none"}
    for r in rows:
        ref = base.get(r["seed"], float("nan"))
        r["accuracy_change"] = r["linear_probe"] - ref
        r["keeps_utility"] = bool(r["accuracy_change"] >= -utility_drop)
        r.update(theft_decision(linear_probe=r["linear_probe"], knn=r["knn"], unattacked_linear_probe=ref,
                                f0_linear_probe=r["f0_linear_probe"], f0_knn=r["f0_knn"],
                                random_linear_probe=r["random_linear_probe"], random_knn=r["random_knn"],
                                share=advantage_kept, utility_drop=utility_drop))
    thresholds = _calibrated_thresholds(null_path, rows) if null_path else {}
    for r in rows:  # the calibration's rule: detected when tau* (the largest margin still at p <= alpha) clears T
        for mode, t in thresholds.items():
            r[f"calibrated_{mode}"] = bool(r[f"tau_star_{mode}"] > t) and not r.get("margin_no_decision")
    rows.sort(key=lambda r: (r["attack"] != "none", r["attack"], r["strength"], r["seed"]))
    write_csv(out_dir / "robustness.csv", rows)
    thefts = [r for r in rows if r["theft"]]
    summary: dict[str, Any] = {"tasks": len(rows), "thefts": len(thefts), "advantage_kept": advantage_kept,
                               "utility_drop": utility_drop,
                               "utility_preserving": sum(r["keeps_utility"] for r in rows),  # the rule before #27
                               "not_thefts": [_not_theft(r) for r in rows if not r["theft"]],
                               "thresholds": thresholds or "margins of the verify section", "modes": {}}
    for mode in MODES:
        key = f"calibrated_{mode}" if thresholds else f"decision_{mode}"
        hits = sum(r[key] for r in thefts)
        missed = [f"{r['attack']}@{r['strength']:g}" for r in thefts if not r[key]]
        summary["modes"][mode] = {"tpr": hits / len(thefts) if thefts else float("nan"), "detected": hits,
                                  "of": len(thefts), "missed": missed}
    perm = [r for r in thefts if "p_permutation" in r]
    if perm:  # per access, the thefts "at the resolution limit": the owner's secret ranked first among the J + 1
        J = int(perm[0]["permutation_alternatives"])
        summary["permutation"] = {"alternatives": J, "resolution": 1 / (J + 1)}
        for access, suffix in PERMUTATION_ACCESS.items():
            column = f"permutation_at_limit{suffix}"
            rs = [r for r in perm if column in r]
            if rs:
                summary["permutation"][access] = {
                    "at_limit": sum(bool(r[column]) for r in rs), "of": len(rs),
                    "missed": [f"{r['attack']}@{r['strength']:g}" for r in rs if not r[column]]}
    null = _null_tau_stars(null_path)
    plot_grid(rows, out_dir / "robustness.png")
    if null:
        summary["roc_auc"] = plot_roc(thefts, null, out_dir / "roc.png")
    atomic_write_text(out_dir / "robustness.json", json.dumps(summary, indent=2))
    return summary


def _not_theft(r: dict) -> dict[str, Any]:
    """A row that is not a theft, with the numbers it was decided on."""
    keys = ("seed", "linear_probe", "knn", "accuracy_change", "probe_advantage_kept", "knn_advantage_kept",
            "f0_linear_probe", "f0_knn", "random_linear_probe", "random_knn")
    return {"derivative": f"{r['attack']}@{r['strength']:g}", **{k: r[k] for k in keys},
            "because": r["not_theft_because"]}


def robustness(cfg: RobustnessConfig) -> dict[str, Any]:
    tasks = expand_grid(cfg.grid)
    ctx = Context.load(cfg.encoder, cfg.secret, cfg.data, cfg.options, cfg.probe, cfg.verify, cfg.clean)
    with open_run(cfg, "robustness", allow_complete=True) as run_dir:
        info(f"robustness grid: {len(tasks)} tasks -> {run_dir / 'tasks'}")
        for task in tqdm(tasks, desc="robustness", dynamic_ncols=True):
            run_task(ctx, task, run_dir)
        summary = collect(run_dir, cfg.grid.utility_drop, cfg.verify.calibration, cfg.grid.advantage_kept)
        for mode, m in summary["modes"].items():
            info(f"{mode:<15} TPR {m['tpr']:.3f} ({m['detected']}/{m['of']} thefts)"
                 + (f"; missed: {', '.join(m['missed'])}" if m["missed"] else ""))
        if "permutation" in summary:
            m = summary["permutation"]
            info(f"permutation tests at their resolution limit (p = {m['resolution']:.3g}, J = {m['alternatives']}):")
            for access in PERMUTATION_ACCESS:
                if access in m:
                    b = m[access]
                    info(f"  {access:<13} {b['at_limit']}/{b['of']} thefts"
                         + (f"; not: {', '.join(b['missed'])}" if b["missed"] else ""))
        for r in summary["not_thefts"]:
            info(f"not a theft: {r['derivative']} seed {r['seed']}: probe {r['linear_probe']:.4f} (f0 "
                 f"{r['f0_linear_probe']:.4f}, random init {r['random_linear_probe']:.4f}), kNN {r['knn']:.4f} "
                 f"(f0 {r['f0_knn']:.4f}, random init {r['random_knn']:.4f}), probe change "
                 f"{100 * r['accuracy_change']:+.1f} points: {r['because']}")
    return summary


# ------------------------------------------------------------------ outputs


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows (dicts; columns in first-seen order) as CSV, written atomically."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _calibrated_thresholds(path: str, rows: list[dict]) -> dict[str, float]:
    """A calibration's thresholds, refused when the task results were measured under other conditions."""
    cal = load_calibration(path)
    c = cal.conditions
    for r in rows:
        bad = [k for k, ok in (("secret", r.get("secret_sha256") == c["secret_sha256"]),
                               *((f"n for {m}", r.get(f"n_{m}") == c["n"].get(m)) for m in MODES),
                               *((f"alpha for {m}", r.get(f"alpha_{m}") == c["alpha"]) for m in MODES)) if not ok]
        if bad:
            raise ConfigError(f"calibration {cal.path} was made under other conditions than task "
                              f"{r['attack']}@{r['strength']:g}: {', '.join(bad)} differ; calibrate again")
    # label mode: the grid's pirate task has the dataset's own classes, whose threshold is the mode's own entry
    # (the blackbox_label@k entries are for tasks regrouped into k classes)
    return {m: cal.thresholds[m] for m in MODES if m in cal.thresholds}


def _null_tau_stars(path: Optional[str]) -> dict[str, list[float]]:
    """The null encoders' tau* with the owner's secret, per mode (the ROC's negatives)."""
    if not path:
        return {}
    data = load_calibration(path).data
    return {mode: [t["tau_star"] for t in m["null"]] for mode, m in data["modes"].items() if mode in MODES}


# per access a verifier can have, the suffix of its permutation test's columns in a row: `p_permutation<suffix>`
# (the encoder-level p: what decides) and `permutation_at_limit<suffix>` (the owner's secret ranked first)
PERMUTATION_ACCESS = {"weights": "", "probabilities": "_blackbox_score", "labels": "_blackbox_label"}


def plot_grid(rows: list[dict], path: Path) -> None:
    """Per attack: -log10 p and the pirate's accuracy, against strength. With the plan's alternatives the p plotted is
    the permutation tests' encoder-level p per access (what decides; the margin tests' image-level p stay in the CSV),
    else the margin tests' image-level p per mode; the dotted line is alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({r["attack"] for r in rows if r["attack"] != "none"})
    ncol = min(6, max(1, len(attacks)))
    nrow = math.ceil(max(1, len(attacks)) / ncol)
    fig, axes = plt.subplots(2 * nrow, ncol, figsize=(2.8 * ncol, 4.4 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for j, name in enumerate(attacks):
        top, bottom = axes[2 * (j // ncol), j % ncol], axes[2 * (j // ncol) + 1, j % ncol]
        top.set_visible(True)
        bottom.set_visible(True)
        rs = sorted((r for r in rows if r["attack"] == name), key=lambda r: r["strength"])
        x = [r["strength"] for r in rs]
        perm = {a: f"p_permutation{x}" for a, x in PERMUTATION_ACCESS.items() if all(f"p_permutation{x}" in r for r in rs)}
        series = ({f"{a} (permutation)": c for a, c in perm.items()} if perm
                  else {f"{mode} (image-level)": f"p_{mode}" for mode in MODES})
        for (label, c), (marker, ms) in zip(series.items(), [("o", 7), ("s", 5), ("^", 3), ("v", 3)]):
            top.plot(x, [-math.log10(max(r[c], 1e-300)) for r in rs], marker=marker, ms=ms, label=label)
        top.axhline(-math.log10(rs[0]["alpha_whitebox"]), color="k", ls=":", lw=0.8)
        if perm:  # from p = 1 to the floor 1/(J+1), so that equal p-values overlap visibly (the markers nest)
            top.set_ylim(-0.05, 1.1 * math.log10(rs[0]["permutation_alternatives"] + 1))
        top.set_title(name, fontsize=9)
        bottom.plot(x, [r["linear_probe"] for r in rs], "o-", ms=3, color="tab:green")
        bottom.set_xlabel("strength", fontsize=8)
        if j % ncol == 0:
            top.set_ylabel("-log10 p (dotted: alpha)", fontsize=8)
            bottom.set_ylabel("pirate's linear probe", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    save_figure(fig, path)


def plot_roc(thefts: list[dict], null: dict[str, list[float]], path: Path) -> dict[str, float]:
    """ROC of the thefts among the watermarked derivatives against the null population, scored by tau*; AUCs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4))
    aucs = {}
    for mode in MODES:
        pos = [r[f"tau_star_{mode}"] for r in thefts]
        neg = null.get(mode, [])
        if not pos or not neg:
            continue
        y = [1] * len(pos) + [0] * len(neg)
        fpr, tpr, _ = roc_curve(y, pos + neg)
        aucs[mode] = float(roc_auc_score(y, pos + neg))
        ax.plot(fpr, tpr, label=f"{mode} (AUC {aucs[mode]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false-positive rate (null population)")
    ax.set_ylabel("true-positive rate (derivatives)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return aucs
