"""The owner's secret: key image ``x_k`` and universal watermark ``delta``.

Stored as ``secret.safetensors`` (tensors ``key`` and ``delta``; the settings
needed to apply them in the safetensors header metadata) and ``secret.json``
beside it, which records the file's SHA-256. Loading refuses a file whose
content no longer matches that hash, so every verdict names exactly which
secret it used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dist_awenc.encoders.io import atomic_write_text, read_state, save_tensors, sha256_file
from dist_awenc.errors import ArtifactError, TamperedSecretError

SECRET_FORMAT = "dist_awenc.secret/1"


@dataclass
class Secret:
    """Key image and watermark, both (3, S, S) in pixel space; ``|delta|_inf <= eps``."""

    key: torch.Tensor
    delta: torch.Tensor
    eps: float
    control_seed: int
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.key.shape != self.delta.shape or self.key.ndim != 3 or self.key.shape[0] != 3:
            raise ArtifactError(f"secret: key {tuple(self.key.shape)} and delta {tuple(self.delta.shape)} must both be (3, S, S)")
        if float(self.delta.abs().max()) > self.eps + 1e-6:
            raise ArtifactError(f"secret: |delta|_inf = {float(self.delta.abs().max()):.5f} exceeds eps = {self.eps:.5f}")

    @property
    def image_size(self) -> int:
        return int(self.key.shape[-1])

    def control(self) -> torch.Tensor:
        """The control perturbation ``r``: a seeded random permutation of delta's entries.

        Same eps, norm and value distribution as delta; no adversarial structure.
        """
        g = torch.Generator().manual_seed(self.control_seed)
        flat = self.delta.flatten()
        return flat[torch.randperm(flat.numel(), generator=g)].view_as(self.delta)

    def mark(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (b, 3, S, S) -> clamp(x + delta, 0, 1)."""
        return (x + self.delta.to(x.device, x.dtype)).clamp(0, 1)

    def mark_control(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.control().to(x.device, x.dtype)).clamp(0, 1)


def save_secret(secret: Secret, path: str | Path) -> str:
    """Write ``<path>.safetensors`` + ``<path>.json``; returns the SHA-256 (also set on ``secret``)."""
    path = Path(path).with_suffix(".safetensors")
    # one header entry of canonical JSON: safetensors orders several entries arbitrarily,
    # which would give the same secret a different file hash on every save
    header = json.dumps({"format": SECRET_FORMAT, "eps": secret.eps, "control_seed": secret.control_seed,
                         "meta": secret.meta}, sort_keys=True)
    secret.sha256 = save_tensors(path, {"key": secret.key, "delta": secret.delta}, metadata={"dist_awenc": header})
    record = {"format": SECRET_FORMAT, "sha256": secret.sha256, "eps": secret.eps, "control_seed": secret.control_seed,
              "image_size": secret.image_size, **secret.meta}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2))
    return secret.sha256


def load_secret(path: str | Path) -> Secret:
    """Load and check a secret (file or run folder holding ``secret.safetensors``).

    Raises:
        TamperedSecretError: the file's SHA-256 differs from the one recorded.
        ArtifactError: missing, unreadable or not a secret.
    """
    p = Path(path)
    if not str(path):
        raise ArtifactError("no secret given: pass secret=<secret.safetensors or watermark run folder>")
    p = p / "secret.safetensors" if p.is_dir() else p.with_suffix(".safetensors")
    if not p.exists():
        raise ArtifactError(f"secret '{p}' does not exist")
    record_path = p.with_suffix(".json")
    if not record_path.exists():
        raise ArtifactError(f"{p}: its record {record_path.name} (with the SHA-256) is missing")
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{record_path}: not valid JSON ({e.msg})") from None
    digest = sha256_file(p)
    if digest != record.get("sha256"):
        raise TamperedSecretError(f"{p}: SHA-256 {digest[:16]}... does not match the recorded {str(record.get('sha256'))[:16]}...; the secret was modified")
    tensors = read_state(p)
    with safe_open(str(p), framework="pt") as f:
        try:
            header = json.loads((f.metadata() or {}).get("dist_awenc", "{}"))
        except json.JSONDecodeError:
            header = {}
    if header.get("format") != SECRET_FORMAT or set(tensors) != {"key", "delta"}:
        raise ArtifactError(f"{p}: not a dist_awenc secret (expected tensors key, delta and format {SECRET_FORMAT})")
    return Secret(key=tensors["key"], delta=tensors["delta"], eps=float(header["eps"]),
                  control_seed=int(header["control_seed"]), meta=header.get("meta", {}), sha256=digest)
