"""Removal attacks (METHOD.md, "Removal attacks"): one registry, each attack a strength knob.

``apply_attack(name, encoder, card, strength, data, options)`` returns the
encoder a pirate would deploy and a JSON-able info dict;
:data:`ATTACK_STRENGTHS` holds the default strength grid of every attack.
"""
from dist_awenc.attacks.base import (ATTACK_STRENGTHS, ATTACKS, AttackData, AttackOptions, apply_attack, get_attack,
                                     register_attack)
from dist_awenc.attacks import finetune, prune, quantize, distill, query, overwrite, adaptive  # noqa: F401,E402  (register)
from dist_awenc.attacks.query import QUERY_KINDS, QueryTransform, TransformedEncoder, wrap_query_transform

__all__ = [
    "ATTACKS",
    "ATTACK_STRENGTHS",
    "AttackData",
    "AttackOptions",
    "QUERY_KINDS",
    "QueryTransform",
    "TransformedEncoder",
    "apply_attack",
    "get_attack",
    "register_attack",
    "wrap_query_transform",
]
