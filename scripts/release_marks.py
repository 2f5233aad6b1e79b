"""Each release's own mark against what its grid's permutation tests caught: is a weak release visible when it is made?

    .venv/bin/python scripts/release_marks.py F0 NAME=ENCODER,SECRET,GRID [NAME=...] [--images 256]

For each release (the embedded encoder, its secret, and the `awenc robustness` folder of its grid, or a committed
copy of that folder's robustness.csv and robustness.json) and for f0: the mean cosine to the key's feature of the
first ``--images`` hold-out images clean, marked and controlled (`mark_statistics`, what `awenc embed` writes to
mark.json), and the share of the grid's thefts each permutation test ranked first. Prints a markdown table, then the
Spearman correlations (scipy) of the release's marked-minus-control gap with those shares.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from scipy import stats

from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import load_encoder
from dist_awenc.watermark.perturbation import mark_statistics
from dist_awenc.watermark.secret import load_secret

ACCESSES = ("weights", "probabilities", "labels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("f0")
    ap.add_argument("releases", nargs="+", help="NAME=ENCODER,SECRET,GRID")
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    parsed = []
    for r in args.releases:
        name, _, rest = r.partition("=")
        parts = rest.split(",")
        if not name or len(parts) != 3:
            ap.error(f"'{r}': expected NAME=ENCODER,SECRET,GRID")
        parsed.append((name, *parts))
    f0, card = load_encoder(args.f0)
    dataset, rows = None, []
    print("| release | white-box score (grid) | f0: clean / marked / control | release: clean / marked / control | gap "
          "| " + " | ".join(ACCESSES) + " |")
    print("|---" * (5 + len(ACCESSES)) + "|")
    for name, encoder, secret_path, grid in parsed:
        secret = load_secret(secret_path)
        if dataset is None:
            dataset = build_dataset(secret.plan["dataset"], image_size=card["input_size"], seed=secret.plan["split_seed"])
        images, _ = dataset.get_batch(make_splits(len(dataset), secret.plan["split_seed"])["holdout"][: args.images])
        release, _ = load_encoder(encoder)
        with torch.no_grad():
            before, after = (mark_statistics(e.eval(), images, secret) for e in (f0, release))
        summary = json.loads((Path(grid) / "robustness.json").read_text())["permutation"]
        unattacked = next(r for r in csv.DictReader(open(Path(grid) / "robustness.csv")) if r["attack"] == "none")
        shares = {a: summary[a]["at_limit"] / summary[a]["of"] for a in ACCESSES}
        gap = after["cos_marked_key"] - after["cos_control_key"]
        rows.append((gap, shares))
        cosines = lambda s: f"{s['cos_clean_key']:.3f} / {s['cos_marked_key']:.3f} / {s['cos_control_key']:.3f}"  # noqa: E731
        print(f"| {name} | {float(unattacked['effect_whitebox']):.3f} | {cosines(before)} | {cosines(after)} | {gap:.3f} | "
              + " | ".join(f"{summary[a]['at_limit']}/{summary[a]['of']}" for a in ACCESSES) + " |")
    print()
    for a in ACCESSES:
        rho, p = stats.spearmanr([g for g, _ in rows], [s[a] for _, s in rows])
        print(f"gap vs the {a}' share of thefts ranked first: Spearman {rho:.2f} (p {p:.3f}, {len(rows)} releases)")


if __name__ == "__main__":
    main()
