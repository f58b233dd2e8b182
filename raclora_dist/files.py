"""Writing a file so that a crash leaves the old one or the new one, never half of either:
the content goes to a hidden file beside the target, which is then renamed over it (a rename
within a folder is atomic on POSIX file systems). ``durable`` also flushes both to the disk
before and after the rename, for files a resume relies on.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Replaces ``path`` by a file holding ``data`` (text is written as UTF-8), atomically.

    Args:
        path: the file to write; its folder must exist.
        data: the whole content.
        durable: fsync the new file before the rename and the folder after it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    if durable:
        fsync_file(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flushes ``path``'s content to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flushes ``path``'s entries (a rename within it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
