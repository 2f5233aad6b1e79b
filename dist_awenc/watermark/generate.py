"""Stage 1 (METHOD.md): a universal adversarial watermark on the frozen clean encoder f0.

    L_gen(delta) = E_x [ alpha * cos(f0(x+delta), f0(x)) - cos(f0(x+delta), f0(x_k)) ]

minimised by projected sign-gradient steps (or Adam) with ``|delta|_inf <= eps``
and ``x + delta`` clipped to [0, 1]. With ``robust.transforms`` set, the
marked images pass a random differentiable transform T first
(:mod:`dist_awenc.watermark.transforms`): ``f0(T(x + delta))``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dist_awenc.config import GenerationSection, WatermarkConfig
from dist_awenc.data import build_dataset, derive_seed, make_splits
from dist_awenc.encoders.io import Encoder, atomic_write_text, load_encoder, read_state, save_tensors
from dist_awenc.engine.log import info
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.runs import open_run
from dist_awenc.verify.plan import make_plan
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, save_alternatives, save_secret
from dist_awenc.watermark.transforms import RandomTransform, TransformParams, cat_draws, make_transform

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (images, generator) -> T(images)


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
    transform: Optional[Transform] = None,
) -> tuple[torch.Tensor, list[float]]:
    """Optimise one universal perturbation over mini-batches of ``images``.

    Args:
        encoder: frozen f0 (pixel space in, features out).
        images: (N, 3, S, S) marking set in [0, 1].
        key: (3, S, S) key image.

    Returns:
        delta (3, S, S) with ``|delta|_inf <= eps``, and the loss per step.
    """
    deltas, history = generate_deltas(encoder, images, key[None], [seed], eps=eps, alpha=alpha, steps=steps,
                                      step_size=step_size, batch_size=batch_size, optimizer=optimizer, progress=progress,
                                      transform=transform)
    return deltas[0], history[0]


def generate_deltas(
    encoder: Encoder,
    images: torch.Tensor,
    keys: torch.Tensor,
    seeds: list[int],
    *,
    eps: float = 16 / 255,
    alpha: float = 1.0,
    steps: int = 300,
    step_size: float = 1 / 255,
    batch_size: int = 128,
    optimizer: str = "pgd",
    progress: bool = True,
    desc: str = "watermark",
    transform: Optional[Transform] = None,
) -> tuple[torch.Tensor, list[list[float]]]:
    """Stage 1 for K secrets at once, each exactly as if generated alone.

    Secret k draws its mini-batches from its own generator seeded by
    ``seeds[k]`` and has its own perturbation; the K problems only share the
    forward passes (one batch of K x b images), so the owner's secret and J
    alternative secrets come from the same procedure.

    With ``transform`` (``(images, generator) -> images``, e.g.
    :func:`~dist_awenc.watermark.transforms.make_transform`), the marked images
    ``(x + delta).clamp(0, 1)`` of secret k pass ``transform(., g_k)`` before
    the encoder (clean images and keys do not), ``g_k`` a CPU generator of its
    own seeded by ``derive_seed(seeds[k], "robust")``: secret k's transform
    draws, like its batches, depend on ``seeds[k]`` only.

    Args:
        encoder: frozen f0 (pixel space in, features out).
        images: (N, 3, S, S) marking set in [0, 1].
        keys: (K, 3, S, S) key images.
        seeds: K seeds, one per secret.

    Returns:
        deltas (K, 3, S, S) with ``|delta|_inf <= eps``, and each secret's loss per step.
    """
    check_generation(eps, steps, step_size, batch_size, optimizer)
    if keys.ndim != 4 or len(keys) != len(seeds):
        raise ConfigError(f"generate_deltas: {len(seeds)} seeds for keys of shape {tuple(keys.shape)}")
    device = next(encoder.parameters()).device
    encoder.eval().requires_grad_(False)
    images, keys = images.to(device), keys.to(device)
    k, b = len(keys), min(batch_size, len(images))
    with torch.no_grad():
        f_key = encoder(keys)  # (K, d)
    deltas = torch.zeros_like(keys, requires_grad=True)
    adam = torch.optim.Adam([deltas], lr=step_size) if optimizer == "adam" else None
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    t_gens = [torch.Generator().manual_seed(derive_seed(int(s), "robust")) for s in seeds]
    history: list[list[float]] = [[] for _ in range(k)]
    for _ in tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True):
        idx = torch.stack([torch.randint(len(images), (b,), generator=g) for g in gens])  # (K, b)
        x = images[idx.to(images.device)]  # (K, b, 3, S, S)
        with torch.no_grad():
            f_clean = encoder(x.flatten(0, 1)).unflatten(0, (k, b))
        marked = (x + deltas[:, None]).clamp(0, 1)
        if isinstance(transform, RandomTransform):  # the same, in one pass over the K secrets' images
            draws = cat_draws([transform.draw(b, g) for g in t_gens])
            marked = transform.apply(marked.flatten(0, 1), draws).unflatten(0, (k, b))
        elif transform is not None:
            marked = torch.stack([transform(marked[i], t_gens[i]) for i in range(k)])
        f_marked = encoder(marked.flatten(0, 1)).unflatten(0, (k, b))
        losses = torch.stack([generation_loss(f_marked[i], f_clean[i], f_key[i], alpha) for i in range(k)])
        (grad,) = torch.autograd.grad(losses.sum(), deltas)
        with torch.no_grad():
            if adam is None:
                deltas -= step_size * grad.sign()
            else:
                deltas.grad = grad
                adam.step()
            deltas.clamp_(-eps, eps)
        for i, v in enumerate(losses.detach().cpu().tolist()):
            history[i].append(v)
    return deltas.detach().cpu(), history


def check_generation(eps: float, steps: int, step_size: float, batch_size: int, optimizer: str) -> None:
    """One-line ConfigError for stage-1 settings out of range."""
    if eps <= 0 or eps > 1 or steps < 1 or step_size <= 0 or batch_size < 1:
        raise ConfigError(f"generation: need 0 < eps <= 1, steps >= 1, step_size > 0, batch_size >= 1 "
                          f"(got {eps}, {steps}, {step_size}, {batch_size})")
    if optimizer not in ("pgd", "adam"):
        raise ConfigError(f"generation.optimizer must be pgd or adam, not '{optimizer}'")


def alternative_seeds(owner_seed: int, count: int) -> list[int]:
    """J seeds for the alternative secrets, derived from the owner's and never equal to it."""
    state = np.random.SeedSequence([int(owner_seed), 0xA17E]).generate_state(count + 1, dtype=np.uint32)
    return [int(s) for s in state if int(s) != int(owner_seed)][:count]


