"""How close to the owner's f0 is a derivative of its release, and how close is an independent encoder?

A diagnostic for issue #11 (why distillation escapes every mode), not a verification mode. For every
encoder, the hold-out images the verification plan uses are embedded; the first 64 are anchors, the other
256 are tested. Per tested image, s_i is the Pearson correlation between the encoder's and f0's relative
representations (the cosines to the anchors; invariant to any rotation and scale of either space). Per
encoder: the median of s_i, and linear CKA between its and f0's embeddings of all 320 images.

Encoders: f0's derivatives (the watermarked release f and attacked copies of f, made here with the attack
registry's defaults), and the null population of results/calibration (independent encoders and their
attacked copies), split into f0's own recipe (SimCLR, tiny CNN, width 32: only the seed differs) and the
others. If a derivative that keeps the pirate's accuracy is no closer to f0 than an independent encoder of
f0's recipe, no test of "derived from f0" built on f0's clean geometry can tell them apart; only what the
embedding stage adds to f (the watermark) could, and only if distillation carries it.

    .venv/bin/python scripts/robust_closeness.py [--out results/robust/closeness]

Needs runs/demo (bash scripts/demo.sh) and runs/calibration/population (results/calibration/README.md).
Derivatives are cached under runs/closeness/.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dist_awenc.attacks.base import apply_attack
from dist_awenc.attacks.stage import PirateData, attacked_card
from dist_awenc.config import CalibrateConfig
from dist_awenc.config_loading import load_config
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.encoders.io import atomic_write_text, load_encoder, save_encoder
from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
from dist_awenc.files import save_figure

ANCHORS, TESTED = 64, 256
DERIVATIVES = [("distill", 10), ("distill", 30), ("distill_arch", 30), ("distill_strong_aug", 10),
               ("adversarial_finetune", 3), ("finetune_full", 0.001), ("finetune_ssl", 5), ("prune_finetune", 0.5),
               ("prune_global", 0.5)]
OWN_RECIPE = "simclr_tiny32_"  # f0's run: SimCLR, the tiny CNN at width 32 (runs/demo/f0/config.yaml)


@torch.no_grad()
def embed(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    return F.normalize(encoder(x).float(), dim=1).double()


def relative_agreement(z: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """Per tested image: Pearson correlation of the two encoders' cosines to the anchors."""
    rel = lambda e: e[ANCHORS:] @ e[:ANCHORS].T  # noqa: E731
    a, b = rel(z), rel(ref)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).numpy()


