"""Captioned image datasets and the resumable, prefetching batch loader.

* ``ShapesDataset`` / ``make_shapes``: the built-in synthetic shapes (``npdiffusion.data.shapes``).
* ``DigitsDataset`` / ``make_digits``: scikit-learn's handwritten digits (optional dependency).
* ``FolderDataset``: a folder of the user's images with metadata.jsonl or .txt captions.
* ``DataLoader``: seeded, resumable batch order with background prefetch.
* ``load_dataset(name, ...)``: one of the three by name, as the training configs choose them.

Every dataset gives ``len(ds)``, ``ds.captions`` and ``ds.get_images(indices) -> uint8 (B, S, S, 3)``.
Docs: docs/training.md ("Datasets").
"""
from __future__ import annotations

from npdiffusion.data.dataset import ArrayDataset, Dataset, to_model_input, to_uint8
from npdiffusion.data.digits import DigitsDataset, make_digits
from npdiffusion.data.folder import FolderDataset
from npdiffusion.data.loader import Batch, DataLoader
from npdiffusion.data.shapes import SHAPES, ShapesDataset, make_shapes

DATASETS = ("shapes", "digits", "folder")


def load_dataset(name: str, *, path: str = "", num_images: int = 10000, resolution: int = 32, seed: int = 0,
                 caption_column: str = "text", shapes=SHAPES) -> Dataset:
    """``"shapes"`` (``num_images`` drawn from ``seed``, each one of ``shapes``), ``"digits"`` or ``"folder"``
    (``path``), at ``resolution`` x ``resolution``."""
    if name == "shapes":
        return ShapesDataset(num_images, seed=seed, size=resolution, shapes=shapes)
    if name == "digits":
        return DigitsDataset(resolution)
    if name == "folder":
        return FolderDataset(path, size=resolution, caption_column=caption_column)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


__all__ = ["Dataset", "ArrayDataset", "ShapesDataset", "make_shapes", "DigitsDataset", "make_digits",
           "FolderDataset", "DataLoader", "Batch", "load_dataset", "to_model_input", "to_uint8", "DATASETS"]
