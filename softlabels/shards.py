"""Building, writing and checking one shard.

A shard is built from Arrow buffers (flat numpy arrays wrapped as fixed-size lists inside lists:
no Python object per position), written with zstd under a ``.tmp`` name, fsync'd and renamed.
Row groups hold about ``ROW_GROUP_POSITIONS`` positions so the loader can split a shard across
workers: 65,536 positions at k=20 is about 5 MB of soft labels per group.

The two soft-label columns skip dictionary encoding (up to V distinct ids per row group only pays
back on huge shards) and use BYTE_STREAM_SPLIT, which puts the high and low bytes of every uint16 id
and float16 log-probability in separate streams that zstd then compresses well: soft labels at
k=20, V=32,000 take 63 instead of 71 bytes per position on a 16k-position shard, 66 instead of 93
on small shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import LogprobCodec
from .errors import VerificationError
from .fidelity import Fidelity
from .manifest import fsync_dir, sha256_file
from .schema import SOFT_COLUMNS, decode_header, id_type, shard_schema

__all__ = ["ROW_GROUP_POSITIONS", "ShardPayload", "build_shard", "write_shard", "soft_label_bytes", "check_shard"]

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
        ids: [N, k] int64 class ids.
        logprobs: [N, k] float32 log-probabilities.
        confidence, entropy: float32 [R].
        agreement: float32 [R], or None for a single teacher.
        fidelity: captured mass and KL(full || stored) of the N positions.
    """

    passthrough: pa.Table
    positions: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    agreement: np.ndarray | None
    fidelity: Fidelity


def _nested(flat: np.ndarray, k: int, positions: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    per_position = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=value_type), k)
    offsets = np.zeros(len(positions) + 1, dtype=np.int32)
    np.cumsum(positions, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), per_position)


def build_shard(payload: ShardPayload, vocab_size: int, top_k: int, ensemble_size: int, header: dict[str, Any]) -> pa.Table:
    """The shard table: sample_id, passthrough columns, soft labels and statistics."""
    passthrough = payload.passthrough.drop_columns(["sample_id"])
    schema = shard_schema(passthrough.schema, vocab_size, top_k, ensemble_size, header)
    ids = payload.ids.astype(id_type(vocab_size).to_pandas_dtype(), copy=False)
    codec = LogprobCodec.from_header(header)
    logprobs = codec.encode_numpy(payload.logprobs)
    arrays = [payload.passthrough.column("sample_id"), *passthrough.columns]
    arrays += [
        _nested(ids, top_k, payload.positions, id_type(vocab_size)),
        _nested(logprobs, top_k, payload.positions, codec.arrow_type),
        pa.array(payload.confidence.astype(np.float32)),
        pa.array(payload.entropy.astype(np.float32)),
    ]
    if ensemble_size > 1:
        arrays.append(pa.array(payload.agreement.astype(np.float32)))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(table: pa.Table, path: Path, positions: int) -> tuple[int, str]:
    """Write ``table`` to ``path`` atomically; returns (bytes, sha256) of the committed file."""
    tmp = path.with_name(path.name + ".tmp")
    rows = max(table.num_rows, 1)
    group_rows = max(1, int(ROW_GROUP_POSITIONS * rows / max(positions, 1)))
    # page CRCs let every later read detect a flipped byte without hashing the whole file
    pq.write_table(
        table, tmp, compression="zstd", row_group_size=group_rows, write_page_checksum=True,
        use_dictionary=[name for name in table.column_names if name not in SOFT_COLUMNS],
        column_encoding={f"{name}.list.element.list.element": "BYTE_STREAM_SPLIT" for name in SOFT_COLUMNS},
        compression_level={"topk_logprobs.list.element.list.element": LOGPROB_ZSTD_LEVEL},
    )
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size, digest


def soft_label_bytes(metadata: pq.FileMetaData) -> int:
    """Compressed bytes of the ``topk_ids`` and ``topk_logprobs`` column chunks."""
    total = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            if chunk.path_in_schema.split(".")[0] in SOFT_COLUMNS:
                total += chunk.total_compressed_size
    return total


def check_shard(path: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Check one committed shard against its manifest entry.

    Raises:
        VerificationError: naming the shard, for a missing file, wrong size or sha256, an unreadable
            file, a header from another run, or a row count that differs.
    """
    name = path.name
    if not path.is_file():
        raise VerificationError(f"{name}: missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise VerificationError(f"{name}: {size} bytes on disk, manifest says {entry.get('bytes')} (truncated or replaced)")
    if sha256_file(path) != entry.get("sha256"):
        raise VerificationError(f"{name}: sha256 differs from the manifest (corrupt)")
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        rows = parquet.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise VerificationError(f"{name}: not a readable Parquet file ({exc})") from None
    header = decode_header(schema.metadata)
    if header is None or header.get("fingerprint") != manifest.get("fingerprint"):
        raise VerificationError(f"{name}: header belongs to another run (fingerprint differs)")
    if rows != entry.get("rows"):
        raise VerificationError(f"{name}: {rows} rows, manifest says {entry.get('rows')}")
    codec_fields = {key: manifest[key] for key in ("logprob_dtype", "logprob_scale") if key in manifest}
    expected = shard_schema(pa.schema([]), manifest["vocab_size"], manifest["top_k"], len(manifest["teachers"]), codec_fields)
    for field in expected:
        if schema.get_field_index(field.name) < 0 or schema.field(field.name).type != field.type:
            raise VerificationError(f"{name}: column {field.name!r} missing or of the wrong type")
