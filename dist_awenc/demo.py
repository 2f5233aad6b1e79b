"""``awenc demo``: the whole method on scikit-learn's digits, on CPU, in minutes.

Pre-trains the owner's clean encoder f0 and an independent encoder (another
seed), generates the secret on f0, embeds it, trains the pirate's downstream
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

from dist_awenc.config import DemoConfig, EmbedConfig, PretrainConfig, RunSection, WatermarkConfig
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import atomic_write_text, load_encoder
from dist_awenc.engine.log import info
from dist_awenc.evaluate.downstream import evaluate_encoder, save_downstream
from dist_awenc.runs import reuse_or_run, run_dir_of
from dist_awenc.ssl.pretrain import encoder_from_config, pretrain
from dist_awenc.verify.core import MODES, Verdict, whitebox_scores
from dist_awenc.verify.run import verify_model
from dist_awenc.watermark.embed import embed
from dist_awenc.watermark.generate import watermark
from dist_awenc.watermark.secret import load_secret


def demo(cfg: DemoConfig) -> dict:
    t0 = time.time()
    root = run_dir_of(cfg)
    root.mkdir(parents=True, exist_ok=True)
    sub = lambda name, seed=cfg.run.seed: RunSection(name=name, out_dir=str(root), seed=seed)  # noqa: E731
    common = dict(data=cfg.data, views=cfg.views, encoder=cfg.encoder, ssl=cfg.ssl, optim=cfg.optim, train=cfg.pretrain)

    info("[1/6] pre-train the owner's clean encoder f0")
    f0_path = reuse_or_run(PretrainConfig(run=sub("f0"), **common), pretrain, "encoder.safetensors")
    info("[2/6] pre-train an independent encoder (another seed)")
    ind_path = reuse_or_run(PretrainConfig(run=sub("independent", cfg.run.seed + 1), **common), pretrain, "encoder.safetensors")
    info("[3/6] stage 1: generate the watermark on f0")
    secret_path = reuse_or_run(WatermarkConfig(run=sub("watermark"), encoder=str(f0_path), data=cfg.data,
                                                generation=cfg.generation), watermark, "secret.safetensors")
    info("[4/6] stage 2: embed it")
    wm_path = reuse_or_run(EmbedConfig(run=sub("embed"), encoder=str(f0_path), secret=str(secret_path), data=cfg.data,
                                        views=cfg.views, mild_views=cfg.mild_views, ssl=cfg.ssl, loss=cfg.loss,
                                        optim=cfg.embed_optim, train=cfg.embed), embed, "encoder.safetensors")

    info("[5/6] downstream: the pirate's linear head on each encoder")
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    splits = make_splits(len(dataset), cfg.data.split_seed)
    down_x, down_y = dataset.get_batch(splits["downstream"])
    holdout, _ = dataset.get_batch(splits["holdout"])
    torch.manual_seed(cfg.run.seed)
    random_encoder = encoder_from_config(cfg.encoder, cfg.data.image_size)[0]
    encoders = {"clean": load_encoder(f0_path), "watermarked": load_encoder(wm_path), "independent": load_encoder(ind_path)}
    utility: dict[str, dict] = {}
    models = {}
    for name, (enc, card) in encoders.items():
        model, metrics = evaluate_encoder(enc, down_x, down_y, dataset.num_classes, cfg.probe, cfg.run.seed)
        (root / f"downstream_{name}").mkdir(exist_ok=True)
        save_downstream(model, card, dataset.num_classes, root / f"downstream_{name}" / "model")
        utility[name], models[name] = metrics, model
    utility["random_init"] = evaluate_encoder(random_encoder, down_x, down_y, dataset.num_classes, cfg.probe, cfg.run.seed)[1]
    for name, m in utility.items():
        info(f"  {name:<12} linear probe {m['linear_probe']:.4f}   kNN {m['knn']:.4f}")

    info("[6/6] verify every encoder in every mode with the owner's secret")
    secret = load_secret(secret_path)
    verdicts: list[dict] = []
    scores: dict[str, Any] = {}
    for name in ("watermarked", "clean", "independent"):
        for mode in MODES:
            suspect = encoders[name][0] if mode == "whitebox" else models[name]
            v = verify_model(suspect, secret, holdout, cfg.verify, mode)
            verdicts.append({"model": name, **_row(v)})
            if mode == "whitebox":
                scores[name] = whitebox_scores(suspect, secret, holdout[: v.n])
    report = {"utility": {k: {"linear_probe": v["linear_probe"], "knn": v["knn"]} for k, v in utility.items()},
              "verification": verdicts, "secret_sha256": secret.sha256, "seconds": round(time.time() - t0, 1),
              "runs": {"f0": str(f0_path), "independent": str(ind_path), "secret": str(secret_path), "watermarked": str(wm_path)}}
    atomic_write_text(root / "report.json", json.dumps(report, indent=2))
    table = verdict_table(report)
    atomic_write_text(root / "report.md", table)
    plot_scores(scores, cfg.verify.tau_whitebox, root / "report.png")
    print("\n" + table)
    info(f"report -> {root / 'report.json'}, {root / 'report.md'}, {root / 'report.png'}  ({report['seconds']:.0f} s)")
    return report


def _row(v: Verdict) -> dict:
    return {"mode": v.mode, "p_value": v.p_value, "effect": v.effect, "n": v.n, "threshold": v.threshold,
            "alpha": v.alpha, "decision": v.decision, "queries": v.details.get("queries", v.n)}


def verdict_table(report: dict) -> str:
    u = report["utility"]
    lines = ["# dist_awenc demo report", "", f"secret `{report['secret_sha256'][:16]}…`, {report['seconds']:.0f} s", "",
             "## Utility (pirate's downstream task)", "", "| encoder | linear probe | kNN |", "|---|---|---|"]
    lines += [f"| {k} | {v['linear_probe']:.4f} | {v['knn']:.4f} |" for k, v in u.items()]
    lines += ["", "## Verification", "", "| model | mode | p-value | effect | margin | n | queries | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["verification"]:
        verdict = "**ownership evidence**" if r["decision"] else "no evidence"
        lines.append(f"| {r['model']} | {r['mode']} | {r['p_value']:.3g} | {r['effect']:+.4f} | {r['threshold']:g} | "
                     f"{r['n']} | {r['queries']} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot_scores(scores: dict, tau: float, path: Path) -> None:
    """Histogram of white-box scores s per encoder, with the margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(float(s.min()) for s in scores.values()), max(float(s.max()) for s in scores.values()), 60)
    for name, s in scores.items():
        ax.hist(s, bins=bins, alpha=0.6, label=f"{name} (mean {s.mean():+.3f})")
    ax.axvline(tau, color="k", ls="--", label=f"margin tau = {tau:g}")
    ax.set_xlabel("s = cos(f(x+δ), f(x_k)) − cos(f(x+r), f(x_k))")
    ax.set_ylabel("hold-out images")
    ax.set_title("White-box verification scores with the owner's secret")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
