"""The robustness grid's theft baselines: f0 (the clean parent) and a random init, per seed and architecture.

The rule itself is :mod:`dist_awenc.evaluate.theft`; this module finds f0 and measures the two reference encoders on
the same pirate split, with the same probe and kNN, as each derivative of the grid.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from dist_awenc.config import ProbeSection
from dist_awenc.encoders.io import load_encoder
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
from dist_awenc.evaluate.theft import random_init_encoder
from dist_awenc.files import atomic_write_text


def load_clean(card: dict, clean: str) -> Optional[torch.nn.Module]:
    """f0 for the theft rule: ``clean`` when given, else the parent the encoder's card records.

    Args:
        card: the watermarked encoder's card (``parent``: f0's SHA-256; ``config.encoder``: the path its
            embedding read f0 from).
        clean: f0's file or run folder, or "" to take the card's.

    Returns:
        f0, or None when the card names no parent and ``clean`` is "" (a pre-trained encoder attacked as it is
        is its own clean parent).

    Raises:
        ArtifactError: ``clean`` is not the encoder's parent, cannot be loaded, or takes another input size.
        ConfigError: the card names a parent whose recorded path is gone or holds another encoder.
    """
    parent = card.get("parent")
    if not clean and parent is None:
        return None
    path = clean or str((card.get("config") or {}).get("encoder") or "")
    f0, f0_card, why = None, {}, "which is another encoder"
    try:
        if path:
            f0, f0_card = load_encoder(path)
    except ArtifactError as e:
        if clean:
            raise
        why = f"which cannot be loaded ({e})"
    if f0 is not None and (parent is None or f0_card.get("sha256") == parent):
        if f0_card["input_size"] != card["input_size"]:
            raise ArtifactError(f"clean encoder {path} takes {f0_card['input_size']} px but the encoder takes "
                                f"{card['input_size']} px")
        return f0
    if clean:
        raise ArtifactError(f"clean={clean} is not the encoder's parent: its SHA-256 is "
                            f"{str(f0_card.get('sha256'))[:12]}..., the encoder's card names {parent[:12]}...")
    raise ConfigError(f"the theft rule measures against f0, the encoder's clean parent (SHA-256 {parent[:12]}...): "
                      f"its card records {path or 'no path'}{', ' + why if path else ''}; "
                      "set clean=<f0 file or run folder>")


def theft_baselines(f0: torch.nn.Module, card: dict, pirate, probe: ProbeSection, folder: Path, arch: str,
                    arch_kwargs: dict, seed: int) -> dict[str, float]:
    """f0's and a random init's (of ``arch``) linear probe and kNN on seed ``seed``'s split of the pirate's task.

    Args:
        f0: the clean parent.
        card: the watermarked encoder's card (the random init takes its normalisation and input size).
        pirate: the grid's :class:`~dist_awenc.attacks.stage.PirateData`.
        probe: the grid's probe settings (the derivatives are measured with the same).
        folder: where each measurement is kept (``f0__s<seed>.json``, ``random_<arch>_<kwargs hash>__s<seed>.json``),
            so each is made once per run; written atomically (tasks of a sweep that race write the same numbers).
        arch, arch_kwargs: the derivative's architecture.
        seed: the task's seed: its train/test split, and the random init's ``torch.manual_seed``.

    Returns:
        ``f0_linear_probe``, ``f0_knn``, ``random_linear_probe``, ``random_knn``.
    """
    tag = hashlib.sha256(json.dumps([arch, arch_kwargs], sort_keys=True).encode()).hexdigest()[:8]
    out: dict[str, float] = {}
    for prefix, name in (("f0", "f0"), ("random", f"random_{arch}_{tag}")):
        path = folder / f"{name}__s{seed}.json"
        if not path.exists():
            enc = f0 if prefix == "f0" else random_init_encoder(arch, arch_kwargs, card["mean"], card["std"],
                                                                card["input_size"], seed)
            _, m = evaluate_encoder(enc, pirate.images, pirate.labels, pirate.num_classes, seed=seed,
                                    **probe_options(probe))
            folder.mkdir(parents=True, exist_ok=True)
            record = {"encoder": prefix, "seed": seed, "linear_probe": m["linear_probe"], "knn": m["knn"]}
            if prefix == "random":
                record.update(arch=arch, arch_kwargs=arch_kwargs)
            atomic_write_text(path, json.dumps(record, indent=1))
        m = json.loads(path.read_text())
        out[f"{prefix}_linear_probe"], out[f"{prefix}_knn"] = m["linear_probe"], m["knn"]
    return out
