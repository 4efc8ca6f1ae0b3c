"""Building and writing one shard.

A shard is built from Arrow buffers (flat numpy arrays wrapped as fixed-size lists inside lists:
no Python object per position), written with zstd in the run directory's staging folder, fsync'd
and renamed into ``data/`` (``RunDirectory.commit_staged``).
Row groups hold about ``ROW_GROUP_POSITIONS`` positions so the loader can split a shard across
workers: 65,536 positions at k=20 is about 5 MB of soft labels per group.

The soft-label columns (top-k ids and log-probs, or the sampled ids, counts, log-probs and log
normalisers) skip dictionary encoding (up to V distinct ids per row group only pays
back on huge shards) and use BYTE_STREAM_SPLIT, which puts the high and low bytes of every id and
log-probability in separate streams that zstd then compresses well. float16 log-probabilities are
the exception: DuckDB cannot read float16 BYTE_STREAM_SPLIT pages (duckdb#17114), so they are
plainly encoded. The statistics columns (confidence, entropy, agreement) are plain too: their
values are nearly all distinct, so a dictionary only costs big readers a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import LogprobCodec, leaf_type
from .fidelity import Fidelity
from .rundir import RunDirectory
from .sampling import SampledTargets, sample_arrays
from .schema import LOGPROB_COLUMNS, SOFT_COLUMNS, STAT_COLUMNS, id_type, shard_schema, targets_of
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
        ids: [N, k] int64 class ids (top-k runs; None for sampled ones).
        logprobs: [N, k] float32 log-probabilities (top-k runs; None for sampled ones).
        confidence, entropy: float32 [R].
        agreement: float32 [R], or None for a single teacher.
        fidelity: captured mass and KL(full || stored) of the N positions (drawn mass and distinct
            ids for sampled targets).
        sampled: the N positions' sampled targets (on the CPU), for runs of ``--targets sample``.
    """

    passthrough: pa.Table
    positions: np.ndarray
    ids: np.ndarray | None
    logprobs: np.ndarray | None
    confidence: np.ndarray
    entropy: np.ndarray
    agreement: np.ndarray | None
    fidelity: Fidelity
    sampled: SampledTargets | None = None


def _nested(flat: np.ndarray, k: int, positions: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    per_position = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=value_type), k)
    offsets = np.zeros(len(positions) + 1, dtype=np.int32)
    np.cumsum(positions, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), per_position)


def build_shard(payload: ShardPayload, vocab_size: int, top_k: int, ensemble_size: int, header: dict[str, Any]) -> pa.Table:
    """The shard table: sample_id, passthrough columns, soft labels (top-k or sampled, as the
    header's ``targets`` says) and statistics."""
    passthrough = payload.passthrough.drop_columns(["sample_id"])
    schema = shard_schema(passthrough.schema, vocab_size, top_k, ensemble_size, header)
    codec = LogprobCodec.from_header(header)
    arrays = [payload.passthrough.column("sample_id"), *passthrough.columns]
    if targets_of(header) == "sample":
        if payload.sampled is None:
            raise ValueError("a sampled run's payload needs its sampled targets")
        arrays += sample_arrays(payload.sampled, payload.positions, vocab_size, codec)
    else:
        ids = payload.ids.astype(id_type(vocab_size).to_pandas_dtype(), copy=False)
        arrays += [
            _nested(ids, top_k, payload.positions, id_type(vocab_size)),
            _nested(codec.encode_numpy(payload.logprobs), top_k, payload.positions, codec.arrow_type),
        ]
    arrays += [
        pa.array(payload.confidence.astype(np.float32)),
        pa.array(payload.entropy.astype(np.float32)),
    ]
    if ensemble_size > 1:
        arrays.append(pa.array(payload.agreement.astype(np.float32)))
    return pa.Table.from_arrays(arrays, schema=schema)


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
    leaves = {name: _leaf_path(name, table.schema.field(name).type) for name in table.column_names if name in SOFT_COLUMNS}
    split = {leaf: "BYTE_STREAM_SPLIT" for name, leaf in leaves.items() if not pa.types.is_float16(leaf_type(table.schema.field(name).type))}
    levels = {leaf: LOGPROB_ZSTD_LEVEL for name, leaf in leaves.items() if name in LOGPROB_COLUMNS}
    dictionary = [name for name in table.column_names if name not in SOFT_COLUMNS and name not in STAT_COLUMNS]
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
    total = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            if chunk.path_in_schema.split(".")[0] in SOFT_COLUMNS:
                total += chunk.total_compressed_size
    return total
