"""The stage-1 optimiser: universal perturbations on a frozen encoder (METHOD.md, stage 1).

    L_gen(delta) = E_x [ alpha * cos(f0(x+delta), f0(x)) - cos(f0(x+delta), f0(x_k)) ]

minimised by projected sign-gradient steps (or Adam) with ``|delta|_inf <= eps``
and ``x + delta`` clipped to [0, 1]. With a robustness transform T the marked
images pass T first (:mod:`dist_awenc.watermark.transforms`): ``f0(T(x + delta))``;
with a :class:`Rehearsal`, surrogate derivatives of f0 are fitted too and
reference encoders kept away (:mod:`dist_awenc.watermark.rehearsal` builds them).

This module is the library the owner's stage (:mod:`dist_awenc.watermark.generate`)
and the pirate's attacks (``overwrite``, ``adversarial_finetune``) share; it
imports neither stages nor attacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dist_awenc.data import derive_seed
from dist_awenc.data.stream import Images, batches, stream
from dist_awenc.encoders.io import Encoder
from dist_awenc.errors import ConfigError
from dist_awenc.watermark.secret import Secret
from dist_awenc.watermark.transforms import RandomTransform, cat_draws

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (images, generator) -> T(images)


@dataclass
class Rehearsal:
    """Encoders stage 1 optimises over besides f0 (all frozen, on f0's device)."""

    surrogates: list[Encoder] = field(default_factory=list)
    references: list[Encoder] = field(default_factory=list)
    reference_weight: float = 1.0

    def __bool__(self) -> bool:
        return bool(self.surrogates or self.references)

    def to(self, device: torch.device) -> "Rehearsal":
        for e in (*self.surrogates, *self.references):
            e.to(device).eval().requires_grad_(False)
        return self


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
    images: Images,
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
    rehearsal: Optional[Rehearsal] = None,
) -> tuple[torch.Tensor, list[float]]:
    """Optimise one universal perturbation over mini-batches of ``images``.

    Args:
        encoder: frozen f0 (pixel space in, features out).
        images: (N, 3, S, S) marking set in [0, 1], a tensor or an
            :class:`~dist_awenc.data.stream.IndexedImages` (decoded batch by batch).
        key: (3, S, S) key image.

    Returns:
        delta (3, S, S) with ``|delta|_inf <= eps``, and the loss per step.
    """
    deltas, history = generate_deltas(encoder, images, key[None], [seed], eps=eps, alpha=alpha, steps=steps,
                                      step_size=step_size, batch_size=batch_size, optimizer=optimizer, progress=progress,
                                      transform=transform, rehearsal=rehearsal)
    return deltas[0], history[0]


def generate_deltas(
    encoder: Encoder,
    images: Images,
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
    rehearsal: Optional[Rehearsal] = None,
) -> tuple[torch.Tensor, list[list[float]]]:
    """Stage 1 for K secrets at once, each exactly as if generated alone.

    Secret k draws its mini-batches from its own generator seeded by
    ``seeds[k]`` and has its own perturbation; the K problems only share the
    forward passes (one batch of K x b images), so the owner's secret and J
    alternative secrets come from the same procedure. Only those K x b
    images are decoded per step (:class:`MarkingSampler`), on a split's
    :class:`~dist_awenc.data.stream.IndexedImages` through the project's
    loader; a tensor is moved to the encoder's device once and gathered there.

    With ``transform`` (``(images, generator) -> images``, e.g.
    :func:`~dist_awenc.watermark.transforms.make_transform`), the marked images
    ``(x + delta).clamp(0, 1)`` of secret k pass ``transform(., g_k)`` before
    the encoder (clean images and keys do not), ``g_k`` a CPU generator of its
    own seeded by ``derive_seed(seeds[k], "robust")``: secret k's transform
    draws, like its batches, depend on ``seeds[k]`` only.

    With ``rehearsal`` (:mod:`dist_awenc.watermark.rehearsal`), each secret's
    loss is the mean of ``L_gen`` over f0 and the surrogate derivatives plus
    the reference encoders' pull of the marked images towards the key.

    Args:
        encoder: frozen f0 (pixel space in, features out).
        images: (N, 3, S, S) marking set in [0, 1] (tensor or IndexedImages).
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
    if rehearsal:
        rehearsal.to(device)
    if isinstance(images, torch.Tensor):
        images = images.to(device)
    keys = keys.to(device)
    k, b = len(keys), min(batch_size, len(images))
    with torch.no_grad():
        f_key = encoder(keys)  # (K, d)
    deltas = torch.zeros_like(keys, requires_grad=True)
    adam = torch.optim.Adam([deltas], lr=step_size) if optimizer == "adam" else None
    t_gens = [torch.Generator().manual_seed(derive_seed(int(s), "robust")) for s in seeds]
    history: list[list[float]] = [[] for _ in range(k)]
    marking = stream(images, MarkingSampler(len(images), b, seeds, steps))
    for _, drawn in zip(tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True), marking):
        x = drawn.to(device).unflatten(0, (k, b))  # (K, b, 3, S, S)
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
        if rehearsal:
            surrogate, reference = rehearsal_terms(rehearsal, x, marked, keys, alpha)
            losses = (losses + surrogate) / (1 + len(rehearsal.surrogates)) + reference
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


class MarkingSampler:
    """Stage 1's mini-batches as a batch sampler: per step, secret k's ``b`` positions drawn with replacement.

    Secret k's generator is seeded by ``seeds[k]``; each step yields the K secrets' draws one after the
    other (K x b positions into the marking set), so the K problems stay independent of one another.
    """

    def __init__(self, n: int, b: int, seeds: list[int], steps: int) -> None:
        self.n, self.b, self.seeds, self.steps = int(n), int(b), [int(s) for s in seeds], int(steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        for _ in range(self.steps):
            yield torch.stack([torch.randint(self.n, (self.b,), generator=g) for g in gens]).flatten().tolist()


def check_generation(eps: float, steps: int, step_size: float, batch_size: int, optimizer: str) -> None:
    """One-line ConfigError for stage-1 settings out of range."""
    if eps <= 0 or eps > 1 or steps < 1 or step_size <= 0 or batch_size < 1:
        raise ConfigError(f"generation: need 0 < eps <= 1, steps >= 1, step_size > 0, batch_size >= 1 "
                          f"(got {eps}, {steps}, {step_size}, {batch_size})")
    if optimizer not in ("pgd", "adam"):
        raise ConfigError(f"generation.optimizer must be pgd or adam, not '{optimizer}'")


def choose_key(kind: str, pool: Images, seed: int) -> tuple[torch.Tensor, str]:
    """The key image: a seeded pick from the owner's pool, or seeded uniform noise."""
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        i = int(torch.randint(len(pool), (1,), generator=g))
        return pool[i].clone(), f"image:{i}"
    if kind == "noise":
        return torch.rand(pool.shape[1:], generator=g), "noise"
    raise ConfigError(f"generation.key must be image or noise, not '{kind}'")


