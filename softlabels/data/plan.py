"""The dataset's plan as pure functions: pieces, the epoch's shuffle, the split over ranks and
DataLoader workers, the windows a worker reads, the order of their rows, and where a resume starts.

Everything here is a function of its arguments (seed, epoch, rank, world size, number of workers,
batch size), so the batch a consumer sees at any position is known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PIECES_PER_RANK", "Piece", "Window", "batches_in", "cut_pieces", "epoch_pieces", "resume_point",
           "round_robin_counts", "stream_index", "window_order", "windows_after", "worker_pieces"]

PIECES_PER_RANK = 16
"""At least this many pieces per rank: row groups are cut when there are fewer."""


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


@dataclass(frozen=True)
class Window:
    """``pieces`` read together by one worker (its ``index``-th window), of whose rows the first
    ``skip_rows`` were consumed before a resume."""

    index: int
    pieces: list[Piece]
    skip_rows: int


def cut_pieces(groups: list[tuple[int, int, int]], world_size: int) -> list[list[Piece]]:
    """The pieces of each row group ``(shard, group, rows)``, in order.

    Too few row groups to go round every rank and worker: each is cut into a few pieces. The pieces
    of one row group stay next to each other, so a worker reads the group once.
    """
    split = max(1, -(-PIECES_PER_RANK * world_size // max(len(groups), 1)))
    row_groups: list[list[Piece]] = []
    for shard, group, rows in groups:
        step = max(1, -(-rows // split))
        row_groups.append([Piece(shard, group, start, min(start + step, rows)) for start in range(0, rows, step)])
    return row_groups


def epoch_pieces(row_groups: list[list[Piece]], shuffle: bool, seed: int, epoch: int) -> list[Piece]:
    """Every piece in the order of ``epoch``: row groups permuted from (seed, epoch) when shuffling."""
    if not shuffle:
        return [piece for pieces in row_groups for piece in pieces]
    order = np.random.default_rng([seed, epoch]).permutation(len(row_groups))
    return [piece for index in order for piece in row_groups[index]]


def worker_pieces(ordered: list[Piece], rank: int, world_size: int, worker: int, workers: int) -> list[Piece]:
    """One worker's share of an epoch's ``ordered`` pieces: dealt round-robin to ranks, then to workers."""
    return ordered[rank::world_size][worker::workers]


def batches_in(pieces: list[Piece], batch_size: int, drop_last: bool) -> int:
    """Batches a worker cuts from ``pieces``."""
    rows = sum(p.rows for p in pieces)
    return rows // batch_size if drop_last else -(-rows // batch_size)


def round_robin_counts(counts: list[int], consumed: int) -> list[int]:
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


def resume_point(counts: list[int], consumed: int, loader_worker: int) -> tuple[int, int]:
    """(worker, batches it skips) for DataLoader worker ``loader_worker`` after ``consumed`` batches.

    A new DataLoader starts its round-robin at worker 0; the stream must go on with the worker whose
    batch was next, so loader worker i plays the part of worker (next + i) mod W.
    """
    workers = len(counts)
    taken = round_robin_counts(counts, consumed)
    waiting = [(taken[w], w) for w in range(workers) if taken[w] < counts[w]]
    next_worker = min(waiting)[1] if waiting else 0
    worker = (next_worker + loader_worker) % workers
    return worker, taken[worker]


def stream_index(counts: list[int], worker: int, local_index: int) -> int:
    """Where a worker's ``local_index``-th batch stands in the round-robin stream the consumer sees."""
    return sum(min(count, local_index) for count in counts) + sum(1 for w in range(worker) if counts[w] > local_index)


def windows_after(pieces: list[Piece], shuffle_buffer: int, skip_rows: int) -> list[Window]:
    """The windows of ``shuffle_buffer`` pieces a worker reads, without those wholly inside the
    first ``skip_rows`` rows (the one the cut falls into says how many of its rows to skip)."""
    windows: list[Window] = []
    for window_index, begin in enumerate(range(0, len(pieces), shuffle_buffer)):
        window = pieces[begin : begin + shuffle_buffer]
        window_rows = sum(p.rows for p in window)
        if skip_rows >= window_rows:
            skip_rows -= window_rows
            continue
        windows.append(Window(window_index, window, skip_rows))
        skip_rows = 0
    return windows


def window_order(rows: int, window: Window, shuffle: bool, seed: int, epoch: int, rank: int, worker: int) -> np.ndarray:
    """The order in which a window's ``rows`` rows are used, less the ones skipped: permuted from
    (seed, epoch, rank, worker, window) when shuffling."""
    order = np.arange(rows)
    if shuffle:
        order = np.random.default_rng([seed, epoch, rank, worker, window.index]).permutation(rows)
    return order[window.skip_rows:]
