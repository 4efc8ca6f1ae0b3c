"""``RunFiles``: where each file of a run directory is, and the reads and writes of each (journals,
shards, the manifest), on local disk or an object store, layout v2 (written) or v1 (read only).
``RunDirectory`` (``lifecycle``) builds the run's lifecycle on these."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import NotSealedError, UserError, VerificationError
from ..schema import FORMAT, FORMAT_V1, READABLE_FORMATS
from ..storage import Location, atomic_write_text, commit_file
from ..targets import kind_of
from .footer import shard_bytes_problem
from .journal import Journal
from .layout import DATA_DIR, JOURNAL_DIR, MANIFEST_NAME, SHARD_PATTERN, STAGING_DIR, Layout, detect_layout, shard_name
from .manifest import (MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY, REQUIRED_MANIFEST_KEYS, ShardEntry, manifest_damage,
                       manifest_text, shape_damage)

__all__ = ["SHARD_READERS", "RunFiles"]

SHARD_READERS = 32
"""Concurrent per-shard checks (footer reads, hashes) on an object store, where each waits on the network."""
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class RunFiles:
    """The files of a soft-label directory on local disk or in an object store.

    Attributes:
        root: the directory (DIR), a local path or a store URI.
        layout: ``"v2"`` (shards under ``data/``) or ``"v1"`` (shards beside the manifest).
    """

    root: Location
    layout: Layout = "v2"

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: "str | os.PathLike[str] | Location") -> "RunFiles":
        """An existing directory, its layout read from the manifest or, failing that, its contents.

        Raises:
            UserError: ``directory`` does not exist or is not a directory.
        """
        root = Location.of(directory)
        if not root.is_dir():
            root.require_bucket()  # a missing bucket says so
            raise UserError(f"{root}: no such directory")
        return cls(root, detect_layout(root))

    @classmethod
    def for_output(cls, directory: "str | os.PathLike[str] | Location", flag: str = "--out") -> "RunFiles":
        """The v2 directory a command writes to (it need not exist yet), once the command has claimed
        it (``claim.claim_output``: the bucket, not a file, apart from its inputs, the lease).

        Raises:
            UserError: it holds a v1 dataset.
        """
        root = Location.of(directory)
        if root.is_dir() and detect_layout(root) == "v1":
            raise UserError(
                f"{flag} {root} holds a {FORMAT_V1} dataset (shards beside manifest.json); this release writes {FORMAT} "
                f"with the shards under data/: use a new {flag} (every command still reads {root})"
            )
        return cls(root, "v2")


    # -- names --------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Location:
        """The folder of the shards: ``DIR/data`` (v2) or DIR itself (v1)."""
        return self.root / DATA_DIR if self.layout == "v2" else self.root

    @property
    def manifest_path(self) -> Location:
        return self.root / MANIFEST_NAME

    @property
    def staging_dir(self) -> Location:
        return self.root / STAGING_DIR if self.layout == "v2" else self.root

    def shard_path(self, name: object) -> Location:
        """The location of a shard named in a manifest or journal, refusing anything that could escape.

        Raises:
            VerificationError: the name is not ``shard-NNNNNN.parquet`` (no folders, no ``..``), or on
                local disk it resolves outside the data folder (a link).
        """
        if not isinstance(name, str) or not SHARD_PATTERN.fullmatch(name):
            raise VerificationError(f"{self.root}: manifest names an invalid shard file {name!r}")
        path = self.data_dir / name
        # The name has no folder in it, so only a link can take it elsewhere: one lstat per shard,
        # and the full resolution of both paths only for a link.
        if path.local and os.path.islink(path.path) and Path(path.path).resolve().parent != Path(self.data_dir.path).resolve():
            raise VerificationError(f"{self.root}: shard {name!r} resolves outside the directory (a link?)")
        return path

    def unit_shard_path(self, unit: int) -> Location:
        return self.data_dir / shard_name(unit)

    def staging_path(self, unit: int) -> Path:
        """Where unit N's shard is written (local disk) before it is renamed into place."""
        return self.staging_dir.local_path / (shard_name(unit) + ".tmp")

    def shard_files(self) -> list[Location]:
        """Every ``shard-NNNNNN.parquet`` in the data folder, in name order."""
        return [self.data_dir / name for name in self.data_dir.listdir() if SHARD_PATTERN.fullmatch(name)]

    def map_shards(self, check: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        """``check`` of each item, in order: one after another on local disk; on an object store,
        ``SHARD_READERS`` at a time (a footer read is a round trip or two, so 10^5 shards one by one
        would take many minutes). An exception comes out where its item's result would have.
        """
        if self.root.local:
            yield from map(check, items)
            return
        with ThreadPoolExecutor(max_workers=SHARD_READERS, thread_name_prefix="softlabels-shards") as pool:
            window: deque[Future[_R]] = deque()
            try:
                for item in items:
                    window.append(pool.submit(check, item))
                    if len(window) >= 4 * SHARD_READERS:  # a bounded window, not a future per shard at once
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()
            finally:
                for future in window:
                    future.cancel()

    # -- journals -----------------------------------------------------------------------------
    def journal(self, rank: int) -> Journal:
        if self.layout == "v1":
            return Journal(self.root / f"journal-{rank:05d}.jsonl")
        if self.root.local:
            return Journal(self.root / JOURNAL_DIR / f"rank-{rank:05d}.jsonl")
        return Journal(self.root / JOURNAL_DIR / f"rank-{rank:05d}")

    def journals(self) -> list[Journal]:
        if self.layout == "v1":
            return [Journal(self.root / n) for n in self.root.listdir() if re.fullmatch(r"journal-\d+\.jsonl", n)]
        folder = self.root / JOURNAL_DIR
        pattern = r"rank-\d+\.jsonl" if self.root.local else r"rank-\d+"
        return [Journal(folder / n) for n in folder.listdir() if re.fullmatch(pattern, n)]

    def journal_paths(self) -> list[Location]:
        return [journal.location for journal in self.journals()]

    def read_journals(self) -> tuple[list[dict[str, Any]], dict[str, ShardEntry]]:
        """Every rank's run record and the latest journalled entry per shard file name."""
        runs: list[dict[str, Any]] = []
        shards: dict[str, ShardEntry] = {}
        for journal in self.journals():
            run, entries = journal.read()
            if run is not None:
                runs.append(run)
            for entry in entries:
                shards[str(entry.get("file"))] = entry
        return runs, shards

    # -- shards -------------------------------------------------------------------------------
    def prepare_for_writing(self) -> None:
        """Create the folders a writer needs (local disk; an object store has none to create)."""
        if self.root.local:
            self.data_dir.mkdir()
            self.staging_dir.mkdir()

    def commit_staged(self, unit: int) -> tuple[int, str]:
        """Move unit N's whole staged shard into the data folder (local disk); returns its (bytes, sha256)."""
        return commit_file(self.staging_path(unit), self.unit_shard_path(unit).local_path)

    def commit_bytes(self, unit: int, data: bytes) -> tuple[int, str]:
        """Write unit N's finished shard as one whole object (object store); returns its (bytes, sha256)."""
        self.unit_shard_path(unit).write_bytes(data)
        return len(data), hashlib.sha256(data).hexdigest()

    def discard_staged(self, units: list[int]) -> None:
        """Remove partial files of these units only: other ranks may be writing theirs right now."""
        if not self.root.local:
            return  # an object store never shows a partial object
        staging = self.staging_dir.local_path
        present = set(os.listdir(staging)) if staging.is_dir() else set()  # one listing, not an unlink per unit
        for unit in units:
            if shard_name(unit) + ".tmp" in present:
                self.staging_path(unit).unlink(missing_ok=True)

    def journalled_shard_intact(self, entry: ShardEntry, hash_bytes: bool = True, sizes: dict[str, int] | None = None) -> bool:
        """Does the journalled shard still have its size (and sha256)? ``sizes`` is a listing of the data folder.

        Raises:
            VerificationError: the entry names no valid shard file (``shard_path``).
        """
        return shard_bytes_problem(self.shard_path(entry.get("file")), entry, hash_bytes, sizes) is None

    # -- the manifest -------------------------------------------------------------------------
    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        """The parsed manifest, its checksum checked and its integrity keys removed.

        Raises:
            VerificationError: missing, unparsable, of no format this release reads, or damaged (a
                checksum that does not match, settings that do not hash to the fingerprint).
        """
        path = self.manifest_path
        if not path.is_file():
            raise NotSealedError(f"{self.root}: no {MANIFEST_NAME}; not a sealed soft-label directory")
        manifest, problem = self.parse_manifest()
        if problem is not None:
            raise VerificationError(f"{path}: {problem}")
        damage = manifest_damage(manifest)
        if damage is not None:
            raise VerificationError(f"{path}: damaged or edited ({damage}); {self.rebuild_advice()}")
        return {k: v for k, v in manifest.items() if k not in (MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY)}

    def parse_manifest(self) -> tuple[dict[str, Any], str | None]:
        """(the manifest as parsed, None) or ({}, what makes it unreadable)."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {}, f"unreadable manifest ({exc}); {self.rebuild_advice()}"
        except RecursionError:
            return {}, f"unreadable manifest (nested too deep); {self.rebuild_advice()}"
        if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
            return {}, f"format is not one of {', '.join(READABLE_FORMATS)}"
        return manifest, None

    def rebuild_advice(self) -> str:
        return (f"rebuild it from the journals with 'softlabels seal {self.root}' (or rerun the 'softlabels generate' or "
                "'softlabels select' command that wrote it)")

    def read_sealed(self) -> dict[str, Any]:
        """The manifest, which must be complete and hold the fields readers rely on, of the right types.

        Raises:
            NotSealedError: no manifest, or the manifest of an unfinished run.
            VerificationError: a damaged manifest, or a field missing or mistyped.
        """
        return self.require_sealed(self.read_manifest())

    def require_sealed(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """``manifest`` (as ``read_manifest`` gave it), once it is complete and of the shape readers rely on.

        Raises:
            NotSealedError: the manifest of an unfinished run.
            VerificationError: a field missing or mistyped.
        """
        if manifest.get("complete") is not True:
            raise NotSealedError(f"{self.root}: manifest is not complete (the run has not finished)")
        required = REQUIRED_MANIFEST_KEYS + kind_of(manifest).manifest_keys
        for key in required:
            if key not in manifest:
                raise VerificationError(f"{self.manifest_path}: missing {key!r}")
        problem = shape_damage(manifest)
        if problem is not None:
            raise VerificationError(f"{self.manifest_path}: {problem}; {self.rebuild_advice()}")
        return manifest

    def unlisted_data_files(self, manifest: dict[str, Any]) -> list[str]:
        """Names in the data folder that the manifest does not list (v1: ``*.parquet`` beside it)."""
        listed = {entry.get("file") for entry in manifest.get("shards", []) if isinstance(entry, dict)}
        names = self.data_dir.listdir()
        if self.layout == "v1":
            names = [name for name in names if name.endswith(".parquet")]
        return [name for name in names if name not in listed]

    def refuse_unlisted(self, manifest: dict[str, Any]) -> None:
        """``data/`` holds exactly the dataset: refuse anything in it the manifest does not list.

        Raises:
            VerificationError: naming the first such file (and how many there are).
        """
        unlisted = self.unlisted_data_files(manifest)
        if unlisted:
            more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
            raise VerificationError(
                f"{self.data_dir / unlisted[0]}: not listed in {MANIFEST_NAME}{more}; every reader of {self.data_dir} would read it: "
                f"move it out of the data folder"
            )

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Seal: the manifest with its checksum, written last (an empty ``_staging/`` is removed with it)."""
        text = manifest_text(manifest)
        if self.root.local:
            atomic_write_text(self.manifest_path.local_path, text)
            if self.layout == "v2" and self.staging_dir.is_dir() and not self.staging_dir.listdir():
                os.rmdir(self.staging_dir.path)
        elif not self.manifest_path.write_bytes(text.encode(), exclusive=True):
            # another rank sealed first; the same units give the same manifest, so check and keep theirs
            if self.read_manifest().get("fingerprint") != manifest.get("fingerprint"):
                raise VerificationError(f"{self.manifest_path}: sealed by a run with another fingerprint")

    def remove_manifest(self) -> None:
        """Unseal: a unit is being redone, so the directory is not complete until it is."""
        self.manifest_path.delete()

    def discard_stale_manifest_writes(self) -> None:
        """Temporary manifest files of a seal interrupted by a crash (local disk)."""
        if not self.root.local:
            return
        for name in self.root.listdir():
            if name.startswith(MANIFEST_NAME) and name.endswith(".tmp"):
                (self.root / name).delete()
