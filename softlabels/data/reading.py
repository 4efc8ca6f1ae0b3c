"""Reading a soft-label directory for the dataset: the row groups of its shards after the run
directory checks each against the manifest, and pieces of rows with page checksums and a
once-per-process sha256.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import VerificationError
from ..rundir import RunDirectory, validate_shard
from ..storage import Location, store_failure
from .plan import Piece

__all__ = ["ShardReader", "prefetched", "shard_row_groups"]

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def shard_row_groups(run_directory: RunDirectory, manifest: dict[str, Any], shard_paths: list[Location]) -> list[tuple[int, int, int]]:
    """``(shard, row group, rows)`` of every row group, after checking each shard's size, footer,
    header and rows against ``manifest`` (concurrently on an object store).

    Raises:
        VerificationError: naming the shard.
    """
    sizes = run_directory.data_dir.sizes()  # one listing, not a request per shard

    def row_groups(item: tuple[Any, dict[str, Any]]) -> list[int]:
        """The rows of each row group of one shard, after the run directory's one shard validator."""
        path, entry = item
        return validate_shard(path, entry, manifest, hash_bytes=False, sizes=sizes, check_types=False).row_groups

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
