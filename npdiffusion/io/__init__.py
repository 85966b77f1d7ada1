"""Checkpoint input/output: safetensors files, crash-safe writes and model folders.

* ``npdiffusion.io.safetensors``: ``save_file`` / ``load_file`` / ``read_header`` /
  ``read_metadata``, our own strict reader and byte-identical writer of the safetensors format.
* ``npdiffusion.io.atomic``: ``atomic_write`` (temp file + fsync + rename) and stale-temp cleanup.
* ``npdiffusion.io.pretrained``: ``read_config`` / ``write_config`` / ``load_weights`` /
  ``save_weights`` / ``check_finite`` for diffusers and transformers model folders.

Nothing here unpickles. See docs/checkpoints.md.
"""
from npdiffusion.io.atomic import atomic_write, atomic_write_bytes, remove_stale_temps
from npdiffusion.io.pretrained import check_finite, load_weights, read_config, save_weights, write_config
from npdiffusion.io.safetensors import SafetensorsError, load_file, read_header, read_metadata, save_file

__all__ = [
    "SafetensorsError", "save_file", "load_file", "read_header", "read_metadata",
    "atomic_write", "atomic_write_bytes", "remove_stale_temps",
    "read_config", "write_config", "load_weights", "save_weights", "check_finite",
]
