"""Image dataset registry.

Every dataset yields ``(image, label)`` with ``image`` a float32 tensor of
shape (3, S, S) in [0, 1] (S = ``image_size``) and ``label`` a Python int, and
exposes ``num_classes``, ``labels`` (LongTensor) and ``__len__``.

In-memory datasets (``digits``, ``fake``, ``cifar10``, ``cifar100``, ``svhn``,
``stl10``) also expose ``images``, one float32 tensor (N, 3, S, S), so callers
can index whole batches at once. ``imagefolder`` decodes lazily.

No dataset is ever downloaded: the torchvision datasets read ``root`` with
``download=False`` and raise :class:`DatasetNotFoundError` when it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_awenc.data.images import (DatasetNotFoundError, EmptyDatasetError, ImageDataset, ImageDecodeError,
                                    ImageFolderDataset, TensorImageDataset, UnknownDatasetError, resize_images)

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "ImageDataset",
    "ImageDecodeError",
    "ImageFolderDataset",
    "TensorImageDataset",
    "UnknownDatasetError",
    "build_dataset",
    "register_dataset",
    "resize_images",
]


# --------------------------------------------------------------------------- helpers


def _subset(n: int, size: int | None, seed: int, name: str) -> Tensor | None:
    """Sorted seeded random subset of ``range(n)`` of ``size`` items (None: keep all)."""
    if size is None or size == n:
        return None
    if not 1 <= size <= n:
        raise ValueError(f"dataset '{name}': size must be in [1, {n}]; got {size}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[:size].sort().values


def _not_found(name: str, root: str | os.PathLike | None, expected: str, example: str) -> DatasetNotFoundError:
    where = "no data root given (data.root is None)" if root is None else f"no data under '{root}'"
    shown = "<root>" if root is None else str(root)
    return DatasetNotFoundError(
        f"dataset '{name}': {where} (expected {expected} there); download it on a machine "
        f"with network, e.g. {example.format(root=shown)}, then pass data.root=<path>"
    )


def _require_dir(name: str, root, expected: str, example: str) -> Path:
    """Return ``root`` as a Path if it is a non-empty directory, else raise DatasetNotFoundError."""
    if root is None:
        raise _not_found(name, root, expected, example)
    path = Path(root).expanduser()
    if not path.is_dir() or not any(path.iterdir()):
        raise _not_found(name, root, expected, example)
    return path


# --------------------------------------------------------------------------- registry

DatasetFactory = Callable[..., ImageDataset]
DATASETS: dict[str, DatasetFactory] = {}


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator adding a dataset factory to :data:`DATASETS` under ``name``.

    The factory is called as ``fn(root=..., image_size=..., seed=..., size=...)``
    and must return an :class:`ImageDataset`.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorate(fn: DatasetFactory) -> DatasetFactory:
        if name in DATASETS:
            raise ValueError(
                f"dataset '{name}' is already registered; registered: {', '.join(sorted(DATASETS))}"
            )
        DATASETS[name] = fn
        return fn

    return decorate


def build_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    image_size: int = 16,
    seed: int = 0,
    size: int | None = None,
) -> ImageDataset:
    """Build a registered dataset.

    Args:
        name: registry key (see :data:`DATASETS`).
        root: data directory (needed by every dataset except ``digits``/``fake``).
        image_size: side S of the returned square images.
        seed: seed of the optional subset (and of ``fake``'s images).
        size: keep a seeded random subset of this many items (None: all);
            for ``fake``, the number of images (default 512).

    Returns:
        An :class:`ImageDataset` of (3, S, S) float images in [0, 1].

    Raises:
        UnknownDatasetError: (a KeyError and ValueError) for an unknown name.
        DatasetNotFoundError: when the dataset's files are missing.
    """
    if name not in DATASETS:
        raise UnknownDatasetError(
            f"unknown dataset '{name}'; valid: {', '.join(sorted(DATASETS))}"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int; got {image_size!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be None or a positive int; got {size!r}")
    return DATASETS[name](root=root, image_size=image_size, seed=seed, size=size)


# --------------------------------------------------------------------------- datasets


@register_dataset("digits")
def _digits(*, root=None, image_size: int = 16, seed: int = 0, size: int | None = None) -> ImageDataset:
    """scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0)  # (N, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    keep = _subset(len(labels), size, seed, "digits")
    if keep is not None:
        images, labels = images[keep], labels[keep]
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
    return TensorImageDataset(images, labels, num_classes=10)


@register_dataset("fake")
def _fake(*, root=None, image_size: int = 16, seed: int = 0, size: int | None = None) -> ImageDataset:
    """torchvision's FakeData (random noise images, 10 classes), materialised in memory."""
    from torchvision.datasets import FakeData
    from torchvision.transforms.functional import pil_to_tensor

    fake = FakeData(
        size=size or 512, image_size=(3, image_size, image_size), num_classes=10, random_offset=seed
    )
    items = [fake[i] for i in range(len(fake))]
    images = torch.stack([pil_to_tensor(img) for img, _ in items]).to(torch.float32).div_(255.0)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
    return TensorImageDataset(images, labels, num_classes=10)


