"""The black-box permutation tests' statistics on one release's grid of derivatives, as the product computes them.

For one watermarked release and its plan's J alternatives, each derivative of the robustness grid that is not a
distilled student (students of the default are no thefts: results/permutation_grid/) is made again as the grid
makes it (seed 0), its product (a linear head on the pirate's task) trained as the grid does, and ranked among
the secrets by the probabilities' statistics (``clean_tv`` and ``key_tv``, :mod:`dist_awenc.verify.permutation`)
and the labels' (``key_hits`` and ``key_hits_shift``), on the images the plan's n pays for (33 and 49). Nulls are
asked the same: the clean f0 and an independent encoder, each with its own head. Whatever the plan of the release
seals, every statistic is computed, which is what choosing between them needs. ``--whitebox`` adds the white-box
permutation test on each suspect's weights under both statistics a plan can seal (``f0_excess`` and ``score``: results/whitebox_statistic/);
``--whitebox-only`` runs that alone (no product is trained or asked), which J = 999 affords.

    .venv/bin/python scripts/blackbox_statistic.py runs/demo/embed/encoder.safetensors \
        runs/demo/watermark/secret.safetensors runs/blackbox_statistic/demo --independent runs/demo/independent
    .venv/bin/python scripts/blackbox_statistic.py --table DIR.. [--alpha A] [--grids GRID..]   # the markdown table

Writes ``statistics.csv`` (one row per suspect: the permutation p of each statistic, the owner's z against the
alternatives, the pirate's probe) and, per suspect, ``<suspect>.npz``: its probabilities for every hold-out image
clean (n, C), marked and controlled with each of the J + 1 secrets (J + 1, n, C), and each key (J + 1, C); index 0
is the owner's secret (what other candidate statistics can be computed from). ``owner_side.npz``: f0's own
feature response to each secret (disruption, pull towards the key).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dist_awenc.attacks import AttackOptions, apply_attack
from dist_awenc.attacks.stage import PirateData
from dist_awenc.config import DataSection
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.encoders.io import load_encoder
from dist_awenc.evaluate.downstream import evaluate_encoder
from dist_awenc.stages.theft import load_clean
from dist_awenc.verify.core import _batched, images_for
from dist_awenc.verify.permutation import (KEY_HITS, KEY_HITS_SHIFT, PERMUTATION_TIE, SCORE_STATISTICS,
                                           blackbox_label_statistics, blackbox_score_statistics, whitebox_statistics)
from dist_awenc.verify.resize import fed_at, plan_resize, weights_at
from dist_awenc.verify.stats import permutation_p
from dist_awenc.watermark.draw import load_plan_alternatives
from dist_awenc.watermark.secret import load_secret

NOT_STUDENTS = [("none", 0.0), ("adversarial_finetune", 3), ("finetune_full", 0.001), ("finetune_resolution", 2),
              ("finetune_ssl", 5), ("overwrite", 5), ("prune_finetune", 0.5), ("prune_global", 0.5),
              ("quantize_int8", 8), ("query_crop", 0.8), ("query_jpeg", 90), ("query_jpeg", 50),
              ("query_purify", 1), ("query_resize", 0.5)]


@torch.no_grad()
def answers(predict, images, keys, deltas, controls) -> dict[str, np.ndarray]:
    run = lambda x: _batched(predict, x).double().numpy()  # noqa: E731
    return {"clean": run(images),
            "marked": np.stack([run((images + d).clamp(0, 1)) for d in deltas]),
            "control": np.stack([run((images + r).clamp(0, 1)) for r in controls]),
            "key": run(keys)}


@torch.no_grad()
def owner_side(f0, images, keys, deltas, controls) -> dict[str, np.ndarray]:
    """Per secret, from f0 alone: its features' disruption and their pull towards the key (marked minus control)."""
    f0.eval()
    feat = lambda x: F.normalize(_batched(lambda b: f0(b).float(), x), dim=1)  # noqa: E731
    fc, fk = feat(images), feat(keys)
    disrupt, pull = [], []
    for j, (d, r) in enumerate(zip(deltas, controls)):
        fm, fr = feat((images + d).clamp(0, 1)), feat((images + r).clamp(0, 1))
        disrupt.append(float(((fc * fr).sum(1) - (fc * fm).sum(1)).mean()))
        pull.append(float(((fm - fr) @ fk[j]).mean()))
    return {"disrupt": np.asarray(disrupt), "pull": np.asarray(pull)}


