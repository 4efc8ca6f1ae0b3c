"""Collation: shard rows (an Arrow table, HF ``datasets`` rows or columns) into padded batch tensors.

``ShardRows`` holds a table's columns as numpy blocks, so any subset of its rows becomes a batch with
one scatter per column; ``collate`` is the DataLoader ``collate_fn`` over rows that lost their
shard header (codec, input and label columns then come from the arguments or the columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..audio_kind import AudioBlock, is_audio_struct
from ..codec import LogprobCodec
from ..errors import UserError
from ..inputs import ColumnBlock
from ..losses import IGNORE_INDEX
from ..schema import ID_COLUMN, TARGETS_COLUMN, codec_of, decode_header
from ..targets import TargetKind, kind_of, kind_of_columns

__all__ = ["AUTO", "ShardRows", "collate"]

AUTO = "auto"


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
        self.input_column = input_column
        self.inputs = _input_block(table, input_column, header, self.sample_ids) if input_column else None
        self.soft = kind.rows(table, codec, options, TargetPlacement(self.targets, self.inputs))
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


class TargetPlacement:
    """Chat rows: where their stored targets go (``softlabels.targets.rows``). It holds the two column
    blocks it reads, not the ``ShardRows``: a decoder that held a bound method of its owner would make
    a reference cycle, and each window's numpy blocks would then wait for the garbage collector."""

    def __init__(self, targets: ColumnBlock | None, inputs: ColumnBlock | None) -> None:
        self.targets, self.inputs = targets, inputs

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
        """(source indices, row of each, index within its row, step of each, T), or None when every position has one."""
        if self.targets is None:
            return None
        plan = self.targets.plan(rows)
        row_of = np.repeat(np.arange(len(rows)), plan.lengths)
        within = plan.source - self.targets.offsets[rows][row_of]
        steps_of = self.targets.values[plan.source].astype(np.int64)
        return plan.source, row_of, within, steps_of, self.steps(rows, steps_of)

    def steps(self, rows: np.ndarray, steps_of: np.ndarray) -> int:
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
        codec = _codec_of_rows(table, header, kind)
    if input_column == AUTO:
        input_column = header.get("input_column") if header else ("inputs" if "inputs" in table.column_names else None)
    if label_column == AUTO:
        label_column = header.get("label_column") if header else None
    if schema is None and isinstance(rows, (list, tuple)) and input_column in table.column_names:
        table = _classifier_inputs_fixed(table, input_column)
    options = kind.row_options(table.schema, header) if proposal_temperature is None else {"proposal_temperature": proposal_temperature}
    return ShardRows(table, input_column, label_column, codec, options).batch(np.arange(table.num_rows))


def _input_block(table: pa.Table, column: str, header: dict[str, Any] | None, sample_ids: np.ndarray) -> ColumnBlock | AudioBlock:
    """The input column as a block: decoded audio when the header says it is an audio run's column."""
    audio = header.get("audio_column") == column if header is not None else is_audio_struct(table.schema.field(column).type)
    if audio:
        return AudioBlock(table.column(column), column, (header or {}).get("sample_rate"), sample_ids)
    return ColumnBlock.from_arrow(table.column(column), column)


def _codec_of_rows(table: pa.Table, header: dict[str, Any] | None, kind: TargetKind) -> LogprobCodec:
    """The log-prob codec of rows: the header's, else told by the column; uint8 codes that lost both
    their header and their integer type are refused (``UserError``), not guessed."""
    codec = kind.codec_without_header(table.schema) if header is None else codec_of(table.schema)
    stored = kind.columns(header or {}, codec)[1]
    if header is None and codec.dtype != "uint8" and stored is not None and stored in table.column_names:
        leaf = table.column(stored)
        while pa.types.is_list(leaf.type) or pa.types.is_fixed_size_list(leaf.type) or pa.types.is_large_list(leaf.type):
            leaf = pc.list_flatten(leaf)
        if pa.types.is_float16(leaf.type):  # Arrow has no min/max kernel for half floats
            leaf = pa.array(leaf.to_numpy(zero_copy_only=False).astype(np.float32))
        if (pc.max(leaf).as_py() or 0.0) > 0.0:  # codes that lost their header and their integer type
            raise UserError(f"column {stored!r} holds values above 0, so they are not log-probabilities "
                            "(uint8 codes whose header is gone?); pass the codec of the directory's manifest")
    return codec


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

