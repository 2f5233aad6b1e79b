"""Stage: one removal attack at one strength (``awenc attack``).

Writes the attacked encoder (safetensors + a card naming its parent and the
attack; a query-side attack records its transform, which the pirate's
downstream model applies to its queries and loading never does)
and the pirate's downstream accuracy on it, beside the unattacked one's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_awenc.attacks.base import AttackData, AttackOptions, apply_attack
from dist_awenc.config import DataSection, ProbeSection, RunSection, SuspectCardSection, to_dict
from dist_awenc.data import build_dataset, splits_for, train_test_split_indices
from dist_awenc.data.stream import Images, IndexedImages, take
from dist_awenc.encoders.io import Encoder, atomic_write_text, card_for, save_encoder
from dist_awenc.encoders.thirdparty import load_suspect
from dist_awenc.errors import ArtifactError
from dist_awenc.evaluate.downstream import evaluate_encoder, probe_options
from dist_awenc.log import info
from dist_awenc.runs import open_run
from dist_awenc.verify.resize import fed_at


@dataclass
class AttackSpec:
    name: str = "prune_global"  # a registered attack: see `awenc config attack` and docs/robustness.md
    strength: float = 0.5


@dataclass
class AttackConfig:
    run: RunSection = field(default_factory=lambda: RunSection(name="attack"))
    encoder: str = ""  # the suspect to attack (the watermarked encoder): file or run folder
    data: DataSection = field(default_factory=DataSection)
    attack: AttackSpec = field(default_factory=AttackSpec)
    options: AttackOptions = field(default_factory=AttackOptions)
    probe: ProbeSection = field(default_factory=ProbeSection)
    suspect_card: SuspectCardSection = field(default_factory=SuspectCardSection)  # when `encoder` is a bare weights file


@dataclass
class PirateData:
    """The pirate's downstream split: the attack trains on its train part; accuracy is measured on the rest.

    ``images`` is the split undecoded (:class:`~dist_awenc.data.stream.IndexedImages`; a tensor also
    works): attacks decode their mini-batches, the probe its feature batches.
    """

    images: Images
    labels: torch.Tensor
    num_classes: int

    @classmethod
    def load(cls, data: DataSection, image_size: int) -> "PirateData":
        dataset = build_dataset(data.name, root=data.root, image_size=image_size, seed=data.split_seed, size=data.size)
        images = IndexedImages(dataset, splits_for(len(dataset), data.split_seed, data.splits, "the pirate's task",
                                                   "downstream")["downstream"], num_workers=data.num_workers)
        return cls(images, images.labels, dataset.num_classes)

    def attack_data(self, test_fraction: float, seed: int) -> AttackData:
        """The pirate's training part (the split :func:`evaluate_encoder` trains its head on)."""
        train, _ = train_test_split_indices(torch.arange(len(self.images)), seed, test_fraction)
        return AttackData(train_images=take(self.images, train), train_labels=self.labels[train],
                          num_classes=self.num_classes, unlabeled=take(self.images, train), seed=seed)


def attacked_card(parent_card: dict, info_: dict[str, Any], attacked: Encoder, extra: dict | None = None) -> dict:
    """The card of an attacked encoder: its own architecture, the parent's hash, the attack."""
    return card_for(attacked, arch=info_["arch"], arch_kwargs=info_["arch_kwargs"], method=parent_card.get("method", ""),
                    stage="attack", parent=parent_card.get("sha256"),
                    extra={"attack": info_, "query_transform": info_.get("query_transform"),
                           "secret_sha256": parent_card.get("secret_sha256"), **(extra or {})})


def attack(cfg: AttackConfig) -> dict:
    """Attack the suspect once; returns the downstream accuracies and the attack's info."""
    suspect, card = load_suspect(cfg.encoder, cfg.suspect_card)
    if card["input_size"] != cfg.data.image_size:
        raise ArtifactError(f"encoder takes {card['input_size']} px but data.image_size={cfg.data.image_size}")
    pirate = PirateData.load(cfg.data, card["input_size"])
    with open_run(cfg, "attack") as run_dir:
        attacked, details = apply_attack(cfg.attack.name, suspect, card, cfg.attack.strength,
                                         pirate.attack_data(cfg.probe.test_fraction, cfg.run.seed), cfg.options)
        save_encoder(attacked, run_dir / "encoder", attacked_card(card, details, attacked, {"config": to_dict(cfg)}))
        probe = probe_options(cfg.probe)
        _, before = evaluate_encoder(suspect, pirate.images, pirate.labels, pirate.num_classes, seed=cfg.run.seed, **probe)
        # a derivative at another input size serves the pirate's images resized to it, as its own pipeline would
        served = fed_at(attacked, attacked.input_size, card["input_size"])
        _, after = evaluate_encoder(served, pirate.images, pirate.labels, pirate.num_classes, seed=cfg.run.seed, **probe)
        result = {"attack": details, "downstream": {"unattacked": before, "attacked": after,
                                                    "linear_probe_change": after["linear_probe"] - before["linear_probe"]}}
        atomic_write_text(run_dir / "attack.json", json.dumps(result, indent=2))
        info(f"{cfg.attack.name} @ {cfg.attack.strength:g}: linear probe {before['linear_probe']:.4f} -> "
             f"{after['linear_probe']:.4f}  ({details['seconds']:.1f} s)  -> {run_dir / 'encoder.safetensors'}")
    return result
