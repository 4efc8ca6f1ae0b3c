"""``SoftLabelDataset``: stream a sealed soft-label directory into student training.

The unit of work is a *piece*: a row range of one Parquet row group. Each epoch the pieces are
permuted from (seed, epoch), dealt round-robin to DDP ranks and then to DataLoader workers; a worker
reads ``shuffle_buffer`` pieces at a time, permutes their rows and cuts batches from the resulting
stream. Batches are whole tensors built from the column buffers (one scatter per column), so the
Python cost is per batch, not per position: at 64 rows a batch the per-batch overhead is amortised
over 64 classifier rows or 64 x 512 tokens.

The order is a pure function of (seed, epoch, rank, world size, number of workers). A DataLoader
takes batches from its workers round-robin, so the position of every batch in what the trainer sees
is known in advance, and resuming after n consumed batches skips exactly those n, reading only the
one buffer the cut falls into. Resume is exact with the same number of workers.

Sampled targets (``generate --targets sample``): batches carry ``sample_ids``, ``sample_counts`` and
``sample_logprobs`` [B, T, m] (m the most distinct ids of a position in the batch, count 0 in padding
slots), ``sample_log_normalizer`` [B, T] when the proposal temperature is not 1, and
``proposal_temperature`` (a float), in place of ``topk_ids`` and ``topk_logprobs``; the loss is
``kd_loss(..., targets="sample")``.

Corruption: every shard's size and header are checked against the manifest when the dataset is
built, page checksums are verified on every read, and each process hashes a shard (sha256) the first
time it touches it, unless ``verify_sha256=False``. Errors name the file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .codec import LogprobCodec
from .distributed import distributed_env
from .errors import UserError, VerificationError
from .inputs import ColumnBlock, NestedBlock
from .losses import IGNORE_INDEX
from .rundir import RunDirectory, header_mismatch, read_shard_header, run_header
from .schema import ID_COLUMN, TARGETS_COLUMN, codec_of, decode_header
from .targets import kind_of, kind_of_columns
from .storage import store_failure

__all__ = ["SoftLabelDataset", "SoftLabelLoader", "collate", "Piece", "ShardRows", "NestedBlock"]

AUTO = "auto"

PIECES_PER_RANK = 16


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of row group ``row_group`` of shard ``shard``."""

    shard: int
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class ShardRows:
    """A table of shard rows held as numpy column blocks; any subset of rows becomes a batch.

    The soft-label columns are decoded by the rows' target kind (``softlabels.targets``; told by the
    header, else by the columns), with its ``options`` (sampled rows: their ``proposal_temperature``).
    """

    def __init__(self, table: pa.Table, input_column: str | None, label_column: str | None, codec: LogprobCodec,
                 options: dict[str, Any] | None = None) -> None:
        header = decode_header(table.schema.metadata)
        kind = kind_of(header) if header is not None else kind_of_columns(table.column_names)
        options = options or {}
        soft = kind.read_columns({**(header or {}), **options}, codec)
        for name in (ID_COLUMN, *soft, input_column, label_column):
            if name and name not in table.column_names:
                raise UserError(f"shard rows have no column {name!r} (columns: {', '.join(table.column_names)})")
        self.sample_ids = table.column(ID_COLUMN).to_numpy(zero_copy_only=False)
        # chat shards store targets at some positions only: ``target_positions`` says which
        self.targets = ColumnBlock.from_arrow(table.column(TARGETS_COLUMN), TARGETS_COLUMN) if TARGETS_COLUMN in table.column_names else None
        self.soft = kind.rows(table, codec, options, self._place)
        self.input_column = input_column
        self.inputs = ColumnBlock.from_arrow(table.column(input_column), input_column) if input_column else None
        self.labels: ColumnBlock | None = None
        if label_column:
            labels = table.column(label_column).combine_chunks()
            if pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type):
                labels = labels.fill_null(pa.scalar([], labels.type))
                flat = labels.values.fill_null(IGNORE_INDEX)
                labels = type(labels).from_arrays(labels.offsets, flat)
            else:
                labels = labels.fill_null(IGNORE_INDEX)
            self.labels = ColumnBlock.from_arrow(labels, label_column)

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        batch: dict[str, Any] = {"sample_id": self.sample_ids[rows].tolist()}
        batch.update(self.soft.batch(rows))
        if self.inputs is not None:
            inputs, input_lengths = self.inputs.gather(rows)
            batch["inputs"] = torch.from_numpy(inputs)
            if input_lengths is not None:
                batch["lengths"] = torch.from_numpy(input_lengths)
        if self.labels is not None:
            labels, _ = self.labels.gather(rows, IGNORE_INDEX, np.int64)
            batch["labels"] = torch.from_numpy(labels)
        return batch

    def _place(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
        """Chat rows: where their stored targets go (``softlabels.targets.rows``); None when every position has one."""
        if self.targets is None:
            return None
        plan = self.targets.plan(rows)
        row_of = np.repeat(np.arange(len(rows)), plan.lengths)
        within = plan.source - self.targets.offsets[rows][row_of]
        steps_of = self.targets.values[plan.source].astype(np.int64)
        return plan.source, row_of, within, steps_of, self._steps(rows, steps_of)

    def _steps(self, rows: np.ndarray, steps_of: np.ndarray) -> int:
        """T of a chat batch: the longest input of the rows (the student's positions)."""
        if self.inputs is not None and self.inputs.ragged:
            return int(self.inputs.lengths(rows).max()) if len(rows) else 0
        return int(steps_of.max()) + 1 if len(steps_of) else 0


def collate(
    rows: pa.Table | list[Any] | dict[str, list[Any]],
    input_column: str | None = AUTO,
    label_column: str | None = AUTO,
    codec: LogprobCodec | None = None,
    schema: pa.Schema | None = None,
    proposal_temperature: float | None = None,
) -> dict[str, Any]:
    """Turn shard rows into a batch of tensors; usable as a DataLoader ``collate_fn``.

    Args:
        rows: a pyarrow table of shard rows; a list of row dicts (a torch DataLoader over an HF
            ``datasets`` Dataset of shard rows) or of one-row tables (``with_format("arrow")``);
            or a dict of columns (an HF batch).
        input_column, label_column: ``"auto"`` takes them from the shard header; without a header
            ``inputs`` (if present) and no label.
        codec: how the log-probabilities are stored; by default from the header, else from the
            column itself. uint8 codes whose header and field metadata are gone are refused
            (``UserError``) rather than guessed: pass ``LogprobCodec.from_header(manifest)``.
        schema: the Arrow schema of row dicts (e.g. ``hf_dataset.features.arrow_schema``), so
            their types are exact. Without it, a list-of-numbers input column counts as a
            sequence unless every row holds a single position (a classifier), when it is a fixed vector.
        proposal_temperature: of sampled rows; by default from the header, else from the
            ``sample_log_normalizer`` field's metadata (pass the manifest's when both are gone).

    Returns:
        ``sample_id`` (list of str); ``inputs`` ([B, ...] float32/int64) and ``lengths`` (int64 [B],
        sequences only) when there is an input column; ``topk_ids`` int64 [B, T, k];
        ``topk_logprobs`` float32 [B, T, k] (decoded); ``mask`` bool [B, T] (valid positions; for chat
        shards, whose ``target_positions`` column names the positions that have targets, the targets are
        put at those positions of the input's T and only they are valid);
        ``labels`` int64 [B] or [B, T] with IGNORE_INDEX for missing labels, when there is a label column.
        Sampled rows (a ``sample_ids`` column) give ``sample_ids`` and ``sample_counts`` int64
        [B, T, m], ``sample_logprobs`` float32 [B, T, m] (count 0 and log-prob 0 in padding slots),
        ``sample_log_normalizer`` float32 [B, T] when the proposal temperature is not 1 and
        ``proposal_temperature`` (float) instead of ``topk_ids`` and ``topk_logprobs``.
    """
    table = _as_table(rows, schema)
    header = decode_header(table.schema.metadata)
    kind = kind_of(header) if header is not None else kind_of_columns(table.column_names)
    if codec is None:
        codec = kind.codec_without_header(table.schema) if header is None else codec_of(table.schema)
        stored = kind.columns(header or {}, codec)[1]
        if header is None and codec.dtype != "uint8" and stored is not None and stored in table.column_names:
            leaf = table.column(stored)
            while pa.types.is_list(leaf.type) or pa.types.is_fixed_size_list(leaf.type) or pa.types.is_large_list(leaf.type):
                leaf = pc.list_flatten(leaf)
            if (pc.max(leaf).as_py() or 0.0) > 0.0:  # codes that lost their header and their integer type
                raise UserError(f"column {stored!r} holds values above 0, so they are not log-probabilities "
                                "(uint8 codes whose header is gone?); pass the codec of the directory's manifest")
    if input_column == AUTO:
        input_column = header.get("input_column") if header else ("inputs" if "inputs" in table.column_names else None)
    if label_column == AUTO:
        label_column = header.get("label_column") if header else None
    if schema is None and isinstance(rows, (list, tuple)) and input_column in table.column_names:
        table = _classifier_inputs_fixed(table, input_column)
    options = kind.row_options(table.schema, header) if proposal_temperature is None else {"proposal_temperature": proposal_temperature}
    return ShardRows(table, input_column, label_column, codec, options).batch(np.arange(table.num_rows))


def _as_table(rows: pa.Table | list[Any] | dict[str, list[Any]], schema: pa.Schema | None) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, dict):
        return pa.table(rows, schema=schema)
    if isinstance(rows, (list, tuple)) and rows and all(isinstance(row, pa.Table) for row in rows):
        return pa.concat_tables(rows)
    if isinstance(rows, (list, tuple)) and rows and all(isinstance(row, dict) for row in rows):
        return pa.Table.from_pylist(list(rows), schema=schema)
    raise UserError(f"collate takes a pyarrow Table, a non-empty list of row dicts or tables, or a dict of columns; got {type(rows).__name__}")


