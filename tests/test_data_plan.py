"""The dataset's plan as pure functions (softlabels.data.plan), against direct simulations: pieces
cover every row once, ranks and workers partition an epoch, the round-robin stream index and the
resume point agree with a simulated DataLoader, and skipped windows leave the stream's suffix."""

from __future__ import annotations

import numpy as np
import pytest

from softlabels.data.plan import (Piece, batches_in, cut_pieces, epoch_pieces, resume_point, stream_index, window_order,
                                  windows_after, worker_pieces)


def _round_robin(streams: list[list[object]]) -> list[object]:
    """What a DataLoader hands out from workers' streams: one from each in turn, skipping the exhausted."""
    out, position = [], [0] * len(streams)
    while any(position[w] < len(streams[w]) for w in range(len(streams))):
        for w, stream in enumerate(streams):
            if position[w] < len(stream):
                out.append(stream[position[w]])
                position[w] += 1
    return out


@pytest.mark.parametrize("counts", [[5, 3, 4], [0, 2, 7], [1], [3, 3, 3, 0, 1], [0, 0]])
def test_stream_index_and_resume_point_follow_a_simulated_dataloader(counts):
    stream = _round_robin([[(w, i) for i in range(count)] for w, count in enumerate(counts)])
    assert [stream_index(counts, w, i) for w, i in stream] == list(range(len(stream)))
    for consumed in range(len(stream) + 1):
        # a new DataLoader: loader worker i plays worker (next + i) mod W from its skip onwards
        played = []
        for loader_worker in range(len(counts)):
            worker, skip = resume_point(counts, consumed, loader_worker)
            played.append([(worker, i) for i in range(skip, counts[worker])])
        assert _round_robin(played) == stream[consumed:], consumed


def test_pieces_cover_every_row_once_and_ranks_and_workers_partition_an_epoch():
    groups = [(0, 0, 13), (0, 1, 7), (1, 0, 1), (2, 0, 29), (2, 1, 0)]
    row_groups = cut_pieces(groups, world_size=3)
    for (shard, group, rows), pieces in zip(groups, row_groups):
        assert all(p.shard == shard and p.row_group == group for p in pieces)
        assert [r for p in pieces for r in range(p.start, p.stop)] == list(range(rows))
    everything = [p for pieces in row_groups for p in pieces]
    assert len(everything) >= 3  # cut so that every rank gets some
    for shuffle in (False, True):
        ordered = epoch_pieces(row_groups, shuffle, seed=4, epoch=2)
        assert sorted(ordered, key=everything.index) == everything
        dealt = [p for rank in range(3) for worker in range(2) for p in worker_pieces(ordered, rank, 3, worker, 2)]
        assert sorted(dealt, key=everything.index) == everything
    assert epoch_pieces(row_groups, True, 4, 2) == epoch_pieces(row_groups, True, 4, 2)
    assert epoch_pieces(row_groups, True, 4, 2) != epoch_pieces(row_groups, True, 4, 3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_skipping_rows_leaves_the_suffix_of_the_workers_row_stream(shuffle):
    pieces = [Piece(0, g, 0, rows) for g, rows in enumerate([5, 1, 8, 3, 6, 2, 7])]
    starts = np.cumsum([0] + [p.rows for p in pieces])

    def rows_of(windows) -> list[int]:
        out = []
        for window in windows:
            first = pieces.index(window.pieces[0])
            size = sum(p.rows for p in window.pieces)
            out += [int(starts[first] + r) for r in window_order(size, window, shuffle, seed=1, epoch=0, rank=0, worker=1)]
        return out

    whole = rows_of(windows_after(pieces, 3, 0))
    assert sorted(whole) == list(range(starts[-1]))
    for skip in range(starts[-1] + 1):
        assert rows_of(windows_after(pieces, 3, skip)) == whole[skip:], skip
    assert batches_in(pieces, 4, drop_last=False) == 8 and batches_in(pieces, 4, drop_last=True) == 8
    assert batches_in(pieces, 5, drop_last=False) == 7 and batches_in(pieces, 5, drop_last=True) == 6
