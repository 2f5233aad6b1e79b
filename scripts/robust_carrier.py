"""Experiment (issue #11, not a feature): a clean-data carrier that a pirate's distillation might copy.

The watermark of AWEncoder lives on marked images x + delta, which a pirate's distillation never shows the
student. This experiment puts a second mark into f's answers on clean images, where distillation does look
(the idea behind EWE's entanglement and radioactive data):

    c(x) = sign(<w, x> - t)                  w a secret random smooth filter (4x4 noise upsampled), t its median
    s(x) = c(x) * (cos(f(x), f(a1)) - cos(f(x), f(a2)))      a1, a2 two secret images of the owner's data

Stage 2 (the demo's embedding config and secret) gets the term ``weight * mean(relu(margin - s))`` on the mild
and clean views. s uses the suspect's own embeddings of a1 and a2, so rotating or scaling the embedding space
does not remove it. Then the attack grid's derivatives of f are made, and every encoder is tested two ways:

* margin: the exact sign test of median(s) <= tau on 256 hold-out images, as white-box mode; tau* per encoder
  (the margin at which p reaches 1e-3) against the null population's (runs/calibration/population);
* exact: the owner's mean s ranked among J = 1999 alternative carriers drawn by the same procedure
  (p = (1 + #{T_j >= T}) / (J + 1); exact under H0 for any suspect independent of the owner's secret).

    .venv/bin/python scripts/robust_carrier.py MARGIN WEIGHT [--zero-mean] [--smooth]

Needs runs/demo and runs/calibration/population; writes runs/carrier/<setting>/ and prints a markdown table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dist_awenc.attacks.base import apply_attack
from dist_awenc.attacks.stage import PirateData, attacked_card
from dist_awenc.config import CalibrateConfig, EmbedConfig
from dist_awenc.config_loading import load_config
from dist_awenc.data import build_dataset, splits_for
from dist_awenc.encoders.io import load_encoder, save_encoder
from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
from dist_awenc.verify.calibration import tau_star
from dist_awenc.watermark import embed as E

OWNER_SEED, ALTERNATIVES = 12345, 1999
DERIVATIVES = [("distill", 10), ("distill", 30), ("distill_arch", 30), ("distill_strong_aug", 10),
               ("adversarial_finetune", 3), ("finetune_full", 0.001), ("prune_finetune", 0.5)]


class Carriers:
    """The owner's carrier (index 0) and J alternatives, each (filter, threshold, anchor pool indices)."""

    def __init__(self, pool: torch.Tensor, seeds: list[int], zero_mean: bool):
        w, t, a1, a2 = [], [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            f = F.interpolate(torch.randn(1, *pool.shape[1:2], 4, 4, generator=g), size=pool.shape[-1], mode="bilinear",
                              align_corners=False)[0]
            if zero_mean:
                f = f - f.mean(dim=(1, 2), keepdim=True)
            f = f / f.norm()
            w.append(f)
            t.append((pool * f).flatten(1).sum(1).median())
            perm = torch.randperm(len(pool), generator=g)
            a1.append(perm[0])
            a2.append(perm[1])
        self.w, self.t, self.a1, self.a2 = torch.stack(w), torch.stack(t), torch.stack(a1), torch.stack(a2)

    def sign(self, x: torch.Tensor) -> torch.Tensor:
        """(J+1, n): c_j(x_i)."""
        return torch.sign(torch.einsum("nchw,jchw->jn", x, self.w.to(x.device)) - self.t.to(x.device)[:, None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("margin", type=float)
    ap.add_argument("weight", type=float)
    ap.add_argument("--zero-mean", action="store_true", help="a zero-mean filter per channel (blind to brightness)")
    ap.add_argument("--smooth", action="store_true", help="regress d(x) on margin * clamp(z-scored <w, x> - t, -1, 1) "
                    "instead of the hinge on sign(<w, x> - t) * d(x)")
    args = ap.parse_args()
    from plain_demo import require_plain_demo  # scripts/ (this file's folder); runs/demo is its plain AWEncoder (#27)

    require_plain_demo("runs/demo")
    tag = ("_zm" if args.zero_mean else "") + ("_smooth" if args.smooth else "")
    root = Path(f"runs/carrier/m{args.margin:g}_w{args.weight:g}{tag}")
    cfg = load_config(CalibrateConfig, "configs/sweep/null/digits.yaml")
    ds = build_dataset(cfg.data.name, image_size=cfg.data.image_size, seed=cfg.data.split_seed)
    sp = splits_for(len(ds), cfg.data.split_seed, cfg.data.splits, "carrier", "pretrain", "holdout")
    pool, _ = ds.get_batch(sp["pretrain"])
    hold, _ = ds.get_batch(sp["holdout"][:256])
    carriers = Carriers(pool, [OWNER_SEED] + [100000 + j for j in range(ALTERNATIVES)], args.zero_mean)
    a1, a2 = pool[carriers.a1[0]], pool[carriers.a2[0]]
    w0, t0 = carriers.w[0], carriers.t[0]
    owner_proj = lambda x: (x * w0.to(x.device)).flatten(1).sum(1) - t0  # noqa: E731
    scale = float(owner_proj(pool).std())

    original = E.EmbedTask.forward

    def forward(self, inputs):  # stage 2 plus the carrier term
        out = original(self, inputs)
        xs = torch.cat([inputs["aug"], inputs["clean"]])
        z = F.normalize(self.method.backbone(torch.cat([xs, a1[None], a2[None]])), dim=1)
        d, c = z[:-2] @ z[-2] - z[:-2] @ z[-1], owner_proj(xs)
        if args.smooth:
            term = ((d - args.margin * (c / scale).clamp(-1, 1)) ** 2).mean()
        else:
            term = F.relu(args.margin - torch.sign(c) * d).mean()
        out["loss_carrier"] = term
        out["loss"] = out["loss"] + args.weight * term
        return out

    E.EmbedTask.forward = forward
    if not (root / "embed/encoder.safetensors").exists():
        E.embed(load_config(EmbedConfig, "runs/demo/embed/config.yaml",
                            [f"run.out_dir={root}", "run.name=embed", "train.progress=false"]))
    pirate = PirateData.load(cfg.data, cfg.data.image_size)
    f, f_card = load_encoder(root / "embed")
    owner = {"f0": Path("runs/demo/f0"), "f (plain AWEncoder)": Path("runs/demo/embed"), "f (+ carrier)": root / "embed"}
    for name, strength in DERIVATIVES:
        path = root / f"f__{name}{strength:g}"
        if not (path / "encoder.safetensors").exists():
            attacked, details = apply_attack(name, f, f_card, strength, pirate.attack_data(cfg.probe.test_fraction, 0),
                                             progress=False)
            path.mkdir(parents=True, exist_ok=True)
            save_encoder(attacked, path / "encoder", attacked_card(f_card, details, attacked))
        owner[f"{name}@{strength:g}"] = path
    pop = Path("runs/calibration/population")
    nulls = {p.name: p for p in sorted(pop.iterdir()) if (p / "encoder.safetensors").exists()}
    signs = carriers.sign(hold)  # (J+1, n)

    @torch.no_grad()
    def measure(path: Path) -> dict:
        enc = load_encoder(path)[0].eval()
        zh = F.normalize(enc(hold).float(), dim=1)
        za = F.normalize(enc(torch.cat([pool[carriers.a1], pool[carriers.a2]])).float(), dim=1)
        d = zh @ (za[: len(carriers.a1)] - za[len(carriers.a1):]).T  # (n, J+1)
        s = (signs.T * d).double()
        t = s.mean(0)
        return {"mean_s": float(t[0]), "tau_star": tau_star("whitebox", s[:, 0].numpy(), 1e-3),
                "p_exact": (1 + int((t[1:] >= t[0]).sum())) / (ALTERNATIVES + 1), "alt_sd": float(t[1:].std())}

    null_rows = {k: measure(p) for k, p in nulls.items()}
    max_null = max(r["tau_star"] for r in null_rows.values())
    min_p = min(r["p_exact"] for r in null_rows.values())
    print(f"# carrier: margin {args.margin:g}, weight {args.weight:g}{', zero-mean filter' if args.zero_mean else ''}"
          f"{', smooth target' if args.smooth else ''}\n")
    print(f"{len(null_rows)} null encoders: largest tau* {max_null:+.4f}; smallest exact p {min_p:.4g}\n")
    print("| encoder | linear probe | kNN | mean s | tau* | above every null | exact p (J = 1999) |")
    print("|---|---|---|---|---|---|---|")
    for name, path in owner.items():
        r = measure(path)
        _, m = evaluate_encoder(load_encoder(path)[0], pirate.images, pirate.labels, pirate.num_classes,
                                seed=cfg.run.seed, **probe_options(cfg.probe))
        print(f"| {name} | {m['linear_probe']:.4f} | {m['knn']:.4f} | {r['mean_s']:+.4f} | {r['tau_star']:+.4f} | "
              f"{'yes' if r['tau_star'] > max_null else 'no'} | {r['p_exact']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
