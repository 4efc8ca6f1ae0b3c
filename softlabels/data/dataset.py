"""``SoftLabelDataset``: stream a sealed soft-label directory into student training.

The unit of work is a *piece*: a row range of one Parquet row group. Each epoch the pieces are
permuted from (seed, epoch), dealt round-robin to DDP ranks and then to DataLoader workers; a worker
reads ``shuffle_buffer`` pieces at a time, permutes their rows and cuts batches from the resulting
stream (``softlabels.data.plan``). Batches are whole tensors built from the column buffers (one
scatter per column, ``softlabels.data.collation``), so the Python cost is per batch, not per
position: at 64 rows a batch the per-batch overhead is amortised over 64 classifier rows or 64 x 512
tokens.

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
time it touches it, unless ``verify_sha256=False``. Errors name the file
(``softlabels.data.reading``).
"""

from __future__ import annotations

import os
from contextlib import closing
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from ..codec import LogprobCodec
from ..distributed import data_parallel_position
from ..rundir import RunDirectory
from ..schema import ID_COLUMN
from ..targets import kind_of
from .collation import ShardRows
from .plan import (Piece, Window, batches_in, cut_pieces, epoch_pieces, resume_point, stream_index, window_order,
                   windows_after, worker_pieces)
from .reading import ShardReader, prefetched, shard_row_groups
from .state import StreamState

__all__ = ["SoftLabelDataset", "cut_batches"]


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
        default_rank, default_world = data_parallel_position()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.manifest = self.run_directory.open_sealed(allow_partial, without_manifest)
        self.input_column = self.manifest.get("input_column") if with_inputs else None
        self.label_column = self.manifest.get("label_column")
        self.codec = LogprobCodec.from_header(self.manifest)
        self.kind = kind_of(self.manifest)
        self.proposal_temperature = float(self.manifest.get("proposal_temperature", 1.0))  # sampled directories' (train's unbiasedness warning)
        self.shards = [self.run_directory.shard_path(entry["file"]) for entry in self.manifest["shards"]]
        self.row_groups: list[list[Piece]] = cut_pieces(shard_row_groups(self.run_directory, self.manifest, self.shards), self.world_size)
        self.pieces = [piece for pieces in self.row_groups for piece in pieces]
        self._state = StreamState()
        self._reader = ShardReader(self.shards, self.manifest, verify_sha256)

    # -- the plan -----------------------------------------------------------------------------
    def _worker_pieces(self, epoch: int, rank: int, worker: int, workers: int) -> list[Piece]:
        ordered = epoch_pieces(self.row_groups, self.shuffle, self.seed, epoch)
        return worker_pieces(ordered, rank, self.world_size, worker, workers)

    def _batch_counts(self, epoch: int, rank: int, workers: int) -> list[int]:
        """Batches each of ``workers`` workers of ``rank`` cuts in ``epoch``."""
        return [batches_in(self._worker_pieces(epoch, rank, w, workers), self.batch_size, self.drop_last) for w in range(workers)]

    def num_batches(self, num_workers: int = 0, rank: int | None = None, epoch: int | None = None) -> int:
        """Batches one epoch yields on ``rank`` with ``num_workers`` DataLoader workers."""
        rank = self.rank if rank is None else rank
        epoch = self.epoch if epoch is None else epoch
        return sum(self._batch_counts(epoch, rank, max(num_workers, 1)))

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
        return self._state.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows, in this process and in every
        DataLoader worker (a resume point is kept only for its own epoch)."""
        self._state.set_epoch(epoch)

    def record_consumed(self, batch: dict[str, Any]) -> None:
        """Record that the consumer has taken ``batch``; ``SoftLabelLoader`` calls it for every batch."""
        self._state.record(int(batch["batch_index"]))

    mark_consumed = record_consumed  # the first release's name

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands: enough for ``load_state_dict`` to resume exactly.

        Raises:
            UserError: batches came from DataLoader workers through a loader that did not record
                them (use ``SoftLabelLoader``), so what was consumed is unknown.
        """
        return self._state.state_dict(self.seed, self.world_size)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("world_size", self.world_size) != self.world_size:
            raise ValueError("the loader state was saved with another seed or world size; resume with the same ones")
        self._state.load(int(state["epoch"]), int(state["batches"]))

    def end_of_epoch(self) -> None:
        """The consumer has taken every batch of the epoch: a later iteration of it starts afresh."""
        self._state.skip = 0

    def first_batch(self) -> dict[str, Any]:
        """One batch of the current epoch, leaving the iteration state untouched (for shape probes)."""
        saved = self._state.snapshot()
        try:
            return next(iter(self))
        finally:
            self._state.restore(saved)

    # -- reading --------------------------------------------------------------------------------
    def _columns(self) -> list[str]:
        columns = [ID_COLUMN, *self.kind.read_columns(self.manifest, self.codec)]
        columns += [c for c in (self.input_column, self.label_column, self.manifest.get("target_positions_column")) if c]
        return list(dict.fromkeys(columns))

    def _rows(self, table: pa.Table) -> ShardRows:
        return ShardRows(table, self.input_column, self.label_column, self.codec, self.kind.row_options(table.schema, self.manifest))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This process's batches of the current epoch from its resume point (a DataLoader worker's
        share of them); each carries ``batch_index``, its place in the stream the consumer sees."""
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        counts = self._batch_counts(epoch, self.rank, workers)
        worker, skip = resume_point(counts, self._state.skip, loader_worker)
        windows = windows_after(self._worker_pieces(epoch, self.rank, worker, workers), self.shuffle_buffer, skip * self.batch_size)
        columns = self._columns()

        def load(window: Window) -> tuple[Window, pa.Table, ShardRows]:
            """A window's rows as one table and as column blocks (runs in the loading thread)."""
            table = self._reader.read_window(window.pieces, columns)
            return window, table, self._rows(table)

        def order(window: Window, rows: int) -> np.ndarray:
            return window_order(rows, window, self.shuffle, self.seed, epoch, self.rank, worker)

        with closing(prefetched(load, windows)) as loaded:
            batches = cut_batches(loaded, order, self.batch_size, self.drop_last, self._rows)
            for local_index, (rows, chosen) in enumerate(batches, start=skip):
                batch = rows.batch(chosen)
                batch["batch_index"] = stream_index(counts, worker, local_index)
                self._state.produced(batch["batch_index"], in_worker=info is not None)
                yield batch
        if info is None:
            self.end_of_epoch()


