"""``awenc demo``: the whole method on scikit-learn's digits, on CPU, in minutes.

Pre-trains the owner's clean encoder f0 and an independent encoder (another
seed), generates the secret on f0, embeds it (plain AWEncoder by default; ``robust`` transforms in both stages
and stage 2's ``shadow`` student when set: docs/robustness.md), trains the pirate's downstream
heads, verifies all three encoders in every mode, and writes ``report.json``,
``report.md`` and ``report.png``. Each step is a stage run in its own folder
under ``runs/<name>/``; a complete stage with the same config is reused when
the demo runs again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from dist_awenc.config import (DemoConfig, EmbedConfig, PretrainConfig, RobustSection, RunSection, ShadowSection,
                               WatermarkConfig)
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.encoders.io import atomic_write_text, load_encoder
from dist_awenc.files import save_figure
from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options, save_downstream
from dist_awenc.log import info
from dist_awenc.runs import reuse_or_run, run_dir_of
from dist_awenc.ssl.pretrain import encoder_from_config, pretrain
from dist_awenc.verify.core import MODES, Verdict, overall_verdict, whitebox_scores
from dist_awenc.verify.run import load_plan_alternatives, resolve_settings, verify_model
from dist_awenc.watermark.embed import embed
from dist_awenc.watermark.generate import watermark
from dist_awenc.watermark.secret import load_secret


def demo(cfg: DemoConfig) -> dict:
    t0 = time.time()
    root = run_dir_of(cfg)
    root.mkdir(parents=True, exist_ok=True)
    sub = lambda name, seed=cfg.run.seed: RunSection(name=name, out_dir=str(root), seed=seed)  # noqa: E731
    common = dict(data=cfg.data, views=cfg.views, encoder=cfg.encoder, ssl=cfg.ssl, optim=cfg.optim, train=cfg.pretrain)
    robust, shadow = recipe_sections(cfg)

    info("[1/6] pre-train the owner's clean encoder f0")
    f0_path = reuse_or_run(PretrainConfig(run=sub("f0"), **common), pretrain, "encoder.safetensors")
    info("[2/6] pre-train an independent encoder (another seed)")
    ind_path = reuse_or_run(PretrainConfig(run=sub("independent", cfg.run.seed + 1), **common), pretrain, "encoder.safetensors")
    info("[3/6] stage 1: generate the watermark on f0")
    secret_path = reuse_or_run(WatermarkConfig(run=sub("watermark"), encoder=str(f0_path), data=cfg.data,
                                                generation=cfg.generation, plan=cfg.plan, robust=robust), watermark,
                                 "secret.safetensors")
    info("[4/6] stage 2: embed it")
    wm_path = reuse_or_run(EmbedConfig(run=sub("embed"), encoder=str(f0_path), secret=str(secret_path), data=cfg.data,
                                        views=cfg.views, mild_views=cfg.mild_views, ssl=cfg.ssl, loss=cfg.loss,
                                        optim=cfg.embed_optim, train=cfg.embed, robust=robust, shadow=shadow,
                                        specific=cfg.specific),
                           embed, "encoder.safetensors")

    info("[5/6] downstream: the pirate's linear head on each encoder")
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    splits = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "the demo", "pretrain", "holdout", "downstream")
    down_x, down_y = dataset.get_batch(splits["downstream"])
    holdout, _ = dataset.get_batch(splits["holdout"])
    torch.manual_seed(cfg.run.seed)
    random_encoder = encoder_from_config(cfg.encoder, cfg.data.image_size)[0]
    encoders = {"clean": load_encoder(f0_path), "watermarked": load_encoder(wm_path), "independent": load_encoder(ind_path)}
    probe = probe_options(cfg.probe)
    utility: dict[str, dict] = {}
    models = {}
    for name, (enc, card) in encoders.items():
        model, metrics = evaluate_encoder(enc, down_x, down_y, dataset.num_classes, seed=cfg.run.seed, **probe)
        (root / f"downstream_{name}").mkdir(exist_ok=True)
        save_downstream(model, card, dataset.num_classes, root / f"downstream_{name}" / "model")
        utility[name], models[name] = metrics, model
    utility["random_init"] = evaluate_encoder(random_encoder, down_x, down_y, dataset.num_classes, seed=cfg.run.seed, **probe)[1]
    for name, m in utility.items():
        info(f"  {name:<12} linear probe {m['linear_probe']:.4f}   kNN {m['knn']:.4f}")

    info("[6/6] verify every encoder in every mode with the owner's secret (and its plan)")
    secret = load_secret(secret_path)
    alternatives = load_plan_alternatives(str(secret_path), secret)
    settings = {m: resolve_settings(cfg.verify, secret, m, dataset=cfg.data.name, dataset_size=len(dataset),
                                    split_seed=cfg.data.split_seed, holdout_indices=splits["holdout"]) for m in MODES}
    verdicts: list[dict] = []
    overall: dict[str, dict] = {}
    scores: dict[str, Any] = {}
    for name in ("watermarked", "clean", "independent"):
        by_access: dict[str, list[Verdict]] = {}
        for mode in MODES:
            suspect = encoders[name][0] if mode == "whitebox" else models[name]
            by_access.setdefault(ACCESS[mode], []).extend(
                verify_model(suspect, secret, holdout, settings[mode], mode, alternatives))
            if mode == "whitebox":
                scores[name] = whitebox_scores(suspect, secret, holdout[: settings[mode].n])
        # one decision per access a verifier could have (each its own verification): Holm over that access's tests
        overall[name] = {a: overall_verdict(vs, settings["whitebox"].alpha) for a, vs in by_access.items()}
        verdicts += [{"model": name, "access": a, **_row(v)} for a, vs in by_access.items() for v in vs]
    report = {"utility": {k: {"linear_probe": v["linear_probe"], "knn": v["knn"]} for k, v in utility.items()},
              "verification": verdicts, "overall": overall, "alpha": settings["whitebox"].alpha,
              "plan": secret.plan, "downstream_test_images": utility["clean"].get("n_test"),
              "secret_sha256": secret.sha256, "seconds": round(time.time() - t0, 1),
              "runs": {"f0": str(f0_path), "independent": str(ind_path), "secret": str(secret_path), "watermarked": str(wm_path)}}
    atomic_write_text(root / "report.json", json.dumps(report, indent=2))
    table = verdict_table(report)
    atomic_write_text(root / "report.md", table)
    plot_scores(scores, settings["whitebox"].tau, "calibrated" if settings["whitebox"].calibration_sha256 else "demo default",
                root / "report.png")
    print("\n" + table)
    info(f"report -> {root / 'report.json'}, {root / 'report.md'}, {root / 'report.png'}  ({report['seconds']:.0f} s)")
    return report


def recipe_sections(cfg: DemoConfig) -> tuple[RobustSection, ShadowSection]:
    """The ``robust`` and ``shadow`` sections the demo's stages get: the demo's own, except that one switched off
    (no transforms; shadow weight 0) is the stages' default section, so ``robust.transforms=[] shadow.weight=0``
    configures stage 1 and stage 2 exactly as plain AWEncoder's stages (the other fields of an off section compute
    nothing), and a plain run folder of the same settings is reused rather than refused for an unused field."""
    return (cfg.robust if cfg.robust.transforms else RobustSection(),
            cfg.shadow if cfg.shadow.weight > 0 else ShadowSection())


# the access a verifier has decides which tests are one verification: weights (the encoder), the downstream model's
# probabilities, or its top-1 labels only
ACCESS = {"whitebox": "weights", "blackbox_score": "probabilities", "blackbox_label": "labels",
          "blackbox_collapse": "labels"}


def _row(v: Verdict) -> dict:
    return {"mode": v.mode, "p_value": v.p_value, "p_floor": v.p_floor, "p_source": v.p_source, "image_p": v.image_p,
            "effect": v.effect, "n": v.n, "threshold": v.threshold, "threshold_source": v.threshold_source,
            "calibration_sha256": v.calibration_sha256, "heldout_fpr_upper_95": v.heldout_fpr_upper_95,
            "alpha": v.alpha, "decision": v.decision, "queries": v.details.get("queries", v.n),
            "alternatives": v.details.get("alternatives"), "resolution": v.details.get("resolution"),
            "owner_z": v.details.get("owner_z"), "exploratory": v.exploratory, "no_decision": v.no_decision,
            "secondary": {k: v.details[k] for k in ("wilcoxon_p", "t_test_p", "tango_asymptotic_p") if k in v.details}}


EXPLANATION = """**What a verdict claims.** Each model is tested against one null hypothesis: *this model was not
derived from the owner's encoder*. Two kinds of number appear, and only one decides:

