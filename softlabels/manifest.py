"""The commit protocol: shard names, atomic writes, the journal, and ``manifest.json``.

A shard is written under a ``.tmp`` name, fsync'd and renamed into place; the rename makes it
whole, and the journal line written after it (with the shard's sha256) makes it count. Resume trusts
a shard only when its bytes still hash to the journalled sha256, so a truncated, zeroed or flipped
shard is simply run again. ``manifest.json`` is written last, once every unit is journalled: it is the
commit record of the whole run. Each rank appends to its own journal file, so several processes can
share a directory without interleaving writes to one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import UserError, VerificationError
from .schema import FORMAT

__all__ = [
    "MANIFEST_NAME",
    "SHARD_PATTERN",
    "shard_name",
    "resolve_shard",
    "sha256_file",
    "fsync_dir",
    "atomic_write_text",
    "Journal",
    "read_journals",
    "read_manifest",
    "write_manifest",
    "read_sealed_manifest",
]

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"shard-\d{6}\.parquet")
JOURNAL_GLOB = "journal-*.jsonl"


def shard_name(unit: int) -> str:
    """Unit N always writes ``shard-NNNNNN.parquet``."""
    return f"shard-{unit:06d}.parquet"


def resolve_shard(directory: Path, name: object) -> Path:
    """The path of a shard named in a manifest or journal, refusing anything that could escape.

    Raises:
        VerificationError: the name is not ``shard-NNNNNN.parquet`` or resolves outside ``directory``.
    """
    if not isinstance(name, str) or not SHARD_PATTERN.fullmatch(name):
        raise VerificationError(f"{directory}: manifest names an invalid shard file {name!r}")
    path = (directory / name).resolve()
    if path.parent != directory.resolve():
        raise VerificationError(f"{directory}: shard {name!r} resolves outside the directory")
    return path


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks sealing at once never share a tmp
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Journal:
    """Append-only record of committed shards for one rank: a run line, then one line per shard."""

    def __init__(self, directory: Path, rank: int = 0) -> None:
        self.path = directory / f"journal-{rank:05d}.jsonl"

    def start(self, run: dict[str, Any]) -> None:
        """Begin a fresh journal whose first line names the run's fingerprint and settings."""
        atomic_write_text(self.path, json.dumps({"kind": "run", **run}, sort_keys=True) + "\n")

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"kind": "shard", **entry}, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    run: dict[str, Any] | None = None
    shards: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-append: that shard simply runs again
            if not isinstance(record, dict):
                continue
            if record.get("kind") == "run":
                run = record
            elif record.get("kind") == "shard" and run is not None:
                shards.append(record)
    return run, shards


def read_journals(directory: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every rank's run line and the latest journalled entry per shard file name."""
    runs: list[dict[str, Any]] = []
    shards: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob(JOURNAL_GLOB)):
        run, entries = _read_journal(path)
        if run is not None:
            runs.append(run)
        for entry in entries:
            shards[str(entry.get("file"))] = entry
    return runs, shards


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of a soft-label directory.

    Raises:
        VerificationError: missing, unparsable, or not of format ``softlabels.v1``.
    """
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(f"{directory}: no {MANIFEST_NAME}; not a sealed soft-label directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VerificationError(f"{path}: format is not {FORMAT}")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_sealed_manifest(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The directory and its manifest, which must be complete and hold the fields readers rely on.

    Raises:
        UserError: ``directory`` does not exist.
        VerificationError: no manifest, an unfinished run, or a manifest missing a field.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    manifest = read_manifest(root)
    if manifest.get("complete") is not True:
        raise VerificationError(f"{root}: manifest is not complete (the run has not finished)")
    for key in ("fingerprint", "top_k", "vocab_size", "teachers", "shards", "totals"):
        if key not in manifest:
            raise VerificationError(f"{root}/{MANIFEST_NAME}: missing {key!r}")
    return root, manifest
