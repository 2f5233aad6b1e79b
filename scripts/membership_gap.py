"""Dataset inference's first question on the demo (#27 item 2): does an encoder treat the owner's private
pre-training images as more familiar than images it never saw?

The owner's pre-training split is cut in two halves A and B (seeded); C is every image outside it (hold-out and the
pirate's downstream split). Per encoder g: a Gaussian mixture (k components, diagonal covariances, scikit-learn) is
fitted to g's own L2-normalised features of A, and g's features of B and C are scored under it. A member gap is B's
mean log-likelihood above C's; its p is the one-sided Mann-Whitney test (scipy) of B > C. The mixture is fitted on
g's own features, so encoders whose embedding spaces differ are each measured in their own; a student that never
saw the private images shows a gap only if it inherited one. Dataset inference (Dziedzic et al., NeurIPS 2022)
needs that gap in f0 first, then in the suspects derived from it, and none in encoders that never saw the private
images.

    .venv/bin/python scripts/membership_gap.py [DEMO_DIR] [--students N]   # default runs/demo; about a minute

Encoders: f0, the release, the demo's independent encoder (trained on the same private split with another seed:
a member too, so not a null for this test), a random init, and N students distilled from the release for 30
epochs (the attack registry's `distill@30`, seeds 0..N-1; default 3).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from sklearn.mixture import GaussianMixture

from dist_awenc.attacks import AttackOptions, apply_attack
from dist_awenc.attacks.stage import PirateData
from dist_awenc.config import DataSection, ProbeSection
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import build_encoder, load_encoder
from dist_awenc.evaluate.probe import extract_features

COMPONENTS = (1, 5, 20)


def member_gap(encoder: torch.nn.Module, parts: tuple[torch.Tensor, ...], k: int) -> tuple[float, float]:
    """(B's mean log-likelihood minus C's, one-sided Mann-Whitney p of B > C) under a k-component mixture of A."""
    a, b, c = (torch.nn.functional.normalize(extract_features(encoder, x), dim=1).double().numpy() for x in parts)
    gm = GaussianMixture(k, covariance_type="diag", random_state=0, reg_covar=1e-4).fit(a)
    lb, lc = gm.score_samples(b), gm.score_samples(c)
    return float(lb.mean() - lc.mean()), float(mannwhitneyu(lb, lc, alternative="greater").pvalue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", nargs="?", default="runs/demo")
    ap.add_argument("--students", type=int, default=3)
    args = ap.parse_args()
    ds = build_dataset("digits", image_size=16, seed=0)
    splits = make_splits(len(ds), 0)
    pre = splits["pretrain"][torch.randperm(len(splits["pretrain"]), generator=torch.Generator().manual_seed(0))]
    half = len(pre) // 2
    parts = tuple(ds.get_batch(i)[0] for i in (pre[:half], pre[half:], torch.cat([splits["holdout"], splits["downstream"]])))
    release, card = load_encoder(f"{args.demo}/embed/encoder.safetensors")
    torch.manual_seed(0)
    encoders = {"f0": load_encoder(f"{args.demo}/f0/encoder.safetensors")[0], "release": release,
                "independent (same private split)": load_encoder(f"{args.demo}/independent/encoder.safetensors")[0],
                "random init": build_encoder(card["arch"], card["arch_kwargs"], card["mean"], card["std"], 16)}
    pirate = PirateData.load(DataSection(name="digits", image_size=16), 16)
    for seed in range(args.students):
        encoders[f"distill@30 seed {seed}"] = apply_attack("distill", release, card, 30, pirate.attack_data(ProbeSection().test_fraction, seed),
                                                           AttackOptions(), progress=False)[0]
    print(f"A {half}, B {len(pre) - half} private images; C {len(parts[2])} others")
    print("| encoder | " + " | ".join(f"k = {k}: gap (p)" for k in COMPONENTS) + " |")
    print("|---|" + "---|" * len(COMPONENTS))
    for name, enc in encoders.items():
        cells = [member_gap(enc, parts, k) for k in COMPONENTS]
        print(f"| {name} | " + " | ".join(f"{g:+.3f} ({p:.3g})" for g, p in cells) + " |", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
