"""Atomic file writes: a temporary file in the target's folder, fsync, rename (never half a file)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_PREFIX", "atomic_write", "remove_stale_temporaries"]

#: Temporary files of an unfinished write start with this (and are removed by the next write there).
TMP_PREFIX = ".tmp-spade-"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete what a killed write left in ``folder`` (files named ``TMP_PREFIX…``); returns their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(TMP_PREFIX) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                    removed.append(entry.name)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file next to ``path``, then make it ``path`` atomically.

    The temporary file is fsynced before the rename and the folder after it,
    so a crash leaves either the old file or the new one, never a mix; a
    leftover temporary of a killed write is removed by the next
    :func:`remove_stale_temporaries` in that folder.
    """
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    try:
        write(os.fspath(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