def cut_batches(loaded: Iterator[tuple[Window, pa.Table, ShardRows]], order: Callable[[Window, int], np.ndarray], batch_size: int,
                drop_last: bool, rows_of: Callable[[pa.Table], ShardRows]) -> Iterator[tuple[ShardRows, np.ndarray]]:
    """Batches of ``batch_size`` rows, each as (rows, indices into them), cut from the windows' rows
    taken in ``order(window, rows)``; a window's last rows lead the next window's first batch, and
    the final short batch is dropped under ``drop_last``."""
    carry: pa.Table | None = None
    for window, table, rows in loaded:
        chosen = order(window, table.num_rows)
        if carry is not None:  # the previous window's last rows lead this window's stream
            head, chosen = chosen[: batch_size - carry.num_rows], chosen[batch_size - carry.num_rows :]
            carry = pa.concat_tables([carry, table.take(pa.array(head))])
            if carry.num_rows < batch_size:
                continue
            yield rows_of(carry.combine_chunks()), np.arange(carry.num_rows)
            carry = None
        full = len(chosen) // batch_size
        for index in range(full):
            yield rows, chosen[index * batch_size : (index + 1) * batch_size]
        rest = chosen[full * batch_size :]
        carry = table.take(pa.array(rest)) if len(rest) else None
    if carry is not None and not drop_last:
        yield rows_of(carry.combine_chunks()), np.arange(carry.num_rows)
