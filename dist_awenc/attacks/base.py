"""Removal attacks: one registry, the pirate's data, the attack options, and :func:`apply_attack`.

An attack takes the suspect encoder and a strength and returns the encoder a
pirate would deploy. Every attack is registered with ``@register_attack(name,
strengths=...)``; the strengths become its default grid in
:data:`ATTACK_STRENGTHS`. :func:`apply_attack` hands each attack a private
deep copy of the suspect (the caller's encoder is never modified), seeds the
CPU RNG from ``(data.seed, name)`` inside a forked RNG state, and adds the fields every
info dict carries (``attack``, ``strength``, ``arch``, ``arch_kwargs``,
``seconds``, and ``rel_weight_change`` where the architecture is unchanged).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dist_awenc.data.splits import derive_seed
from dist_awenc.encoders.io import Encoder
from dist_awenc.config_checks import as_count, as_fraction  # noqa: F401  (re-exported for the attacks)
from dist_awenc.errors import ConfigError

# fn(encoder_copy, card, strength, data, options, progress) -> (attacked encoder, info)
AttackFn = Callable[[Encoder, dict, float, "AttackData", "AttackOptions", bool], tuple[Encoder, dict]]

ATTACKS: dict[str, AttackFn] = {}
ATTACK_STRENGTHS: dict[str, list[float]] = {}


@dataclass
class AttackData:
    """What the pirate holds.

    Attributes:
        train_images: (N, 3, S, S) labelled downstream images in [0, 1].
        train_labels: (N,) long class labels.
        num_classes: number of downstream classes.
        unlabeled: (M, 3, S, S) new unlabeled / surrogate images in [0, 1]
            (continued SSL, distillation, overwriting).
        seed: seed of every random choice an attack makes.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    num_classes: int
    unlabeled: torch.Tensor
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_images", "unlabeled"):
            x = getattr(self, name)
            if x.dim() != 4 or x.shape[1] != 3:
                raise ConfigError(f"AttackData.{name} must be (n, 3, S, S) images; got {tuple(x.shape)}")
        if self.train_labels.shape != (len(self.train_images),):
            raise ConfigError(f"AttackData.train_labels must be ({len(self.train_images)},); got {tuple(self.train_labels.shape)}")
        if self.num_classes < 1:
            raise ConfigError(f"AttackData.num_classes must be >= 1; got {self.num_classes}")

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1] if len(self.train_images) else self.unlabeled.shape[-1])


