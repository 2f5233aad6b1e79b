"""The owner's secret: key image ``x_k`` and universal watermark ``delta``.

Stored as ``secret.safetensors`` (tensors ``key`` and ``delta``; the settings
needed to apply them and the verification plan in the safetensors header
metadata) and ``secret.json`` beside it, which records the file's SHA-256.
Loading refuses a file whose content no longer matches that hash, so every
verdict names exactly which secret it used; the hash covers the plan, so
publishing it at release commits the owner to the plan.

The J alternative secrets of the secret-permutation test (same f0, same
procedure, other seeds; never embedded) are one more file,
``alternatives.safetensors``, whose hash the plan records. Stage 1 makes
J + 1 candidate secrets and draws the owner's among them by a digest of all
of them (:mod:`dist_awenc.watermark.draw`); the plan records the draw and
:func:`~dist_awenc.watermark.draw.check_owner_draw` recomputes it from the two files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from dist_awenc.encoders.io import atomic_write_text, read_state, save_tensors, sha256_file
from dist_awenc.files import read_json
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
    plan: dict[str, Any] = field(default_factory=dict)  # the verification plan (dist_awenc.verify.plan); {} before plans
    record: dict[str, Any] = field(default_factory=dict)  # secret.json as read (e.g. the bound calibration)

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
        return control_of(self.delta, self.control_seed)

    def mark(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (b, 3, S, S) -> clamp(x + delta, 0, 1)."""
        return (x + self.delta.to(x.device, x.dtype)).clamp(0, 1)

    def mark_control(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.control().to(x.device, x.dtype)).clamp(0, 1)


