"""Overwriting: the pirate embeds its own watermark, with its own key, into the suspect.

The pirate runs the owner's two stages with its own secret: stage 1
(:func:`~dist_awenc.watermark.perturbation.generate_delta`) on the suspect with a
key image picked from its unlabeled data, then stage 2 (the
:class:`~dist_awenc.watermark.embed.EmbedTask` loss, fresh SimCLR heads,
``f0`` = the suspect) for ``strength`` epochs in a plain in-process loop.
"""
from __future__ import annotations

import torch

from dist_awenc.attacks.base import AttackData, AttackOptions, as_count, device_of, register_attack
from dist_awenc.attacks.training import fit_steps, mild_single_view
from dist_awenc.data.views import ViewConfig, make_views
from dist_awenc.encoders.io import Encoder
from dist_awenc.errors import ConfigError
from dist_awenc.ssl.methods import build_method
from dist_awenc.watermark.embed import EmbedTask
from dist_awenc.watermark.perturbation import choose_key, generate_delta, mark_statistics
from dist_awenc.watermark.secret import Secret

PIRATE_SEED_OFFSET = 12345


def pirate_secret(suspect: Encoder, images: torch.Tensor, seed: int, *, eps: float, steps: int, batch_size: int,
                  progress: bool) -> Secret:
    """Stage 1 with the pirate's key: ``choose_key('image', images, seed + 12345)`` and a fresh delta.

    ``suspect`` is left in eval mode with ``requires_grad=False`` (as by ``generate_delta``).
    """
    pirate_seed = seed + PIRATE_SEED_OFFSET
    key, source = choose_key("image", images, pirate_seed)
    delta, history = generate_delta(suspect, images, key, eps=eps, steps=steps, batch_size=batch_size,
                                    seed=pirate_seed, progress=progress)
    return Secret(key=key, delta=delta, eps=eps, control_seed=pirate_seed + 7919,
                  meta={"key_source": source, "loss_first": history[0], "loss_last": history[-1]})


@register_attack("overwrite", strengths=[5, 10])
def overwrite(encoder: Encoder, card: dict, strength: float, data: AttackData,
              options: AttackOptions, progress: bool) -> tuple[Encoder, dict]:
    """Embed a pirate watermark into the suspect for ``strength`` epochs over ``data.unlabeled``.

    Stage 1: ``options.overwrite_steps`` PGD steps, ``options.overwrite_eps``.
    Stage 2: default loss weights, Adam at ``options.lr``; one mild view for
    the watermark terms, two strong views for the contrastive term.
    """
    epochs = as_count(strength, "overwrite", "the number of epochs", minimum=1)
    if len(data.unlabeled) < 2:
        raise ConfigError("attack overwrite needs at least 2 unlabeled images")
    device = device_of(encoder)
    images = data.unlabeled
    secret = pirate_secret(encoder, images, data.seed, eps=options.overwrite_eps, steps=options.overwrite_steps,
                           batch_size=options.batch_size, progress=progress)
    # EmbedTask keeps its own frozen copy of f0 = the suspect; the encoder itself becomes the pirate's f
    method = build_method("simclr", encoder, encoder.feature_dim, proj_hidden_dim=options.proj_hidden_dim,
                          proj_dim=options.proj_dim, temperature=options.temperature)
    task = EmbedTask(method, encoder, secret).to(device)
    encoder.requires_grad_(True)
    task.train()
    strong, mild = ViewConfig(), mild_single_view()
    key = secret.key[None].to(device)
    last: dict[str, float] = {}

    def loss_at(idx: torch.Tensor, step: int) -> torch.Tensor:
        x = images[idx].to(device)
        out = task({"views": make_views(x, strong, seed=data.seed, step=step, stream=14),
                    "aug": make_views(x, mild, seed=data.seed, step=step, stream=15)[0],
                    "clean": x,
                    "key_aug": make_views(key, mild, seed=data.seed, step=step, stream=16)[0]})
        last.update({k: float(v.detach()) for k, v in out.items()})
        return out["loss"]

    history = fit_steps(task.parameters(), loss_at, n=len(images), epochs=epochs, batch_size=options.batch_size,
                        lr=options.lr, weight_decay=options.weight_decay, seed=data.seed, min_batch=2,
                        desc="overwrite", progress=progress)
    attacked = task.backbone
    held = images[: min(256, len(images))]
    with torch.no_grad():
        before = mark_statistics(task.f0, held, secret)["cos_marked_key"]
        after = mark_statistics(attacked.eval(), held, secret)
    return attacked, {"epochs": epochs, "steps": len(history), "lr": options.lr, "pirate_key": secret.meta["key_source"],
                      "pirate_eps": secret.eps, "loss_first": history[0], "loss_last": history[-1],
                      "terms_last": last, "pirate_cos_marked_key_before": before,
                      "pirate_cos_marked_key": after["cos_marked_key"],
                      "pirate_cos_control_key": after["cos_control_key"]}
