"""Crash-safe file writes: a file appears under its final name complete, or not at all.

``atomic_write(path)`` opens a temporary file in the *same folder* (so the final rename never
crosses a file system), hands it to the caller, and on a clean exit flushes it, ``fsync``s it,
``os.replace``s it onto ``path`` (atomic on POSIX and Windows) and ``fsync``s the folder so the
rename itself survives a power cut. If the body raises, the temporary file is removed and
``path`` is left exactly as it was. A process killed in the middle (SIGKILL, power loss) leaves
at most a stale temporary file named ``.<name>.<pid>.<random>.tmp``, never a truncated file
under ``path``; ``remove_stale_temps(folder)`` deletes those whose writer is gone.

No write here follows a symlink it did not create: the temporary file is created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` under a fresh random name (another name is tried when one is taken,
so a file or symlink planted in a shared folder can neither be written through nor block the write),
and ``os.replace`` replaces a symlink at ``path`` instead of writing to its target.
``check_writable(folder)`` probes a folder the same way, before a long job writes into it.

Derivation and rationale: docs/checkpoints.md ("Atomic writes").
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from typing import Iterator

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<tag>[0-9a-f]{8})\.tmp$")


def _temp_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


#: flags of every file this module creates: a new file or nothing (never an existing file, never via a symlink)
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
_TRIES = 100


def _create_temp(path: str) -> tuple[int, str]:
    """``(fd, name)`` of a new, empty temporary file next to ``path`` (see ``_temp_name``), opened for writing.

    The name is random; a name that exists already (a file, or a symlink someone planted) is never opened
    but skipped for a fresh one, up to ``_TRIES`` names (then FileExistsError).
    """
    for _ in range(_TRIES):
        tmp = _temp_name(path)
        try:
            return os.open(tmp, _NEW_FILE_FLAGS, 0o666), tmp   # 0o666 & ~umask like a plain open()
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name next to {path!r} in {_TRIES} tries")


def check_writable(folder) -> None:
    """Prove that a file can be created in ``folder`` (OSError if not): create a new file of a random name
    (``O_CREAT | O_EXCL | O_NOFOLLOW``, so nothing existing is opened and no symlink is followed), then
    remove it. A probe left by a killed process is a stale temp file (``remove_stale_temps``)."""
    fd, tmp = _create_temp(os.path.join(os.fspath(folder), "npdiffusion-write-test"))
    os.close(fd)
    os.unlink(tmp)


def fsync_dir(folder: str) -> None:
    """``fsync`` a folder so a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows, or a file system that refuses: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator:
    """Context manager yielding a file object whose contents replace ``path`` only on success.

    ``mode`` is ``"wb"`` (default) or ``"w"`` (text, UTF-8). The folder of ``path`` must exist.
    On an exception inside the ``with`` body the temporary file is deleted, ``path`` is untouched
    and the exception propagates.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"atomic_write: folder {folder!r} of {path!r} does not exist")
    fd, tmp = _create_temp(path)
    try:
        f = os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path, data) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically (see ``atomic_write``)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded with ``\\n`` line ends."""
    with atomic_write(path, "w") as f:
        f.write(text)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or the platform cannot tell: keep its file
    return True


def stale_temp_files(folder) -> list[str]:
    """Paths of temporary files left in ``folder`` by ``atomic_write`` calls whose process is gone."""
    folder = os.fspath(folder)
    out = []
    for entry in sorted(os.listdir(folder)):
        m = _TEMP_RE.match(entry)
        if m and not _pid_alive(int(m.group("pid"))):
            out.append(os.path.join(folder, entry))
    return out


def remove_stale_temps(folder) -> list[str]:
    """Delete ``stale_temp_files(folder)`` and return their paths.

    Files of a writer that is still running are kept, so this is safe to call while another
    process saves into the same folder.
    """
    removed = []
    for path in stale_temp_files(folder):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed
