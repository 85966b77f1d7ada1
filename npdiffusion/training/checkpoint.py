"""Training checkpoints: diffusers-layout folders, written atomically, keep-last-N, a ``latest`` pointer.

Layout of an output folder::

    output_dir/
      checkpoint-500/                     one complete checkpoint (diffusers' name)
        <model folders>/                  written by the stage: e.g. vae/config.json +
                                          vae/diffusion_pytorch_model.safetensors (diffusers layout)
        optimizer.safetensors             AdamW moments and step (npdiffusion.optim.save_state)
        lr_scheduler.safetensors          schedule step and base lr
        ema.safetensors                   EMA averages (only with use_ema)
        data_order.safetensors            the loader's epoch permutation (+ epoch, position as metadata)
        losses.csv                        the loss history up to this step
        trainer_state.json                step, counters, RNG states, config: written last
      checkpoint-1000/
      latest                              "checkpoint-1000": written after the folder is complete
      losses.csv                          the history of the run so far (for plots)

Protocol of ``CheckpointManager.save`` (reliability.md, "Crash-safe writes"):

1. everything goes into ``.checkpoint-<step>.<pid>.<random>.tmp/`` in the output folder, each file
   through ``atomic_write`` (flushed and fsynced); then the temp folder is fsynced;
2. ``os.rename`` of the temp folder to ``checkpoint-<step>`` (atomic on one file system), and an
   fsync of the output folder, so the checkpoint appears complete or not at all;
3. the ``latest`` pointer is replaced atomically;
4. only now are checkpoints beyond the newest ``keep_last`` deleted, each first renamed to a temp
   name (so a crash mid-delete never leaves a half-deleted folder under a checkpoint name).

A process killed at any moment leaves the previous checkpoints intact and at most a stale temp
folder, which the next ``CheckpointManager`` on the folder removes (when its writer is dead).
Docs: docs/training.md ("Checkpoints and resume").
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil

from npdiffusion.checks import read_json_object
from npdiffusion.io.atomic import _pid_alive, atomic_write_text, check_writable, fsync_dir, remove_stale_temps

CHECKPOINT_RE = re.compile(r"^checkpoint-(?P<step>\d+)$")
TEMP_RE = re.compile(r"^\.(?P<what>checkpoint-\d+|trash-[^.]+)\.(?P<pid>\d+)\.(?P<tag>[0-9a-f]{8})\.tmp$")
LATEST = "latest"
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{int(step)}"


def prepare_output_dir(path) -> str:
    """Create ``path`` if needed and prove it is writable (one clear OSError if not). Returns it."""
    path = os.fspath(path)
    if not path:
        raise ValueError("output_dir is empty: set it to the folder for checkpoints and models")
    try:
        os.makedirs(path, exist_ok=True)
        check_writable(path)
    except OSError as exc:
        raise OSError(exc.errno, f"output_dir {path!r} is not writable: {exc.strerror or exc}") from None
    return path


class CheckpointManager:
    """Saves and finds checkpoints in ``output_dir`` (see the module docstring)."""

    def __init__(self, output_dir, keep_last: int = 3):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be a positive int, got {keep_last!r}")
        self.output_dir = prepare_output_dir(output_dir)
        self.keep_last = keep_last
        self.remove_stale()

    # ------------------------------------------------------------------ finding
    def checkpoints(self) -> list[tuple[int, str]]:
        """``[(step, path)]`` of the complete checkpoints, oldest first."""
        out = []
        for entry in os.listdir(self.output_dir):
            m = CHECKPOINT_RE.match(entry)
            path = os.path.join(self.output_dir, entry)
            if m and os.path.isfile(os.path.join(path, STATE_FILE)):
                out.append((int(m.group("step")), path))
        return sorted(out)

    def latest(self) -> str | None:
        """The folder the ``latest`` pointer names; else the newest complete checkpoint; else None."""
        pointer = os.path.join(self.output_dir, LATEST)
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as f:
                name = f.read().strip()
            path = os.path.join(self.output_dir, name)
            if CHECKPOINT_RE.match(name) and os.path.isfile(os.path.join(path, STATE_FILE)):
                return path
        found = self.checkpoints()
        return found[-1][1] if found else None

    # ------------------------------------------------------------------ saving
    def _temp(self, what: str) -> str:
        return os.path.join(self.output_dir, f".{what}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

    def save(self, step: int, write, state: dict) -> str:
        """Write checkpoint ``step``: ``write(folder)`` fills a temp folder, ``state`` (JSON-able) becomes
        trainer_state.json, written last; then the atomic rename, the pointer, the pruning. Returns the path.
        If ``write`` raises, the temp folder is removed and nothing else changes.
        """
        final = os.path.join(self.output_dir, checkpoint_name(step))
        tmp = self._temp(checkpoint_name(step))
        os.mkdir(tmp)
        try:
            write(tmp)
            atomic_write_text(os.path.join(tmp, STATE_FILE),
                              json.dumps(state, indent=1, sort_keys=True, allow_nan=True) + "\n")
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        trash = None
        if os.path.exists(final):  # a checkpoint of this step from an earlier, uncommitted attempt
            trash = self._temp(f"trash-{checkpoint_name(step)}")
            os.rename(final, trash)
        os.rename(tmp, final)
        fsync_dir(self.output_dir)
        atomic_write_text(os.path.join(self.output_dir, LATEST), checkpoint_name(step) + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune(keep=final)
        return final

    def prune(self, keep: str | None = None) -> list[str]:
        """Delete all but the newest ``keep_last`` checkpoints (never ``keep`` or the one ``latest`` names)."""
        found = self.checkpoints()
        protected = {os.path.abspath(p) for p in (keep, self.latest()) if p}
        removed = []
        for _, path in found[:max(0, len(found) - self.keep_last)]:
            if os.path.abspath(path) in protected:
                continue
            trash = self._temp(f"trash-{os.path.basename(path)}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(path)
        if removed:
            fsync_dir(self.output_dir)
        return removed

    def remove_stale(self) -> list[str]:
        """Delete temp folders left by writers that no longer run (killed mid-save or mid-delete)."""
        removed = []
        for entry in os.listdir(self.output_dir):
            m = TEMP_RE.match(entry)
            if m and not _pid_alive(int(m.group("pid"))):
                with contextlib.suppress(OSError):
                    shutil.rmtree(os.path.join(self.output_dir, entry))
                    removed.append(entry)
        removed += [os.path.basename(p) for p in remove_stale_temps(self.output_dir)]   # e.g. a half-written pointer
        return removed

    @staticmethod
    def read_state(folder: str) -> dict:
        """The trainer_state.json of checkpoint ``folder``."""
        path = os.path.join(folder, STATE_FILE)
        return read_json_object(path, "read_state")
