"""Distillation / stealing: a fresh student trained to match the suspect's embeddings.

StolenEncoder-style (Liu et al., CCS 2022, "StolenEncoder: Stealing
Pre-trained Encoders in Self-supervised Learning"): the pirate only queries
the suspect on a surrogate set and trains a student to reproduce its
embeddings under augmentation; no weight of the suspect is copied.

Three registered variants share :func:`distill_student`: ``distill`` (mild
views, the suspect's architecture unless ``attack.student_arch`` says
otherwise), and the adaptive ``distill_strong_aug`` (strongly augmented
surrogate images) and ``distill_arch`` (another architecture by default).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from dist_awenc.attacks.base import AttackData, AttackOptions, as_count, device_of, register_attack
from dist_awenc.attacks.training import fit_steps, mild_single_view, strong_single_view
from dist_awenc.data.views import ViewConfig, make_views
from dist_awenc.encoders.io import Encoder, build_encoder
from dist_awenc.encoders.registry import ENCODERS, arch_kwargs
from dist_awenc.errors import ConfigError


def embedding_match_loss(f_student: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
    """Shape: (b, d), (b, d) -> scalar ``mean(1 - cos(f_student, f_teacher))``."""
    return (1 - F.cosine_similarity(f_student, f_teacher, dim=1)).mean()


def student_spec(card: dict, options: AttackOptions) -> tuple[str, dict]:
    """The student's architecture and card ``arch_kwargs``: the suspect's unless ``options`` say otherwise."""
    arch = options.student_arch or card["arch"]
    if arch not in ENCODERS:
        raise ConfigError(f"attack.student_arch: unknown encoder '{arch}'; valid: {', '.join(sorted(ENCODERS))}")
    kwargs = dict(card["arch_kwargs"])
    if options.student_width:
        kwargs["width"] = options.student_width
    kept = arch_kwargs(arch, **kwargs)
    if options.student_width and "width" not in kept:
        raise ConfigError(f"attack.student_width: encoder '{arch}' has no width argument; set attack.student_width=0")
    return arch, kept


def distill_student(encoder: Encoder, card: dict, epochs: int, data: AttackData, options: AttackOptions,
                    progress: bool, *, views: ViewConfig, name: str, stream: int) -> tuple[Encoder, dict]:
    """Train a fresh student for ``epochs`` epochs on ``data.unlabeled`` to match the suspect.

    Loss ``1 - cos(student(A(x)), suspect(A(x)))``, the same view ``A`` (drawn
    from ``views``, parameter stream ``stream``) given to both; Adam at
    ``options.lr``. The student (:func:`student_spec`) has the suspect's
    normalisation and input size; its feature dimension must equal the
    suspect's. The info's ``arch``, ``arch_kwargs`` describe the student.
    """
    if len(data.unlabeled) == 0:
        raise ConfigError(f"attack {name} needs unlabeled (surrogate) images")
    arch, kwargs = student_spec(card, options)
    device = device_of(encoder)
    teacher = encoder.eval().requires_grad_(False)
    student = build_encoder(arch, kwargs, teacher.mean.flatten().tolist(), teacher.std.flatten().tolist(),
                            teacher.input_size).to(device).train()
    if student.feature_dim != teacher.feature_dim:
        raise ConfigError(f"attack {name}: the student '{arch}' {kwargs} has feature_dim {student.feature_dim} but the "
                          f"suspect has {teacher.feature_dim}; choose attack.student_arch/student_width to match")
    images = data.unlabeled

    def loss_at(idx: torch.Tensor, step: int) -> torch.Tensor:
        x = make_views(images[idx].to(device), views, seed=data.seed, step=step, stream=stream)[0]
        with torch.no_grad():
            target = teacher(x)
        return embedding_match_loss(student(x), target)

    history = fit_steps(student.parameters(), loss_at, n=len(images), epochs=epochs, batch_size=options.batch_size,
                        lr=options.lr, weight_decay=options.weight_decay, seed=data.seed, desc=name,
                        progress=progress)
    return student, {"arch": arch, "arch_kwargs": kwargs, "epochs": epochs, "steps": len(history), "lr": options.lr,
                     "loss_first": history[0], "loss_last": history[-1]}


@register_attack("distill", strengths=[10, 30])
def distill(encoder: Encoder, card: dict, strength: float, data: AttackData,
            options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Distil the suspect into a fresh student for ``strength`` epochs, one mild view per image (crop 0.8..1)."""
    epochs = as_count(strength, "distill", "the number of epochs", minimum=1)
    return distill_student(encoder, card, epochs, data, options, progress, views=mild_single_view(), name="distill",
                           stream=13)


@register_attack("distill_strong_aug", strengths=[10, 30])
def distill_strong_aug(encoder: Encoder, card: dict, strength: float, data: AttackData,
                       options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Adaptive: distil for ``strength`` epochs on strongly augmented surrogate images (:func:`strong_single_view`:
    crop 0.2..1, colour jitter, grayscale, blur); the student matches the suspect's embedding of the same view."""
    epochs = as_count(strength, "distill_strong_aug", "the number of epochs", minimum=1)
    views = strong_single_view()
    student, info = distill_student(encoder, card, epochs, data, options, progress, views=views,
                                    name="distill_strong_aug", stream=17)
    return student, {**info, "crop_scale_min": views.crop_scale_min, "blur_p": views.blur_p}


def other_arch(arch: str) -> str:
    """The default student architecture of ``distill_arch``: ``tiny_resnet`` for a ``tiny`` suspect, else ``tiny``."""
    return "tiny_resnet" if arch == "tiny" else "tiny"


@register_attack("distill_arch", strengths=[10, 30])
def distill_arch(encoder: Encoder, card: dict, strength: float, data: AttackData,
                 options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Adaptive: ``distill`` for ``strength`` epochs into another architecture: ``attack.student_arch`` when
    set, else :func:`other_arch` of the suspect's (its width and norm kept where the student takes them)."""
    epochs = as_count(strength, "distill_arch", "the number of epochs", minimum=1)
    arch = options.student_arch or other_arch(card["arch"])
    student, info = distill_student(encoder, card, epochs, data, replace(options, student_arch=arch), progress,
                                    views=mild_single_view(), name="distill_arch", stream=13)
    return student, {**info, "teacher_arch": card["arch"]}
