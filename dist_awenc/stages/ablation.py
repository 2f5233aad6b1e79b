"""Stage: compare watermark variants on the same grid, seeds and null population (``awenc ablation``).

Each variant is one finished ``awenc robustness`` run (its watermarked encoder
attacked by the same grid, verified at the thresholds of a calibration made
for that variant's secret on the same null population) plus the run folders of
the stages that made it (stage 1, stage 2), whose ``status.json`` give its cost.
Utility is measured here: the clean f0 and each variant's watermarked encoder
(the one its robustness run attacked) are probed on the same ``utility_splits``
seeded train/test splits of the pirate data, with the data and probe settings of
the variants' robustness runs (which must agree, as must their grid seeds), and
a variant's change is the paired mean difference with its standard error: one
split of a small test set moves kNN by several points. Each variant is checked
against ``targets`` (issue #11's by default): utility, white-box, best black-box and best label-only TPR, and no
held-out null family detected; a TPR counts only where its mode's threshold
held on the held-out families. Writes ``ablation.json``, ``ablation.md`` and
``ablation.png``; ``report=<ablation.json>`` renders an earlier run's again
(with the targets given now) without measuring anything.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dist_awenc.config import DataSection, ProbeSection, load_config
from dist_awenc.config_ablation import AblationConfig, TargetsSection, VariantSection
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.files import atomic_write_text, read_json, save_figure
from dist_awenc.log import info
from dist_awenc.runs import open_run
from dist_awenc.verify.core import LABEL_MODES, MODES


def _seconds(folder: str) -> float:
    status = read_json(Path(folder) / "status.json", ArtifactError, what="run status")
    if status.get("state") != "complete":
        raise ArtifactError(f"{folder}: run is not complete (state {status.get('state')!r})")
    return float(status.get("seconds") or 0.0)


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "robustness.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _calibration(folder: Path, cfg: Any) -> dict[str, Any]:
    """The thresholds and held-out counts of the calibration robustness run ``folder`` (config ``cfg``) applied."""
    from dist_awenc.verify.calibration import load_calibration

    if not cfg.verify.calibration:
        raise ConfigError(f"{folder}: robustness run without verify.calibration; the ablation compares calibrated "
                          "decisions only")
    data = load_calibration(cfg.verify.calibration).data
    return {m: {"threshold": d["threshold"], "heldout_positive": d["heldout"]["false_positive_families"],
                "heldout_families": d["heldout"]["families"], "fpr_upper_95": d["heldout"]["heldout_fpr_upper_95"]}
            for m, d in data["modes"].items()}


def _common_measurement(variants: dict[str, VariantSection], configs: dict[str, Any]
                        ) -> tuple[DataSection, ProbeSection, list[int]]:
    """The pirate data, probe settings and grid seeds that every variant's robustness run (config ``configs[name]``)
    shares.

    Variants are compared on one grid (their TPRs over the same attacks and seeds) and their utility is probed with
    one data and probe setting; variants collected differently are refused rather than compared.
    """
    measured = {}
    for name, v in variants.items():
        folder, cfg = Path(v.robustness), configs[name]
        seeds = sorted({int(r["seed"]) for r in _rows(folder) if r["attack"] == "none"})
        if not seeds:
            raise ArtifactError(f"variant {name}: {folder}/robustness.csv has no unattacked ('none') row; is it a "
                                "robustness run?")
        measured[name] = {"seeds": seeds, "data": asdict(cfg.data), "probe": asdict(cfg.probe)}
    first, ref = next(iter(measured.items()))
    for name, m in measured.items():
        for key in ("seeds", "data", "probe"):
            if m[key] != ref[key]:
                raise ConfigError(f"variant {name}: its robustness run has {key} {m[key]} but variant {first}'s has "
                                  f"{ref[key]}; an ablation compares variants measured alike (same grid.seeds, data "
                                  "and probe)")
    return configs[first].data, configs[first].probe, ref["seeds"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def paired_utility(variant: list[dict[str, float]], clean: list[dict[str, float]]) -> dict[str, Any]:
    """A variant's accuracy and its change from f0, both probed on the same seeded splits: means over the splits,
    the change a paired mean with its standard error (NaN for one split)."""
    from scipy.stats import sem

    out: dict[str, Any] = {}
    for metric, key in (("linear_probe", "probe"), ("knn", "knn")):
        diffs = [v[metric] - c[metric] for v, c in zip(variant, clean, strict=True)]
        out[metric] = _mean([v[metric] for v in variant])
        out[f"{key}_change"] = _mean(diffs)
        out[f"{key}_change_se"] = float(sem(diffs)) if len(diffs) > 1 else float("nan")
        out[f"{key}_change_per_split"] = diffs
    return out


def summarise_variant(name: str, v: VariantSection, calibration: dict[str, Any], utility: dict[str, Any],
                      pretrain_s: float) -> dict[str, Any]:
    folder = Path(v.robustness)
    summary = read_json(folder / "robustness.json", ArtifactError, what="robustness summary")
    if isinstance(summary.get("thresholds"), str):
        raise ConfigError(f"variant {name}: {folder} was collected without a calibration")
    cost = sum(_seconds(s) for s in v.stages)
    modes = {m: summary["modes"][m] for m in MODES if m in summary["modes"]}  # collapse mode: runs since it exists
    return {"variant": name, **utility, "tpr": {m: s["tpr"] for m, s in modes.items()},
            "detected": {m: f"{s['detected']}/{s['of']}" for m, s in modes.items()},
            "missed": {m: s["missed"] for m, s in modes.items()},
            "best_blackbox_tpr": max(s["tpr"] for m, s in modes.items() if m != "whitebox"),
            "counted": "thefts" if "thefts" in summary else "utility-preserving derivatives",  # #27's rule, or before
            "seconds": cost, "cost_fraction_of_pretraining": cost / pretrain_s if pretrain_s else None,
            "calibration": calibration, "robustness": str(folder)}


def check_targets(v: dict[str, Any], t: TargetsSection) -> dict[str, dict[str, Any]]:
    """Which targets a variant reaches: ``{target: {"required", "value", "met"}}`` (values in points or rates).

    A mode's TPR counts only when no held-out null family passed its threshold (otherwise the calibration does
    not back it): the white-box entry says ``backed``, and the best black-box and label-only TPRs are the best
    backed ones among the modes the variant measured.
    """
    measured = [m for m in MODES if m in v["tpr"]]
    backed = {m: v["calibration"][m]["heldout_positive"] == 0 for m in measured}

    def best(modes: list[str]) -> float:
        return max((v["tpr"][m] for m in modes if backed[m]), default=0.0)

    def rate(value: float, required: float, backed: bool = True) -> dict[str, Any]:
        return {"required": f">= {required:g}", "value": value, "met": backed and value >= required}

    def points(change: float, allowed: float) -> dict[str, Any]:
        value = 100 * change
        return {"required": f">= -{allowed:g} points", "value": value, "met": value >= -allowed - 1e-9}

    fp = sum(v["calibration"][m]["heldout_positive"] for m in measured)
    return {
        "linear_probe": points(v["probe_change"], t.probe_points),
        "knn": points(v["knn_change"], t.knn_points),
        "whitebox_tpr": {**rate(v["tpr"]["whitebox"], t.whitebox_tpr, backed["whitebox"]), "backed": backed["whitebox"]},
        "best_blackbox_tpr": rate(best([m for m in measured if m != "whitebox"]), t.blackbox_tpr),
        "best_label_only_tpr": rate(best([m for m in measured if m in LABEL_MODES]), t.label_tpr),
        "heldout_false_positives": {"required": "0", "value": fp, "met": fp == 0},
    }


def with_targets(report: dict[str, Any], t: TargetsSection) -> dict[str, Any]:
    """The report with every variant's :func:`check_targets` and the targets used."""
    out = {**report, "targets": {"settings": dict(vars(t)), "variants": {}}}
    for v in report["variants"]:
        out["targets"]["variants"][v["variant"]] = check_targets(v, t)
    return out