def generate_alternatives(encoder: Encoder, pool: torch.Tensor, g: GenerationSection, owner_seed: int, count: int,
                          work_dir: Path, chunk: int = 16, *, transform: Optional[Transform]) -> AlternativeSecrets:
    """J alternative secrets by exactly the owner's procedure (key draw + stage 1) with other seeds.

    ``transform`` is required (None: none) and must be the owner's: alternatives made with
    another transform setting would not be exchangeable with the owner's secret.

    Generated ``chunk`` at a time; each finished chunk is saved under
    ``work_dir``, so an interrupted run resumes where it stopped.
    """
    seeds = alternative_seeds(owner_seed, count)
    work_dir.mkdir(parents=True, exist_ok=True)
    keys_all, deltas_all = [], []
    for start in range(0, count, chunk):
        part = seeds[start : start + chunk]
        path = work_dir / f"chunk_{start:06d}_{len(part)}.safetensors"
        if path.exists():
            t = read_state(path)
            keys, deltas = t["keys"], t["deltas"]
        else:
            keys = torch.stack([choose_key(g.key, pool, s)[0] for s in part])
            deltas, _ = generate_deltas(encoder, pool, keys, part, eps=g.eps, alpha=g.alpha, steps=g.steps,
                                        step_size=g.step_size, batch_size=g.batch_size, optimizer=g.optimizer,
                                        desc=f"alternatives {start + len(part)}/{count}", transform=transform)
            save_tensors(path, {"keys": keys, "deltas": deltas})
        keys_all.append(keys)
        deltas_all.append(deltas)
    return AlternativeSecrets(keys=torch.cat(keys_all), deltas=torch.cat(deltas_all), seeds=seeds,
                              control_seeds=[control_seed_of(s) for s in seeds])


