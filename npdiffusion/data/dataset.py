"""The dataset protocol shared by the shapes, the digits and a user's image folder.

Shape legend: N images, B batch, S image side, 3 RGB channels.

A dataset has ``len(ds)`` images, a ``captions`` list (N strings, always in memory), a ``size``
(every image is S x S) and ``get_images(indices) -> uint8 (B, S, S, 3)``, channels last as a PNG
stores them. In-memory datasets subclass ``ArrayDataset``; ``FolderDataset`` decodes files on
demand (the loader's prefetch thread calls ``get_images``, so decoding overlaps training).

``to_model_input(images)`` turns uint8 (B, S, S, 3) into float32 (B, 3, S, S) in [-1, 1], the
``ToTensor`` + ``Normalize([0.5], [0.5])`` of diffusers' training scripts:
x = (u / 255 - 0.5) / 0.5. Docs: docs/training.md ("Datasets").
"""
from __future__ import annotations

import numpy


class MissingDependencyError(ImportError):
    """An optional package a dataset needs is not installed (the message says what to install)."""


class Dataset:
    """Base class: subclasses set ``captions``, ``size``, ``name`` and implement ``get_images``."""

    captions: list
    size: int
    name: str = "dataset"

    def __len__(self) -> int:
        return len(self.captions)

    def get_images(self, indices) -> numpy.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}: {len(self)} images of {self.size}x{self.size})"


class ArrayDataset(Dataset):
    """Images held in one uint8 array (N, S, S, 3) with their N captions."""

    def __init__(self, images, captions, name: str = "array"):
        images = numpy.asarray(images)
        if images.dtype != numpy.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"{name}: images must be uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
        captions = list(captions)
        if len(captions) != images.shape[0]:
            raise ValueError(f"{name}: {images.shape[0]} images but {len(captions)} captions")
        if not all(isinstance(c, str) for c in captions):
            raise TypeError(f"{name}: every caption must be a str")
        if not captions:
            raise ValueError(f"{name}: the dataset is empty")
        self.images = images
        self.captions = captions
        self.size = int(images.shape[1])
        self.name = name

    def get_images(self, indices) -> numpy.ndarray:
        """uint8 (B, S, S, 3): the images at ``indices`` (a copy)."""
        return self.images[numpy.asarray(indices)]


def to_model_input(images) -> numpy.ndarray:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [-1, 1]: (u / 255 - 0.5) / 0.5."""
    images = numpy.asarray(images)
    if images.dtype != numpy.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"to_model_input: images must be uint8 (B, S, S, 3), got {images.dtype} {images.shape}")
    x = images.transpose(0, 3, 1, 2).astype(numpy.float32)                # (B, 3, S, S)
    x /= 255.0
    x -= 0.5
    x /= 0.5
    return x


def to_uint8(x) -> numpy.ndarray:
    """Inverse of ``to_model_input`` for model outputs: float (B, 3, S, S) in [-1, 1] -> uint8
    (B, S, S, 3), clipped and rounded as diffusers' ``numpy_to_pil`` does ((x / 2 + 0.5) * 255)."""
    x = numpy.asarray(x, dtype=numpy.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"to_uint8: x must be (B, 3, S, S), got shape {x.shape}")
    y = numpy.clip(x / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (y * 255.0).round().astype(numpy.uint8)