def _targets_markdown(report: dict[str, Any]) -> list[str]:
    t, rows = report["targets"]["settings"], report["targets"]["variants"]
    head = {"linear_probe": f"probe change (>= -{t['probe_points']:g} pt)", "knn": f"kNN change (>= -{t['knn_points']:g} pt)",
            "whitebox_tpr": f"TPR white-box (>= {t['whitebox_tpr']:g})",
            "best_blackbox_tpr": f"best black-box TPR (>= {t['blackbox_tpr']:g})",
            "best_label_only_tpr": f"best label-only TPR (>= {t['label_tpr']:g})",
            "heldout_false_positives": "held-out FP families, summed over modes (0)"}
    lines = ["", "Targets (a TPR counts only in modes whose threshold detected no held-out null family):", "",
             "| variant | " + " | ".join(head.values()) + " | all met |", "|---|" + "---|" * (len(head) + 1)]
    for name, r in rows.items():
        cells = []
        for k in head:
            value = r[k]["value"]
            shown = f"{value:+.1f}" if k in ("linear_probe", "knn") else (f"{value:.2f}" if "tpr" in k else f"{value}")
            if r[k].get("backed") is False:
                shown += " (not backed)"
            cells.append(f"{shown} {'met' if r[k]['met'] else '**missed**'}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if all(x['met'] for x in r.values()) else 'no'} |")
    return lines