def control_seed_of(seed: int) -> int:
    """The control permutation's seed for a secret generated with ``seed`` (owner and alternatives alike)."""
    return int(seed) + 7919


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
    """Generate the owner's secret on f0 with its verification plan (and the J alternative secrets).

    Writes ``secret.safetensors`` + ``secret.json`` and, with ``plan.alternatives`` = J > 0,
    ``alternatives.safetensors``, whose hash the plan records.
    """
    g, pl = cfg.generation, cfg.plan
    n = {"whitebox": pl.n_whitebox, "blackbox_score": pl.n_score, "blackbox_label": pl.n_label}
    make_plan(dataset=cfg.data.name, dataset_size=1, image_size=cfg.data.image_size, split_seed=cfg.data.split_seed,
              holdout_indices=np.zeros(0), n=n, alpha=pl.alpha, alternatives=pl.alternatives, alternatives_sha256=None,
              primary_mode=pl.primary_mode)  # checks the plan's values before anything is written
    check_generation(g.eps, g.steps, g.step_size, g.batch_size, g.optimizer)
    if g.key not in ("image", "noise"):
        raise ConfigError(f"generation.key must be image or noise, not '{g.key}'")
    robust = TransformParams.of(cfg.robust)
    transform = make_transform(robust)  # one transform for the owner's secret and its alternatives alike
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
                                        batch_size=g.batch_size, optimizer=g.optimizer, seed=cfg.run.seed,
                                        transform=transform)
        alt_sha = None
        if pl.alternatives:
            alt = generate_alternatives(encoder, pool, g, cfg.run.seed, pl.alternatives, run_dir / "alternatives.parts",
                                        transform=transform)
            alt_sha = save_alternatives(alt, run_dir / "alternatives.safetensors")
        plan = make_plan(dataset=cfg.data.name, dataset_size=len(dataset), image_size=cfg.data.image_size,
                         split_seed=cfg.data.split_seed, holdout_indices=splits["holdout"], n=n, alpha=pl.alpha,
                         alternatives=pl.alternatives, alternatives_sha256=alt_sha, primary_mode=pl.primary_mode)
        meta = {"encoder_sha256": card.get("sha256"), "alpha": g.alpha, "key_source": key_source,
                "dataset": cfg.data.name, "seed": cfg.run.seed}
        if robust.enabled:  # only when on: a secret made without transforms keeps its bytes and hash
            meta["robust"] = robust.record()  # the owner's secret and its alternatives alike
        secret = Secret(key=key, delta=delta, eps=g.eps, control_seed=control_seed_of(cfg.run.seed), meta=meta, plan=plan)
        save_secret(secret, run_dir / "secret")
        stats = mark_statistics(encoder, holdout, secret)
        atomic_write_text(run_dir / "generation.json", json.dumps(
            {"secret_sha256": secret.sha256, "loss_first": history[0], "loss_last": history[-1], "holdout": stats,
             "alternatives": pl.alternatives, "alternatives_sha256": alt_sha,
             **({"robust": robust.record()} if robust.enabled else {})}, indent=2))
        info(f"secret {secret.sha256[:12]}  holdout cos(marked, key) {stats['cos_marked_key']:.3f} "
             f"vs control {stats['cos_control_key']:.3f}  -> {run_dir / 'secret.safetensors'}"
             + (f" (+ {pl.alternatives} alternative secrets)" if pl.alternatives else ""))
    return run_dir / "secret.safetensors"


def alternatives_path(secret_path: str | Path) -> Path:
    """Where a secret's alternatives live: ``alternatives.safetensors`` beside it."""
    p = Path(secret_path)
    return (p if p.is_dir() else p.parent) / "alternatives.safetensors"
