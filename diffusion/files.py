"""Writing result files so that a reader never sees half of one.

A file is written under a unique temporary name in its destination folder, flushed to disk and
renamed over the destination (atomic on POSIX); on any failure the temporary file is removed and
the destination, if it existed, is untouched. So an interrupted sample or statistics write leaves
either the old file or the new one, never a truncated file that a rerun would trust.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it to `path` when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_savez(path: str, **arrays) -> None:
    """`np.savez(path, **arrays)`, atomically (`path` should end in .npz)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
