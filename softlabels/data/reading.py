"""Reading a soft-label directory for the dataset: its manifest (sealed, partial, or rebuilt from the
shards), the row groups of its shards after checking each against the manifest, and pieces of
rows with page checksums and a once-per-process sha256.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import VerificationError
from ..rundir import RunDirectory, header_mismatch, read_shard_header, run_header
from ..schema import decode_header
from ..storage import Location, store_failure
from ..targets import kind_of
from .plan import Piece

__all__ = ["ShardReader", "load_manifest", "prefetched", "shard_row_groups"]

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def load_manifest(directory: RunDirectory, allow_partial: bool, without_manifest: bool) -> dict[str, Any]:
    """The manifest the dataset reads: the sealed one; under ``allow_partial`` one built from the
    journal (its committed shards); under ``without_manifest`` one rebuilt from the shards' headers.

    Raises:
        VerificationError: not sealed (without ``allow_partial``), or not a soft-label directory.
    """
    if without_manifest and not directory.has_manifest():
        return directory.manifest_from_shards()
    try:
        manifest = directory.read_manifest()
        complete = manifest.get("complete") is True
    except VerificationError:
        if not allow_partial:
            raise
        manifest, complete = {}, False
    if complete:
        sealed = directory.read_sealed()
        directory.refuse_unlisted(sealed)  # data/ holds exactly the listed shards
        return sealed
    if not allow_partial:
        raise VerificationError(f"{directory.root}: the run is not complete (no sealed manifest); pass allow_partial=True to read committed shards")
    runs, journal = directory.read_journals()
    if not runs:
        raise VerificationError(f"{directory.root}: no manifest and no journal; not a soft-label directory")
    settings = runs[0]["settings"]
    entries = sorted(journal.values(), key=lambda e: e["file"])
    header = read_shard_header(directory.shard_path(entries[0]["file"])) if entries else {}
    kind_settings = {key: settings[key] for key in kind_of(header or settings).manifest_keys if key in settings}
    return {**run_header(header or {}), "fingerprint": runs[0]["fingerprint"], **kind_settings,
            "vocab_size": settings["vocab_size"], "shards": entries, "complete": False}


def shard_row_groups(run_directory: RunDirectory, manifest: dict[str, Any], shard_paths: list[Location]) -> list[tuple[int, int, int]]:
    """``(shard, row group, rows)`` of every row group, after checking each shard's size, footer,
    header and rows against ``manifest`` (concurrently on an object store).

    Raises:
        VerificationError: naming the shard.
    """
    sizes = run_directory.data_dir.sizes()  # one listing, not a request per shard

    def row_groups(item: tuple[Any, dict[str, Any]]) -> list[int]:
        """The rows of each row group of one shard, after checking its size and footer."""
        path, entry = item
        if path.name not in sizes:
            raise VerificationError(f"{path.name}: missing")
        if sizes[path.name] != entry["bytes"]:
            raise VerificationError(f"{path.name}: {sizes[path.name]} bytes on disk, manifest says {entry['bytes']}")
        try:
            with path.open() as handle:
                metadata = pq.read_metadata(handle)
            header = decode_header(metadata.metadata)  # the footer's key-value pairs: no Arrow schema to rebuild
        except (pa.ArrowInvalid, OSError) as exc:
            raise store_failure(exc, path) or VerificationError(f"{path.name}: not a readable Parquet file ({exc})") from None
        if header is None or header.get("fingerprint") != manifest["fingerprint"]:
            raise VerificationError(f"{path.name}: header belongs to another run (fingerprint differs)")
        if metadata.num_rows != entry["rows"]:
            raise VerificationError(f"{path.name}: {metadata.num_rows} rows, manifest says {entry['rows']}")
        if (mismatch := header_mismatch(header, manifest)) is not None and not manifest.get("from_shards"):
            raise VerificationError(f"{path.name}: its header and the manifest differ on {mismatch}")
        return [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]

    groups: list[tuple[int, int, int]] = []
    shards = list(zip(shard_paths, manifest["shards"]))
    for index, rows_per_group in enumerate(run_directory.map_shards(row_groups, shards)):  # concurrent on an object store
        groups.extend((index, group, rows) for group, rows in enumerate(rows_per_group))
    return groups


class ShardReader:
    """Pieces of a directory's shards as Arrow tables: page checksums verified on every read, each
    shard hashed against the manifest the first time this process touches it (``verify_sha256``),
    and the last row group kept, as the pieces of one row group follow each other."""

    def __init__(self, shards: list[Location], manifest: dict[str, Any], verify_sha256: bool) -> None:
        self.shards = shards
        self.manifest = manifest
        self.verify_sha256 = verify_sha256
        self.hashed: set[int] = set()
        self.cached: tuple[tuple[int, int], pa.Table] | None = None

    def read_window(self, pieces: list[Piece], columns: list[str]) -> pa.Table:
        """The rows of ``pieces`` in order, as one table of single chunks."""
        return pa.concat_tables([self.read_piece(p, columns) for p in pieces]).combine_chunks()

    def read_piece(self, piece: Piece, columns: list[str]) -> pa.Table:
        key = (piece.shard, piece.row_group)
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, self.read_row_group(piece, columns))
        return self.cached[1].slice(piece.start, piece.rows)

    def read_row_group(self, piece: Piece, columns: list[str]) -> pa.Table:
        """Raises: VerificationError naming the shard (a failing store raises its own error)."""
        path = self.shards[piece.shard]
        try:
            if self.verify_sha256 and piece.shard not in self.hashed:
                expected = self.manifest["shards"][piece.shard].get("sha256")
                if expected is not None and path.sha256() != expected:
                    raise VerificationError(f"{path.name}: sha256 differs from the manifest (corrupt)")
                self.hashed.add(piece.shard)
            with path.open() as handle:
                parquet = pq.ParquetFile(handle, page_checksum_verification=True)
                return parquet.read_row_group(piece.row_group, columns=columns)
        except (pa.ArrowException, OSError) as exc:  # a store that fails is not a damaged shard
            raise store_failure(exc, path) or VerificationError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from None


def prefetched(load: Callable[[Item], Loaded], items: list[Item]) -> Iterator[Loaded]:
    """``load(item)`` of each item in order; the next one is loaded in a thread while the caller
    uses this one. Closing the iterator waits for the thread."""
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-load")
    try:
        upcoming = loader.submit(load, items[0]) if items else None
        for position in range(len(items)):
            loaded = upcoming.result()  # type: ignore[union-attr]
            if position + 1 < len(items):
                upcoming = loader.submit(load, items[position + 1])
            yield loaded
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