def _modes(report: dict[str, Any]) -> list[str]:
    """The modes any variant measured (a run from before collapse mode has no column for it: n/a)."""
    return [m for m in MODES if any(m in v["tpr"] for v in report["variants"])]


def _change(v: dict[str, Any], key: str) -> str:
    """``+0.6 ± 0.4`` points (no ± for one split, or a report from before paired splits)."""
    se = v.get(f"{key}_change_se", float("nan"))
    return f"{100 * v[f'{key}_change']:+.1f}" + (f" ± {100 * se:.1f}" if se == se else "")


def markdown(report: dict[str, Any]) -> str:
    c, modes = report["clean"], _modes(report)
    short = {"whitebox": "white-box", "blackbox_score": "score", "blackbox_label": "label", "blackbox_collapse": "collapse"}
    if "splits" in c:
        splits = (f", means over {len(c['splits'])} seeded train/test splits of the pirate's data" if len(c["splits"]) > 1
                  else f", on the pirate data's split {c['splits'][0]}")
        paired = ("Utility: each variant's watermarked encoder probed on the same splits as f0; a change is the mean "
                  "paired difference in points" + (", ± its standard error over the splits." if len(c["splits"]) > 1
                                                   else "."))
    else:  # a report from before the ablation probed utility itself: its variants' unattacked rows on the grid's seed
        splits, paired = "", "Utility: the variants' unattacked rows of their robustness runs."
    lines = [f"# Watermark variants on one grid (clean f0: linear probe {c['linear_probe']:.4f}, kNN {c['knn']:.4f}, "
             f"{c['n_test']} test images{splits}: one image = {100 / c['n_test']:.2f} points)", "", paired, "",
             f"TPR = share of the {_counted(report)} detected at the variant's calibrated threshold; "
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
        lines.append(f"| {v['variant']} | {v['linear_probe']:.4f} ({_change(v, 'probe')}) | {v['knn']:.4f} "
                     f"({_change(v, 'knn')}) | {tprs} | {fp} | {cost} |")
    lines += ["", "† held-out null families were detected too at this threshold: the TPR is not backed by the "
              "calibration (its threshold, the maximum over the calibration families, was too low for this split). "
              "Even for a correct calibration, at least one of m held-out families crosses the maximum of m' "
              "calibration families with probability m / (m' + m), 1/2 for 30 and 30: a † is partly a draw of the "
              "split, so compare variants on their thresholds and tau* too, not on † alone."]
    if "targets" in report:
        lines += _targets_markdown(report)
    lines += ["", "Missed derivatives (utility kept, not detected):", ""]
    for v in report["variants"]:
        for m in modes:
            if v["missed"].get(m):
                lines.append(f"- {v['variant']}, {m}: {', '.join(v['missed'][m])}")
    return "\n".join(lines) + "\n"


def _counted(report: dict[str, Any], short: bool = False) -> str:
    """What the variants' TPRs count: thefts (#27), or, for robustness runs collected before, the derivatives within
    the utility drop."""
    counted = {v.get("counted", "utility-preserving derivatives") for v in report["variants"]}
    if counted == {"thefts"}:
        return "thefts" + ("" if short else " (half of f0's advantage over random init kept on probe and kNN, "
                                             "within the utility drop)")
    return "utility-preserving derivatives" + (" (thefts for some variants)" if "thefts" in counted else "")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    names = [v["variant"] for v in report["variants"]]
    slant = max(len(n) for n in names) > 14  # long names are slanted under their bars rather than widening the plot
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 + 1.4 * len(names)), 4.4 if slant else 3.8))
    modes = _modes(report)
    width = 0.8 / len(modes)
    colors = []
    for j, m in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [v["tpr"].get(m, 0.0) for v in report["variants"]], width, label=m)
        colors.append(bars.patches[0].get_facecolor())
        for x, bar, v in zip(xs, bars, report["variants"]):
            fp = v["calibration"][m]["heldout_positive"] if m in v["tpr"] else 0
            if fp:  # the threshold let held-out null families through: this TPR is not backed by the calibration
                bar.set_hatch("xx")
                ax.text(x, bar.get_height() + 0.02, f"FP {fp}", ha="center", fontsize=6, color="crimson")
    ax.axhline(0.95, color="k", ls=":", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20 if slant else 0, ha="right" if slant else "center",
                  rotation_mode="anchor")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("TPR at calibrated thresholds")
    ax.set_title(f"{_counted(report, short=True)} detected\n(dotted: target 0.95; hatched, FP k: k held-out null "
                 "families also detected)", fontsize=8)
    from matplotlib.patches import Patch  # plain swatches: a hatched first bar would hatch its mode's legend entry

    ax.legend(handles=[Patch(color=c, label=m) for c, m in zip(colors, modes)], fontsize=7)
    save_figure(fig, path)


