"""Seeded, disjoint index splits of a dataset, and seed derivation.

The owner of the encoder pre-trains on ``pretrain`` and keeps ``holdout`` for
verification; the pirate fine-tunes/probes on ``downstream``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
from torch import Tensor

from dist_awenc.errors import ConfigError

__all__ = ["DEFAULT_FRACTIONS", "SPLIT_NAMES", "derive_seed", "make_splits", "splits_for", "train_test_split_indices"]

SPLIT_NAMES: tuple[str, str, str] = ("pretrain", "holdout", "downstream")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.5, 0.2, 0.3)


def derive_seed(*parts: int | str) -> int:
    """Mix several ints/strings into one 63-bit seed (stable across runs and machines).

    Args:
        *parts: e.g. ``(seed, epoch)`` or ``(seed, "views", step)``.

    Returns:
        A non-negative int < 2**63 suitable for ``torch.Generator.manual_seed``.
    """
    text = "/".join(f"{type(p).__name__}:{p}" for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def make_splits(
    n: int, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, Tensor]:
    """Split ``range(n)`` into the pretrain / holdout / downstream index sets.

    A seeded random permutation is cut into consecutive pieces of sizes
    ``round(f * n)`` (the last piece takes the remainder). A fraction of 0
    leaves its split empty (``(1, 0, 0)``: everything for pre-training; a
    downstream task on another dataset: ``(0, 0, 1)`` there).

    Args:
        n: dataset size.
        seed: split seed (same seed -> same splits).
        fractions: three fractions in [0, 1] summing to 1, in the order of
            ``("pretrain", "holdout", "downstream")``.

    Returns:
        ``{"pretrain": idx, "holdout": idx, "downstream": idx}``, each a sorted
        LongTensor; disjoint and together covering ``range(n)``.

    Raises:
        ValueError: on bad fractions or when a split with a positive fraction would be empty.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLIT_NAMES):
        raise ValueError(
            f"fractions must have {len(SPLIT_NAMES)} entries {SPLIT_NAMES}; got {fractions}"
        )
    if any(not 0 <= f <= 1 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be in [0, 1] and sum to 1; got {fractions}")
    sizes = [round(f * n) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    if any(s < 1 for s, f in zip(sizes, fractions) if f > 0) or any(s < 0 for s in sizes):
        raise ValueError(
            f"n={n} is too small for fractions {fractions}: split sizes would be {sizes}"
        )
    perm = torch.randperm(n, generator=_generator(seed, "splits"))
    pieces = perm.split(sizes)
    return {name: piece.sort().values for name, piece in zip(SPLIT_NAMES, pieces)}


def splits_for(n: int, seed: int, fractions: Sequence[float], stage: str, *needed: str) -> dict[str, Tensor]:
    """:func:`make_splits` for a stage: bad fractions, or an empty split among ``needed``, are one-line errors.

    Raises:
        ConfigError: naming ``data.splits`` and the stage that needs the empty split.
    """
    try:
        splits = make_splits(n, seed, fractions)
    except ValueError as e:
        raise ConfigError(f"data.splits: {e}") from None
    for name in needed:
        if len(splits[name]) == 0:
            raise ConfigError(f"data.splits={list(fractions)} leaves the {name} split empty, and {stage} needs it "
                              f"(the fractions are of {'/'.join(SPLIT_NAMES)})")
    return splits


def train_test_split_indices(
    indices: Tensor | Sequence[int], seed: int, test_fraction: float = 0.3
) -> tuple[Tensor, Tensor]:
    """Seeded train/test split of a set of dataset indices (for the downstream probe).

    Args:
        indices: LongTensor (m,) or sequence of dataset indices, m >= 2.
        seed: split seed.
        test_fraction: fraction in (0, 1) going to the test part
            (rounded, at least one item on each side).

    Returns:
        ``(train_idx, test_idx)``: sorted LongTensors, disjoint, covering ``indices``.
    """
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    m = idx.numel()
    if m < 2:
        raise ValueError(f"need at least 2 indices to split into train and test; got {m}")
    n_test = min(max(round(test_fraction * m), 1), m - 1)
    perm = torch.randperm(m, generator=_generator(seed, "train_test"))
    return idx[perm[n_test:]].sort().values, idx[perm[:n_test]].sort().values
