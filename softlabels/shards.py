"""Building and writing one shard.

A shard is built from Arrow buffers (flat numpy arrays wrapped as fixed-size lists inside lists:
no Python object per position), written with zstd in the run directory's staging folder, fsync'd
and renamed into ``data/`` (``RunDirectory.commit_staged``).
Row groups hold about ``ROW_GROUP_POSITIONS`` positions so the loader can split a shard across
workers: 65,536 positions at k=20 is about 5 MB of soft labels per group.

The soft-label columns of every target kind (top-k ids and log-probs, or the sampled ids, counts,
log-probs and log normalisers, ...) skip dictionary encoding (up to V distinct ids per row group only pays
back on huge shards) and use BYTE_STREAM_SPLIT, which puts the high and low bytes of every id and
log-probability in separate streams that zstd then compresses well. float16 log-probabilities are
the exception: DuckDB cannot read float16 BYTE_STREAM_SPLIT pages (duckdb#17114), so they are
plainly encoded. The statistics columns (confidence, entropy, agreement) are plain too: their
values are nearly all distinct, so a dictionary only costs big readers a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import LogprobCodec, leaf_type
from .fidelity import Fidelity
from .rundir import RunDirectory
from .schema import STAT_COLUMNS, shard_schema
from .targets import all_logprob_columns, all_soft_columns, kind_of
from .storage import writing

__all__ = ["ROW_GROUP_POSITIONS", "ShardPayload", "build_shard", "write_shard", "write_parquet", "soft_label_bytes"]

ROW_GROUP_POSITIONS = 65536
# zstd level of the log-probability column only: level 6 takes float16 log-probs at k=20 on the KJV
# corpus from 25.3 to 21.3 bytes per position (uint8 codes from 15.1 to about 12.3) for about
# 2 us per position of writer-thread time; the ids gain nothing from a higher level and stay at 1.
LOGPROB_ZSTD_LEVEL = 6


@dataclass
class ShardPayload:
    """What the teacher produced for one unit, as host arrays.

    Attributes:
        passthrough: ``sample_id`` and the corpus columns of the kept rows.
        positions: int64 [R] positions per kept row.
        targets: the N positions' targets, as the run's target kind joined them (``TargetKind.join``).
        confidence, entropy: float32 [R].
        agreement: float32 [R], or None for a single teacher.
        fidelity: the N positions' fidelity figures (what the kind records).
        order: row i of the shard is payload row ``order[i]`` (rows computed out of corpus order), or None.
        skipped_samples: [{sample_id, reason}] of rows dropped as bad input (journalled with the shard).
    """

    passthrough: pa.Table
    positions: np.ndarray
    targets: Any
    confidence: np.ndarray
    entropy: np.ndarray
    agreement: np.ndarray | None
    fidelity: Fidelity
    order: np.ndarray | None = None
    skipped_samples: list[dict[str, str]] = field(default_factory=list)


def build_shard(payload: ShardPayload, vocab_size: int, ensemble_size: int, header: dict[str, Any]) -> pa.Table:
    """The shard table: sample_id, passthrough columns, soft labels (of the header's target kind) and statistics."""
    passthrough = payload.passthrough.drop_columns(["sample_id"])
    kind = kind_of(header)
    codec = LogprobCodec.from_header(header)
    schema = shard_schema(passthrough.schema, kind.fields(vocab_size, header, codec), ensemble_size, header)
    arrays = [payload.passthrough.column("sample_id"), *passthrough.columns]
    arrays += kind.arrays(payload.targets, payload.positions, vocab_size, codec, header)
    arrays += [
        pa.array(payload.confidence.astype(np.float32)),
        pa.array(payload.entropy.astype(np.float32)),
    ]
    if ensemble_size > 1:
        arrays.append(pa.array(payload.agreement.astype(np.float32)))
    table = pa.Table.from_arrays(arrays, schema=schema)
    return table if payload.order is None else table.take(pa.array(payload.order))


def write_shard(table: pa.Table, directory: RunDirectory, unit: int, positions: int) -> tuple[int, str, int]:
    """Write unit N's shard whole: staged, fsync'd and renamed into ``data/`` on local disk, one
    whole-object write on an object store.

    Returns (bytes, sha256, soft-label bytes) of the committed file. On any exception a staged
    file is removed.
    """
    # The footer is read back rather than collected by the writer: a writer that failed (a full
    # disk) would otherwise raise again from its finaliser, after the one-line error was printed.
    if directory.root.local:
        staged = directory.staging_path(unit)
        with writing(directory.unit_shard_path(unit), staged):  # never leave a short shard; a full disk is one line
            write_parquet(table, staged, positions)
            footer = pq.read_metadata(staged)
            size, digest = directory.commit_staged(unit)
    else:
        buffer = pa.BufferOutputStream()
        write_parquet(table, buffer, positions)
        data = buffer.getvalue()
        footer = pq.read_metadata(pa.BufferReader(data))
        size, digest = directory.commit_bytes(unit, data.to_pybytes())
    return size, digest, soft_label_bytes(footer)


def write_parquet(table: pa.Table, where: Any, positions: int, footers: list[pq.FileMetaData] | None = None) -> None:
    """The shard's Parquet encoding, chosen so every client reads it (see the module docstring).

    Args:
        where: a local path or a writable pyarrow stream.
        footers: receives the written file's footer (``FileMetaData``) when given.
    """
    rows = max(table.num_rows, 1)
    group_rows = max(1, int(ROW_GROUP_POSITIONS * rows / max(positions, 1)))
    soft = all_soft_columns()
    leaves = {name: _leaf_path(name, table.schema.field(name).type) for name in table.column_names if name in soft}
    split = {leaf: "BYTE_STREAM_SPLIT" for name, leaf in leaves.items() if not pa.types.is_float16(leaf_type(table.schema.field(name).type))}
    levels = {leaf: LOGPROB_ZSTD_LEVEL for name, leaf in leaves.items() if name in all_logprob_columns()}
    dictionary = [name for name in table.column_names if name not in soft and name not in STAT_COLUMNS]
    # page CRCs let every later read detect a flipped byte without hashing the whole file
    pq.write_table(
        table, where, compression="zstd", row_group_size=group_rows, write_page_checksum=True,
        use_dictionary=dictionary, column_encoding=split or None, compression_level=levels or None,
        metadata_collector=footers,
    )


def _leaf_path(name: str, value_type: pa.DataType) -> str:
    """The Parquet path of a (nested) list column's leaf: ``name.list.element`` once per list level."""
    path = name
    while pa.types.is_list(value_type) or pa.types.is_fixed_size_list(value_type) or pa.types.is_large_list(value_type):
        path += ".list.element"
        value_type = value_type.value_type
    return path


def soft_label_bytes(metadata: pq.FileMetaData) -> int:
    """Compressed bytes of the soft-label column chunks (top-k ids and log-probs, or the sampled columns)."""
    total, soft = 0, all_soft_columns()
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            if chunk.path_in_schema.split(".")[0] in soft:
                total += chunk.total_compressed_size
    return total