def _tensors_and_header(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A safetensors file's tensors and its ``dist_awenc`` JSON header entry ({} when absent or invalid)."""
    tensors = read_state(p)
    with safe_open(str(p), framework="pt") as f:
        try:
            header = json.loads((f.metadata() or {}).get("dist_awenc", "{}"))
        except json.JSONDecodeError:
            header = {}
    return tensors, header if isinstance(header, dict) else {}


def control_of(delta: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random permutation of ``delta``'s entries (the control perturbation ``r``)."""
    g = torch.Generator().manual_seed(int(seed))
    flat = delta.flatten()
    return flat[torch.randperm(flat.numel(), generator=g)].view_as(delta)


@dataclass
class AlternativeSecrets:
    """J alternative secrets on the owner's f0 (the secret-permutation test's reference set).

    ``keys`` and ``deltas`` are (J, 3, S, S); ``seeds[j]`` is the seed that drew
    key j and drove its generation, ``control_seeds[j]`` seeds its control.
    ``baselines`` (J,) and ``owner_baseline``: the clean f0's mean white-box score
    with each alternative and with the owner's secret, recorded at stage 1 on the
    plan's first ``baseline_images`` hold-out images (under a plan sealing
    ``f0_excess`` the permutation test ranks each secret's excess over f0's
    response to it; None in files made before baselines were recorded).
    """

    keys: torch.Tensor
    deltas: torch.Tensor
    seeds: list[int]
    control_seeds: list[int]
    sha256: str = ""
    baselines: Optional[torch.Tensor] = None
    owner_baseline: Optional[float] = None
    baseline_images: Optional[int] = None

    def __post_init__(self) -> None:
        j = len(self.seeds)
        if self.keys.shape != self.deltas.shape or self.keys.ndim != 4 or len(self.keys) != j or len(self.control_seeds) != j:
            raise ArtifactError(f"alternative secrets: keys {tuple(self.keys.shape)}, deltas {tuple(self.deltas.shape)}, "
                                f"{j} seeds and {len(self.control_seeds)} control seeds do not match")

    def __len__(self) -> int:
        return len(self.seeds)

    def controls(self) -> torch.Tensor:
        return torch.stack([control_of(d, s) for d, s in zip(self.deltas, self.control_seeds)])


ALTERNATIVES_FORMAT = "dist_awenc.alternatives/1"


def save_alternatives(alt: AlternativeSecrets, path: str | Path) -> str:
    """Write ``alternatives.safetensors`` atomically; returns (and sets) its SHA-256."""
    fields = {"format": ALTERNATIVES_FORMAT, "seeds": list(map(int, alt.seeds)),
              "control_seeds": list(map(int, alt.control_seeds))}
    tensors = {"keys": alt.keys, "deltas": alt.deltas}
    if alt.baselines is not None:
        fields["baseline_images"] = int(alt.baseline_images)
        tensors["baselines"] = alt.baselines.to(torch.float64)
        tensors["owner_baseline"] = torch.tensor([float(alt.owner_baseline)], dtype=torch.float64)
    alt.sha256 = save_tensors(Path(path), tensors, metadata={"dist_awenc": json.dumps(fields, sort_keys=True)})
    return alt.sha256


def load_alternatives(path: str | Path, expected_sha256: str | None = None) -> AlternativeSecrets:
    """Load the alternative secrets; with ``expected_sha256`` (the plan's), refuse any other file."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"alternative secrets '{p}' do not exist (awenc watermark plan.alternatives=J writes them)")
    digest = sha256_file(p)
    if expected_sha256 is not None and digest != expected_sha256:
        raise TamperedSecretError(f"{p}: SHA-256 {digest[:16]}... is not the plan's {expected_sha256[:16]}...; "
                                  "the alternative secrets were modified or replaced")
    tensors, header = _tensors_and_header(p)
    if header.get("format") != ALTERNATIVES_FORMAT or set(tensors) not in ({"keys", "deltas"},
                                                                          {"keys", "deltas", "baselines", "owner_baseline"}):
        raise ArtifactError(f"{p}: not a dist_awenc alternatives file (expected tensors keys, deltas and format "
                            f"{ALTERNATIVES_FORMAT})")
    base = {}
    if "baselines" in tensors:
        base = {"baselines": tensors["baselines"], "owner_baseline": float(tensors["owner_baseline"][0]),
                "baseline_images": int(header.get("baseline_images", 0))}
    return AlternativeSecrets(keys=tensors["keys"], deltas=tensors["deltas"], seeds=header["seeds"],
                              control_seeds=header["control_seeds"], sha256=digest, **base)


def save_secret(secret: Secret, path: str | Path) -> str:
    """Write ``<path>.safetensors`` + ``<path>.json``; returns the SHA-256 (also set on ``secret``)."""
    path = Path(path).with_suffix(".safetensors")
    # one header entry of canonical JSON: safetensors orders several entries arbitrarily,
    # which would give the same secret a different file hash on every save
    header = json.dumps({"format": SECRET_FORMAT, "eps": secret.eps, "control_seed": secret.control_seed,
                         "meta": secret.meta, "plan": secret.plan}, sort_keys=True)
    secret.sha256 = save_tensors(path, {"key": secret.key, "delta": secret.delta}, metadata={"dist_awenc": header})
    record = {"format": SECRET_FORMAT, "sha256": secret.sha256, "eps": secret.eps, "control_seed": secret.control_seed,
              "image_size": secret.image_size, **secret.meta, "plan": secret.plan}
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
    if p.is_dir():
        p = p / "secret.safetensors"
    elif p.suffix in ("", ".json"):
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        raise ArtifactError(f"secret '{p}': expected a .safetensors secret or a watermark run folder, not a "
                            f"'{p.suffix}' file (nothing is ever unpickled)")
    if not p.exists():
        raise ArtifactError(f"secret '{p}' does not exist")
    record_path = p.with_suffix(".json")
    record = read_json(record_path, ArtifactError, f"the record of {p.name}, with its SHA-256")
    digest = sha256_file(p)
    if digest != record.get("sha256"):
        raise TamperedSecretError(f"{p}: SHA-256 {digest[:16]}... does not match the recorded {str(record.get('sha256'))[:16]}...; the secret was modified")
    tensors, header = _tensors_and_header(p)
    if header.get("format") != SECRET_FORMAT or set(tensors) != {"key", "delta"}:
        raise ArtifactError(f"{p}: not a dist_awenc secret (expected tensors key, delta and format {SECRET_FORMAT})")
    return Secret(key=tensors["key"], delta=tensors["delta"], eps=float(header["eps"]),
                  control_seed=int(header["control_seed"]), meta=header.get("meta", {}), sha256=digest,
                  plan=header.get("plan") or {}, record=record)


def _record_path(secret_path: str | Path) -> Path:
    p = Path(secret_path)
    return (p / "secret.safetensors" if p.is_dir() else p.with_suffix(".safetensors")).with_suffix(".json")


def seal_calibration(secret_path: str | Path, calibration_sha256: str, calibration_path: str | Path) -> str:
    """Fix a calibration for verification: sealed into the plan before release, bound after it; returns which.

    Before release (no embedding recorded in ``secret.json``) the calibration's hash goes into the plan in the
    secret's header, with the unsealed secret's hash it was made for (``sealed_from``): the file, and so its
    SHA-256 that the release card carries and the owner publishes, then covers it. After release the published
    hash must stay valid, so the calibration is bound in ``secret.json`` only (not covered by any published
    hash) and every verdict says it was chosen after release. Once sealed or bound, a secret keeps its
    calibration: returns ``"kept"`` (re-choosing after the fact would let a verdict shop for thresholds).
    """
    from dist_awenc.log import info, warn

    secret = load_secret(secret_path)
    sealed = (secret.plan or {}).get("calibration") or {}
    bound = secret.record.get("calibration") or {}
    current = sealed.get("sha256") or bound.get("sha256")
    if current:
        if current != calibration_sha256:
            warn(f"the secret is already {'sealed with' if sealed else 'bound to'} calibration {current[:12]}...; not "
                 f"replacing it with {calibration_sha256[:12]}...: verify keeps using the first one")
        return "kept"
    where = {"sha256": calibration_sha256, "path": str(Path(calibration_path).resolve())}
    record_path = _record_path(secret_path)
    if secret.record.get("released"):
        record = {**secret.record, "calibration": {**where, "after_release": True}}
        atomic_write_text(record_path, json.dumps(record, indent=2))
        warn(f"the secret was released ({secret.record['released'][0].get('encoder')}) before this calibration: "
             f"calibration {calibration_sha256[:12]}... is bound in {record_path.name}, not sealed into the published "
             "plan, and every verdict will say it was chosen after release")
        return "bound"
    plan = {**secret.plan, "calibration": {"sha256": calibration_sha256, "sealed_from": secret.sha256}}
    sealed_secret = Secret(key=secret.key, delta=secret.delta, eps=secret.eps, control_seed=secret.control_seed,
                           meta=secret.meta, plan=plan)
    digest = save_secret(sealed_secret, record_path.with_suffix(".safetensors"))
    record = json.loads(record_path.read_text())
    atomic_write_text(record_path, json.dumps({**record, "calibration": where}, indent=2))
    info(f"sealed calibration {calibration_sha256[:12]}... into the secret's plan: secret {secret.sha256[:12]}... is "
         f"now {digest[:12]}... (embed after this, so the release card carries the sealed hash)")
    return "sealed"


def note_release(secret_path: str | Path, encoder_path: str | Path, secret_sha256: str) -> None:
    """Record in ``secret.json`` that an encoder was released carrying this secret's hash (calibrate reads it)."""
    record_path = _record_path(secret_path)
    record = read_json(record_path, ArtifactError, "the record of the secret")
    released = [r for r in record.get("released", []) if r.get("encoder") != str(encoder_path)]
    record["released"] = released + [{"encoder": str(encoder_path), "secret_sha256": secret_sha256}]
    atomic_write_text(record_path, json.dumps(record, indent=2))


def alternatives_path(secret_path: str | Path) -> Path:
    """Where a secret's alternatives live: ``alternatives.safetensors`` beside it."""
    p = Path(secret_path)
    return (p if p.is_dir() else p.parent) / "alternatives.safetensors"
