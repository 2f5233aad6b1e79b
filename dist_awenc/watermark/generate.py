"""Stage 1 (METHOD.md): a universal adversarial watermark on the frozen clean encoder f0.

    L_gen(delta) = E_x [ alpha * cos(f0(x+delta), f0(x)) - cos(f0(x+delta), f0(x_k)) ]

minimised by projected sign-gradient steps (or Adam) with ``|delta|_inf <= eps``
and ``x + delta`` clipped to [0, 1].
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dist_awenc.config import WatermarkConfig
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import Encoder, atomic_write_text, load_encoder
from dist_awenc.engine.log import info
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.runs import open_run
from dist_awenc.watermark.secret import Secret, save_secret


def generation_loss(f_marked: torch.Tensor, f_clean: torch.Tensor, f_key: torch.Tensor, alpha: float) -> torch.Tensor:
    """Stage-1 loss.

    Args:
        f_marked: (b, d) features of x + delta.
        f_clean: (b, d) features of x.
        f_key: (d,) or (1, d) features of the key image.
        alpha: weight of the "leave your own place" term (0: the summary form).

    Returns:
        Scalar ``mean(alpha * cos(f_marked, f_clean) - cos(f_marked, f_key))``.
    """
    return (alpha * F.cosine_similarity(f_marked, f_clean, dim=1)
            - F.cosine_similarity(f_marked, f_key.reshape(1, -1), dim=1)).mean()


def generate_delta(
    encoder: Encoder,
    images: torch.Tensor,
    key: torch.Tensor,
    *,
    eps: float = 16 / 255,
    alpha: float = 1.0,
    steps: int = 300,
    step_size: float = 1 / 255,
    batch_size: int = 128,
    optimizer: str = "pgd",
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Optimise one universal perturbation over mini-batches of ``images``.

    Args:
        encoder: frozen f0 (pixel space in, features out).
        images: (N, 3, S, S) marking set in [0, 1].
        key: (3, S, S) key image.

    Returns:
        delta (3, S, S) with ``|delta|_inf <= eps``, and the loss per step.
    """
    if eps <= 0 or eps > 1 or steps < 1 or step_size <= 0 or batch_size < 1:
        raise ConfigError(f"generation: need 0 < eps <= 1, steps >= 1, step_size > 0, batch_size >= 1 (got {eps}, {steps}, {step_size}, {batch_size})")
    if optimizer not in ("pgd", "adam"):
        raise ConfigError(f"generation.optimizer must be pgd or adam, not '{optimizer}'")
    device = next(encoder.parameters()).device
    encoder.eval().requires_grad_(False)
    images, key = images.to(device), key.to(device)
    with torch.no_grad():
        f_key = encoder(key[None])
    delta = torch.zeros_like(key, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=step_size) if optimizer == "adam" else None
    g = torch.Generator().manual_seed(seed)
    history: list[float] = []
    for _ in tqdm(range(steps), desc="watermark", disable=not progress, dynamic_ncols=True):
        x = images[torch.randint(len(images), (min(batch_size, len(images)),), generator=g)]
        with torch.no_grad():
            f_clean = encoder(x)
        loss = generation_loss(encoder((x + delta).clamp(0, 1)), f_clean, f_key, alpha)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if adam is None:
                delta -= step_size * grad.sign()
            else:
                delta.grad = grad
                adam.step()
            delta.clamp_(-eps, eps)
        history.append(float(loss.detach()))
    return delta.detach().cpu(), history


def choose_key(kind: str, pool: torch.Tensor, seed: int) -> tuple[torch.Tensor, str]:
    """The key image: a seeded pick from the owner's pool, or seeded uniform noise."""
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        i = int(torch.randint(len(pool), (1,), generator=g))
        return pool[i].clone(), f"image:{i}"
    if kind == "noise":
        return torch.rand(pool.shape[1:], generator=g), "noise"
    raise ConfigError(f"generation.key must be image or noise, not '{kind}'")


@torch.no_grad()
def mark_statistics(encoder: Encoder, images: torch.Tensor, secret: Secret) -> dict[str, float]:
    """Mean cosines that stage 1 moves: marked vs own clean features, marked vs key."""
    device = next(encoder.parameters()).device
    f_key = encoder(secret.key[None].to(device))
    x = images.to(device)
    f_x, f_m, f_r = encoder(x), encoder(secret.mark(x)), encoder(secret.mark_control(x))
    cos = lambda a, b: float(F.cosine_similarity(a, b.expand_as(a), dim=1).mean())  # noqa: E731
    return {"cos_marked_own": cos(f_m, f_x), "cos_marked_key": cos(f_m, f_key),
            "cos_control_key": cos(f_r, f_key), "cos_clean_key": cos(f_x, f_key)}


def watermark(cfg: WatermarkConfig) -> Path:
    """Generate the owner's secret on f0; writes ``secret.safetensors`` + ``secret.json``."""
    g = cfg.generation
    encoder, card = load_encoder(cfg.encoder)
    if card["input_size"] != cfg.data.image_size:
        raise ArtifactError(f"encoder was trained at {card['input_size']} px but data.image_size={cfg.data.image_size}")
    dataset = build_dataset(cfg.data.name, root=cfg.data.root, image_size=cfg.data.image_size, seed=cfg.data.split_seed, size=cfg.data.size)
    splits = make_splits(len(dataset), cfg.data.split_seed)
    pool, _ = dataset.get_batch(splits["pretrain"])
    holdout, _ = dataset.get_batch(splits["holdout"])
    with open_run(cfg, "watermark") as run_dir:
        key, key_source = choose_key(g.key, pool, cfg.run.seed)
        delta, history = generate_delta(encoder, pool, key, eps=g.eps, alpha=g.alpha, steps=g.steps, step_size=g.step_size,
                                        batch_size=g.batch_size, optimizer=g.optimizer, seed=cfg.run.seed)
        secret = Secret(key=key, delta=delta, eps=g.eps, control_seed=cfg.run.seed + 7919,
                        meta={"encoder_sha256": card.get("sha256"), "alpha": g.alpha, "key_source": key_source,
                              "dataset": cfg.data.name})
        save_secret(secret, run_dir / "secret")
        stats = mark_statistics(encoder, holdout, secret)
        atomic_write_text(run_dir / "generation.json", json.dumps(
            {"secret_sha256": secret.sha256, "loss_first": history[0], "loss_last": history[-1], "holdout": stats}, indent=2))
        info(f"secret {secret.sha256[:12]}  holdout cos(marked, key) {stats['cos_marked_key']:.3f} "
             f"vs control {stats['cos_control_key']:.3f}  -> {run_dir / 'secret.safetensors'}")
    return run_dir / "secret.safetensors"