@torch.no_grad()
def mark_statistics(encoder: Encoder, images: Images, secret: Secret, batch_size: int = 512) -> dict[str, float]:
    """Mean cosines that stage 1 moves: marked vs own clean features, marked vs key.

    ``images`` (a tensor or IndexedImages) pass the encoder ``batch_size`` at a time; the means are
    over every image's cosine, so up to ``batch_size`` images give what one forward over them gave.
    """
    device = next(encoder.parameters()).device
    f_key = encoder(secret.key[None].to(device))
    cos = lambda a, b: F.cosine_similarity(a, b.expand_as(a), dim=1)  # noqa: E731
    parts: dict[str, list[torch.Tensor]] = {"cos_marked_own": [], "cos_marked_key": [], "cos_control_key": [],
                                            "cos_clean_key": []}
    for x in batches(images, batch_size):
        x = x.to(device)
        f_x, f_m, f_r = encoder(x), encoder(secret.mark(x)), encoder(secret.mark_control(x))
        for name, c in zip(parts, (cos(f_m, f_x), cos(f_m, f_key), cos(f_r, f_key), cos(f_x, f_key))):
            parts[name].append(c)
    return {name: float(torch.cat(c).mean()) for name, c in parts.items()}


def rehearsal_terms(rehearsal: Rehearsal, x: torch.Tensor, marked: torch.Tensor, keys: torch.Tensor,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate and reference terms of stage 1 for K secrets at once.

    Args:
        x: (K, b, 3, S, S) clean images; marked: (K, b, 3, S, S) what the encoders see of x + delta
            (after any robustness transform); keys: (K, 3, S, S).

    Returns:
        (K,) sum over surrogates of L_gen (the caller adds f0's and divides by 1 + S), and (K,)
        ``reference_weight`` times the references' mean cos(r(marked), r(key)).
    """
    k, b = x.shape[:2]
    surrogate, reference = marked.new_zeros(k), marked.new_zeros(k)
    flat_x, flat_m = x.flatten(0, 1), marked.flatten(0, 1)
    for e in rehearsal.surrogates:
        with torch.no_grad():
            f_clean, f_key = e(flat_x).unflatten(0, (k, b)), e(keys)
        f_m = e(flat_m).unflatten(0, (k, b))
        surrogate = surrogate + (alpha * F.cosine_similarity(f_m, f_clean, dim=2)
                                 - F.cosine_similarity(f_m, f_key[:, None], dim=2)).mean(1)
    for r in rehearsal.references:
        with torch.no_grad():
            f_key = r(keys)
        f_m = r(flat_m).unflatten(0, (k, b))
        reference = reference + F.cosine_similarity(f_m, f_key[:, None], dim=2).mean(1)
    if rehearsal.references:
        reference = reference * (rehearsal.reference_weight / len(rehearsal.references))
    return surrogate, reference