def ablation(cfg: AblationConfig) -> dict[str, Any]:
    from dist_awenc.attacks.stage import PirateData
    from dist_awenc.encoders.io import load_encoder
    from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
    from dist_awenc.evaluate.probe import extract_features
    from dist_awenc.stages.robustness import RobustnessConfig

    if cfg.report:
        return rerender(cfg)
    if not cfg.variants or not cfg.clean:
        raise ConfigError("ablation needs clean=<f0 run folder> and variants.<name>.robustness=<robustness run folder>")
    for name, v in cfg.variants.items():
        if not (Path(v.robustness) / "robustness.json").exists():
            raise ConfigError(f"variant {name}: {v.robustness} holds no collected robustness run (robustness.json)")
    configs = {n: load_config(RobustnessConfig, Path(v.robustness) / "config.yaml") for n, v in cfg.variants.items()}
    data, probe, seeds = _common_measurement(cfg.variants, configs)
    calibrations = {n: _calibration(Path(v.robustness), configs[n]) for n, v in cfg.variants.items()}
    watermarked = {n: _watermarked_encoder(n, configs[n]) for n in cfg.variants}
    encoder, card = load_encoder(cfg.clean)
    pirate = PirateData.load(data, card["input_size"])
    splits = list(range(cfg.utility_splits))

    def probed(enc: Any) -> list[dict[str, float]]:  # the split is seeded: f0 and every variant see the same ones
        feats = extract_features(enc, pirate.images)  # once per encoder, whatever the number of splits
        return [evaluate_encoder(enc, pirate.images, pirate.labels, pirate.num_classes, seed=s, features=feats,
                                 **probe_options(probe))[1] for s in splits]

    pretrain_s = _seconds(str(Path(cfg.clean) if Path(cfg.clean).is_dir() else Path(cfg.clean).parent))
    with open_run(cfg, "ablation", allow_complete=True) as run_dir:
        base = probed(encoder)
        bar = tqdm(watermarked.items(), desc="utility", unit="encoder", dynamic_ncols=True)
        per_split = {n: probed(load_encoder(path)[0]) for n, path in bar}
        clean = {"linear_probe": _mean([m["linear_probe"] for m in base]), "knn": _mean([m["knn"] for m in base]),
                 "n_train": base[0]["n_train"], "n_test": base[0]["n_test"], "splits": splits, "grid_seeds": seeds,
                 "seconds": pretrain_s}
        report = with_targets({"clean": clean, "variants": [
            summarise_variant(n, v, calibrations[n], paired_utility(per_split[n], base), pretrain_s)
            for n, v in cfg.variants.items()]}, cfg.targets)
        _write(report, run_dir)
    return report


def _watermarked_encoder(name: str, cfg: Any) -> str:
    """The encoder a variant's robustness run (config ``cfg``) attacked: the one whose utility counts."""
    path = cfg.encoder
    if not path or not Path(path).exists():
        raise ArtifactError(f"variant {name}: the encoder its robustness run attacked ({path or 'none recorded'}) is "
                            "not there; the ablation probes it for utility")
    return path


def _write(report: dict[str, Any], run_dir: Path) -> None:
    table = markdown(report)
    atomic_write_text(run_dir / "ablation.json", json.dumps(report, indent=2))
    atomic_write_text(run_dir / "ablation.md", table)
    plot(report, run_dir / "ablation.png")
    info(table)


def rerender(cfg: AblationConfig) -> dict[str, Any]:
    """``report=<ablation.json>``: an earlier run's table, targets (``cfg.targets``) and plot, measuring nothing."""
    if cfg.variants or cfg.clean:
        raise ConfigError("report= renders a finished ablation again; give it alone, without clean= or variants.*")
    saved = read_json(Path(cfg.report), ArtifactError, what="ablation report")
    if not isinstance(saved.get("variants"), list) or not isinstance(saved.get("clean"), dict):
        raise ArtifactError(f"{cfg.report}: not an ablation report (expected 'clean' and a 'variants' list, as "
                            "awenc ablation writes in ablation.json)")
    report = with_targets({k: v for k, v in saved.items() if k != "targets"}, cfg.targets)
    with open_run(cfg, "ablation", allow_complete=True) as run_dir:
        _write(report, run_dir)
    return report