def _classifier_inputs_fixed(table: pa.Table, input_column: str) -> pa.Table:
    """Row dicts lose fixed_size_list types: a list<number> input of a classifier (one position per
    row, equal lengths) becomes the fixed vector it was in the shard."""
    column = table.column(input_column).combine_chunks()
    if not pa.types.is_list(column.type) or pa.types.is_nested(column.type.value_type):
        return table
    ids = kind_of_columns(table.column_names).id_column
    positions = pc.list_value_length(table.column(ids)).to_numpy(zero_copy_only=False)
    widths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or len(widths) == 0 or (positions != 1).any() or (widths != widths[0]).any():
        return table
    fixed = pa.FixedSizeListArray.from_arrays(column.flatten(), int(widths[0]))
    return table.set_column(table.schema.get_field_index(input_column), input_column, fixed)


def _distributed_position() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env = distributed_env()
    return env.rank, env.world_size


def _round_robin_counts(counts: list[int], consumed: int) -> list[int]:
    """How many batches each worker has produced when a round-robin consumer has taken ``consumed``."""
    taken = [0] * len(counts)
    remaining = consumed
    full_rounds = min(min((c for c in counts if c > 0), default=0), remaining // max(sum(c > 0 for c in counts), 1))
    # whole rounds first (cheap), then one batch at a time through the last partial rounds
    for worker, count in enumerate(counts):
        if count > 0:
            taken[worker] = full_rounds
    remaining -= full_rounds * sum(c > 0 for c in counts)
    while remaining > 0:
        progressed = False
        for worker, count in enumerate(counts):
            if remaining and taken[worker] < count:
                taken[worker] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return taken


class SoftLabelDataset(IterableDataset):
    """A torch IterableDataset of collated batches over a sealed soft-label directory (v1 or v2).

    Iterate it with ``SoftLabelLoader(dataset, num_workers=N)`` (a DataLoader that records each
    batch it hands out, so ``state_dict()`` is exact without any call from the trainer), or directly
    in the main process. ``set_epoch`` reaches DataLoader workers, persistent ones included.

    Args:
        directory: the output directory of ``softlabels generate``.
        batch_size: rows per batch.
        shuffle: permute pieces and rows each epoch (deterministic from ``seed`` and the epoch).
        seed: shuffle seed.
        shuffle_buffer: pieces whose rows are permuted together by one worker.
        drop_last: drop each worker's final short batch.
        allow_partial: read a directory without a complete manifest (its journalled shards only).
        without_manifest: read the shards in the data folder from their own headers when the
            manifest is gone (sizes, footers and page CRCs are checked; there is no sha256 to compare).
        verify_sha256: hash each shard once per process before reading it.
        rank, world_size: DDP position; default from torch.distributed or RANK / WORLD_SIZE.
        with_inputs: include the passed-through input column (``inputs``/``lengths``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 8,
        drop_last: bool = False,
        allow_partial: bool = False,
        verify_sha256: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        with_inputs: bool = True,
        without_manifest: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.run_directory = RunDirectory.open(directory)
        self.directory = self.run_directory.root
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.drop_last = drop_last
        self.verify_sha256 = verify_sha256
        default_rank, default_world = _distributed_position()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.manifest = self._load_manifest(allow_partial, without_manifest)
        self.input_column = self.manifest.get("input_column") if with_inputs else None
        self.label_column = self.manifest.get("label_column")
        self.codec = LogprobCodec.from_header(self.manifest)
        self.kind = kind_of(self.manifest)
        self.proposal_temperature = float(self.manifest.get("proposal_temperature", 1.0))  # sampled directories' (train's unbiasedness warning)
        self.shards = [self.run_directory.shard_path(entry["file"]) for entry in self.manifest["shards"]]
        self.pieces = self._plan_pieces()
        # [epoch, batches to skip, batches made by worker processes]: in shared memory, so DataLoader
        # workers (persistent ones too) see set_epoch and load_state_dict made after they started.
        self._shared = torch.zeros(3, dtype=torch.int64).share_memory_()
        self._consumed = 0
        self._recorded = False
        self._hashed: set[int] = set()
        self._cached: tuple[tuple[int, int], pa.Table] | None = None

    # -- construction -----------------------------------------------------------------------
    def _load_manifest(self, allow_partial: bool, without_manifest: bool) -> dict[str, Any]:
        directory = self.run_directory
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
            raise VerificationError(f"{self.directory}: the run is not complete (no sealed manifest); pass allow_partial=True to read committed shards")
        runs, journal = directory.read_journals()
        if not runs:
            raise VerificationError(f"{self.directory}: no manifest and no journal; not a soft-label directory")
        settings = runs[0]["settings"]
        entries = sorted(journal.values(), key=lambda e: e["file"])
        header = read_shard_header(directory.shard_path(entries[0]["file"])) if entries else {}
        kind_settings = {key: settings[key] for key in kind_of(header or settings).manifest_keys if key in settings}
        return {**run_header(header or {}), "fingerprint": runs[0]["fingerprint"], **kind_settings,
                "vocab_size": settings["vocab_size"], "shards": entries, "complete": False}

    def _plan_pieces(self) -> list[Piece]:
        sizes = self.run_directory.data_dir.sizes()  # one listing, not a request per shard

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
            if header is None or header.get("fingerprint") != self.manifest["fingerprint"]:
                raise VerificationError(f"{path.name}: header belongs to another run (fingerprint differs)")
            if metadata.num_rows != entry["rows"]:
                raise VerificationError(f"{path.name}: {metadata.num_rows} rows, manifest says {entry['rows']}")
            if (mismatch := header_mismatch(header, self.manifest)) is not None and not self.manifest.get("from_shards"):
                raise VerificationError(f"{path.name}: its header and the manifest differ on {mismatch}")
            return [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]

        groups: list[tuple[int, int, int]] = []
        shards = list(zip(self.shards, self.manifest["shards"]))
        for index, rows_per_group in enumerate(self.run_directory.map_shards(row_groups, shards)):  # concurrent on an object store
            groups.extend((index, group, rows) for group, rows in enumerate(rows_per_group))
        # Too few row groups to go round every rank and worker: cut each into a few pieces. The
        # pieces of one row group stay next to each other, so a worker reads the group once.
        split = max(1, -(-PIECES_PER_RANK * self.world_size // max(len(groups), 1)))
        self.row_groups: list[list[Piece]] = []
        for shard, group, rows in groups:
            step = max(1, -(-rows // split))
            self.row_groups.append([Piece(shard, group, start, min(start + step, rows)) for start in range(0, rows, step)])
        return [piece for pieces in self.row_groups for piece in pieces]

    def _epoch_pieces(self, epoch: int) -> list[Piece]:
        if not self.shuffle:
            return list(self.pieces)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.row_groups))
        return [piece for index in order for piece in self.row_groups[index]]

    def _worker_pieces(self, epoch: int, rank: int, worker: int, workers: int) -> list[Piece]:
        return self._epoch_pieces(epoch)[rank :: self.world_size][worker::workers]

    def _worker_batches(self, pieces: list[Piece]) -> int:
        rows = sum(p.rows for p in pieces)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def num_batches(self, num_workers: int = 0, rank: int | None = None, epoch: int | None = None) -> int:
        """Batches one epoch yields on ``rank`` with ``num_workers`` DataLoader workers."""
        rank = self.rank if rank is None else rank
        epoch = self.epoch if epoch is None else epoch
        workers = max(num_workers, 1)
        return sum(self._worker_batches(self._worker_pieces(epoch, rank, w, workers)) for w in range(workers))

    @property
    def targets(self) -> str:
        """The directory's target kind (``topk``, ``sample``, ...): ``self.kind.name``."""
        return self.kind.name

    def columns(self) -> list[str]:
        """The column names of the shards (of the first one)."""
        if not self.shards:
            return []
        with self.shards[0].open() as handle:
            return pq.read_schema(handle).names

    # -- state --------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    @property
    def _skip_batches(self) -> int:
        return int(self._shared[1])

    @_skip_batches.setter
    def _skip_batches(self, value: int) -> None:
        self._shared[1] = value

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows, in this process and in every
        DataLoader worker (a resume point is kept only for its own epoch)."""
        if epoch != self.epoch:
            self._skip_batches = 0
            self._consumed = 0
            self._shared[2] = 0
            self._recorded = False
        self._shared[0] = epoch

    def record_consumed(self, batch: dict[str, Any]) -> None:
        """Record that the consumer has taken ``batch``; ``SoftLabelLoader`` calls it for every batch."""
        self._consumed = int(batch["batch_index"]) + 1
        self._recorded = True

    mark_consumed = record_consumed  # the first release's name

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands: enough for ``load_state_dict`` to resume exactly.

        Raises:
            UserError: batches came from DataLoader workers through a loader that did not record
                them (use ``SoftLabelLoader``), so what was consumed is unknown.
        """
        if int(self._shared[2]) > 0 and not self._recorded:
            raise UserError("SoftLabelDataset: batches came from DataLoader workers that softlabels cannot see; "
                            "iterate with softlabels.SoftLabelLoader(dataset, num_workers=N) so the resume point is known")
        return {"epoch": self.epoch, "batches": self._consumed, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError("the loader state was saved with another seed or world size; resume with the same ones")
        self._shared[0] = int(state["epoch"])
        self._skip_batches = int(state["batches"])
        self._consumed = self._skip_batches
        self._recorded = True

    def end_of_epoch(self) -> None:
        """The consumer has taken every batch of the epoch: a later iteration of it starts afresh."""
        self._skip_batches = 0

    def first_batch(self) -> dict[str, Any]:
        """One batch of the current epoch, leaving the iteration state untouched (for shape probes)."""
        saved = (self._skip_batches, self._consumed)
        try:
            return next(iter(self))
        finally:
            self._skip_batches, self._consumed = saved

    # -- reading --------------------------------------------------------------------------------
    def _read_piece(self, piece: Piece, columns: list[str]) -> pa.Table:
        key = (piece.shard, piece.row_group)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._read_row_group(piece, columns))
        return self._cached[1].slice(piece.start, piece.rows)

    def _read_row_group(self, piece: Piece, columns: list[str]) -> pa.Table:
        path = self.shards[piece.shard]
        try:
            if self.verify_sha256 and piece.shard not in self._hashed:
                expected = self.manifest["shards"][piece.shard].get("sha256")
                if expected is not None and path.sha256() != expected:
                    raise VerificationError(f"{path.name}: sha256 differs from the manifest (corrupt)")
                self._hashed.add(piece.shard)
            with path.open() as handle:
                parquet = pq.ParquetFile(handle, page_checksum_verification=True)
                return parquet.read_row_group(piece.row_group, columns=columns)
        except (pa.ArrowException, OSError) as exc:  # a store that fails is not a damaged shard
            raise store_failure(exc, path) or VerificationError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from None

    def _columns(self) -> list[str]:
        columns = [ID_COLUMN, *self.kind.read_columns(self.manifest, self.codec)]
        columns += [c for c in (self.input_column, self.label_column, self.manifest.get("target_positions_column")) if c]
        return list(dict.fromkeys(columns))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        counts = [self._worker_batches(self._worker_pieces(epoch, self.rank, w, workers)) for w in range(workers)]
        taken = _round_robin_counts(counts, self._skip_batches)
        # A new DataLoader starts its round-robin at worker 0; the stream must go on with the worker
        # whose batch was next, so loader worker i plays the part of worker (next + i) mod W.
        waiting = [(taken[w], w) for w in range(workers) if taken[w] < counts[w]]
        next_worker = min(waiting)[1] if waiting else 0
        worker = (next_worker + loader_worker) % workers
        self._worker = worker
        skip = taken[worker]
        pieces = self._worker_pieces(epoch, self.rank, worker, workers)
        columns = self._columns()
        skip_rows = skip * self.batch_size
        produced = skip
        windows: list[tuple[int, list[Piece], int]] = []  # (index, pieces, rows to skip at its start)
        for window_index, begin in enumerate(range(0, len(pieces), self.shuffle_buffer)):
            window = pieces[begin : begin + self.shuffle_buffer]
            window_rows = sum(p.rows for p in window)
            if skip_rows >= window_rows:
                skip_rows -= window_rows
                continue
            windows.append((window_index, window, skip_rows))
            skip_rows = 0
        # the next window is read and converted in a thread while this one's batches are cut and used
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softlabels-load")
        try:
            upcoming = loader.submit(self._load_window, windows[0][1], columns) if windows else None
            carry: pa.Table | None = None
            for position, (window_index, _, skip_rows) in enumerate(windows):
                table, rows = upcoming.result()  # type: ignore[union-attr]
                if position + 1 < len(windows):
                    upcoming = loader.submit(self._load_window, windows[position + 1][1], columns)
                order = np.arange(table.num_rows)
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch, self.rank, worker, window_index]).permutation(table.num_rows)
                order = order[skip_rows:]
                if carry is not None:  # the previous window's last rows lead this window's stream
                    head, order = order[: self.batch_size - carry.num_rows], order[self.batch_size - carry.num_rows :]
                    carry = pa.concat_tables([carry, table.take(pa.array(head))])
                    if carry.num_rows < self.batch_size:
                        continue
                    joined = self._rows(carry.combine_chunks())
                    yield self._batch(joined, np.arange(carry.num_rows), produced, counts)
                    produced += 1
                    carry = None
                full = len(order) // self.batch_size
                for index in range(full):
                    yield self._batch(rows, order[index * self.batch_size : (index + 1) * self.batch_size], produced, counts)
                    produced += 1
                rest = order[full * self.batch_size :]
                carry = table.take(pa.array(rest)) if len(rest) else None
            if carry is not None and not self.drop_last:
                rows = self._rows(carry.combine_chunks())
                yield self._batch(rows, np.arange(carry.num_rows), produced, counts)
        finally:
            loader.shutdown(wait=True, cancel_futures=True)
        if info is None:
            self.end_of_epoch()

    def _load_window(self, window: list[Piece], columns: list[str]) -> tuple[pa.Table, ShardRows]:
        """A window's rows as one table and as column blocks (runs in the loading thread)."""
        table = pa.concat_tables([self._read_piece(p, columns) for p in window]).combine_chunks()
        return table, self._rows(table)

    def _rows(self, table: pa.Table) -> ShardRows:
        return ShardRows(table, self.input_column, self.label_column, self.codec, self.kind.row_options(table.schema, self.manifest))

    def _batch(self, window: ShardRows, rows: np.ndarray, local_index: int, counts: list[int]) -> dict[str, Any]:
        batch = window.batch(rows)
        # where this batch stands in the round-robin stream the consumer sees
        worker = self._worker
        before = sum(min(count, local_index) for count in counts) + sum(1 for w in range(worker) if counts[w] > local_index)
        batch["batch_index"] = before
        if get_worker_info() is None:
            self._consumed = before + 1
        else:
            self._shared[2] += 1
        return batch


