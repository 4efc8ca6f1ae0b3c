"""Batches by length for ragged inputs (audio, tokens, frames): pure functions over row lengths.

A unit's rows are sorted by length and cut into batches whose padded size (rows x the longest row)
stays within a cap, as ESPnet's numel batches and lhotse's dynamic bucketing do, so short
utterances are not padded to long ones. The caller computes each batch and puts the rows back in
corpus order: shards keep corpus order, and every row's values are what batch size 1 gives.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["length_batches", "corpus_order_batches", "padding_waste"]


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
