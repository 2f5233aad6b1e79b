"""Derivative robustness: rehearse the pirate in stage 1 (a "conferrable" watermark).

Plain stage 1 fits the perturbation to f0 alone, and a student distilled from
the watermarked encoder does not inherit the response (METHOD.md, "Robust
embedding"). Rehearsal fits it to f0 *and* to surrogate derivatives of f0 that
the owner makes itself, on its own data, with the removal attacks of the
registry (``distill:10``, ``finetune_full:0.001``, ``prune_global:0.5``...),
while a few independent reference encoders, pre-trained exactly like f0 with
other seeds, must not respond: the perturbation should be carried by copies of
f0, not by every encoder (Lukas et al., "conferrable adversarial examples",
ICLR 2021; SSLGuard's shadow encoder plays the same role).

    L(delta) = 1/(1+S) * sum_{e in f0, surrogates} L_gen(e; delta)
             + w / R   * sum_{r in references}     cos(r(T(x+delta)), r(x_k))

The references are seeded 7000 + r: disjoint from the demo's encoders (0, 1)
and from the calibration's null population (1000 + seed), so calibration and
the "independent" comparisons never test an encoder the secret was tuned
against. ``reference_archs`` adds references of other architectures (a pirate
may distil into one, and strangers of that architecture must stay quiet too):
``references`` of each, seeded 7000 + 100 a + r for the a-th listed one.
Surrogates and references are cached in the watermark run folder.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from dist_awenc.data.stream import IndexedImages
from dist_awenc.data.splits import derive_seed
from dist_awenc.encoders.io import Encoder, load_encoder, save_encoder
from dist_awenc.encoders.registry import parse_arch
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.log import info
from dist_awenc.watermark.perturbation import Rehearsal

REFERENCE_SEED = 7000


def parse_surrogate(spec: str) -> tuple[str, float]:
    """``"attack:strength"`` -> (attack, strength); the attack must be registered."""
    from dist_awenc.attacks import ATTACKS

    name, sep, strength = str(spec).partition(":")
    if not sep or name not in ATTACKS:
        raise ConfigError(f"rehearsal.surrogates: '{spec}' must be attack:strength with a registered attack "
                          f"({', '.join(sorted(ATTACKS))})")
    try:
        return name, float(strength)
    except ValueError:
        raise ConfigError(f"rehearsal.surrogates: '{spec}': strength must be a number") from None


def check_rehearsal(surrogates: list[str], references: int, reference_weight: float,
                    reference_archs: Sequence[str] = ()) -> None:
    """One-line ConfigError for rehearsal settings out of range (before a run folder exists)."""
    for spec in reference_archs:
        parse_arch(spec, "rehearsal.reference_archs")
    if reference_archs and not 1 <= references <= 99:  # seeds 7000 + 100 a + r stay apart
        raise ConfigError(f"rehearsal.reference_archs needs rehearsal.references in 1..99 (the count per "
                          f"architecture), not {references}")
    for s in surrogates:
        if parse_surrogate(s)[0].startswith("query_"):
            raise ConfigError(f"rehearsal.surrogates: '{s}' is a query-side attack; the surrogates must be encoders")
    if references < 0 or reference_weight < 0:
        raise ConfigError(f"rehearsal: need references >= 0 and reference_weight >= 0 (got {references}, {reference_weight})")


def build_surrogates(f0: Encoder, card: dict, specs: list[str], images: torch.Tensor, labels: torch.Tensor,
                     num_classes: int, out_dir: Path, seed: int) -> list[Encoder]:
    """f0's derivatives by the registry's attacks on the owner's own images (cached under ``out_dir``)."""
    from dist_awenc.attacks import AttackData, apply_attack
    from dist_awenc.attacks.stage import attacked_card

    data = AttackData(train_images=images, train_labels=labels, num_classes=num_classes, unlabeled=images, seed=seed)
    out = []
    for i, spec in enumerate(specs):
        name, strength = parse_surrogate(spec)
        path = out_dir / f"{i:02d}_{name}_{strength:g}" / "encoder.safetensors"
        if not path.exists():
            info(f"rehearsal: surrogate {i + 1}/{len(specs)}: {name} at {strength:g} on the owner's data")
            enc, details = apply_attack(name, f0, card, strength, replace(data, seed=seed + i), progress=False)
            if details.get("query_transform"):
                raise ConfigError(f"rehearsal.surrogates: '{spec}' is a query-side attack; the surrogates must be encoders")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_encoder(enc, path.with_suffix(""), attacked_card(card, details, enc))
        out.append(load_encoder(path)[0])
    return out


