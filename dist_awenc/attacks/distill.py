"""Distillation / stealing: a fresh student trained to match the suspect's embeddings.

StolenEncoder-style (Liu et al., CCS 2022, "StolenEncoder: Stealing
Pre-trained Encoders in Self-supervised Learning"): the pirate only queries
the suspect on a surrogate set and trains a student to reproduce its
embeddings under augmentation; no weight of the suspect is copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_awenc.attacks.base import AttackData, AttackOptions, as_count, device_of, register_attack
from dist_awenc.attacks.training import fit_steps, mild_single_view
from dist_awenc.data.views import make_views
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


@register_attack("distill", strengths=[10, 30])
def distill(encoder: Encoder, card: dict, strength: float, data: AttackData,
            options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Train a fresh student for ``strength`` epochs on ``data.unlabeled`` to match the suspect.

    Loss ``1 - cos(student(A(x)), suspect(A(x)))``, the same mild view ``A``
    given to both; Adam at ``options.lr``. The student has the suspect's
    normalisation and input size; its feature dimension must equal the
    suspect's. ``info["arch"]``, ``info["arch_kwargs"]`` describe the student.
    """
    epochs = as_count(strength, "distill", "the number of epochs", minimum=1)
    if len(data.unlabeled) == 0:
        raise ConfigError("attack distill needs unlabeled (surrogate) images")
    arch, kwargs = student_spec(card, options)
    device = device_of(encoder)
    teacher = encoder.eval().requires_grad_(False)
    student = build_encoder(arch, kwargs, teacher.mean.flatten().tolist(), teacher.std.flatten().tolist(),
                            teacher.input_size).to(device).train()
    if student.feature_dim != teacher.feature_dim:
        raise ConfigError(f"attack distill: the student '{arch}' {kwargs} has feature_dim {student.feature_dim} but the "
                          f"suspect has {teacher.feature_dim}; choose attack.student_arch/student_width to match")
    views = mild_single_view()
    images = data.unlabeled

    def loss_at(idx: torch.Tensor, step: int) -> torch.Tensor:
        x = make_views(images[idx].to(device), views, seed=data.seed, step=step, stream=13)[0]
        with torch.no_grad():
            target = teacher(x)
        return embedding_match_loss(student(x), target)

    history = fit_steps(student.parameters(), loss_at, n=len(images), epochs=epochs, batch_size=options.batch_size,
                        lr=options.lr, weight_decay=options.weight_decay, seed=data.seed, desc="distill",
                        progress=progress)
    return student, {"arch": arch, "arch_kwargs": kwargs, "epochs": epochs, "steps": len(history), "lr": options.lr,
                     "loss_first": history[0], "loss_last": history[-1]}
