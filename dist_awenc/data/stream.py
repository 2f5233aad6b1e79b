"""A split's images, decoded only when used: how the stages after pre-training read their data.

A stage that once decoded a whole split into one tensor (``dataset.get_batch(split)``) holds an
:class:`IndexedImages` instead. It indexes like the tensor it replaces (``x[i]``, ``x[a:b]``,
``x[idx]``, ``len(x)``, ``x.shape``) but decodes only the items asked for, when asked; on an
in-memory dataset the values are exactly that tensor's, so results do not change. :func:`stream`
feeds a batch sampler's batches through the project's loader (:func:`dist_awenc.data.sampler.loader`,
``data.num_workers`` decoding ahead), and :func:`batches` walks the images in order.
"""
from __future__ import annotations

from numbers import Integral
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, SequentialSampler

from dist_awenc.data.sampler import loader

__all__ = ["Images", "IndexedImages", "batches", "stream", "take"]


class IndexedImages:
    """The images of ``dataset`` at ``indices`` (in that order), decoded on access.

    Args:
        dataset: an image dataset (``get_batch``, ``labels``, ``image_size``).
        indices: dataset indices, LongTensor (n,) or a sequence of ints.
        num_workers: loader workers that decode ahead in :func:`stream` / :func:`batches` (0: this process).
    """

    def __init__(self, dataset: Dataset, indices: Tensor | Sequence[int], num_workers: int = 0) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        self.num_workers = int(num_workers)

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def shape(self) -> torch.Size:
        """(n, 3, S, S), as the decoded tensor would have."""
        s = int(self.dataset.image_size)
        return torch.Size((len(self), 3, s, s))

    def dim(self) -> int:
        return 4

    @property
    def labels(self) -> Tensor:
        """The items' labels (LongTensor (n,)), read without decoding any image."""
        return torch.as_tensor(self.dataset.labels)[self.indices]

    def subset(self, positions: Tensor | Sequence[int] | slice) -> "IndexedImages":
        """The items at ``positions`` (of this view), still undecoded."""
        key = positions if isinstance(positions, slice) else torch.as_tensor(positions, dtype=torch.long).cpu()
        return IndexedImages(self.dataset, self.indices[key], self.num_workers)

    def get_batch(self, positions: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Decode the items at ``positions``: ``(images (b, 3, S, S), labels (b,))`` (the loader's interface)."""
        return self.dataset.get_batch(self.indices[torch.as_tensor(positions, dtype=torch.long).cpu()])

    def __getitem__(self, key: int | slice | Tensor | Sequence[int]) -> Tensor:
        """Decoded images, as indexing the whole split's tensor would give them."""
        if isinstance(key, Integral) or (isinstance(key, Tensor) and key.ndim == 0):
            return self.dataset[int(self.indices[int(key)])][0]
        if isinstance(key, slice):
            return self.dataset.get_batch(self.indices[key])[0]
        return self.get_batch(key)[0]


Images = Union[Tensor, IndexedImages]


def take(images: Images, positions: Tensor) -> Images:
    """``images[positions]`` without decoding: a sub-view of a view, a gather of a tensor."""
    return images.subset(positions) if isinstance(images, IndexedImages) else images[positions]


def stream(images: Images, batch_sampler: Iterable[list[int]]) -> Iterator[Tensor]:
    """The images of each batch of positions ``batch_sampler`` yields, decoded batch by batch.

    A view goes through the project's loader (its ``num_workers`` decode ahead); a tensor is gathered
    on its own device.
    """
    if isinstance(images, IndexedImages):
        for batch in loader(images, batch_sampler, num_workers=images.num_workers):  # type: ignore[arg-type]
            yield batch.images
        return
    for positions in batch_sampler:
        yield images[torch.as_tensor(positions, dtype=torch.long, device=images.device)]


def batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """``images`` in order, ``batch_size`` at a time (the last batch may be smaller)."""
    if not isinstance(images, IndexedImages):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    yield from stream(images, BatchSampler(SequentialSampler(range(len(images))), batch_size, drop_last=False))
