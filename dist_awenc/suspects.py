"""``awenc attack`` on a bare third-party weights file: the attack stage with a ``suspect_card`` section.

``awenc verify`` and ``awenc downstream`` load their suspect with
:func:`~dist_awenc.encoders.thirdparty.load_suspect`, which reads a bare weights
file from ``suspect_card.*`` and checks those fields against a card where there
is one. The attack stage (:mod:`dist_awenc.attacks.stage`) reads its suspect
by path with ``load_encoder``; this wrapper loads the suspect the same way and
hands it to the stage through :func:`~dist_awenc.encoders.io.preloaded`, so the
three commands take the same fields. (The field belongs in ``AttackConfig``
itself once that module takes it; then this wrapper goes.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dist_awenc.attacks import stage as attack_stage
from dist_awenc.config import SuspectCardSection
from dist_awenc.encoders.io import preloaded
from dist_awenc.encoders.thirdparty import load_suspect


@dataclass
class AttackSuspectConfig(attack_stage.AttackConfig):
    suspect_card: SuspectCardSection = field(default_factory=SuspectCardSection)  # when `encoder` is a bare weights file


def attack(cfg: AttackSuspectConfig) -> dict:
    """:func:`dist_awenc.attacks.stage.attack` on the suspect as :func:`load_suspect` reads it."""
    encoder, card = load_suspect(cfg.encoder, cfg.suspect_card)
    with preloaded(cfg.encoder, encoder, card):
        return attack_stage.attack(cfg)