def _array_dataset(
    name: str, make: Callable[[str], object], root, image_size: int, seed: int, size: int | None,
    *, expected: str, example: str, channels_last: bool, num_classes: int,
) -> ImageDataset:
    """Load a torchvision dataset whose ``.data`` is a uint8 array, into memory."""
    path = _require_dir(name, root, expected, example)
    try:
        ds = make(str(path))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
        raise _not_found(name, root, expected, example) from err
    data = torch.as_tensor(ds.data)
    if channels_last:  # (N, H, W, 3) -> (N, 3, H, W)
        data = data.permute(0, 3, 1, 2)
    raw_labels = getattr(ds, "targets", None)
    if raw_labels is None:
        raw_labels = ds.labels
    labels = torch.as_tensor(raw_labels, dtype=torch.long)
    keep = _subset(len(labels), size, seed, name)
    if keep is not None:
        data, labels = data[keep], labels[keep]
    return TensorImageDataset(resize_images(data, image_size), labels, num_classes=num_classes)


@register_dataset("cifar10")
def _cifar10(*, root=None, image_size: int = 16, seed: int = 0, size: int | None = None) -> ImageDataset:
    """CIFAR-10 train split (50,000 images, 10 classes) from ``root``."""
    from torchvision.datasets import CIFAR10

    return _array_dataset(
        "cifar10", lambda r: CIFAR10(r, train=True, download=False), root, image_size, seed, size,
        expected="torchvision's CIFAR-10 files (cifar-10-batches-py/)",
        example="torchvision.datasets.CIFAR10('{root}', download=True)",
        channels_last=True, num_classes=10,
    )


@register_dataset("cifar100")
def _cifar100(*, root=None, image_size: int = 16, seed: int = 0, size: int | None = None) -> ImageDataset:
    """CIFAR-100 train split (50,000 images, 100 fine classes) from ``root``."""
    from torchvision.datasets import CIFAR100

    return _array_dataset(
        "cifar100", lambda r: CIFAR100(r, train=True, download=False), root, image_size, seed, size,
        expected="torchvision's CIFAR-100 files (cifar-100-python/)",
        example="torchvision.datasets.CIFAR100('{root}', download=True)",
        channels_last=True, num_classes=100,
    )


@register_dataset("svhn")
def _svhn(*, root=None, image_size: int = 16, seed: int = 0, size: int | None = None) -> ImageDataset:
    """SVHN train split (73,257 images, 10 classes) from ``root``."""
    from torchvision.datasets import SVHN

    return _array_dataset(
        "svhn", lambda r: SVHN(r, split="train", download=False), root, image_size, seed, size,
        expected="torchvision's SVHN file train_32x32.mat",
        example="torchvision.datasets.SVHN('{root}', split='train', download=True)",
        channels_last=False, num_classes=10,
    )


@register_dataset("stl10")
def _stl10(*, root=None, image_size: int = 16, seed: int = 0, size: int | None = None) -> ImageDataset:
    """STL-10 labelled train split (5,000 images of 96x96, 10 classes) from ``root``."""
    from torchvision.datasets import STL10

    return _array_dataset(
        "stl10", lambda r: STL10(r, split="train", download=False), root, image_size, seed, size,
        expected="torchvision's STL-10 files (stl10_binary/)",
        example="torchvision.datasets.STL10('{root}', split='train', download=True)",
        channels_last=False, num_classes=10,
    )


@register_dataset("imagefolder")
def _imagefolder(*, root=None, image_size: int = 16, seed: int = 0, size: int | None = None) -> ImageDataset:
    """Any ``root/<class>/<image>`` tree of images (lazy decoding)."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    layout = "a folder per class holding its images, i.e. <root>/<class>/<image>.png"
    if root is None or not Path(root).expanduser().is_dir():
        where = "no data root given (data.root is None)" if root is None else f"no folder at '{root}'"
        raise DatasetNotFoundError(
            f"dataset 'imagefolder': {where} (expected {layout}); pass data.root=<path> of such a folder"
        )
    path = Path(root).expanduser()
    if not any(p.is_dir() for p in path.iterdir()):
        raise EmptyDatasetError(
            f"dataset 'imagefolder': no class folders under '{root}' (expected {layout})"
        )
    folder = ImageFolder(str(path), allow_empty=True)
    if not folder.samples:
        raise EmptyDatasetError(
            f"dataset 'imagefolder': no image files under '{root}' (expected {layout}; "
            f"extensions: {', '.join(IMG_EXTENSIONS)})"
        )
    keep = _subset(len(folder.samples), size, seed, "imagefolder")
    return ImageFolderDataset(folder, image_size, keep=keep)
