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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .errors import UserError

__all__ = ["TeacherInputs", "check_input_type", "to_teacher_inputs", "pad_ragged"]


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


def _numpy_values(values: pa.Array) -> np.ndarray:
    data = values.to_numpy(zero_copy_only=False)
    dtype = np.int64 if data.dtype.kind in "iub" else np.float32
    # torch wants writable memory; Arrow buffers are read-only, so a copy happens at most once here
    return data.astype(dtype, copy=not data.flags.writeable or data.dtype != dtype)


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
    rows = len(column)
    fixed = _fixed_shape(column.type)
    if fixed is not None:
        shape, _ = fixed
        values = column
        for _ in shape:
            values = values.flatten()
        return TeacherInputs(torch.from_numpy(_numpy_values(values).reshape(rows, *shape)), None)

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    if (lengths == 0).any():
        bad = sample_ids.filter(pa.array(lengths == 0)).to_pylist()[:5]
        raise UserError(f"--input-column {name!r} is an empty sequence for sample ids {', '.join(bad)}")
    positions = column.flatten()
    if pa.types.is_fixed_size_list(positions.type) or _is_list(positions.type):
        widths = pc.list_value_length(positions).to_numpy(zero_copy_only=False)
        if positions.null_count or widths.min() != widths.max():
            raise UserError(f"--input-column {name!r}: frames in this batch have unequal feature sizes")
        frame_values = _numpy_values(positions.flatten()).reshape(len(positions), int(widths[0]))
    else:
        frame_values = _numpy_values(positions)
    return TeacherInputs(torch.from_numpy(pad_ragged(frame_values, lengths)), torch.from_numpy(lengths))


def pad_ragged(values: np.ndarray, lengths: np.ndarray, fill: float | int = 0) -> np.ndarray:
    """Scatter row-major ragged values into a padded block.

    Args:
        values: [N, ...] the positions of all rows, row after row.
        lengths: int [B] positions per row, summing to N.
        fill: value of the padding.

    Returns:
        [B, max(lengths), ...] with row b's positions first and ``fill`` after them.
    """
    rows = len(lengths)
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    row_of = np.repeat(np.arange(rows), lengths)
    step_of = np.arange(total) - np.repeat(starts, lengths)
    longest = int(lengths.max()) if rows else 0
    padded = np.full((rows, longest, *values.shape[1:]), fill, dtype=values.dtype)
    padded[row_of, step_of] = values
    return padded
