"""Durable file writes: a message the gateway has acknowledged must survive a crash."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(tmp: Path, final: Path, data: bytes) -> None:
    """Write ``data`` to ``tmp``, sync it, then rename it to ``final``: a reader sees the whole
    file or none of it. The caller syncs the directory (see :func:`fsync_dir`)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)


def fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