- **encoder-level p**: the probability that an encoder NOT derived from the owner's would score at least
  this. Only it decides, at p <= alpha = {alpha:g}, with Holm's correction across a model's tests. Its
  smallest possible value is fixed before any suspect is seen: 1/(J + 1) for the permutation test,
  1/(m' + 1) for a margin calibrated on m' null families. A test whose smallest p exceeds alpha cannot
  decide and says so.
- **image-level p**: the margin tests' sign test (or Tango's test) of the effect against the margin tau,
  over this one model's query images: how strong the effect is on this model. It is not a
  false-positive rate: a universal adversarial perturbation partly transfers to encoders that never
  saw it, and whether an innocent encoder crosses tau is the calibration's question, not this test's.

- **whitebox_permutation**, **blackbox_score_permutation**, **blackbox_label_permutation** (exact, no
  margin): the owner's statistic ranked among J = {J} alternative secrets made on the same f0 by the same
  procedure and never embedded; p = (1 + #alternatives at least as high) / (J + 1) is exact under the null.
  The black-box ones cost queries: each alternative needs its own marked queries. The demo uses alpha = {alpha:g} because J = {J} gives a
  smallest p of {res:.3g}: deciding at alpha = 1e-3 needs J >= {need_1e3} (and {need} here).
- **margin tests** (whitebox, blackbox_score, blackbox_label, blackbox_collapse) use the margin
  **{tau_src}**; uncalibrated, they have no encoder-level p and decide nothing. `awenc calibrate` gives
  them one, with the held-out families' false-positive bound beside it.
- "No evidence" does not prove independence: a removal attack can weaken the mark below what a test sees.
- The **clean** model is the owner's own f0 before embedding: never watermarked, and not under the null
  either (it is the owner's encoder). The permutation tests rank it like any encoder, so on about 1 draw in
  J + 1 it comes first; what the null, and alpha, are about is the **independent** encoder.
- Each permutation test's size was measured on encoders trained independently of f0, each with a
  pirate's head, over 40 secret sets: they ranked the owner's secret first on about 1 set in J + 1, as
  the p states (results/null_ranks/README.md).
"""


def verdict_table(report: dict) -> str:
    u = report["utility"]
    alpha = report["alpha"]
    perm = next((r for r in report["verification"] if r["alternatives"]), None)
    wb = next(r for r in report["verification"] if r["mode"] == "whitebox")
    lines = ["# dist_awenc demo report", "",
             f"secret `{report['secret_sha256'][:16]}…`, alpha = {alpha:g} (an encoder-level p <= alpha counts as "
             f"evidence), {report['seconds']:.0f} s", "",
             "## Utility (pirate's downstream task)", "",
             f"Test set: {report.get('downstream_test_images')} images (one image = "
             f"{100 / max(1, report.get('downstream_test_images') or 1):.2f} points).", "",
             "| encoder | linear probe | kNN |", "|---|---|---|"]
    lines += [f"| {k} | {v['linear_probe']:.4f} | {v['knn']:.4f} |" for k, v in u.items()]
    lines += ["", "## Verification", "",
              "| model | test | encoder-level p (smallest possible) | image-level p | effect | margin (source) | n | "
              "queries | decides? |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["verification"]:
        if r["p_value"] is None:
            enc, decides = "none (uncalibrated)", "no: no encoder-level p"
        else:
            enc = f"{r['p_value']:.3g} ({r['p_floor']:.3g})"
            decides = ("**ownership evidence**" if r["decision"] else "no evidence") if r["p_floor"] <= alpha * (1 + 1e-9) \
                else f"no: cannot reach {alpha:g}"
        image = f"{r['image_p']:.3g}" if r["image_p"] is not None else "-"
        if r["threshold"] is None:
            margin = f"none (J = {r['alternatives']})"
        else:
            margin = f"{r['threshold']:.4g} ({'calibrated' if r['calibration_sha256'] else 'demo default'})"
        lines.append(f"| {r['model']} | {r['mode']} | {enc} | {image} | {r['effect']:+.4f} | {margin} | "
                     f"{r['n']} | {r['queries']} | {decides} |")
    accesses = list(next(iter(report["overall"].values())))
    lines += ["", f"Verdicts, one per access a verifier could have (Holm at alpha = {alpha:g} over that access's tests "
              "that can reach it):", "", "| model | " + " | ".join(accesses) + " |", "|---|" + "---|" * len(accesses)]
    lines += [f"| {k} | " + " | ".join(f"{'**ownership evidence**' if o[a]['decision'] else 'no evidence'} "
                                       f"({', '.join(o[a]['family']) or 'no test can reach alpha'})" for a in accesses)
              + " |" for k, o in report["overall"].items()]
    j = perm["alternatives"] if perm else 0
    lines += ["", EXPLANATION.format(alpha=alpha, J=j, res=1 / (j + 1), need=max(0, round(1 / alpha) - 1),
                                     need_1e3=999, tau_src=wb["threshold_source"])]
    return "\n".join(lines) + "\n"


def plot_scores(scores: dict, tau: float, tau_source: str, path: Path) -> None:
    """Histogram of white-box scores s per encoder, with the margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(float(s.min()) for s in scores.values()), max(float(s.max()) for s in scores.values()), 60)
    for name, s in scores.items():
        ax.hist(s, bins=bins, alpha=0.6, label=f"{name} (mean {s.mean():+.3f})")
    ax.axvline(tau, color="k", ls="--", label=f"margin tau = {tau:.3g} ({tau_source})")
    ax.set_xlabel("s = cos(f(x+δ), f(x_k)) − cos(f(x+r), f(x_k))")
    ax.set_ylabel("hold-out images")
    ax.set_title("White-box verification scores with the owner's secret")
    ax.legend()
    save_figure(fig, path, dpi=120)
