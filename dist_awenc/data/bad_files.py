"""Unreadable image files in a training run (``data.bad_files``): replaced and counted, or refused at start.

A multi-day run must not die at a random step on the one broken file among a million, nor stop one rank while the
others wait for it. Files PIL can decode are never bad, whatever their name says: a PNG named ``.JPEG``, CMYK and
grayscale JPEGs are decoded by the PIL path of every loader (the device decoder hands them to it). A file that
PIL cannot decode (truncated, corrupt, empty) is *bad*, and ``data.bad_files`` says what happens:

* ``skip`` (the default): the sample is replaced by the next readable image of the split (the next dataset index
  of the split in index order, wrapping), so every rank keeps the same number of samples and the replacement does
  not depend on the batch, the rank or the number of processes; a decode-time crop keeps its sample's boxes (drawn
  for the replacement's size). Each rank logs each bad file once, the count of replaced samples goes into the
  run's metrics (``bad_files``, summed over ranks) and each epoch with a replacement ends with a line.
* ``refuse``: before the first step every file of the split is decoded (:func:`scan_files`; JPEGs at 1/8 scale,
  which still reads all their data) and the run stops with one line naming the first bad file, on every rank at
  once. A file that breaks after the scan stops the run when it is read.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .images import ImageDecodeError

__all__ = ["BAD_FILES", "BadFileLog", "Loaded", "Replacement", "check_bad_files", "check_file", "first_readable",
           "replaced_samples", "scan_files"]

BAD_FILES = ("skip", "refuse")
MAX_IN_A_ROW = 64  # consecutive unreadable files of a split before a replacement gives up
T = TypeVar("T")


def check_bad_files(value: str) -> str:
    if value not in BAD_FILES:
        raise ValueError(f"data.bad_files must be one of {', '.join(BAD_FILES)}; got {value!r}")
    return value


class Replacement:
    """Which image stands in for an unreadable one: the next dataset index of ``split`` in index order, wrapping.

    Args:
        split: the dataset indices a source samples from (LongTensor (m,) or a sequence of ints).
    """

    def __init__(self, split: Tensor | Sequence[int]) -> None:
        self.order = np.unique(np.asarray(torch.as_tensor(split, dtype=torch.long).flatten()))  # sorted, distinct
        if self.order.size == 0:
            raise ValueError("a replacement needs a non-empty split")

    def next(self, index: int) -> int:
        k = int(np.searchsorted(self.order, index, side="right")) % self.order.size
        return int(self.order[k])


def first_readable(index: int, read: Callable[[int], T],
                   replacement: Optional[Replacement]) -> tuple[int, T, list[tuple[str, str]]]:
    """``read(index)``; where it raises :class:`ImageDecodeError` and ``replacement`` is set, ``read`` of the split's
    next index, and so on.

    Returns:
        ``(the index read, what read returned, [(path, reason) of each file skipped on the way]``).

    Raises:
        ImageDecodeError: without ``replacement``, or after :data:`MAX_IN_A_ROW` unreadable files in a row.
    """
    skipped: list[tuple[str, str]] = []
    i = int(index)
    while True:
        try:
            return i, read(i), skipped
        except ImageDecodeError as err:
            if replacement is None:
                raise
            skipped.append((err.path, str(err)))
            if len(skipped) >= MAX_IN_A_ROW:
                raise ImageDecodeError(f"{MAX_IN_A_ROW} image files of the split in a row are unreadable, from "
                                       f"'{skipped[0][0]}' to '{err.path}': is the data folder damaged?",
                                       err.path) from err
            i = replacement.next(i)


class Loaded(NamedTuple):
    """What a loader worker returns under ``data.bad_files=skip``: the batch, and ``(path, reason)`` of each file it
    replaced (a source's :class:`BadFileLog` takes them off before the batch reaches the loop)."""

    batch: tuple
    skipped: tuple


class BadFileLog:
    """A source's record of the files it replaced: each logged once per rank, and the count of replaced samples."""

    def __init__(self, rank: int = 0, who: str = "") -> None:
        self.who = who or f"rank {rank}"  # the prefix of its lines
        self.replaced = 0  # samples replaced since this process started
        self.seen: set[str] = set()

    def note(self, skipped: Iterable[tuple[str, str]]) -> None:
        for path, reason in skipped:
            self.replaced += 1
            if path not in self.seen:
                self.seen.add(path)
                _say(f"warning: {self.who}: {reason}; the sample is replaced by the split's next readable "
                     "image (data.bad_files=skip; data.bad_files=refuse stops at start instead)")

    def unwrap(self, batches: Iterator, epoch: int, n_batches: int, finish: Callable = lambda b: b) -> Iterator:
        """``batches`` (``n_batches`` of ``epoch``) with each :class:`Loaded` taken apart, its files noted, and
        ``finish`` applied (the main process's share of the work); with the last batch, a line if the epoch
        replaced any sample (the loop never asks past an epoch's last batch)."""
        start = self.replaced
        for k, item in enumerate(batches):
            if isinstance(item, Loaded):
                self.note(item.skipped)
                item = item.batch
            item = finish(item)
            if k == n_batches - 1 and self.replaced > start:
                _say(f"{self.who}: epoch {epoch}: {self.replaced - start} sample(s) replaced for unreadable "
                     f"image files ({len(self.seen)} distinct file(s) so far; data.bad_files=skip)")
            yield item


def _say(line: str) -> None:
    """Print on every rank (each rank reads other files): stderr, without breaking progress bars."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def replaced_samples(source, sum_over_ranks: Callable[[float], float]) -> dict[str, float]:
    """``{"bad_files": samples replaced so far, summed over ranks}`` for a source with a :class:`BadFileLog`, else
    ``{}`` (the same on every rank: call it on all of them; ``sum_over_ranks`` is the engine's collective)."""
    log = getattr(source, "bad_file_log", None)
    return {} if log is None else {"bad_files": float(sum_over_ranks(float(log.replaced)))}


# --------------------------------------------------------------------------- data.bad_files=refuse: the scan


def check_file(path: str) -> Optional[str]:
    """None where PIL decodes the file at ``path``, else why not (one line). A JPEG is decoded at 1/8 scale (DCT
    scaling: every byte of its data is still read, so a truncated or corrupt file fails as at full size)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # PIL's decode failures: OSError, SyntaxError, EOFError, struct.error, ...
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


class _Checks(Dataset):
    def __init__(self, paths: list[tuple[int, str]]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> Optional[tuple[int, str, str]]:
        index, path = self.paths[k]
        reason = check_file(path)
        return None if reason is None else (index, path, reason)


def _found(items: list) -> list:
    return [it for it in items if it is not None]


def scan_files(dataset, indices: Tensor | Sequence[int], *, num_workers: int = 0, rank: int = 0, world: int = 1,
               gather: Optional[Callable[[object], list]] = None) -> None:
    """``data.bad_files=refuse``: decode every file of ``indices`` before training; a bad one stops the run.

    With ``gather`` (the engine's all-gather of Python objects) rank ``rank`` of ``world`` scans every world-th
    file and the ranks join their findings; without it every rank scans them all. Either way every rank raises
    the same error, so none waits on another that stopped.

    Raises:
        ImageDecodeError: one line naming the first bad file (in dataset index order) and how many more there are.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None:  # images held in memory: nothing to decode
        return
    idx = sorted({int(i) for i in torch.as_tensor(indices, dtype=torch.long).flatten().tolist()})
    mine = idx[rank::world] if gather is not None else idx
    checks = DataLoader(_Checks([(i, samples[i][0]) for i in mine]), batch_size=64, num_workers=num_workers,
                        collate_fn=_found)
    bad = [found for batch in checks for found in batch]
    if gather is not None:
        bad = sorted(found for part in gather(bad) for found in part)
    if bad:
        index, path, reason = bad[0]
        more = f"; {len(bad) - 1} more bad file(s) in the split" if len(bad) > 1 else ""
        raise ImageDecodeError(f"data.bad_files=refuse: cannot decode image file '{path}' ({reason}){more}; "
                               "replace or remove it, or set data.bad_files=skip", path)
