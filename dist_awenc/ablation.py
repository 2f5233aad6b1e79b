"""Stage: compare watermark variants on the same grid, seeds and null population (``awenc ablation``).

Each variant is one finished ``awenc robustness`` run (its watermarked encoder
attacked by the same grid, verified at the thresholds of a calibration made
for that variant's secret on the same null population) plus the run folders of
the stages that made it (stage 1, stage 2), whose ``status.json`` give its cost.
The clean f0 is probed here with the same probe settings, so utility is read
against it. Writes ``ablation.json``, ``ablation.md`` and ``ablation.png``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from dist_awenc.config import AblationConfig, VariantSection, load_config
from dist_awenc.engine.log import info
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.files import atomic_write_text, read_json, save_figure
from dist_awenc.runs import open_run
from dist_awenc.verify.core import MODES


def _seconds(folder: str) -> float:
    status = read_json(Path(folder) / "status.json", ArtifactError, what="run status")
    if status.get("state") != "complete":
        raise ArtifactError(f"{folder}: run is not complete (state {status.get('state')!r})")
    return float(status.get("seconds") or 0.0)


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "robustness.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _calibration(folder: Path) -> dict[str, Any]:
    from dist_awenc.robustness import RobustnessConfig
    from dist_awenc.verify.calibration import load_calibration

    cfg = load_config(RobustnessConfig, folder / "config.yaml")
    if not cfg.verify.calibration:
        raise ConfigError(f"{folder}: robustness run without verify.calibration; the ablation compares calibrated "
                          "decisions only")
    data = load_calibration(cfg.verify.calibration).data
    return {m: {"threshold": d["threshold"], "heldout_positive": d["heldout"]["false_positive_families"],
                "heldout_families": d["heldout"]["families"], "fpr_upper_95": d["heldout"]["heldout_fpr_upper_95"]}
            for m, d in data["modes"].items()}


def summarise_variant(name: str, v: VariantSection, clean: dict[str, float], pretrain_s: float) -> dict[str, Any]:
    folder = Path(v.robustness)
    summary = read_json(folder / "robustness.json", ArtifactError, what="robustness summary")
    if isinstance(summary.get("thresholds"), str):
        raise ConfigError(f"variant {name}: {folder} was collected without a calibration")
    rows = _rows(folder)
    base = [r for r in rows if r["attack"] == "none"]
    probe = sum(float(r["linear_probe"]) for r in base) / len(base)
    knn = sum(float(r["knn"]) for r in base) / len(base)
    cost = sum(_seconds(s) for s in v.stages)
    modes = {m: summary["modes"][m] for m in MODES if m in summary["modes"]}  # collapse mode: runs since it exists
    return {"variant": name, "linear_probe": probe, "knn": knn, "probe_change": probe - clean["linear_probe"],
            "knn_change": knn - clean["knn"], "tpr": {m: s["tpr"] for m, s in modes.items()},
            "detected": {m: f"{s['detected']}/{s['of']}" for m, s in modes.items()},
            "missed": {m: s["missed"] for m, s in modes.items()},
            "best_blackbox_tpr": max(s["tpr"] for m, s in modes.items() if m != "whitebox"),
            "seconds": cost, "cost_fraction_of_pretraining": cost / pretrain_s if pretrain_s else None,
            "calibration": _calibration(folder), "robustness": str(folder)}


def _modes(report: dict[str, Any]) -> list[str]:
    """The modes any variant measured (a run from before collapse mode has no column for it: n/a)."""
    return [m for m in MODES if any(m in v["tpr"] for v in report["variants"])]


def markdown(report: dict[str, Any]) -> str:
    c, modes = report["clean"], _modes(report)
    short = {"whitebox": "white-box", "blackbox_score": "score", "blackbox_label": "label", "blackbox_collapse": "collapse"}
    lines = [f"# Watermark variants on one grid (clean f0: linear probe {c['linear_probe']:.4f}, kNN {c['knn']:.4f}, "
             f"{c['n_test']} test images: one image = {100 / c['n_test']:.2f} points)", "",
             "TPR = share of the utility-preserving derivatives detected at the variant's calibrated threshold; "
             "held-out FP = null families (independent encoders and attacked copies) detected among those held out "
             "of threshold setting.", "",
             "| variant | probe (change) | kNN (change) | " + " | ".join(f"TPR {short[m]}" for m in modes)
             + f" | held-out FP ({'/'.join(short[m] for m in modes)}) | cost (s, x pre-training) |",
             "|---|---|---|" + "---|" * len(modes) + "---|---|"]
    for v in report["variants"]:
        fp = ", ".join(f"{v['calibration'][m]['heldout_positive']}/{v['calibration'][m]['heldout_families']}"
                       if m in v["tpr"] else "n/a" for m in modes)
        frac = v["cost_fraction_of_pretraining"]
        cost = f"{v['seconds']:.0f} ({frac:.2f}x)" if frac is not None else f"{v['seconds']:.0f}"
        tprs = " | ".join(f"{v['tpr'][m]:.2f} ({v['detected'][m]})" + (" †" if v["calibration"][m]["heldout_positive"] else "")
                          if m in v["tpr"] else "n/a" for m in modes)
        lines.append(f"| {v['variant']} | {v['linear_probe']:.4f} ({100 * v['probe_change']:+.1f}) | {v['knn']:.4f} "
                     f"({100 * v['knn_change']:+.1f}) | {tprs} | {fp} | {cost} |")
    lines += ["", "† held-out null families were detected too at this threshold: the TPR is not backed by the "
              "calibration (its threshold, the maximum over the calibration families, is too low for this secret).",
              "", "Missed derivatives (utility kept, not detected):", ""]
    for v in report["variants"]:
        for m in modes:
            if v["missed"].get(m):
                lines.append(f"- {v['variant']}, {m}: {', '.join(v['missed'][m])}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    names = [v["variant"] for v in report["variants"]]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 + 1.4 * len(names)), 3.8))  # wide enough for the title
    modes = _modes(report)
    width = 0.8 / len(modes)
    for j, m in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [v["tpr"].get(m, 0.0) for v in report["variants"]], width, label=m)
        for x, bar, v in zip(xs, bars, report["variants"]):
            fp = v["calibration"][m]["heldout_positive"] if m in v["tpr"] else 0
            if fp:  # the threshold let held-out null families through: this TPR is not backed by the calibration
                bar.set_hatch("xx")
                ax.text(x, bar.get_height() + 0.02, f"FP {fp}", ha="center", fontsize=6, color="crimson")
    ax.axhline(0.95, color="k", ls=":", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("TPR at calibrated thresholds")
    ax.set_title("utility-preserving derivatives detected\n(dotted: target 0.95; hatched, FP k: k held-out null "
                 "families also detected)", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def ablation(cfg: AblationConfig) -> dict[str, Any]:
    from dist_awenc.attacks.stage import PirateData
    from dist_awenc.encoders.io import load_encoder
    from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options

    if not cfg.variants or not cfg.clean:
        raise ConfigError("ablation needs clean=<f0 run folder> and variants.<name>.robustness=<robustness run folder>")
    for name, v in cfg.variants.items():
        if not (Path(v.robustness) / "robustness.json").exists():
            raise ConfigError(f"variant {name}: {v.robustness} holds no collected robustness run (robustness.json)")
    encoder, card = load_encoder(cfg.clean)
    pirate = PirateData.load(cfg.data, card["input_size"])
    _, clean = evaluate_encoder(encoder, pirate.images, pirate.labels, pirate.num_classes, seed=0, **probe_options(cfg.probe))
    pretrain_s = _seconds(str(Path(cfg.clean) if Path(cfg.clean).is_dir() else Path(cfg.clean).parent))
    with open_run(cfg, "ablation", allow_complete=True) as run_dir:
        report = {"clean": {**clean, "seconds": pretrain_s},
                  "variants": [summarise_variant(n, v, clean, pretrain_s) for n, v in cfg.variants.items()]}
        atomic_write_text(run_dir / "ablation.json", json.dumps(report, indent=2))
        atomic_write_text(run_dir / "ablation.md", markdown(report))
        plot(report, run_dir / "ablation.png")
        info(markdown(report))
    return report
