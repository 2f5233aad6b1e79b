"""Suspects from third-party weights: a bare weights file with no card, described by ``suspect_card.*`` or imported once.

A pirate's model is often a torchvision or timm checkpoint: a ``.pt`` state dict
with its own key names, a classifier head, its own normalisation, maybe fp16,
and no ``encoder.json``. :func:`load_suspect` (what ``awenc verify``, ``awenc
downstream`` and ``awenc attack`` call) reads such a file from the conventions
the owner gives as config fields (``suspect_card.arch``, ``stem``,
``input_size``, ``mean``, ``std``); where a card is beside the file, the card
decides and a field that disagrees with it is an error, so a suspect is never
measured two ways by accident. :func:`import_weights` (``awenc import``) writes
a card and a safetensors copy of the mapped weights once, so later commands
need no fields.

Only the owner's fields and the weights' shapes decide how a suspect is
measured: nothing else in its files does (a checkpoint's other entries and a
safetensors header's metadata are ignored). A ``.pt``/``.pth`` file is read with
``torch.load(weights_only=True)`` only: anything but plain containers of
tensors is refused before any of it runs. A torchvision ResNet maps onto this
project's ``resnet18/34/50`` (timm's ResNets share its key names); any timm model
onto ``timm/<model name>`` (a ViT's patch size and a ResNet's or ConvNeXt's stem
are read from the weights' first convolution, a ViT's ``img_size`` is the input size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from dist_awenc.encoders.io import (Encoder, build_encoder, card_for, load_card, load_encoder, read_state,
                                    resolve_encoder_path, save_encoder)
from dist_awenc.encoders.keymap import fit, strip_prefixes, unwrap
from dist_awenc.encoders.registry import factory, resolve_arch_kwargs
from dist_awenc.encoders.timm_backbones import PREFIX as TIMM, stem_from_weights
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.files import read_json, sha256_file
from dist_awenc.log import info

FIELDS = ("arch", "stem", "input_size", "mean", "std")
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # torchvision's and timm's ResNets' normalisation
IMAGENET_STD = [0.229, 0.224, 0.225]
STEM_OF_KERNEL = {3: "cifar", 7: "imagenet"}
NO_CARD_HINT = ("give suspect_card.arch and suspect_card.input_size (and stem, mean, std) for a third-party weights "
                "file, or run `awenc import` on it once")


def declared(section: Any) -> dict[str, Any]:
    """The ``suspect_card`` fields that are set (a ``SuspectCardSection`` or None)."""
    return {k: getattr(section, k) for k in FIELDS if getattr(section, k, None) is not None}


def _card_value(card: dict, name: str) -> Any:
    return card.get("arch_kwargs", {}).get("stem") if name == "stem" else card.get(name)


def _same(name: str, given: Any, recorded: Any) -> bool:
    if name in ("mean", "std"):  # a card records float32 values: 0.485 is 0.48500001430511475 there
        try:
            return len(given) == len(recorded) and bool(torch.equal(torch.tensor(given, dtype=torch.float32),
                                                                    torch.tensor(recorded, dtype=torch.float32)))
        except (TypeError, ValueError):
            return False
    return given == recorded


def check_agrees(card: dict, fields: dict[str, Any], where: Path) -> None:
    """Refuse a ``suspect_card`` field that disagrees with the card beside the weights (one line, the field named)."""
    for name, given in fields.items():
        recorded = _card_value(card, name)
        if not _same(name, given, recorded):
            raise ConfigError(f"suspect_card.{name}={given} disagrees with the card of {where.name} "
                              f"({where.with_suffix('.json').name}: {name}={recorded}): a card decides how its weights "
                              "are measured; drop the field or correct it")


def _triple(name: str, values: Optional[list[float]], default: list[float], positive: bool = False) -> list[float]:
    values = list(default if values is None else values)
    if len(values) != 3 or (positive and min(values) <= 0):
        raise ConfigError(f"suspect_card.{name} must be 3 {'positive ' if positive else ''}numbers (R, G, B); got {values}")
    return [float(v) for v in values]


def read_foreign(p: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A third-party weights file's state dict (unwrapped): safetensors, or a ``.pt``/``.pth``/``.bin`` read with
    ``weights_only=True``. Raises ArtifactError for anything else, before any of it is executed."""
    if p.suffix == ".safetensors":
        return read_state(p), []
    if p.suffix not in (".pt", ".pth", ".bin"):
        raise ArtifactError(f"{p}: unknown weights format '{p.suffix}'; expected .safetensors or a .pt/.pth state dict")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any failure is a refused file to the user)
        raise ArtifactError(f"{p}: refused to load: not a plain state dict of tensors ({type(e).__name__}; "
                            "read with weights_only=True, nothing in it was run)") from None
    return unwrap(obj, str(p))


def _stem(arch: str, stem: Optional[str], state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, Any]:
    """The backbone's explicit arguments: the stem where it takes one (from the first convolution's kernel when not
    given)."""
    if "stem" not in resolve_arch_kwargs(arch):
        return {} if stem is None else {"stem": stem}  # resolve_arch_kwargs then names the unused argument
    if stem is None and arch.startswith(TIMM):
        stem, why = stem_from_weights(arch, state)
        if stem is None:
            raise ConfigError(f"give suspect_card.stem for {arch}: {why} in the file")
        notes.append(f"stem {stem}: {why}")
    elif stem is None:
        w = state.get("conv1.weight")
        stem = STEM_OF_KERNEL.get(int(w.shape[-1])) if w is not None and w.ndim == 4 else None
        if stem is None:
            raise ConfigError(f"give suspect_card.stem (cifar or imagenet): conv1 of the file is "
                              f"{tuple(w.shape) if w is not None else 'absent'}")
        notes.append(f"stem {stem}: conv1 is {w.shape[-1]}x{w.shape[-1]}")
    return {"stem": stem}


