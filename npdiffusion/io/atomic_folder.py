"""Crash-safe folder writes: a model folder is, at every instant, the complete old one or the complete new one.

``atomic_folder(path)`` yields an empty temporary folder ``.<name>.<pid>.<hex16>.tmp`` next to
``path`` (same parent, so every rename stays on one file system). The caller writes the whole new
folder there; on a clean exit every file and folder in it is ``fsync``ed and it is swapped in:

* ``path`` does not exist (first export): ``os.rename(tmp, path)``, atomic;
* ``path`` exists: one ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15; ``renamex_np(RENAME_SWAP)``
  on macOS) swaps the two names in a single atomic step, then the old folder, now under the temp
  name, is deleted. No instant exists at which ``path`` is missing or mixed;
* where the kernel or file system cannot exchange (``exchange_folders`` returns False): ``path`` is
  renamed to ``.<name>.<pid>.<hex16>.old``, the temp folder to ``path``, and the backup deleted. A
  kill between those two renames leaves no ``path`` but a complete backup, which the next writer into
  the same parent (``remove_stale_folders``, called by ``atomic_folder``) renames back.

A process killed at any moment leaves at most stale temp folders, removed by the next writer
(``remove_stale_folders``: only those whose process is gone). The 16-hex tag keeps them apart from
``atomic_write``'s temp files (8 hex digits), so ``remove_stale_temps`` never touches a folder.
An existing folder is replaced as a whole: files in it that the new version lacks are gone, so a
folder that holds none of ``MODEL_FILES`` (a home folder, a training run) is refused, not replaced.

Reasoning and the crash tests: docs/checkpoints.md ("Atomic model folders").
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import threading
from typing import Iterator

from npdiffusion.io.atomic import _pid_alive, fsync_dir

#: A non-empty folder is replaced only if it holds one of these (what a model, pipeline,
#: tokenizer, scheduler or processor folder holds at its top).
MODEL_FILES = ("config.json", "model_index.json", "scheduler_config.json", "tokenizer_config.json",
               "tokenizer.json", "vocab.json", "preprocessor_config.json")
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<tag>[0-9a-f]{16})\.(?P<kind>tmp|old)$")
_open = threading.local()  # .temps: the temp folders of this thread's atomic_folder blocks still open
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def _temp_path(parent: str, name: str, kind: str) -> str:
    return os.path.join(parent, f".{name}.{os.getpid()}.{secrets.token_hex(8)}.{kind}")


@functools.lru_cache(maxsize=None)
def _exchange_call():
    """``(function, flag)`` of the C library's atomic swap of two names, or None on this platform."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # Windows: no process-wide C library handle
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, rename_swap)
    return None


def exchange_folders(a, b) -> bool:
    """Atomically swap the names ``a`` and ``b`` (both must exist). False where unsupported, then
    nothing changed; any other failure raises OSError."""
    call = _exchange_call()
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"cannot exchange {os.fspath(a)!r} and {os.fspath(b)!r}: {os.strerror(err)}")


def fsync_tree(folder) -> None:
    """``fsync`` every file and folder under ``folder`` (itself included), deepest first."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)
            except OSError:  # a platform that cannot fsync a read-only handle
                pass
            finally:
                os.close(fd)
        fsync_dir(root)


def remove_stale_folders(parent) -> list[str]:
    """Clean up after ``atomic_folder`` writers in ``parent`` whose process is gone: a backup
    (``.old``) whose folder is missing is renamed back to its name (a kill between the two renames
    of the fallback swap); every other temp folder is deleted. Returns the paths handled."""
    parent = os.fspath(parent)
    handled = []
    for entry in sorted(os.listdir(parent)):
        m = _TEMP_RE.match(entry)
        if not m or _pid_alive(int(m.group("pid"))):
            continue
        path = os.path.join(parent, entry)
        final = os.path.join(parent, m.group("name"))
        if m.group("kind") == "old" and not os.path.lexists(final):
            os.rename(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    if handled:
        fsync_dir(parent)
    return handled


def _check_replaceable(final: str, path: str) -> None:
    if not os.path.lexists(final):
        return
    if not os.path.isdir(final):
        raise ValueError(f"{path!r} is a file, expected a folder")
    entries = os.listdir(final)
    if entries and not any(os.path.isfile(os.path.join(final, f)) for f in MODEL_FILES):
        raise ValueError(f"{path!r} holds {len(entries)} entries but none of the model files {list(MODEL_FILES)}; "
                         "saving would replace the whole folder, so it is refused: save into a new or empty folder")


def _is_cwd(folder: str) -> bool:
    try:
        return os.path.samefile(os.getcwd(), folder)
    except OSError:  # no such folder yet, or a working directory that was deleted
        return False


def _swap_in(tmp: str, final: str) -> str:
    """Put the complete folder ``tmp`` under ``final``; returns the path left to delete (or '')."""
    parent, name = os.path.split(final)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return ""
    if exchange_folders(tmp, final):
        return tmp                        # the old folder, now under the temp name
    backup = _temp_path(parent, name, "old")
    os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(backup, final)
        raise
    return backup


@contextlib.contextmanager
def atomic_folder(path) -> Iterator[str]:
    """Context manager yielding an empty temporary folder whose contents replace the folder ``path``
    on a clean exit (see the module docstring). If the body raises, the temp folder is removed and
    ``path`` is untouched. A symlink ``path`` keeps pointing where it did: its target is replaced.
    The parent folder is created if needed. Raises ValueError when ``path`` is a file or a non-empty
    folder holding none of ``MODEL_FILES``.
    """
    path = os.fspath(path)
    final = os.path.abspath(path)
    if os.path.islink(final):
        final = os.path.realpath(final)
    parent, name = os.path.split(final)
    if not name:
        raise ValueError(f"atomic_folder: path must name a folder below a parent, got {path!r}")
    os.makedirs(parent, exist_ok=True)
    remove_stale_folders(parent)
    _check_replaceable(final, path)
    temps = _open.__dict__.setdefault("temps", [])
    # Inside an outer block's temp folder (a pipeline's unet/): the outer block fsyncs everything.
    durable = not any(final.startswith(t + os.sep) for t in temps)
    tmp = _temp_path(parent, name, "tmp")
    os.mkdir(tmp)
    temps.append(tmp)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        in_cwd = _is_cwd(final)
        leftover = _swap_in(tmp, final)
        if durable:
            fsync_dir(parent)
        if in_cwd:  # our working directory was the old folder: follow the name to the new one
            os.chdir(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        temps.remove(tmp)
    if leftover:
        shutil.rmtree(leftover, ignore_errors=True)