def ranked(t: np.ndarray) -> tuple[float, float]:
    """The owner's (index 0) permutation p among the J + 1 statistics, and its z against the alternatives."""
    alt, sd = t[1:], float(t[1:].std(ddof=1))
    return permutation_p(float(t[0]), alt, tie=PERMUTATION_TIE), float((t[0] - alt.mean()) / sd) if sd else float("nan")


def product_statistics(model, holdout, keys, deltas, controls, plan_n: dict) -> dict[str, float]:
    """The black-box permutation tests of the product, with every probabilities' and labels' statistic, on the
    plan's images."""
    row = {}
    x = holdout[: images_for("blackbox_score", plan_n["blackbox_score"])]
    for name in SCORE_STATISTICS:
        row[f"p_{name}"], row[f"z_{name}"] = ranked(blackbox_score_statistics(model.predict_proba, keys, deltas,
                                                                              controls, x, name))
    x = holdout[: images_for("blackbox_label", plan_n["blackbox_label"])]
    for name, column in ((KEY_HITS, "label"), (KEY_HITS_SHIFT, "label_shift")):
        row[f"p_{column}"], row[f"z_{column}"] = ranked(blackbox_label_statistics(lambda b: model(b).argmax(1), keys,
                                                                                  deltas, controls, x, name))
    return row


@torch.no_grad()
def whitebox_columns(encoder, holdout, keys, deltas, controls, baselines: np.ndarray, n: int) -> dict[str, float]:
    """The white-box permutation test on the weights under both statistics a plan can seal, from one pass of the
    scores: ``f0_excess`` (each secret's mean white-box score minus f0's own; column ``wb_excess``) and ``score``
    (the score alone, new plans' default; column ``wb_raw``), on the plan's n hold-out images."""
    t = whitebox_statistics(encoder, keys, deltas, controls, holdout[:n])
    row = {}
    for name, s in (("wb_excess", t - baselines), ("wb_raw", t)):
        row[f"p_{name}"], row[f"z_{name}"] = ranked(s)
    return row


def table(folders: list[str], alpha: float = 0.05, grids: list[str] | None = None) -> str:
    """Markdown: per release, the derivatives whose owner's secret each statistic ranks at p <= alpha (0.05: first
    of J + 1 = 20). ``grids``: each folder's robustness grid; then only its thefts (robustness.csv's ``theft``) count."""
    names = {"p_clean_tv": "probabilities, clean_tv", "p_key_tv": "probabilities, key_tv", "p_label": "labels",
             "p_label_shift": "labels, key_hits_shift",
             "p_wb_excess": "weights, f0_excess", "p_wb_raw": "weights, score"}
    rows_of = {}
    for folder in folders:
        with (Path(folder) / "statistics.csv").open() as f:
            rows_of[folder] = list(csv.DictReader(f))
    names = {c: v for c, v in names.items() if all(c in r for rows in rows_of.values() for r in rows)}
    what = "thefts" if grids else "derivatives (none + 13 attacks)"
    lines = [f"| release | {what} | " + " | ".join(names.values()) + " | nulls (f0, independent) |",
             "|---|---|" + "---|" * len(names) + "---|"]
    total = dict.fromkeys(names, 0)
    count = 0
    for i, folder in enumerate(folders):
        rows = rows_of[folder]
        ds = [r for r in rows if not r["suspect"].startswith("null_")]
        if grids:
            with (Path(grids[i]) / "robustness.csv").open() as f:
                theft = {f"{r['attack']}__{float(r['strength']):g}": r["theft"] == "True" for r in csv.DictReader(f)}
            ds = [r for r in ds if theft[r["suspect"]]]
        count += len(ds)
        cells = []
        for c in names:
            hit = [r for r in ds if float(r[c]) <= alpha + 1e-9]
            total[c] += len(hit)
            miss = [r["suspect"].replace("__", "@") + f" {float(r[c]):.2g}" for r in ds if r not in hit]
            cells.append(f"{len(hit)}/{len(ds)}" + (f" (not: {', '.join(miss)})" if miss else ""))
        nulls = "; ".join(f"{names[c].split(',')[-1].strip()} " + " / ".join(
            f"{float(r[c]):.2f}" for r in rows if r["suspect"].startswith("null_")) for c in names if c != "p_clean_tv")
        lines.append(f"| {Path(folder).name} | {len(ds)} | " + " | ".join(cells) + f" | {nulls} |")
    lines.append(f"| **all** | {count} | " + " | ".join(f"**{total[c]}/{count}**" for c in names) + " | |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--table":  # the markdown table of folders it wrote
        tp = argparse.ArgumentParser(prog="blackbox_statistic.py --table")
        tp.add_argument("folders", nargs="+")
        tp.add_argument("--alpha", type=float, default=0.05)
        tp.add_argument("--grids", nargs="+", help="each folder's robustness grid, in order: count its thefts only")
        t = tp.parse_args(sys.argv[2:])
        if t.grids and len(t.grids) != len(t.folders):
            tp.error(f"--grids names {len(t.grids)} grids for {len(t.folders)} folders; give one per folder")
        print(table(t.folders, t.alpha, t.grids))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("encoder")
    ap.add_argument("secret")
    ap.add_argument("out")
    ap.add_argument("--independent", default="", help="a null encoder (run folder or file) asked the same")
    ap.add_argument("--whitebox", action="store_true",
                    help="also the white-box permutation test on each suspect's weights, with and without f0's baselines")
    ap.add_argument("--whitebox-only", action="store_true",
                    help="only that test (no product is trained or asked: what J = 999 affords)")
    ap.add_argument("--no-answers", action="store_true",
                    help="save no answers (.npz), only statistics.csv: at J = 999 they would be 1 GB a release")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    enc, card = load_encoder(a.encoder)
    f0 = load_clean(card, "")
    sec = load_secret(a.secret)
    alt = load_plan_alternatives(a.secret, sec)
    keys = torch.cat([sec.key[None], alt.keys])
    deltas = torch.cat([sec.delta[None], alt.deltas])
    controls = torch.cat([sec.control()[None], alt.controls()])
    data = DataSection()
    dataset = build_dataset(data.name, image_size=sec.image_size, seed=data.split_seed)
    holdout, _ = dataset.get_batch(splits_for(len(dataset), data.split_seed, data.splits, "x", "holdout")["holdout"])
    pirate = PirateData.load(data, sec.image_size)
    if not (a.no_answers or a.whitebox_only):
        np.savez(out / "owner_side.npz", **owner_side(f0, holdout, keys, deltas, controls))
    method = plan_resize(sec.plan)[0]
    baselines = (np.concatenate([[alt.owner_baseline], alt.baselines.double().numpy()]) if alt.baselines is not None
                 else np.zeros(len(keys)))
    suspects = [(f"{n}__{s:g}", n, s) for n, s in NOT_STUDENTS] + [("null_f0", "f0", 0), ("null_independent", "ind", 0)]
    rows = []
    for name, attack, strength in tqdm(suspects, desc="suspects"):
        if attack == "ind" and not a.independent:
            continue
        if attack == "f0":
            model_enc = f0
        elif attack == "ind":
            model_enc = load_encoder(a.independent)[0]
        elif attack == "none":
            model_enc = enc
        else:
            model_enc, _ = apply_attack(attack, enc, card, strength, pirate.attack_data(0.3, 0), AttackOptions())
        size = getattr(model_enc, "input_size", sec.image_size)
        wb = {}
        if a.whitebox or a.whitebox_only:  # a query-side attack leaves the weights the owner inspects as they were
            weights = enc if attack.startswith("query_") else weights_at(model_enc, size, sec.image_size, method)[0]
            wb = whitebox_columns(weights, holdout, keys, deltas, controls, baselines, sec.plan["n"]["whitebox"])
        if a.whitebox_only:
            rows.append({"suspect": name, **wb})
            continue
        model_enc = fed_at(model_enc, size, sec.image_size, method)
        model, metrics = evaluate_encoder(model_enc, pirate.images, pirate.labels, pirate.num_classes, seed=0)
        if not a.no_answers:
            np.savez(out / f"{name}.npz", **answers(model.predict_proba, holdout, keys, deltas, controls))
        rows.append({"suspect": name, "linear_probe": round(metrics["linear_probe"], 4),
                     **product_statistics(model, holdout, keys, deltas, controls, sec.plan["n"]), **wb})
    with (out / "statistics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{out / 'statistics.csv'}: secret {sec.sha256[:8]}, J = {len(alt)}")
    for r in rows:
        wb = f"  weights {r['p_wb_excess']:.3g} (raw {r['p_wb_raw']:.3g})" if "p_wb_raw" in r else ""
        bb = "" if a.whitebox_only else (f"p clean_tv {r['p_clean_tv']:.2f}  key_tv {r['p_key_tv']:.2f}  "
                                         f"label {r['p_label']:.2f}  label_shift {r['p_label_shift']:.2f}")
        print(f"  {r['suspect']:<26} {bb}{wb}")


if __name__ == "__main__":
    main()
