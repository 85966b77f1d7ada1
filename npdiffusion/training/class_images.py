"""DreamBooth's class images: generated once by the pretrained model, cached on disk, resumable.

Shape legend: N class images, S their side (the training resolution), k the generation batch.

``ensure_class_images(pipe, folder, prompt, count, ...)`` makes ``folder`` hold ``count`` images
``class-00000.png`` ... generated from ``prompt`` by ``pipe`` (the pretrained pipeline, before any
training), and returns their paths. Image i starts from the noise of seed ``seed + i`` (the
pipeline's ``seed=[...]``, one generator per image), and the images are generated in fixed chunks
``[j k, (j + 1) k)``, so each chunk is the same computation whenever it runs. Each PNG is written
atomically (``io.atomic``): a file exists only complete. A killed generation therefore resumes where
it stopped: complete chunks are skipped, the first incomplete one is generated again in full, and the
folder ends byte for byte as an uninterrupted generation leaves it.

``folder/generation.json`` records the settings (prompt, model, steps, guidance, size, seed, chunk);
a folder holding images of other settings is refused with one line, never mixed or overwritten.
Docs: docs/training.md ("DreamBooth").
"""
from __future__ import annotations

import io
import json
import os

import numpy

SETTINGS_FILE = "generation.json"


def class_image_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"class-{i:05d}.png")


def _check_settings(folder: str, settings: dict) -> None:
    """Write ``folder/generation.json`` the first time; afterwards refuse a folder of other settings."""
    from npdiffusion.checks import read_json_object  # noqa: PLC0415
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415

    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.isfile(path):
        found = read_json_object(path, "class images")
        differ = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
        if differ:
            k = differ[0]
            raise ValueError(f"class image folder {folder!r} holds images generated with {k} = {found.get(k)!r}, "
                             f"not {settings.get(k)!r}; delete the folder or set dreambooth.class_data_dir to "
                             "another one")
        return
    existing = [f for f in os.listdir(folder) if f.startswith("class-") and f.endswith(".png")]
    if existing:
        raise ValueError(f"class image folder {folder!r} holds {len(existing)} class images but no {SETTINGS_FILE} "
                         "saying how they were made; delete them or choose another dreambooth.class_data_dir")
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def ensure_class_images(pipe, folder, prompt: str, count: int, *, size: int, steps: int, guidance_scale: float,
                        batch_size: int, seed: int, model: str, log=print) -> list[str]:
    """Paths of ``count`` class images of ``prompt`` in ``folder``, generating the missing ones with
    ``pipe`` (a ``StableDiffusionPipeline``) at ``size`` x ``size`` (see the module docstring)."""
    from npdiffusion.io.atomic import atomic_write  # noqa: PLC0415

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    settings = {"prompt": prompt, "model": os.path.abspath(model), "size": size, "steps": steps,
                "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size,
                "scheduler": type(pipe.scheduler).__name__}
    _check_settings(folder, settings)
    paths = [class_image_path(folder, i) for i in range(count)]
    chunks = [range(j, min(count, j + batch_size)) for j in range(0, count, batch_size)]
    todo = [c for c in chunks if not all(os.path.isfile(paths[i]) for i in c)]
    if todo:
        log(f"class images: generating {sum(len(c) for c in todo)} of {count} of {prompt!r} into {folder} "
            f"({count - sum(len(c) for c in todo)} cached)")
    for chunk in todo:
        images = pipe([prompt] * len(chunk), num_inference_steps=steps, guidance_scale=guidance_scale,
                      height=size, width=size, seed=[seed + i for i in chunk], output_type="pil",
                      progress=False).images
        for i, image in zip(chunk, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            with atomic_write(paths[i]) as f:
                f.write(buffer.getvalue())
    return paths


def read_class_images(paths) -> numpy.ndarray:
    """uint8 (N, S, S, 3) of the PNG files ``paths``."""
    from PIL import Image  # noqa: PLC0415

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(numpy.asarray(im.convert("RGB"), dtype=numpy.uint8))
    return numpy.stack(out)
