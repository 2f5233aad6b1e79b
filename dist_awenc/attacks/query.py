"""Query-side attacks: the pirate transforms every query before the suspect sees it.

The weights are untouched; the attacked model is a
:class:`~dist_awenc.evaluate.serving.TransformedEncoder` (the transform in front of the same backbone), and the
transform is recorded as ``info["query_transform"]``, rebuilt from that dict by
:func:`~dist_awenc.evaluate.serving.wrap_query_transform` when the pirate's deployed model is built.
"""
from __future__ import annotations

from dist_awenc.attacks.base import AttackData, AttackOptions, register_attack
from dist_awenc.encoders.io import Encoder
from dist_awenc.evaluate.serving import (QUERY_KINDS, QueryTransform, TransformedEncoder,  # noqa: F401  (re-exported)
                                         median3x3, with_recorded_transform, wrap_query_transform)


def _query_attack(kind: str):
    def attack(encoder: Encoder, card: dict, strength: float, data: AttackData,
               options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
        transform = QueryTransform(kind, strength, data.seed)
        return TransformedEncoder(transform, encoder), {"query_transform": transform.spec()}

    attack.__name__ = f"query_{kind}"
    attack.__doc__ = f"Query-side {kind}: the weights are unchanged, every query passes a :class:`QueryTransform`."
    return attack


query_jpeg = register_attack("query_jpeg", strengths=[90, 70, 50])(_query_attack("jpeg"))
query_noise = register_attack("query_noise", strengths=[0.01, 0.03, 0.05])(_query_attack("noise"))
query_resize = register_attack("query_resize", strengths=[0.75, 0.5])(_query_attack("resize"))
query_crop = register_attack("query_crop", strengths=[0.9, 0.8])(_query_attack("crop"))
query_purify = register_attack("query_purify", strengths=[0.5, 1.0])(_query_attack("purify"))
