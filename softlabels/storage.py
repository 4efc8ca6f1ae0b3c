"""Durable local writes: hashing, fsync of files and directories, atomic text and file commits.

A leaf module: it knows nothing about soft labels. Every write softlabels makes to disk goes through
``atomic_write_text`` or ``commit_file``: the bytes land under a temporary name, are fsync'd, then
renamed into place and the directory entry is fsync'd, so a crash leaves either the old file or the
whole new one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["sha256_file", "fsync_dir", "fsync_file", "atomic_write_text", "commit_file"]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (the temporary name is per process)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks sealing at once never share a tmp
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def commit_file(staged: Path, target: Path) -> tuple[int, str]:
    """fsync ``staged``, hash it and rename it to ``target``; returns (bytes, sha256) of the file."""
    fsync_file(staged)
    digest = sha256_file(staged)
    size = staged.stat().st_size
    os.replace(staged, target)
    fsync_dir(target.parent)
    return size, digest
