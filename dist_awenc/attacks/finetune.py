"""Fine-tuning attacks: linear probe only, full supervised fine-tuning, fine-tuning at another input resolution,
continued SimCLR."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.attacks.base import AttackData, AttackOptions, as_count, device_of, register_attack
from dist_awenc.attacks.training import fit_steps, mild_single_view
from dist_awenc.data.views import ViewConfig, make_views
from dist_awenc.encoders.io import Encoder
from dist_awenc.errors import ConfigError
from dist_awenc.ssl.methods import build_method
from dist_awenc.verify.resize import resize_images


@register_attack("finetune_probe", strengths=[0])
def finetune_probe(encoder: Encoder, card: dict, strength: float, data: AttackData,
                   options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """The pirate trains only a linear head on the frozen encoder: the encoder is returned unchanged."""
    return encoder, {"note": "encoder unchanged: only a linear head is trained downstream"}


def supervised_finetune(encoder: Encoder, data: AttackData, *, lr: float, epochs: int, batch_size: int,
                        weight_decay: float, progress: bool, name: str, size: int | None = None) -> dict:
    """Train ``encoder`` (in place) + a fresh linear head with cross-entropy on ``data.train_images``.

    ``epochs`` epochs of Adam at ``lr`` with mild views (random-resized crop
    0.8..1, flip, light colour jitter); normalisation layers train as usual
    (BatchNorm statistics update); ``size``: each batch resized to it first. Returns the training info.
    """
    if len(data.train_images) == 0:
        raise ConfigError(f"attack {name} needs labelled train_images")
    device = device_of(encoder)
    head = nn.Linear(encoder.feature_dim, data.num_classes).to(device)
    model = nn.Sequential(encoder, head).train()
    views = mild_single_view()
    images, labels = data.train_images, data.train_labels
    correct = [0, 0]

    def loss_at(idx: torch.Tensor, step: int) -> torch.Tensor:
        batch = images[idx].to(device)
        batch = batch if size is None else resize_images(batch, size)
        x = make_views(batch, views, seed=data.seed, step=step, stream=11)[0]
        y = labels[idx].to(device)
        logits = model(x)  # (b, num_classes)
        correct[0] += int((logits.argmax(1) == y).sum())
        correct[1] += len(y)
        return F.cross_entropy(logits, y)

    history = fit_steps(model.parameters(), loss_at, n=len(images), epochs=epochs, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, seed=data.seed, desc=name, progress=progress)
    return {"lr": lr, "epochs": epochs, "steps": len(history), "loss_first": history[0], "loss_last": history[-1],
            "train_accuracy": correct[0] / max(1, correct[1])}


@register_attack("finetune_full", strengths=[1e-4, 1e-3, 3e-3])
def finetune_full(encoder: Encoder, card: dict, strength: float, data: AttackData,
                  options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Supervised fine-tuning of encoder + a fresh linear head (cross-entropy, Adam, lr = strength).

    ``options.epochs`` epochs of :func:`supervised_finetune`.
    """
    if not strength > 0:
        raise ConfigError(f"attack finetune_full: strength is the learning rate, > 0; got {strength}")
    return encoder, supervised_finetune(encoder, data, lr=strength, epochs=options.epochs,
                                        batch_size=options.batch_size, weight_decay=options.weight_decay,
                                        progress=progress, name="finetune_full")


@register_attack("finetune_resolution", strengths=[2])
def finetune_resolution(encoder: Encoder, card: dict, strength: float, data: AttackData,
                        options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """The pirate moves the encoder to ``strength`` x its input resolution (224 -> 384 px is routine).

    Its labelled images are upsampled to ``round(S * strength)`` px (bilinear, antialiased) and encoder + a fresh
    linear head fine-tuned there (:func:`supervised_finetune`, ``options.epochs`` epochs at
    ``options.resolution_lr``). The derivative takes the new size: its card's ``input_size`` says so, and a
    verifier's queries made at the secret's resolution are resized to it (:mod:`dist_awenc.verify.resize`).
    Architectures whose input size is fixed (a ViT's position embedding) fail in their forward.
    """
    size = round(data.image_size * strength)
    if not strength > 0 or size < 2 or size == data.image_size:
        raise ConfigError(f"attack finetune_resolution: strength is the factor on the input size, giving another "
                          f"size of at least 2 px; got {strength} ({data.image_size} px -> {size} px)")
    info = supervised_finetune(encoder, data, lr=options.resolution_lr, epochs=options.epochs,
                               batch_size=options.batch_size, weight_decay=options.weight_decay, progress=progress,
                               name="finetune_resolution", size=size)
    encoder.input_size = size
    return encoder, {"input_size": size, **info}


@register_attack("finetune_ssl", strengths=[1, 5, 10])
def finetune_ssl(encoder: Encoder, card: dict, strength: float, data: AttackData,
                 options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Continued SimCLR training on ``data.unlabeled`` with fresh heads for ``strength`` epochs.

    Two strong views per image (the default :class:`ViewConfig`), Adam at
    ``options.lr``, temperature ``options.temperature``.
    """
    epochs = as_count(strength, "finetune_ssl", "the number of epochs")
    if epochs == 0:
        return encoder, {"epochs": 0, "steps": 0}
    if len(data.unlabeled) < 2:
        raise ConfigError("attack finetune_ssl needs at least 2 unlabeled images")
    device = device_of(encoder)
    method = build_method("simclr", encoder, encoder.feature_dim, proj_hidden_dim=options.proj_hidden_dim,
                          proj_dim=options.proj_dim, temperature=options.temperature).to(device).train()
    views = ViewConfig()
    images = data.unlabeled

    def loss_at(idx: torch.Tensor, step: int) -> torch.Tensor:
        return method(make_views(images[idx].to(device), views, seed=data.seed, step=step, stream=12))["loss"]

    history = fit_steps(method.parameters(), loss_at, n=len(images), epochs=epochs, batch_size=options.batch_size,
                        lr=options.lr, weight_decay=options.weight_decay, seed=data.seed, min_batch=2,
                        desc="finetune_ssl", progress=progress)
    return encoder, {"epochs": epochs, "steps": len(history), "lr": options.lr,
                     "loss_first": history[0], "loss_last": history[-1]}