def linear_cka(z: torch.Tensor, ref: torch.Tensor) -> float:
    x, y = z - z.mean(0), ref - ref.mean(0)
    return float((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def group_of(name: str) -> str:
    if name.startswith("f__") or name == "f":
        return "derivative of f"
    own = name.startswith(OWN_RECIPE)
    attacked = "__" in name
    return f"null, {'f0 recipe' if own else 'other recipe'}{', attacked' if attacked else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/robust/closeness")
    ap.add_argument("--population", default="runs/calibration/population")
    ap.add_argument("--cache", default="runs/closeness")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(CalibrateConfig, "configs/sweep/null/digits.yaml")
    dataset = build_dataset(cfg.data.name, image_size=cfg.data.image_size, seed=cfg.data.split_seed)
    holdout_idx = splits_for(len(dataset), cfg.data.split_seed, cfg.data.splits, "closeness", "holdout")["holdout"]
    x, _ = dataset.get_batch(holdout_idx[: ANCHORS + TESTED])
    pirate = PirateData.load(cfg.data, cfg.data.image_size)
    f, f_card = load_encoder("runs/demo/embed")
    encoders = {"f": Path("runs/demo/embed")}
    for name, strength in DERIVATIVES:
        path = Path(args.cache) / f"f__{name}{strength:g}"
        if not (path / "encoder.safetensors").exists():
            attacked, details = apply_attack(name, f, f_card, strength, pirate.attack_data(cfg.probe.test_fraction, 0),
                                             progress=False)
            path.mkdir(parents=True, exist_ok=True)
            save_encoder(attacked, path / "encoder", attacked_card(f_card, details, attacked))
        encoders[path.name] = path
    pop = Path(args.population)
    nulls = sorted(p for p in pop.iterdir() if (p / "encoder.safetensors").exists() and not p.name.startswith("secret_"))
    if len(nulls) < 30:
        raise SystemExit(f"{pop}: {len(nulls)} null encoders; run the calibration of results/calibration first")
    encoders.update({p.name: p for p in nulls})
    ref = embed(load_encoder("runs/demo/f0")[0], x)
    rows = []
    for name, path in encoders.items():
        enc, _ = load_encoder(path)
        z = embed(enc, x)
        s = relative_agreement(z, ref)
        row = {"encoder": name, "group": group_of(name), "median_s": float(np.median(s)),
               "q25_s": float(np.quantile(s, 0.25)), "cka": linear_cka(z, ref)}
        if row["group"] == "derivative of f":
            _, m = evaluate_encoder(enc, pirate.images, pirate.labels, pirate.num_classes, seed=cfg.run.seed,
                                    **probe_options(cfg.probe))
            row["linear_probe"] = m["linear_probe"]
        rows.append(row)
        print(f"{name:<55} {row['group']:<28} median s {row['median_s']:.3f}  CKA {row['cka']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "closeness.json", json.dumps({"anchors": ANCHORS, "tested": TESTED, "rows": rows}, indent=2))
    atomic_write_text(out / "closeness.md", markdown(rows))
    plot(rows, out / "closeness.png")


def markdown(rows: list[dict]) -> str:
    lines = [f"# Closeness to f0 ({ANCHORS} anchors, {TESTED} tested hold-out images)", "",
             "median s: the median over tested images of the correlation between the encoder's and f0's relative "
             "representations; CKA: linear CKA with f0 on all images. Derivatives show the pirate's linear-probe "
             "accuracy (the unattacked f: first row).", "",
             "| encoder | group | median s | lower quartile s | CKA | linear probe |", "|---|---|---|---|---|---|"]
    for r in rows:
        probe = f"{r['linear_probe']:.4f}" if "linear_probe" in r else ""
        lines.append(f"| {r['encoder']} | {r['group']} | {r['median_s']:.3f} | {r['q25_s']:.3f} | {r['cka']:.3f} | {probe} |")
    groups = sorted({r["group"] for r in rows})
    lines += ["", "| group | encoders | median s: min | max |", "|---|---|---|---|"]
    for g in groups:
        v = [r["median_s"] for r in rows if r["group"] == g]
        lines.append(f"| {g} | {len(v)} | {min(v):.3f} | {max(v):.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["derivative of f", "null, f0 recipe", "null, f0 recipe, attacked", "null, other recipe",
              "null, other recipe, attacked"]
    fig, ax = plt.subplots(figsize=(9.5, 4.4))
    markers = "osD^v<>pPXh*"
    for i, g in enumerate(groups):
        rs = [r for r in rows if r["group"] == g]
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(rs))
        if g != "derivative of f":
            ax.scatter([r["median_s"] for r in rs], i + jitter, s=18, alpha=0.8, color="tab:gray")
            continue
        for k, (r, j) in enumerate(zip(rs, jitter)):  # each derivative its own marker, named in the legend
            ax.scatter(r["median_s"], i + j, s=30, marker=markers[k % len(markers)], label=r["encoder"].removeprefix("f__"))
    ax.legend(title="derivative of f", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    ax.set_xlabel("median s: agreement with f0's relative representation (1 = f0 itself)")
    ax.set_title("Derivatives of the watermarked f vs independent encoders: closeness to f0\n"
                 "(digits demo; 64 anchors, 256 tested hold-out images)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
