"""World-size-invariant batch sampling.

:class:`GlobalBatchSampler` draws one permutation per epoch from a generator
seeded by ``(seed, epoch)`` only, cuts it into *global* batches and hands each
rank its contiguous slice. Concatenating the slices of all ranks therefore
gives exactly the batches of a single process with the same global batch size,
and a run can resume mid-epoch with :meth:`GlobalBatchSampler.set_start`.

Do not pass the loader of :func:`loader` through ``accelerator.prepare``: it
would re-shard the already sharded batches.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .bad_files import BadFileLog, Loaded, Replacement, check_bad_files, first_readable
from .splits import derive_seed

__all__ = ["GlobalBatchSampler", "IndexedBatch", "IndexedDataset", "collate_indexed", "loader"]


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of every global batch of an epoch.

    Args:
        indices: dataset indices to sample from (LongTensor (m,)), or an int n
            meaning ``range(n)``.
        global_batch_size: batch size summed over all ranks.
        seed: sampling seed; epoch e uses a generator seeded by ``(seed, e)``.
        rank: this process's rank.
        world_size: number of processes; must divide ``global_batch_size``.
        shuffle: permute the indices each epoch (False: keep their order).
        drop_last: drop the last incomplete global batch; if False it is padded
            to full size with indices from the start of the epoch's order.

    Yields:
        Lists of ``global_batch_size // world_size`` dataset indices.
    """

    def __init__(
        self,
        indices: Tensor | Sequence[int] | int,
        global_batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if isinstance(indices, int):
            if indices < 1:
                raise ValueError(f"indices as an int must be a positive dataset size; got {indices}")
            indices = torch.arange(indices)
        self.indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1; got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}"
            )
        n = self.indices.numel()
        if n == 0 or (drop_last and n < global_batch_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is larger than the {n} indices; "
                "with drop_last=True no batch would be yielded"
            )
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // world_size
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        """Number of global batches in a full epoch (ignores :meth:`set_start`)."""
        n, g = self.indices.numel(), self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its permutation) and reset the start batch to 0."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, batch: int) -> None:
        """Skip the first ``batch`` global batches of the current epoch (exact resume)."""
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(
                f"start batch must be in [0, {self.batches_per_epoch}] for this epoch; got {batch}"
            )
        self.start = int(batch)

    def epoch_positions(self) -> Tensor:
        """The epoch's order as positions into ``indices`` (what a ``.beton`` of the split is addressed by).

        Returns:
            LongTensor (batches_per_epoch * global_batch_size,), padded by wrapping when drop_last=False.
        """
        n = self.indices.numel()
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self.batches_per_epoch * self.global_batch_size
        if total > n:  # pad the last batch by wrapping around
            order = order.repeat(-(-total // n))
        return order[:total]

    def epoch_order(self) -> Tensor:
        """The epoch's full order of dataset indices, padded when drop_last=False.

        Returns:
            LongTensor (batches_per_epoch * global_batch_size,).
        """
        return self.indices[self.epoch_positions()]

    def local_positions(self) -> Tensor:
        """This rank's rows of :meth:`epoch_positions`, from the start batch on: LongTensor (batches, local batch)."""
        pos = self.epoch_positions().view(self.batches_per_epoch, self.global_batch_size)
        lo = self.rank * self.local_batch_size
        return pos[self.start :, lo : lo + self.local_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.local_positions():
            yield self.indices[batch].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


class IndexedBatch(NamedTuple):
    """A collated batch: images (b, 3, S, S), labels (b,), dataset indices (b,)."""

    images: Tensor
    labels: Tensor
    index: Tensor


class IndexedDataset(Dataset):
    """Wraps an image dataset so that items carry their dataset index.

    Items are ``(image, label, index)``; ``__getitems__`` fetches a whole batch
    at once through the dataset's ``get_batch`` when it has one (bulk tensor
    indexing for in-memory datasets); with ``uint8`` through its ``get_batch_uint8``
    when it has one (files: the decoder's bytes, made float on the device). With a ``replacement`` (files, uint8:
    ``data.bad_files=skip``) an unreadable file's sample is the split's next readable image, and a batch comes as
    :class:`~dist_awenc.data.bad_files.Loaded` naming the files replaced.
    """

    def __init__(self, dataset: Dataset, uint8: bool = False, replacement: Optional[Replacement] = None) -> None:
        self.dataset = dataset
        self.get_batch = getattr(dataset, "get_batch_uint8" if uint8 and hasattr(dataset, "get_batch_uint8")
                                 else "get_batch", None)
        self.replacement = replacement if uint8 and hasattr(dataset, "load_uint8") else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index

    def __getitems__(self, indices: list[int]) -> IndexedBatch | Loaded:
        if self.replacement is not None:
            return self._replacing(indices)
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.get_batch is not None:
            images, labels = self.get_batch(index)
            return IndexedBatch(images, torch.as_tensor(labels, dtype=torch.long), index)
        return collate_indexed([self[i] for i in indices])

    def _replacing(self, indices: list[int]) -> Loaded:
        used, images, skipped = [], [], []
        for i in indices:
            j, image, bad = first_readable(i, self.dataset.load_uint8, self.replacement)
            used.append(j)
            images.append(image)
            skipped += bad
        index = torch.as_tensor(used, dtype=torch.long)
        return Loaded(IndexedBatch(torch.stack(images), self.dataset.labels[index], index), tuple(skipped))


def collate_indexed(items: IndexedBatch | Loaded | list[tuple[Tensor, int, int]]) -> IndexedBatch | Loaded:
    """Stack ``(image, label, index)`` items into an :class:`IndexedBatch` (pass-through if batched)."""
    if isinstance(items, (IndexedBatch, Loaded)):
        return items
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    index = torch.tensor([int(it[2]) for it in items], dtype=torch.long)
    return IndexedBatch(images, labels, index)


def loader(
    dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int = 0, *, pin_memory: bool = False,
    uint8: bool = False, replacement: Optional[Replacement] = None,
) -> DataLoader:
    """DataLoader over ``dataset`` driven by ``sampler`` (a batch sampler).

    Args:
        dataset: an image dataset returning ``(image, label)``.
        sampler: the batch sampler; call its ``set_epoch`` / ``set_start``
            before iterating the loader.
        num_workers: worker processes for decoding (0: in the main process).
        pin_memory: pin batches for faster host-to-GPU copies.
        uint8: deliver uint8 images where the dataset decodes files (``get_batch_uint8``).
        replacement: with ``uint8``, replace an unreadable file's sample by the split's next readable image; its
            batches then come as :class:`~dist_awenc.data.bad_files.Loaded` (a source takes them apart).

    Returns:
        A DataLoader yielding :class:`IndexedBatch` ``(images (b,3,S,S),
        labels (b,), index (b,))``.
    """
    return DataLoader(
        IndexedDataset(dataset, uint8, replacement),
        batch_sampler=sampler,
        collate_fn=collate_indexed,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


class SamplerSource:
    """The training loop's default batch source: a :class:`GlobalBatchSampler` through a DataLoader.

    ``iterate(epoch, start)`` yields this rank's batches of ``epoch`` from global
    batch ``start`` on, so a resumed run picks up exactly where it stopped.
    Other sources (the FFCV loader) implement the same two-argument method.

    One DataLoader serves the whole run: ``iterate`` re-points its batch sampler
    and iterates it again, so with ``num_workers > 0`` the workers persist across
    epochs instead of starting anew; ``pin_memory`` (set for CUDA devices by
    :func:`~dist_awenc.data.ffcv.build_source`) lets the loop's batch copy run non-blocking, and ``uint8``
    (also set there) sends decoded files as uint8, made float32 on the device by the loop.

    ``bad_files`` (``data.bad_files``): ``skip`` replaces the sample of an unreadable image file by the split's next
    readable image and records it in ``bad_file_log`` (:mod:`dist_awenc.data.bad_files`); ``refuse`` lets the error
    stop the run (the stage has scanned the files before).
    """

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int = 0, *,
                 pin_memory: bool = False, uint8: bool = False, bad_files: str = "skip") -> None:
        self.dataset, self.sampler, self.num_workers, self.pin_memory = dataset, sampler, num_workers, pin_memory
        self.uint8 = uint8
        files = hasattr(dataset, "samples")  # only image files can be unreadable
        self.replacement = Replacement(sampler.indices) if check_bad_files(bad_files) == "skip" and files else None
        self.bad_file_log = BadFileLog(sampler.rank) if files else None
        self._loader: DataLoader | None = None

    def _make_loader(self) -> DataLoader:
        return loader(self.dataset, self.sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
                      uint8=self.uint8, replacement=self.replacement)

    def iterate(self, epoch: int, start: int) -> Iterator[IndexedBatch]:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)
        if self._loader is None:
            self._loader = self._make_loader()
        batches = iter(self._loader)  # persistent workers: resets them onto the sampler's new epoch and start
        if self.bad_file_log is None:  # images held in memory
            return map(self._finish, batches)
        return self.bad_file_log.unwrap(batches, epoch, len(self.sampler), self._finish)

    def _finish(self, batch):
        """What the main process does to a batch the loader delivers (nothing here)."""
        return batch