@dataclass
class AttackOptions:
    """Settings shared by the attacks (plain fields: usable as an OmegaConf structured config).

    The defaults suit the digits demo (16 px, tiny width-32 net, 2 CPU cores):
    every attack at every default strength runs in well under a minute.

    Attributes:
        epochs: epochs of supervised fine-tuning (``finetune_full``, whose lr is the strength, and
            ``prune_finetune``).
        lr: Adam learning rate of ``finetune_ssl``, the ``distill*`` attacks, ``overwrite``,
            ``prune_finetune`` and ``adversarial_finetune``.
        weight_decay: Adam weight decay of every training attack.
        batch_size: mini-batch size of every training attack.
        proj_hidden_dim, proj_dim: the fresh SimCLR projector (``finetune_ssl``, ``overwrite``).
        temperature: SimCLR temperature (``finetune_ssl``, ``overwrite``).
        student_arch: ``distill*`` student architecture; "" = the suspect's (``distill_arch``: another one).
        student_width: ``distill*`` student width (tiny nets); 0 = the suspect's.
        overwrite_steps: steps of the pirate's watermark generation (``overwrite``).
        overwrite_eps: L-inf budget of the pirate's watermark (``overwrite``).
        quant_per_channel: ``quantize_int8`` scale per output channel (else per tensor).
        adv_keys: universal perturbations (one per random key from the pirate's data) that
            ``adversarial_finetune`` computes on the stolen encoder every epoch.
        adv_steps: PGD steps of each of those perturbations.
        adv_eps: their L-inf budget.
        resolution_lr: Adam learning rate of ``finetune_resolution`` (the pirate's gentle fine-tune at its new
            input size; ``epochs`` epochs).
    """

    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    proj_hidden_dim: int = 256
    proj_dim: int = 64
    temperature: float = 0.2
    student_arch: str = ""
    student_width: int = 0
    overwrite_steps: int = 50
    overwrite_eps: float = 16 / 255
    quant_per_channel: bool = True
    adv_keys: int = 4
    adv_steps: int = 10
    adv_eps: float = 16 / 255
    resolution_lr: float = 1e-4

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for name in ("epochs", "batch_size", "proj_hidden_dim", "proj_dim", "overwrite_steps", "adv_keys", "adv_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"attack.{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or not self.temperature > 0 or not self.resolution_lr > 0:
            raise ConfigError(f"attack.lr, attack.resolution_lr and attack.temperature must be > 0 and weight_decay "
                              f">= 0; got {self.lr}, {self.resolution_lr}, {self.temperature}, {self.weight_decay}")
        if self.student_width < 0:
            raise ConfigError(f"attack.student_width must be >= 0 (0 = the suspect's); got {self.student_width}")
        for name in ("overwrite_eps", "adv_eps"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"attack.{name} must be in (0, 1]; got {getattr(self, name)}")


def register_attack(name: str, strengths: Sequence[float] = ()) -> Callable[[AttackFn], AttackFn]:
    """Decorator adding an attack to :data:`ATTACKS` and its default grid to :data:`ATTACK_STRENGTHS`.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn: AttackFn) -> AttackFn:
        if name in ATTACKS:
            raise ValueError(f"attack '{name}' is already registered; registered: {', '.join(sorted(ATTACKS))}")
        ATTACKS[name] = fn
        ATTACK_STRENGTHS[name] = [float(s) for s in strengths]
        return fn

    return deco


def get_attack(name: str) -> AttackFn:
    """The registered attack ``name``; :class:`ConfigError` listing the valid names otherwise."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack '{name}'; valid: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def apply_attack(name: str, encoder: Encoder, card: dict, strength: float, data: AttackData,
                 options: AttackOptions | None = None, progress: bool = True) -> tuple[Encoder, dict[str, Any]]:
    """Run attack ``name`` at ``strength`` on a copy of ``encoder``.

    Args:
        name: a key of :data:`ATTACKS`.
        encoder: the suspect (left unchanged).
        card: the suspect's card (``arch``, ``arch_kwargs`` are read).
        strength: the attack's knob (see :data:`ATTACK_STRENGTHS`).
        data: the pirate's data.
        options: attack settings (defaults: :class:`AttackOptions`).
        progress: show a progress bar on the attacks that train.

    Returns:
        The attacked encoder, in eval mode (a new module; for the ``query_*``
        attacks a :class:`~dist_awenc.attacks.query.TransformedEncoder`), and a
        JSON-able info dict with at least ``attack``, ``strength``, ``arch``,
        ``arch_kwargs`` (the attacked encoder's card fields) and ``seconds``.

    Raises:
        ConfigError: unknown attack, a strength the attack does not accept,
            data of another image size than the encoder's.
    """
    fn = get_attack(name)
    options = options if options is not None else AttackOptions()
    options.check()
    if data.image_size != encoder.input_size:
        raise ConfigError(f"attack data are {data.image_size} px but the encoder takes {encoder.input_size} px")
    if not math.isfinite(float(strength)):
        raise ConfigError(f"attack {name}: strength must be a finite number; got {strength}")
    work = copy.deepcopy(encoder)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(data.seed, "attack", name))  # fresh heads / students: not another stage's init
        attacked, details = fn(work, card, float(strength), data, options, progress)
    info: dict[str, Any] = {"attack": name, "strength": float(strength),
                            "arch": card["arch"], "arch_kwargs": dict(card["arch_kwargs"])}
    info.update(details)
    info["seconds"] = round(time.perf_counter() - start, 3)
    if info["arch"] == card["arch"] and info["arch_kwargs"] == dict(card["arch_kwargs"]):
        info["rel_weight_change"] = relative_change(encoder.backbone, attacked.backbone)
    return attacked.eval(), info


# ----------------------------------------------------------------------- helpers shared by the attacks


def weight_modules(module: nn.Module, kinds: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)) -> list[nn.Module]:
    """Every conv / linear layer of ``module`` (in ``modules()`` order) that has a weight."""
    return [m for m in module.modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def relative_change(before: nn.Module, after: nn.Module) -> float:
    """``||theta' - theta|| / ||theta||`` over the floating-point state of two same-shaped modules."""
    a, b = before.state_dict(), after.state_dict()
    num = den = 0.0
    for k, v in a.items():
        if v.is_floating_point() and k in b and b[k].shape == v.shape:
            num += float((b[k].float().cpu() - v.float().cpu()).pow(2).sum())
            den += float(v.float().cpu().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0
