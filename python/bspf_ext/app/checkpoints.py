"""Training checkpoints: written atomically (a kill at any moment leaves the previous one
intact), read back with a clear error when a file is missing, truncated or not ours."""

from __future__ import annotations

import io
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Optional

import torch

from .atomic import write_atomically

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint"]

CHECKPOINT = "checkpoint.pt"


# Test hook (tests/test_checkpoint_kill.py): BSPF_TEST_STALL_CHECKPOINT="<epoch>:<marker file>"
# makes the write of that epoch's checkpoint stop half-way: half of its bytes reach the
# temporary file (flushed to disk), the marker file is created, and the process sleeps
# until it is killed. So "killed while writing a checkpoint" is a moment a test can reach
# deterministically instead of by racing the writer.
STALL_CHECKPOINT_ENV = "BSPF_TEST_STALL_CHECKPOINT"


def _stall_marker(epoch: int) -> Optional[Path]:
    request = os.environ.get(STALL_CHECKPOINT_ENV, "")
    stall_epoch, _, marker = request.partition(":")
    return Path(marker) if marker and stall_epoch == str(epoch) else None


def _stall_half_written(state: dict, file, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    os.fsync(file.fileno())
    marker.write_text(f"{os.getpid()}\n")
    while True:  # until killed
        time.sleep(60)


def save_checkpoint(state: dict, path: Path) -> None:
    """Writes a training checkpoint atomically (bspf_ext.app.atomic): a kill at any moment
    leaves the previous checkpoint intact."""

    def write(file) -> None:
        marker = _stall_marker(state["epoch"])
        if marker is not None:
            _stall_half_written(state, file, marker)
        torch.save(state, file)

    write_atomically(path, write)


CHECKPOINT_KEYS = ("config", "epoch", "history", "model", "optimizer", "scheduler")


def load_checkpoint(path) -> dict:
    """A checkpoint written by train (a file, or the run's out_dir holding checkpoint.pt).
    FileNotFoundError when there is none; ValueError when the file is not a whole checkpoint
    (truncated, corrupt, or something else saved with torch.save)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {error}") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is not a bspf-ext training checkpoint: it lacks {missing}")
    return state
