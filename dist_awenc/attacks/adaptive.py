"""Adaptive removal attacks on the weights: a pirate who knows the method (METHOD.md, "Robust embedding").

``prune_finetune`` prunes and then fine-tunes with the pruning masks kept;
``adversarial_finetune`` makes the stolen encoder invariant to universal
perturbations the pirate computes on it itself, with stage 1's own procedure
(:func:`~dist_awenc.watermark.perturbation.generate_deltas`). The other adaptive
attacks live beside their plain versions: ``distill_strong_aug`` and
``distill_arch`` in :mod:`~dist_awenc.attacks.distill`, ``query_purify`` in
:mod:`~dist_awenc.attacks.query`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dist_awenc.attacks.base import AttackData, AttackOptions, as_count, as_fraction, device_of, register_attack
from dist_awenc.attacks.distill import embedding_match_loss
from dist_awenc.attacks.finetune import supervised_finetune
from dist_awenc.attacks.prune import global_magnitude_masks, remove_masks
from dist_awenc.attacks.training import batch_plan, fit_steps, mild_single_view
from dist_awenc.data.splits import derive_seed
from dist_awenc.data.views import make_views
from dist_awenc.encoders.io import Encoder
from dist_awenc.errors import ConfigError
from dist_awenc.watermark.perturbation import choose_key, generate_deltas


@register_attack("prune_finetune", strengths=[0.5, 0.7, 0.9])
def prune_finetune(encoder: Encoder, card: dict, strength: float, data: AttackData,
                   options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Global magnitude pruning of the fraction ``strength`` of conv / linear weights, then
    ``options.epochs`` epochs of supervised fine-tuning (encoder + fresh head, Adam at ``options.lr``)
    on the pirate's labelled data with the masks kept: pruned weights stay exactly zero.
    """
    ratio = as_fraction(strength, "prune_finetune", "the fraction of weights pruned")
    modules = global_magnitude_masks(encoder, ratio, "prune_finetune")
    tuned = supervised_finetune(encoder, data, lr=options.lr, epochs=options.epochs, batch_size=options.batch_size,
                                weight_decay=options.weight_decay, progress=progress, name="prune_finetune")
    return encoder, {"target_sparsity": ratio, **remove_masks(modules), **tuned}


@torch.no_grad()
def perturbation_response(encoder: Encoder, images: torch.Tensor, deltas: torch.Tensor) -> float:
    """How far universal perturbations move embeddings: mean over images and perturbations of
    ``1 - cos(f(clip(x + delta)), f(x))``.

    Shape: images (n, 3, S, S), deltas (K, 3, S, S) -> scalar.
    """
    device = device_of(encoder)
    was_training = encoder.training
    encoder.eval()
    x = images.to(device)
    f_x = encoder(x)
    moved = [1 - F.cosine_similarity(encoder((x + d.to(device)).clamp(0, 1)), f_x, dim=1).mean() for d in deltas]
    encoder.train(was_training)
    return float(torch.stack(moved).mean())


def pirate_perturbations(encoder: Encoder, images: torch.Tensor, keys: torch.Tensor, seed: int, round_: int,
                         options: AttackOptions) -> torch.Tensor:
    """Stage 1 on the encoder as it is now, one universal perturbation per key: ``options.adv_steps`` PGD
    steps of size ``2.5 eps / steps`` within ``options.adv_eps``, each step on one mini-batch of
    ``options.batch_size`` images split over the keys (on a frozen snapshot; ``encoder`` is untouched).

    Shape: keys (K, 3, S, S) -> (K, 3, S, S) on the encoder's device.
    """
    seeds = [derive_seed(seed, "adversarial_finetune", round_, i) for i in range(len(keys))]
    eps, steps = options.adv_eps, options.adv_steps
    deltas, _ = generate_deltas(copy.deepcopy(encoder), images, keys, seeds, eps=eps, steps=steps,
                                step_size=2.5 * eps / steps, batch_size=max(1, options.batch_size // len(keys)), progress=False)
    return deltas.to(device_of(encoder))


@register_attack("adversarial_finetune", strengths=[1, 3, 5])
def adversarial_finetune(encoder: Encoder, card: dict, strength: float, data: AttackData,
                         options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Fine-tune for ``strength`` epochs so the encoder ignores universal perturbations the pirate computes on it.

    At the start of every epoch the pirate runs stage 1 on the current encoder
    for ``options.adv_keys`` keys drawn from its own unlabeled data
    (:func:`pirate_perturbations`); each mini-batch (one mild view per image)
    then minimises ``1 - cos(f(x + delta'), f(x))`` (``f(x)`` detached, delta'
    cycling over the perturbations) plus the preservation term
    ``1 - cos(f(x), f_orig(x))`` against the frozen stolen encoder; Adam at
    ``options.lr``. The info reports the response (:func:`perturbation_response`)
    to the first epoch's perturbations before and after, and to perturbations
    recomputed on the attacked encoder.
    """
    epochs = as_count(strength, "adversarial_finetune", "the number of epochs", minimum=1)
    images = data.unlabeled
    if len(images) < 2:
        raise ConfigError("attack adversarial_finetune needs at least 2 unlabeled images")
    device = device_of(encoder)
    original = copy.deepcopy(encoder).eval().requires_grad_(False)
    keys = torch.stack([choose_key("image", images, derive_seed(data.seed, "adversarial_finetune_key", i))[0]
                        for i in range(options.adv_keys)])
    per_epoch = batch_plan(len(images), options.batch_size)
    views = mild_single_view()
    held = images[: min(256, len(images))]
    state: dict[str, torch.Tensor] = {}
    last: dict[str, float] = {}

    def loss_at(idx: torch.Tensor, step: int) -> torch.Tensor:
        if step % per_epoch == 0:
            state["deltas"] = pirate_perturbations(encoder, images, keys, data.seed, step // per_epoch, options)
            state.setdefault("first", state["deltas"])
        x = make_views(images[idx].to(device), views, seed=data.seed, step=step, stream=18)[0]
        deltas = state["deltas"][(torch.arange(len(idx)) + step) % len(keys)]  # (b, 3, S, S)
        f_x = encoder(x)
        invariance = (1 - F.cosine_similarity(encoder((x + deltas).clamp(0, 1)), f_x.detach(), dim=1)).mean()
        with torch.no_grad():
            target = original(x)
        keep = embedding_match_loss(f_x, target)
        last.update(invariance=float(invariance.detach()), keep=float(keep.detach()))
        return invariance + keep

    encoder.train().requires_grad_(True)
    history = fit_steps(encoder.parameters(), loss_at, n=len(images), epochs=epochs, batch_size=options.batch_size,
                        lr=options.lr, weight_decay=options.weight_decay, seed=data.seed, desc="adversarial_finetune",
                        progress=progress)
    encoder.eval()
    recomputed = pirate_perturbations(encoder, images, keys, data.seed, epochs, options)
    return encoder, {"epochs": epochs, "steps": len(history), "lr": options.lr, "keys": len(keys),
                     "pgd_steps": options.adv_steps, "eps": options.adv_eps,
                     "loss_first": history[0], "loss_last": history[-1], "terms_last": last,
                     "response_before": perturbation_response(original, held, state["first"]),
                     "response_after": perturbation_response(encoder, held, state["first"]),
                     "response_recomputed_after": perturbation_response(encoder, held, recomputed)}