class SoftLabelLoader(DataLoader):
    """A DataLoader over a ``SoftLabelDataset`` that records every batch it hands out.

    Batching happens in the dataset (``batch_size=None``). Because the loader tells the dataset what
    the consumer took, ``dataset.state_dict()`` is the exact resume point however many workers
    prefetch ahead, and the trainer never reports consumption itself.
    """

    def __init__(self, dataset: SoftLabelDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if not isinstance(dataset, SoftLabelDataset):
            raise TypeError(f"SoftLabelLoader takes a SoftLabelDataset, not {type(dataset).__name__}")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        dataset: SoftLabelDataset = self.dataset  # type: ignore[assignment]
        try:
            for batch in super().__iter__():
                dataset.record_consumed(batch)
                yield batch
        except (UserError, VerificationError) as exc:
            raise _worker_error(exc) from None
        dataset.end_of_epoch()


def _worker_error(exc: ValueError) -> ValueError:
    """A worker's one-line error as it was raised there: torch re-raises it with the worker's
    traceback in the message ("Caught X in DataLoader worker process N. Original Traceback ...")."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return exc
    name, _, message = lines[-1].partition(": ")  # the traceback's last line: "module.Type: message"
    return type(exc)(message if message and name.rsplit(".", 1)[-1] == type(exc).__name__ else lines[-1])
