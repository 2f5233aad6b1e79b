"""Utility of watermarked encoders against their clean f0, over paired seeded splits of the pirate's task.

    .venv/bin/python scripts/utility_paired.py F0 NAME=ENCODER [NAME=ENCODER ...] [--splits 5]

Each encoder and f0 are probed (linear probe and kNN, the robustness grid's probe settings) on the same seeded
train/test splits of the pirate data (digits at f0's size, the robustness grid's data section); a change is the
paired mean difference over the splits with its standard error (the measure of `awenc ablation`).
"""
from __future__ import annotations

import argparse

from dist_awenc.attacks.stage import PirateData
from dist_awenc.config import DataSection, ProbeSection
from dist_awenc.encoders.io import load_encoder
from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
from dist_awenc.evaluate.probe import extract_features
from dist_awenc.stages.ablation import paired_utility


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("f0")
    ap.add_argument("encoders", nargs="+", help="NAME=PATH (a file or run folder)")
    ap.add_argument("--splits", type=int, default=5)
    args = ap.parse_args()
    pairs = [e.partition("=")[::2] for e in args.encoders]
    if any(not name or not path for name, path in pairs):
        ap.error("encoders must be given as NAME=PATH")
    f0, card = load_encoder(args.f0)
    pirate = PirateData.load(DataSection(name="digits", image_size=card["input_size"]), card["input_size"])
    probe = ProbeSection()

    def probed(enc) -> list[dict[str, float]]:
        feats = extract_features(enc, pirate.images)
        return [evaluate_encoder(enc, pirate.images, pirate.labels, pirate.num_classes, seed=s, features=feats,
                                 **probe_options(probe))[1] for s in range(args.splits)]

    base = probed(f0)
    print(f"f0: probe {sum(m['linear_probe'] for m in base) / len(base):.4f}  kNN {sum(m['knn'] for m in base) / len(base):.4f}"
          f"  ({args.splits} splits of {base[0]['n_test']} test images)")
    print("| encoder | probe | change (points) | kNN | change (points) |\n|---|---|---|---|---|")
    for name, path in pairs:
        u = paired_utility(probed(load_encoder(path)[0]), base)
        print(f"| {name} | {u['linear_probe']:.4f} | {100 * u['probe_change']:+.1f} ± {100 * u['probe_change_se']:.1f} | "
              f"{u['knn']:.4f} | {100 * u['knn_change']:+.1f} ± {100 * u['knn_change_se']:.1f} |")


if __name__ == "__main__":
    main()