def reference_specs(count: int, archs: Sequence[str] = ()) -> list[tuple[str, int, Optional[str]]]:
    """(run name, seed, architecture or None for f0's) of each reference: f0's architecture first, as always."""
    out = [(f"reference_{r}", REFERENCE_SEED + r, None) for r in range(count)]
    for a, spec in enumerate(archs, start=1):
        name, width = parse_arch(spec, "rehearsal.reference_archs")
        out += [(f"reference_{name}{width or ''}_{r}", REFERENCE_SEED + 100 * a + r, spec) for r in range(count)]
    return out


def build_references(f0_path: str | Path, count: int, out_dir: Path, archs: Sequence[str] = ()) -> list[Encoder]:
    """``count`` encoders pre-trained exactly like f0 (its run's config.yaml) with seeds 7000 + r, and ``count`` of
    each architecture of ``archs`` (name[:width]; otherwise like f0) with seeds 7000 + 100 a + r."""
    if not count:
        return []
    from dist_awenc.config import PretrainConfig, RunSection, load_config
    from dist_awenc.runs import reuse_or_run
    from dist_awenc.ssl.pretrain import pretrain

    p = Path(f0_path)
    run_cfg = (p if p.is_dir() else p.parent) / "config.yaml"
    if not run_cfg.exists():
        raise ArtifactError(f"rehearsal.references needs f0's run config ({run_cfg} not found): references are "
                            "pre-trained exactly like f0")
    owner = load_config(PretrainConfig, run_cfg)
    specs = reference_specs(count, archs)
    out = []
    for i, (name, seed, arch) in enumerate(specs):
        encoder = owner.encoder
        if arch is not None:  # as the null population does: the architecture and width change, the rest is f0's
            arch_name, width = parse_arch(arch, "rehearsal.reference_archs")
            encoder = replace(owner.encoder, arch=arch_name, width=width, stem=None)
        cfg = replace(owner, run=RunSection(name=name, out_dir=str(out_dir), seed=seed), encoder=encoder,
                      train=replace(owner.train, progress=False))
        info(f"rehearsal: reference encoder {i + 1}/{len(specs)} (pre-trained like f0{f', as {arch}' if arch else ''}, "
             f"seed {seed})")
        out.append(load_encoder(reuse_or_run(cfg, pretrain, "encoder.safetensors"))[0])
    return out


def prepare_rehearsal(f0: Encoder, card: dict, cfg, dataset, pretrain_indices, out_dir: Path) -> tuple[Rehearsal, dict]:
    """The rehearsal of a watermark config (``cfg.rehearsal``, ``cfg.encoder``, ``cfg.run.seed``) and its record.

    Surrogates are made from f0 on the owner's pre-training split (its labels included: the data are the
    owner's); the record (attacks, reference seeds and every encoder's SHA-256) goes into the secret's meta.
    Empty when rehearsal is off.
    """
    rh = cfg.rehearsal
    if not rh.surrogates and not rh.references:
        return Rehearsal(), {}
    images = IndexedImages(dataset, pretrain_indices)  # decoded as the surrogates' attacks draw their mini-batches
    labels = dataset.labels[torch.as_tensor(pretrain_indices, dtype=torch.long)]
    surrogates = build_surrogates(f0, card, list(rh.surrogates), images, labels, dataset.num_classes,
                                  out_dir / "surrogates", derive_seed(cfg.run.seed, "rehearsal"))
    archs = list(rh.reference_archs)
    references = build_references(cfg.encoder, rh.references, out_dir / "references", archs)
    record = {"surrogates": list(rh.surrogates), "references": rh.references,
              "reference_seeds": [seed for _, seed, _ in reference_specs(rh.references, archs)],
              **({"reference_archs": archs} if archs else {}),  # only when used: older secrets keep their record
              "reference_weight": rh.reference_weight,
              "encoders_sha256": [fingerprint(e) for e in (*surrogates, *references)]}
    return Rehearsal(surrogates, references, rh.reference_weight), record


def fingerprint(encoder: Encoder) -> str:
    """SHA-256 over an encoder's parameters and buffers (names, shapes, bytes), for the secret's record."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
