"""The image dataset types every loader returns, their errors, and batched resizing.

A dataset yields ``(image, label)`` with ``image`` a float32 tensor of shape
(3, S, S) in [0, 1] and ``label`` a Python int; the registry of named
datasets is :mod:`dist_awenc.data.datasets`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


# --------------------------------------------------------------------------- errors


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where the configuration says they are."""


class EmptyDatasetError(ValueError):
    """A dataset location exists but holds no usable images."""


class ImageDecodeError(OSError):
    """An image file of an on-disk dataset could not be decoded; ``path`` is the file ("" where unknown)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = str(path)


class UnknownDatasetError(KeyError, ValueError):
    """A dataset name that is not in the registry (both a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- base classes


class ImageDataset(Dataset):
    """Base class shared by every dataset of the registry.

    Attributes:
        num_classes: number of classes (labels lie in ``range(num_classes)``).
        image_size: side S of the square images.
        labels: LongTensor (N,) with every item's label.
    """

    num_classes: int
    image_size: int
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError(f"{type(self).__name__} must implement __getitem__")

    def get_batch(self, index: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Fetch several items at once.

        Args:
            index: dataset indices, LongTensor (b,) or a sequence of ints.

        Returns:
            ``(images, labels)``: float32 (b, 3, S, S) in [0, 1] and LongTensor (b,).
        """
        items = [self[int(i)] for i in torch.as_tensor(index).tolist()]
        images = torch.stack([img for img, _ in items])
        labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
        return images, labels

    def original(self, index: int) -> Tensor:
        """The stored image, before any resizing: (3, H, W), float in [0, 1] or uint8 (default: ``self[index]``)."""
        return self[index][0]

    def crop_views(self, index: Sequence[int], boxes_of, size: int, full: bool = False) -> Tensor:
        """Decode-time views: the boxes ``boxes_of(height, width, k)`` -> (V, 4) of item ``index[k]``, cut from its
        original image and resized to (size, size) (bilinear, antialiased when shrinking). ``full`` (a file
        dataset's choice of decoder) changes nothing for images held in memory.

        Returns:
            (b, V, 3, size, size) in the dtype of :meth:`original` (uint8 or float32 in [0, 1]).
        """
        out = []
        for k, i in enumerate(index):
            img = self.original(int(i))
            boxes = boxes_of(img.shape[-2], img.shape[-1], k).tolist()
            out.append(torch.stack([resized_box(img, box, size) for box in boxes]))
        return torch.stack(out)


class TensorImageDataset(ImageDataset):
    """A dataset held as one tensor in memory.

    Args:
        images: float32 (N, 3, S, S) with values in [0, 1].
        labels: integer tensor (N,).
        num_classes: number of classes.
    """

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(
                f"images must have shape (N, 3, S, S); got {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match the images; "
                f"got {tuple(labels.shape)}"
            )
        self.images = images.to(torch.float32).contiguous()
        self.labels = labels.to(torch.long).contiguous()
        self.num_classes = int(num_classes)
        self.image_size = int(images.shape[-1])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def get_batch(self, index: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.images[idx], self.labels[idx]

    def original(self, index: int) -> Tensor:
        return self.images[index]


class ImageFolderDataset(ImageDataset):
    """Lazily decoded ``root/<class>/<image>`` folder (via torchvision's ImageFolder).

    Images are opened with PIL, converted to RGB and resized to (S, S) with
    bilinear filtering in ``__getitem__``.

    Args:
        folder: a ``torchvision.datasets.ImageFolder`` (only its file list is used).
        image_size: output side S.
        keep: optional indices into the folder's samples to keep (a subset).
    """

    def __init__(self, folder, image_size: int, keep: Tensor | None = None) -> None:
        samples: list[tuple[str, int]] = list(folder.samples)
        if keep is not None:
            samples = [samples[i] for i in keep.tolist()]
        self.samples = samples
        self.classes: list[str] = list(folder.classes)
        self.root = str(folder.root)
        self.num_classes = len(self.classes)
        self.image_size = int(image_size)
        self.labels = torch.tensor([lab for _, lab in samples], dtype=torch.long)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return _load_image(path, self.image_size), int(label)

    def get_batch_uint8(self, index: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """:meth:`get_batch` as the decoder's uint8 (b, 3, S, S): a training batch travels to the device in a quarter
        of the bytes and becomes float there (the same values as :meth:`get_batch`)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return torch.stack([self.load_uint8(int(i)) for i in idx.tolist()]), self.labels[idx]

    def load_uint8(self, index: int) -> Tensor:
        """Item ``index`` decoded and resized to uint8 (3, S, S); :class:`ImageDecodeError` names an unreadable file."""
        return _load_uint8(self.samples[index][0], self.image_size)

    def crop_views(self, index: Sequence[int], boxes_of, size: int, full: bool = False) -> Tensor:
        """Decode each file once and cut its boxes (:meth:`crop_one`): uint8 (b, V, 3, size, size)."""
        out = [self.crop_one(int(i), lambda h, w, k=k: boxes_of(h, w, k), size, full) for k, i in enumerate(index)]
        return torch.from_numpy(np.stack(out)).permute(0, 1, 4, 2, 3)  # channels-last in memory: no copy here

    def crop_one(self, index: int, boxes_of, size: int, full: bool = False) -> np.ndarray:
        """The views of item ``index``: the boxes ``boxes_of(height, width)`` -> (V, 4) of its file, resized to
        (size, size): uint8 (V, size, size, 3). A plain JPEG is decoded only as finely as its boxes need
        (:mod:`dist_awenc.data.box_decode`); any other file (PNG, CMYK, grayscale, progressive, damaged), or every
        file with ``full``, is decoded whole by PIL and its boxes cut from the full resolution (bilinear with PIL's
        reducing filter, as torchvision's ``resized_crop`` on a PIL image)."""
        path = self.samples[index][0]
        if not full:
            from .box_decode import views_from_file

            views = views_from_file(path, boxes_of, size)
            if views is not None:
                return views
        return crop_pil(open_rgb(path), boxes_of, size)


def open_rgb(path: str):
    """The image file at ``path`` fully decoded to a PIL RGB image; :class:`ImageDecodeError` names an unreadable
    file (a truncated one included: the whole file is decoded here)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL's decode failures: OSError, SyntaxError, EOFError, struct.error, ...
        raise ImageDecodeError(f"cannot decode image file '{path}': {err}", path) from err


def crop_pil(img, boxes_of, size: int) -> np.ndarray:
    """The boxes ``boxes_of(height, width)`` -> (V, 4) ``(top, left, h, w)`` of the PIL image ``img``, each resized
    to (size, size) bilinear (with PIL's reducing filter): uint8 (V, size, size, 3)."""
    from PIL import Image

    return np.stack([np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))
                     for top, left, h, w in boxes_of(img.height, img.width).tolist()])


def _load_uint8(path: str, size: int) -> Tensor:
    """Decode one image file to uint8 (3, size, size); errors name the file."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(open_rgb(path).resize((size, size), Image.BILINEAR))


def _load_image(path: str, size: int) -> Tensor:
    """Decode one image file to float32 (3, size, size) in [0, 1]; errors name the file."""
    return _load_uint8(path, size).to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------- helpers


def resized_box(img: Tensor, box: Sequence[int], size: int) -> Tensor:
    """The ``(top, left, height, width)`` box of ``img`` (3, H, W) resized to (size, size): bilinear, antialiased
    when shrinking, on img's device and in its dtype (uint8 rounded, float clamped to [0, 1])."""
    top, left, h, w = box
    patch = img[None, :, top : top + h, left : left + w].to(torch.float32)
    out = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size or w > size)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else out.clamp_(0.0, 1.0)


def resize_images(images: Tensor, size: int, chunk: int = 2048) -> Tensor:
    """Resize a batch of images to (size, size) with bilinear interpolation.

    Uses ``F.interpolate(mode="bilinear", align_corners=False)``; antialiasing
    is switched on when shrinking. Works in chunks to bound peak memory.

    Args:
        images: (N, C, H, W), any real or uint8 dtype; uint8 is scaled to [0, 1].
        size: output side.
        chunk: images per interpolation call.

    Returns:
        float32 (N, C, size, size), clamped to [0, 1].
    """
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    out = []
    for part in images.split(chunk):
        part = part.to(torch.float32) / scale
        if part.shape[-2:] != (size, size):
            shrink = part.shape[-1] > size or part.shape[-2] > size
            part = F.interpolate(
                part, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
            )
        out.append(part.clamp_(0.0, 1.0))
    if not out:
        return torch.empty(0, images.shape[1], size, size)
    return torch.cat(out)
