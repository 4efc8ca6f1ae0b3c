"""Batches by length for ragged inputs (audio, tokens, frames): pure functions over row lengths.

A unit's rows are sorted by length and cut into batches whose padded size (rows x the longest row)
stays within a cap, as ESPnet's numel batches and lhotse's dynamic bucketing do, so short
utterances are not padded to long ones. The caller computes each batch and puts the rows back in
corpus order: shards keep corpus order, and every row's values are what batch size 1 gives.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["BATCH_COLUMN", "ROW_COLUMN", "length_batches", "corpus_order_batches", "padding_waste", "batch_order", "with_batch_columns",
           "in_batch_order", "batch_spans"]

BATCH_COLUMN = "__softlabels_batch"
ROW_COLUMN = "__softlabels_row"
"""int64: each read row's batch, and its place among the unit's rows in corpus order; never stored."""


def length_batches(lengths: Sequence[int], cap: int, max_rows: int | None = None) -> list[list[int]]:
    """Row indices grouped into batches of similar length: padded size ``rows x max length <= cap``.

    Rows are taken longest first (ties in corpus order); a row longer than ``cap`` gets a batch of its
    own. ``max_rows`` also caps the rows of a batch. Every index appears exactly once.

    Raises:
        ValueError: ``cap`` or ``max_rows`` below 1, or a negative length.
    """
    if cap < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError(f"cap {cap} and max_rows {max_rows} must be at least 1")
    if any(length < 0 for length in lengths):
        raise ValueError("lengths must not be negative")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        # longest first: the batch's first row is its longest, so adding a row costs that length again
        if current and max(1, lengths[current[0]]) * (len(current) + 1) <= cap and (max_rows is None or len(current) < max_rows):
            current.append(index)
        else:
            batches.append([index])
    return batches


def corpus_order_batches(rows: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``batch_size`` rows in corpus order (the fixed-size inputs' batching)."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")
    return [list(range(start, min(start + batch_size, rows))) for start in range(0, rows, batch_size)]


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of computed positions that are padding: 1 - sum(lengths) / sum(rows x longest per batch)."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return 0.0 if padded == 0 else 1.0 - sum(lengths) / padded


def batch_order(batches: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """int64 (row of each place in batch order, batch of each place) of ``batches``."""
    order = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches]) if batches else np.zeros(0, dtype=np.int64)
    return order, np.repeat(np.arange(len(batches), dtype=np.int64), [len(b) for b in batches])


def with_batch_columns(table: pa.Table, order: np.ndarray, batch_of: np.ndarray) -> pa.Table:
    """A table already in batch order with ``BATCH_COLUMN`` and ``ROW_COLUMN`` appended (``batch_spans`` reads them)."""
    return table.append_column(BATCH_COLUMN, pa.array(batch_of)).append_column(ROW_COLUMN, pa.array(order))


def in_batch_order(table: pa.Table, batches: Sequence[Sequence[int]]) -> pa.Table:
    """A unit's rows in batch order (one batch after another), with the batch columns appended."""
    order, batch_of = batch_order(batches)
    table = table.take(pa.array(order)) if not np.array_equal(order, np.arange(len(order))) else table
    return with_batch_columns(table, order, batch_of)


def batch_spans(table: pa.Table) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The batches of a table ``in_batch_order`` made, as (first row, rows) spans, and each row's place in corpus order."""
    batch_of = table.column(BATCH_COLUMN).to_numpy()
    starts = np.flatnonzero(np.diff(batch_of, prepend=-1)) if len(batch_of) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.append(starts, len(batch_of)))
    return list(zip(starts.tolist(), sizes.tolist())), table.column(ROW_COLUMN).to_numpy()
