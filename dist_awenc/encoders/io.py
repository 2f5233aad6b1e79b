"""The released encoder: normalisation + backbone, saved as safetensors with a JSON card.

A card records what is needed to rebuild and trust the weights: architecture
and its arguments, SSL method, input size, normalisation, feature dimension,
the SHA-256 of the weights file and the hash of the parent encoder. Loading
never unpickles: ``.safetensors`` is read as such, and a legacy ``.pt``
state_dict only with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import dist_awenc.encoders.backbones  # noqa: F401  (registers the backbones)
import dist_awenc.encoders.timm_backbones  # noqa: F401  (registers timm/<model name>; timm itself loads on first use)
from dist_awenc.encoders.registry import build_backbone
from dist_awenc.errors import ArtifactError
from dist_awenc.files import (_durable_replace, _tmp_name, atomic_write_text,  # noqa: F401  (re-exported)
                              read_json, save_tensors, sha256_file)

CARD_FORMAT = "dist_awenc.encoder/1"


class Encoder(nn.Module):
    """Pixel-space encoder: images in [0, 1] -> features.

    The watermark is added in pixel space before normalisation, so the
    normalisation is part of the released model.

    Shape: (b, 3, S, S) in [0, 1] -> (b, feature_dim).
    """

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float], input_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim: int = backbone.feature_dim
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def build_encoder(arch: str, arch_kwargs: dict, mean: list[float], std: list[float], input_size: int) -> Encoder:
    return Encoder(build_backbone(arch, **arch_kwargs), list(mean), list(std), input_size)


def card_for(encoder: Encoder, *, arch: str, arch_kwargs: dict, method: str, stage: str,
             parent: Optional[str], extra: dict | None = None) -> dict[str, Any]:
    return {
        "format": CARD_FORMAT,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "method": method,
        "stage": stage,
        "input_size": encoder.input_size,
        "mean": encoder.mean.flatten().tolist(),
        "std": encoder.std.flatten().tolist(),
        "feature_dim": encoder.feature_dim,
        "parent": parent,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def save_encoder(encoder: Encoder, path: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``<path>.safetensors`` weights and ``<path>.json`` card; returns the card with its sha256."""
    path = Path(path).with_suffix(".safetensors")
    state = {f"backbone.{k}": v for k, v in encoder.backbone.state_dict().items()}
    card = {**card, "sha256": save_tensors(path, state, metadata={"format": CARD_FORMAT})}
    atomic_write_text(path.with_suffix(".json"), json.dumps(card, indent=2))
    return card


def resolve_encoder_path(path: str | Path, name: str = "encoder") -> Path:
    """A run folder -> its ``<name>.safetensors``; a file -> itself."""
    p = Path(path)
    if not str(path):
        raise ArtifactError("no encoder given: pass encoder=<file or run folder>")
    if p.is_dir():
        p = p / f"{name}.safetensors"
    if not p.exists():
        raise ArtifactError(f"'{p}' does not exist (expected an encoder .safetensors file or a run folder holding one)")
    return p


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or from a ``.pt`` state_dict with weights_only=True."""
    if path.suffix == ".safetensors":
        if not _looks_like_safetensors(path):
            raise ArtifactError(f"{path}: not a safetensors file (a pickle or other format?); expected safetensors")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable safetensors file (truncated or corrupt): {e}") from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any failure is a bad file to the user)
            raise ArtifactError(f"{path}: refused to load: not a plain state_dict of tensors ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ArtifactError(f"{path}: expected a state_dict mapping names to tensors")
        return state
    raise ArtifactError(f"{path}: unknown weights format '{path.suffix}'; expected .safetensors (or a .pt state_dict)")


def load_card(path: Path) -> dict[str, Any]:
    card_path = path.with_suffix(".json")
    card = read_json(card_path, ArtifactError, f"the card of {path.name}: architecture, input size, normalisation")
    missing = [k for k in ("arch", "arch_kwargs", "input_size", "mean", "std") if k not in card]
    if missing:
        raise ArtifactError(f"{card_path}: card lacks field(s) {', '.join(missing)}")
    return card


def load_encoder(path: str | Path, card: dict[str, Any] | None = None, *, verify_hash: bool = True) -> tuple[Encoder, dict]:
    """Rebuild an encoder from its weights file (or run folder) and card.

    Args:
        path: ``encoder.safetensors``, a run folder, or a ``.pt`` state_dict.
        card: overrides the card beside the file (needed for a bare ``.pt``).
        verify_hash: refuse weights whose SHA-256 differs from the card's.

    Raises:
        ArtifactError: missing/corrupt file, pickle instead of safetensors,
            hash mismatch, or weights that do not fit the card's architecture.
    """
    p = resolve_encoder_path(path)
    card = dict(card) if card is not None else load_card(p)
    state = read_state(p)
    if verify_hash and card.get("sha256") and p.suffix == ".safetensors":
        digest = sha256_file(p)
        if digest != card["sha256"]:
            raise ArtifactError(f"{p}: SHA-256 {digest[:12]}... does not match its card ({card['sha256'][:12]}...)")
    encoder = build_encoder(card["arch"], card["arch_kwargs"], card["mean"], card["std"], card["input_size"])
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    try:
        result = encoder.backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise ArtifactError(
            f"{p}: weights do not fit architecture '{card['arch']}' {card['arch_kwargs']}: {first[0] if first else e}"
        ) from None
    del result
    if card.get("query_transform"):
        from dist_awenc.log import warn

        warn(f"{p}: the card's query_transform is not applied: a card never changes how an encoder's weights are "
             "measured (it belongs to a downstream model's serving path)")
    return encoder, card
