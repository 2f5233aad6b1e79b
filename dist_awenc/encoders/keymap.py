"""Third-party weights onto this project's backbones: unwrap, rename, drop the classifier, cast.

A torchvision ResNet's state dict (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``fc``) has the names of this project's ResNet backbones, which are
torchvision's ResNets with ``fc`` replaced by an identity; timm's ResNets use
the same names. So the mapping is: take the state dict out of a
``{"state_dict": ...}`` or ``{"model": ...}`` wrapper, strip DDP's ``module.``
prefix (and this project's ``backbone.``), drop a classifier head (``fc.*``,
``head.*``, ``classifier.*``) and cast fp16/bf16 to float32. Anything else that
does not fit is an error listing the keys: nothing is guessed.

Every function returns notes, one short phrase per thing it did, for the caller to print.
"""
from __future__ import annotations

from typing import Any

import torch

from dist_awenc.errors import ArtifactError

WRAPPER_KEYS = ("state_dict", "model")  # a training checkpoint holding the state dict under one of these
PREFIXES = ("module.", "backbone.")  # DDP's wrapper, then this project's own (stripped where every key has it)
HEAD_PREFIXES = ("fc.", "head.", "classifier.")  # a classifier head: not part of the encoder
LOW_PRECISION = (torch.float16, torch.bfloat16)
SHOWN = 5  # keys listed per kind in an error


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of string names to tensors."""
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def unwrap(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in ``obj``: ``obj`` itself, or the one held under ``state_dict`` or ``model``.

    Raises:
        ArtifactError: anything else (a list, a module, a dict of other things, two candidate state dicts).
    """
    if is_state_dict(obj):
        return dict(obj), []
    if isinstance(obj, dict):
        inner = [k for k in WRAPPER_KEYS if is_state_dict(obj.get(k))]
        if len(inner) == 1:
            others = sorted(str(k) for k in obj if k != inner[0])
            return dict(obj[inner[0]]), [f"took the state dict under '{inner[0]}'"
                                         + (f" (ignored: {_listed(others)})" if others else "")]
        if len(inner) > 1:
            raise ArtifactError(f"{where}: holds several state dicts ({', '.join(inner)}); save the one to verify alone")
    what = f"a dict with keys {_listed(sorted(map(str, obj)))}" if isinstance(obj, dict) else type(obj).__name__
    raise ArtifactError(f"{where}: not a plain mapping of names to tensors (nor a dict holding one under "
                        f"'state_dict' or 'model'): {what}")


def strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove :data:`PREFIXES` that every key carries (``module.backbone.conv1.weight`` -> ``conv1.weight``)."""
    notes = []
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"stripped the '{prefix}' prefix")
    return state, notes


def fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str,
        what: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` renamed onto ``expected`` (a backbone's own state dict): head dropped, low precision cast.

    Raises:
        ArtifactError: missing or unexpected keys (up to 5 of each listed), or shapes that differ.
    """
    notes = []
    head = sorted(k for k in state if k.startswith(HEAD_PREFIXES) and k not in expected)
    if head:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in head[:SHOWN])
        notes.append(f"dropped the classifier head ({shapes}): the encoder is what is measured")
        state = {k: v for k, v in state.items() if k not in head}
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_listed(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_listed(unexpected)})"] if unexpected else [])
        raise ArtifactError(f"{where}: weights do not fit {what}: {'; '.join(parts)}")
    bad = [k for k in expected if state[k].shape != expected[k].shape]
    if bad:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in bad[:SHOWN])
        raise ArtifactError(f"{where}: weights do not fit {what}: {len(bad)} shape(s) differ (file vs model: {shown})")
    low = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.dtype in LOW_PRECISION})
    if low:
        count = sum(v.dtype in LOW_PRECISION for v in state.values())
        state = {k: v.float() if v.dtype in LOW_PRECISION else v for k, v in state.items()}
        notes.append(f"cast {count} {'/'.join(low)} tensors to float32")
    return {k: state[k] for k in expected}, notes
