"""Arrow input columns to the tensors a teacher is called with, through the column buffers.

The calling convention follows the column's Arrow type, never the values, so every batch of a run
is called the same way:

* a number or ``fixed_size_list`` (nested for images) -> ``model(x)``, x [B, ...];
* ``list<number>`` (tokens, samples) -> ``model(x, lengths)``, x [B, T_max] zero-padded;
* ``list<fixed_size_list<number>[F]>`` or ``list<list<number>>`` with equal inner lengths (frames of
  features) -> ``model(x, lengths)``, x [B, T_max, F].

Integer inputs stay int64, floating inputs become float32. Padding is one scatter of the flattened
values, never a Python loop per position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .batching import BATCH_COLUMN, ROW_COLUMN, batch_spans, in_batch_order, length_batches
from .corpus import Corpus, Unit
from .errors import UserError

__all__ = ["TeacherInputs", "ColumnBlock", "ColumnsKind", "GatherPlan", "pad_rows", "NestedBlock", "PROBE_ROWS", "placement", "check_input_type",
           "to_teacher_inputs"]

PROBE_ROWS = 2
"""Rows of the vocabulary probe: every teacher runs on them before any work."""


@dataclass
class TeacherInputs:
    """A batch ready for the teacher.

    Attributes:
        x: float32 or int64, [B, ...] for fixed-size inputs, [B, T_max(, F)] for sequences.
        lengths: int64 [B] valid positions per row for sequences, None for fixed-size inputs.
    """

    x: torch.Tensor
    lengths: torch.Tensor | None

    def to(self, device: torch.device) -> "TeacherInputs":
        lengths = None if self.lengths is None else self.lengths.to(device)
        return TeacherInputs(self.x.to(device, non_blocking=True), lengths)


def _is_list(data_type: pa.DataType) -> bool:
    return pa.types.is_list(data_type) or pa.types.is_large_list(data_type)


def _is_number(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_boolean(data_type)


def _fixed_shape(data_type: pa.DataType) -> tuple[tuple[int, ...], pa.DataType] | None:
    """Shape and element type of a number or a (nested) fixed_size_list of numbers."""
    shape: list[int] = []
    while pa.types.is_fixed_size_list(data_type):
        shape.append(data_type.list_size)
        data_type = data_type.value_type
    return (tuple(shape), data_type) if _is_number(data_type) else None


def check_input_type(data_type: pa.DataType, column: str) -> None:
    """Raise a UserError naming the column when its type has no calling convention."""
    if _fixed_shape(data_type) is not None:
        return
    if _is_list(data_type):
        inner = data_type.value_type
        if _is_number(inner) or (_fixed_shape(inner) is not None and len(_fixed_shape(inner)[0]) == 1):
            return
        if _is_list(inner) and _is_number(inner.value_type):
            return
    raise UserError(
        f"--input-column {column!r} has type {data_type}; expected numbers, fixed_size_list of numbers, "
        "list<number> (sequences) or list<list<number>> (frames)"
    )


def _number_dtype(data: np.ndarray) -> type:
    return np.int64 if data.dtype.kind in "iub" else np.float32


@dataclass
class ColumnBlock:
    """One Arrow column as numpy views, so any rows gather into a (padded) block in two numpy calls.

    Built once per Arrow table (zero-copy where Arrow allows), then ``gather`` serves every batch:
    the per-batch cost is one fancy-index gather and one scatter, never a Python loop per position.

    Attributes:
        values: fixed-size columns [R, *shape]; list columns [N, *inner] (all positions, unsliced).
        offsets: list columns only, int64 [R + 1] indexing ``values``.
    """

    values: np.ndarray
    offsets: np.ndarray | None = None

    @classmethod
    def from_arrow(cls, column: pa.Array | pa.ChunkedArray, name: str) -> "ColumnBlock":
        """Wrap a number, (nested) fixed_size_list, list<number> or list<list-of-equal-width> column."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        fixed = _fixed_shape(column.type)
        if fixed is not None:
            values = column
            for _ in fixed[0]:
                values = values.flatten()
            return cls(values.to_numpy(zero_copy_only=False).reshape(len(column), *fixed[0]))
        if not _is_list(column.type):
            raise UserError(f"column {name!r} has type {column.type}, which has no tensor form")
        offsets = column.offsets.to_numpy().astype(np.int64)
        child = column.values
        if pa.types.is_fixed_size_list(child.type) or _is_list(child.type):
            widths = pc.list_value_length(child).to_numpy(zero_copy_only=False)
            if len(widths) and (child.null_count or widths.min() != widths.max()):
                raise UserError(f"column {name!r}: frames have unequal feature sizes")
            width = int(widths[0]) if len(widths) else 0
            return cls(child.flatten().to_numpy(zero_copy_only=False).reshape(len(child), width), offsets)
        return cls(child.to_numpy(zero_copy_only=False), offsets)

    @property
    def ragged(self) -> bool:
        return self.offsets is not None

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        """int64 [B] positions of each of ``rows`` (list columns only)."""
        return self.offsets[rows + 1] - self.offsets[rows]

    def gather(self, rows: np.ndarray, fill: float | int = 0, dtype: type | None = None,
               plan: "GatherPlan | None" = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The given rows as [B, *shape], or padded [B, T_max, *inner] with their lengths.

        Args:
            rows: int [B] row numbers.
            fill: padding value for list columns.
            dtype: result dtype; default int64 for integers, float32 otherwise.
            plan: ``plan(rows)`` of a column with the same offsets, to reuse its index arithmetic.
        """
        dtype = dtype or _number_dtype(self.values)
        if not self.ragged:
            return self.values[rows].astype(dtype, copy=False), None
        inner = self.values.shape[1:]
        if plan is None:
            starts = self.offsets[rows]
            lengths = self.offsets[rows + 1] - starts
            if len(rows) and int(lengths.sum()) >= SLICE_COPY_POSITIONS * len(rows):  # long rows (audio samples): a copy per row
                views = [self.values[start : start + length] for start, length in zip(starts.tolist(), lengths.tolist())]
                return pad_rows(views, fill, dtype), lengths
        plan = plan or self.plan(rows)
        if plan.uniform:  # every row as long: one gather, no padding to fill
            block = self.values[plan.source].reshape(len(rows), plan.longest, *inner)
            return block.astype(dtype, copy=False), plan.lengths
        padded = np.full((len(rows), plan.longest, *inner), fill, dtype=dtype)
        padded[plan.row_of, plan.step_of] = self.values[plan.source]
        return padded, plan.lengths

    def plan(self, rows: np.ndarray) -> "GatherPlan":
        """Where ``rows``' positions are in ``values`` and where they go in the padded block (list columns)."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        longest = int(lengths.max()) if len(rows) else 0
        if len(rows) and int(lengths.min()) == longest:
            source = (starts[:, None] + np.arange(longest)).reshape(-1)
            return GatherPlan(lengths, longest, source, None, None)
        first_position = np.cumsum(lengths) - lengths
        row_of = np.repeat(np.arange(len(rows)), lengths)
        step_of = np.arange(int(lengths.sum())) - np.repeat(first_position, lengths)
        return GatherPlan(lengths, longest, np.repeat(starts, lengths) + step_of, row_of, step_of)


def pad_rows(rows: list[np.ndarray], fill: float | int, dtype: type) -> np.ndarray:
    """Rows [n_i, *inner] as one block [B, max n_i, *inner] of ``dtype``, padded with ``fill``: a copy per row."""
    inner = rows[0].shape[1:] if rows else ()
    padded = np.full((len(rows), max((len(r) for r in rows), default=0), *inner), fill, dtype=dtype)
    for out, row in zip(padded, rows):
        out[: len(row)] = row
    return padded


SLICE_COPY_POSITIONS = 256
"""Mean positions per row from which ``ColumnBlock.gather`` copies row by row (one slice each) instead
of building per-position indices: a batch of audio holds about a million samples, a batch of tokens
a few thousand positions."""


@dataclass(frozen=True)
class GatherPlan:
    """The index arithmetic of one batch of a list column: int64 [B] lengths, the longest, the flat
    source positions, and (ragged batches only) each position's row and step in the padded block."""

    lengths: np.ndarray
    longest: int
    source: np.ndarray
    row_of: np.ndarray | None
    step_of: np.ndarray | None

    @property
    def uniform(self) -> bool:
        return self.row_of is None


def _refuse_unequal_frames(column: pa.Array, name: str, sample_ids: pa.Array) -> None:
    """A ``list<list<number>>`` column is frames of one feature size: rows whose frames have another
    (or a null frame) are named before the teacher sees them."""
    if not (_is_list(column.type) and _is_list(column.type.value_type)):
        return
    widths = pc.list_value_length(column.flatten()).fill_null(-1).to_numpy(zero_copy_only=False)
    if not len(widths) or widths.min() == widths.max():
        return
    values, counts = np.unique(widths[widths >= 0], return_counts=True)
    usual = int(values[counts.argmax()]) if len(values) else -1
    row_of = np.repeat(np.arange(len(column)), pc.list_value_length(column).to_numpy(zero_copy_only=False))
    bad = np.unique(row_of[widths != usual])
    shown = sample_ids.take(pa.array(bad[:5])).to_pylist()
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise UserError(f"--input-column {name!r}: frames must all have one feature size ({usual} in most rows), "
                    f"but sample ids {', '.join(map(str, shown))}{more} have frames of another size or null")


def to_teacher_inputs(column: pa.Array | pa.ChunkedArray, name: str, sample_ids: pa.Array) -> TeacherInputs:
    """Convert a batch of the input column to teacher inputs.

    Args:
        column: the batch's rows of the input column.
        name: the column name, for error messages.
        sample_ids: the batch's sample ids, for error messages.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        bad = sample_ids.filter(column.is_null()).to_pylist()[:5]
        raise UserError(f"--input-column {name!r} is null for sample ids {', '.join(bad)}")
    _refuse_unequal_frames(column, name, sample_ids)
    block = ColumnBlock.from_arrow(column, f"--input-column {name}")
    rows = np.arange(len(column))
    if block.ragged:
        empty = block.lengths(rows) == 0
        if empty.any():
            bad = sample_ids.filter(pa.array(empty)).to_pylist()[:5]
            raise UserError(f"--input-column {name!r} is an empty sequence for sample ids {', '.join(bad)}")
    x, lengths = block.gather(rows)
    return TeacherInputs(torch.from_numpy(x), None if lengths is None else torch.from_numpy(lengths))


@dataclass
class NestedBlock:
    """A list<list<number>> column (per row, per position, a variable number of values) as numpy.

    Attributes:
        row_offsets: int64 [R + 1] indexing positions.
        position_offsets: int64 [P + 1] indexing ``values``.
        values: [U] every value of every position, unsliced.
    """

    row_offsets: np.ndarray
    position_offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def from_arrow(cls, column: pa.Array | pa.ChunkedArray) -> "NestedBlock":
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        positions = column.values  # the positions of every row, from the first offset on
        return cls(column.offsets.to_numpy().astype(np.int64), positions.offsets.to_numpy().astype(np.int64),
                   positions.values.to_numpy(zero_copy_only=False))

    def scatter(self, positions: np.ndarray, row_of: np.ndarray, step_of: np.ndarray, shape: tuple[int, int],
                dtype: type, width: int | None = None) -> np.ndarray:
        """The values of the given positions as [B, T, m], zero in unused slots.

        Args:
            positions: int64 [M] position indices (into ``position_offsets``).
            row_of, step_of: int64 [M] where each position goes in the [B, T] block.
            shape: (B, T).
            width: m; by default the most values of any of the positions.
        """
        starts = self.position_offsets[positions]
        lengths = self.position_offsets[positions + 1] - starts
        width = (int(lengths.max()) if len(lengths) else 0) if width is None else width
        block = np.zeros((*shape, width), dtype=dtype)
        first = np.cumsum(lengths) - lengths
        slot = np.arange(int(lengths.sum())) - np.repeat(first, lengths)
        block[np.repeat(row_of, lengths), np.repeat(step_of, lengths), slot] = self.values[np.repeat(starts, lengths) + slot]
        return block


def placement(plan: GatherPlan, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, step) in the padded [B, T] block of each position a gather plan takes, int64 [M] each."""
    if plan.uniform:
        return np.repeat(np.arange(rows), plan.longest), np.tile(np.arange(plan.longest), rows)
    return plan.row_of, plan.step_of


class ColumnsKind:
    """The input kind of vectors, tokens and frames (and, through text.DocumentsKind, token windows):
    the input column reaches the teacher as it is (``to_teacher_inputs``), in corpus-order batches of
    ``batch_size`` rows, and each teacher's logits are its positions (``Teacher.logits``)."""

    counts_documents = False
    default_rows_per_shard: int | None = None  # sized from the rows' positions

    def __init__(self, column: str, batch_size: int, batch_positions: int | None = None) -> None:
        self.column, self.batch_size, self.batch_positions = column, batch_size, batch_positions

    def check_column(self, schema: pa.Schema) -> None:
        """Raise a UserError naming the column when its type has no calling convention, or when
        ``--batch-positions`` asks batches by length of rows that all have one length."""
        data_type = schema.field(self.column).type
        check_input_type(data_type, self.column)
        if self.batch_positions is not None and not (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)):
            raise UserError(f"--batch-positions batches ragged rows by length; --input-column {self.column!r} has type {data_type}, "
                            "one size per row (use --batch-size)")

    def by_length(self, table: pa.Table) -> pa.Table:
        """With ``--batch-positions``: the rows in batches by length (``batching.length_batches``: at most
        ``batch_size`` rows and that many padded positions), one batch after another; else as they are."""
        if self.batch_positions is None:
            return table
        lengths = pc.list_value_length(table.column(self.column)).fill_null(0).to_numpy(zero_copy_only=False)
        return in_batch_order(table, length_batches(lengths.tolist(), self.batch_positions, self.batch_size))

    def check_teachers(self, teachers: "list[Any]") -> None:
        """Nothing to check before the probe."""

    def read_unit(self, corpus: Corpus, unit: Unit, table: pa.Table) -> pa.Table:
        """The unit's rows as the teacher sees them: the corpus rows (by length with ``--batch-positions``)."""
        return self.by_length(table)

    def probe_table(self, corpus: Corpus) -> pa.Table:
        """The first ``PROBE_ROWS`` rows the teacher would see."""
        return corpus.read_unit(Unit(0, 0, 0, min(PROBE_ROWS, corpus.files[0].rows)))

    def spans(self, table: pa.Table) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The batches as (first row, rows) spans and each row's place in corpus order: by length
        (``by_length``), else ``batch_size`` rows at a time in corpus order."""
        if BATCH_COLUMN in table.column_names:
            return batch_spans(table)
        return [(begin, self.batch_size) for begin in range(0, table.num_rows, self.batch_size)], np.arange(table.num_rows)

    def teacher_inputs(self, batch: pa.Table, sample_ids: pa.Array) -> TeacherInputs:
        return to_teacher_inputs(batch.column(self.column), self.column, sample_ids)

    def teacher_outputs(self, teachers: "list[Any]", inputs: TeacherInputs, sample_ids: pa.Array) -> "tuple[list[torch.Tensor], torch.Tensor | None]":
        """Every teacher's logits ([B, C] or [B, T, C]) and the rows' valid positions (None for fixed-size rows)."""
        return [teacher.logits(inputs) for teacher in teachers], inputs.lengths

    def check_vocab(self, vocab_size: int) -> None:
        """Nothing to check: the column holds the teacher's own inputs."""

    def settings(self) -> dict[str, Any]:
        """What the fingerprint, the manifest and every header record of the input beyond ``input_column``: nothing."""
        return {}

    def stored(self, table: pa.Table) -> pa.Table:
        """The rows as the shard stores them: without the batch columns of ``by_length``."""
        return table.drop_columns([BATCH_COLUMN, ROW_COLUMN]) if BATCH_COLUMN in table.column_names else table

    def skipped(self, table: pa.Table) -> list[dict[str, str]]:
        return []
