"""A folder of the user's own captioned images, resized and center-cropped to S x S.

Shape legend: N images, B batch, S output side; ``get_images`` returns uint8 (B, S, S, 3).

Captions come from either

* ``metadata.jsonl`` in the folder (Hugging Face's ``imagefolder`` convention): one JSON object
  per line with ``"file_name"`` (a path relative to the folder) and ``"text"`` (the caption; the key
  is ``caption_column``); or
* a ``.txt`` file beside each image with the same stem (``cat.png`` + ``cat.txt``), its text stripped.

Images (``.png .jpg .jpeg .webp .bmp .gif .tif .tiff``, found in the folder and its subfolders,
sorted by relative path) are decoded on demand with Pillow, converted to RGB, and transformed as
diffusers' ``train_text_to_image.py`` does with torchvision: ``Resize(S, BILINEAR)`` (shorter side
to S, longer side ``int(S * long / short)``, untouched when already that size) then ``CenterCrop(S)``
(offsets ``int(round((h - S) / 2))``). The loader's prefetch thread calls ``get_images``, so decoding
overlaps training.

Bad input fails at construction, before any training, with one clear message: a missing folder, a
folder without images, images without captions (they are listed), a malformed metadata line, a
metadata entry naming a missing file, a file Pillow cannot read.
Docs: docs/training.md ("Datasets").
"""
from __future__ import annotations

import json
import os

import numpy

from npdiffusion.data.dataset import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


def _listing(names, limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def find_images(folder: str) -> list[str]:
    """Relative paths (with '/') of the image files under ``folder``, sorted; hidden entries skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def _read_metadata(folder: str, caption_column: str) -> dict[str, str]:
    path = os.path.join(folder, METADATA_FILE)
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON: {exc.msg}") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be a JSON object with 'file_name' and {caption_column!r}, "
                                 f"got a JSON {type(entry).__name__}")
            name, text = entry.get("file_name"), entry.get(caption_column)
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where} needs a 'file_name' string, got {name!r}")
            if not isinstance(text, str):
                raise ValueError(f"{where} needs a {caption_column!r} string (the caption) for {name!r}, got {text!r}")
            name = os.path.normpath(name).replace(os.sep, "/")
            if name.startswith("../") or os.path.isabs(name):
                raise ValueError(f"{where}: file_name {name!r} must be a path inside the folder")
            if name in captions:
                raise ValueError(f"{where}: {name!r} is listed twice")
            captions[name] = text
    return captions


def resize_center_crop(image, size: int):
    """torchvision's ``CenterCrop(size)(Resize(size, BILINEAR)(image))`` on a PIL image (see module doc)."""
    from PIL import Image  # noqa: PLC0415

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class FolderDataset(Dataset):
    """Captioned images in ``path`` (metadata.jsonl or .txt files), served at ``size`` x ``size``."""

    def __init__(self, path, size: int = 32, caption_column: str = "text", verify: bool = True):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image folder: size must be a positive int, got {size!r}")
        folder = os.fspath(path)
        if not folder:
            raise ValueError("image folder: no path given (set data.path to the folder of images)")
        if not os.path.exists(folder):
            raise FileNotFoundError(f"image folder {folder!r} does not exist")
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"image folder {folder!r} is not a folder")
        images = find_images(folder)
        if not images:
            raise ValueError(f"image folder {folder!r} holds no images (looked for {' '.join(IMAGE_EXTENSIONS)})")
        if os.path.isfile(os.path.join(folder, METADATA_FILE)):
            meta = _read_metadata(folder, caption_column)
            missing_files = sorted(set(meta) - set(images))
            if missing_files:
                raise FileNotFoundError(f"{os.path.join(folder, METADATA_FILE)} names {len(missing_files)} image(s) "
                                        f"that are not in the folder: {_listing(missing_files)}")
            uncaptioned = [n for n in images if n not in meta]
            hint = f"add them to {METADATA_FILE} or remove them"
            captions = [meta.get(n) for n in images]
        else:
            captions, uncaptioned = [], []
            for name in images:
                txt = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
                if os.path.isfile(txt):
                    with open(txt, encoding="utf-8") as f:
                        captions.append(f.read().strip())
                else:
                    captions.append(None)
                    uncaptioned.append(name)
            hint = f"give each image a .txt file of the same name, or write a {METADATA_FILE}"
        if uncaptioned:
            raise ValueError(f"image folder {folder!r}: {len(uncaptioned)} of {len(images)} images have no caption: "
                             f"{_listing(uncaptioned)} ({hint})")
        if verify:
            self._verify(folder, images)
        self.folder = folder
        self.files = images
        self.captions = captions
        self.size = size
        self.name = f"folder({folder})"

    @staticmethod
    def _verify(folder: str, images: list[str]) -> None:
        """Open each file's header with Pillow (cheap: no pixel decoding) so a bad file fails now."""
        from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

        for name in images:
            try:
                with Image.open(os.path.join(folder, name)) as im:
                    im.size  # noqa: B018 - the header is parsed by open
            except (UnidentifiedImageError, OSError) as exc:
                raise ValueError(f"image folder {folder!r}: {name!r} is not a readable image ({exc})") from None

    def load_image(self, i: int) -> numpy.ndarray:
        """uint8 (S, S, 3): image ``i`` decoded, converted to RGB, resized and center-cropped."""
        from PIL import Image  # noqa: PLC0415

        path = os.path.join(self.folder, self.files[i])
        with Image.open(path) as im:
            out = resize_center_crop(im.convert("RGB"), self.size)
        return numpy.asarray(out, dtype=numpy.uint8)

    def get_images(self, indices) -> numpy.ndarray:
        """uint8 (B, S, S, 3) for the images at ``indices``."""
        indices = numpy.asarray(indices).reshape(-1)
        out = numpy.empty((indices.size, self.size, self.size, 3), dtype=numpy.uint8)
        for k, i in enumerate(indices.tolist()):
            out[k] = self.load_image(i)
        return out
