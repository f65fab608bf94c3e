"""Files that are either the old version or the new one, never half of each: written to a
temporary file in the same folder, flushed and fsync'ed, renamed over the target with
os.replace (atomic within one file system), then the folder fsync'ed so the rename itself
survives a power cut. A process killed mid-write leaves the target untouched and at most a
stale `<name>.tmp` beside it, which the next write replaces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def temporary_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def fsync_folder(folder: Path) -> None:
    # Not every platform can open a folder (Windows cannot); there the rename is what we have.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path, write: Callable[[BinaryIO], None]) -> None:
    """Calls write(file) on a temporary file, then publishes it as `path` atomically."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text_atomically(path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))
