"""File hashing: the identity of shards, weights and tokenizers."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["sha256_file", "sha256_named_files"]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    _hash_bytes_of(path, digest, chunk_bytes)
    return digest.hexdigest()


def sha256_named_files(files: "list[Path]") -> str:
    """Hex sha256 over each file's name and then its bytes, in the given order: the identity of a model
    or tokenizer that is several files."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        _hash_bytes_of(file, digest)
    return digest.hexdigest()


def _hash_bytes_of(path: Path, digest: "hashlib._Hash", chunk_bytes: int = 1 << 20) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)