def build_declared(p: Path, fields: dict[str, Any], *, stage: str = "third_party") -> tuple[Encoder, dict, list[str]]:
    """Build the encoder of a bare weights file from the owner's ``fields``; returns it, its card and what was done.

    The card's ``sha256`` is the file's own (what is measured is that file, mapped); ``source`` records the file
    and the mapping.
    """
    missing = [k for k in ("arch", "input_size") if k not in fields]
    if missing:
        raise ConfigError(f"{p}: no card ({p.with_suffix('.json').name}) beside it: {NO_CARD_HINT}")
    arch, size = fields["arch"], fields["input_size"]
    try:
        factory(arch)
    except ConfigError as e:
        raise ConfigError(f"suspect_card.arch: {e}") from None
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"suspect_card.input_size must be a positive number of pixels; got {size}")
    notes: list[str] = []
    mean = _triple("mean", fields.get("mean"), IMAGENET_MEAN)
    std = _triple("std", fields.get("std"), IMAGENET_STD, positive=True)
    if "mean" not in fields or "std" not in fields:
        notes.append("normalisation: ImageNet's mean/std where suspect_card.mean/std are not given "
                     "(torchvision's and timm's convention)")
    state, stripped = read_foreign(p)
    state, more = strip_prefixes(state)
    notes += stripped + more
    explicit = _stem(arch, fields.get("stem"), state, notes)
    if "img_size" in resolve_arch_kwargs(arch):  # a ViT: built for the input size
        explicit["img_size"] = size
    kwargs = resolve_arch_kwargs(arch, **explicit)
    encoder = build_encoder(arch, kwargs, mean, std, size)
    state, more = fit(state, encoder.backbone.state_dict(), str(p), f"{arch} {kwargs}")
    notes += more
    encoder.backbone.load_state_dict(state, strict=True)
    digest = sha256_file(p)
    card = card_for(encoder, arch=arch, arch_kwargs=kwargs, method="", stage=stage, parent=None,
                    extra={"sha256": digest, "source": {"file": str(p), "sha256": digest, "mapping": notes}})
    return encoder.eval(), card, notes


def load_suspect(path: str | Path, section: Any = None) -> tuple[Encoder, dict]:
    """An encoder to measure: a file or run folder with its card, or a bare weights file with ``suspect_card.*``.

    Raises:
        ConfigError: a field that disagrees with an existing card; missing fields for a bare file.
        ArtifactError: a file that is not a plain state dict, keys or shapes that do not fit (listed).
    """
    p = resolve_encoder_path(path)
    fields = declared(section)
    if p.with_suffix(".json").exists():
        card = load_card(p)
        check_agrees(card, fields, p)
        return load_encoder(p, card)
    if not fields:
        raise ArtifactError(f"{p}: no card ({p.with_suffix('.json').name}) beside it: {NO_CARD_HINT}")
    encoder, card, notes = build_declared(p, fields)
    for note in notes:
        info(f"{p.name}: {note}")
    return encoder, card


def _same_import(old: dict, new: dict) -> Optional[str]:
    """The first field in which an earlier import differs from this one (None: the same import)."""
    if old.get("source", {}).get("sha256") != new["source"]["sha256"]:
        return "source file (SHA-256)"
    for k in ("arch", "arch_kwargs", "input_size"):
        if old.get(k) != new[k]:
            return k
    return next((k for k in ("mean", "std") if not _same(k, new[k], old.get(k))), None)


def import_weights(weights: str | Path, *, arch: str, input_size: int, stem: Optional[str] = None,
                   mean: Optional[list[float]] = None, std: Optional[list[float]] = None,
                   out: str | Path | None = None) -> dict:
    """``awenc import``: write ``<out>/encoder.safetensors`` (the mapped float32 weights) and its card, once.

    The card records the source file's SHA-256 (``source``) and that it was imported (``imported: true``,
    ``stage: import``); its ``sha256`` covers the copy, which is what every later command measures.
    Rerunning with the same file and conventions writes nothing; another file or convention is refused.
    """
    p = Path(weights)
    if not p.is_file():
        raise ArtifactError(f"'{p}' does not exist (expected a .safetensors file or a .pt/.pth state dict)")
    if p.with_suffix(".json").exists():
        raise ArtifactError(f"{p} has a card ({p.with_suffix('.json').name}) already: commands take it as it is")
    fields = {k: v for k, v in {"arch": arch, "stem": stem, "input_size": input_size, "mean": mean, "std": std}.items()
              if v is not None}
    encoder, card, notes = build_declared(p, fields, stage="import")
    card = {**card, "imported": True}
    out_dir = Path(out) if out else Path("runs") / "imported" / p.stem
    if (out_dir / "encoder.json").exists():
        old = read_json(out_dir / "encoder.json", ArtifactError, "an earlier import's card")
        differs = _same_import(old, card)
        if differs is not None:
            raise ArtifactError(f"{out_dir} holds another import ({differs} differs); choose another --out")
        info(f"{out_dir}: already imported from {p.name} with these conventions; nothing written")
        return old
    for note in notes:
        info(f"{p.name}: {note}")
    out_dir.mkdir(parents=True, exist_ok=True)
    card = save_encoder(encoder, out_dir / "encoder", card)
    mean_, std_ = ([round(v, 4) for v in card[k]] for k in ("mean", "std"))
    info(f"imported {p.name} (SHA-256 {card['source']['sha256'][:12]}...) as {card['arch']} {card['arch_kwargs']}, "
         f"{card['input_size']} px, mean {mean_}, std {std_} -> {out_dir / 'encoder.safetensors'} + encoder.json; "
         f"later commands take suspect={out_dir} with no suspect_card fields")
    return card
