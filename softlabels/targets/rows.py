"""Arrow to batch tensors for the top-k and sampled kinds (``TargetKind.rows``).

A decoder holds one table's soft-label columns as numpy blocks and turns any subset of its rows into
the kind's batch tensors and ``mask`` bool [B, T]. Rows whose targets sit at some positions only
(chat) are placed by the caller's ``place(rows)``: (source indices into the stored positions, row of
each, index among its row's stored positions, step of each, T), or None for every position.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from ..codec import LogprobCodec
from ..inputs import ColumnBlock, NestedBlock, placement
from ..schema import SAMPLE_COUNTS_COLUMN, SAMPLE_IDS_COLUMN, SAMPLE_NORMALIZER_COLUMN, sample_logprob_column

__all__ = ["Placement", "TopKRows", "SampledRows"]

Placement = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None"]


class TopKRows:
    """``topk_ids`` int64 [B, T, k], ``topk_logprobs`` float32 [B, T, k] (decoded) and ``mask``."""

    def __init__(self, table: pa.Table, codec: LogprobCodec, place: Placement) -> None:
        self.codec, self.place = codec, place
        self.topk_ids = ColumnBlock.from_arrow(table.column("topk_ids"), "topk_ids")
        self.topk_logprobs = ColumnBlock.from_arrow(table.column(codec.column), codec.column)

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        placed = self.place(rows)
        if placed is not None:
            ids, logprobs, mask = self._scattered(rows, placed)
        else:
            plan = self.topk_ids.plan(rows)  # the two soft-label columns share their offsets
            ids, lengths = self.topk_ids.gather(rows, 0, np.int64, plan)
            stored, _ = self.topk_logprobs.gather(rows, 0, self.topk_logprobs.values.dtype, plan)
            logprobs = self.codec.decode_numpy(stored)
            mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return {"topk_ids": torch.from_numpy(ids), "topk_logprobs": torch.from_numpy(logprobs), "mask": torch.from_numpy(mask)}

    def _scattered(self, rows: np.ndarray, placed: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Targets stored at some positions only, put where they belong, with T the longest input of the rows."""
        source, row_of, _, steps_of, steps = placed  # the soft-label columns share the targets' offsets
        k = self.topk_ids.values.shape[-1]
        ids = np.zeros((len(rows), steps, k), dtype=np.int64)
        ids[row_of, steps_of] = self.topk_ids.values[source]
        logprobs = np.zeros((len(rows), steps, k), dtype=np.float32)
        logprobs[row_of, steps_of] = self.codec.decode_numpy(self.topk_logprobs.values[source])
        mask = np.zeros((len(rows), steps), dtype=bool)
        mask[row_of, steps_of] = True
        return ids, logprobs, mask


class SampledRows:
    """``sample_ids`` and ``sample_counts`` int64 [B, T, m], ``sample_logprobs`` float32 [B, T, m] (count 0
    and log-prob 0 in padding slots), ``sample_log_normalizer`` float32 [B, T] when the proposal
    temperature is not 1, ``proposal_temperature`` and ``mask``."""

    def __init__(self, table: pa.Table, codec: LogprobCodec, proposal_temperature: float, place: Placement) -> None:
        self.codec, self.place, self.proposal_temperature = codec, place, proposal_temperature
        self.drawn_ids = NestedBlock.from_arrow(table.column(SAMPLE_IDS_COLUMN))
        self.drawn_counts = NestedBlock.from_arrow(table.column(SAMPLE_COUNTS_COLUMN))
        self.drawn_logprobs = NestedBlock.from_arrow(table.column(sample_logprob_column(codec)))
        self.log_normalizer = (ColumnBlock.from_arrow(table.column(SAMPLE_NORMALIZER_COLUMN), SAMPLE_NORMALIZER_COLUMN)
                               if proposal_temperature != 1.0 else None)
        self.positions = ColumnBlock(np.empty(0), self.drawn_ids.row_offsets)  # the rows' positions, for gather plans

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        placed = self.place(rows)
        if placed is not None:  # position j of a row's stored ones is its j-th target position
            _, row_of, within, steps_of, steps = placed
        else:
            plan = self.positions.plan(rows)
            row_of, within = placement(plan, len(rows))
            steps_of, steps = within, plan.longest
        positions = self.drawn_ids.row_offsets[rows][row_of] + within
        shape = (len(rows), steps)
        ids = self.drawn_ids.scatter(positions, row_of, steps_of, shape, np.int64)
        width = ids.shape[-1]
        counts = self.drawn_counts.scatter(positions, row_of, steps_of, shape, np.int64, width)
        stored = self.drawn_logprobs.scatter(positions, row_of, steps_of, shape, self.drawn_logprobs.values.dtype, width)
        mask = np.zeros(shape, dtype=bool)
        mask[row_of, steps_of] = True
        batch: dict[str, Any] = {
            "sample_ids": torch.from_numpy(ids),
            "sample_counts": torch.from_numpy(counts),
            "sample_logprobs": torch.from_numpy(np.where(counts > 0, self.codec.decode_numpy(stored), np.float32(0.0))),
            "mask": torch.from_numpy(mask),
            "proposal_temperature": self.proposal_temperature,
        }
        if self.log_normalizer is not None:
            normalizer = np.zeros(shape, dtype=np.float32)
            normalizer[row_of, steps_of] = self.log_normalizer.values[self.log_normalizer.offsets[rows][row_of] + within]
            batch["sample_log_normalizer"] = torch.from_numpy(normalizer)
        return batch
