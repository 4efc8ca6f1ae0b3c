"""Shard format ``softlabels.v2``: the Arrow schema of a shard and its self-describing header.

One row per corpus sample; per position the k most probable class ids and their log-probabilities.
Ids are uint16 when the vocabulary fits (<= 65,536 classes), halving the id payload against uint32:
at k=20 that is 40 instead of 80 bytes per position before compression, and with float16
log-probabilities the raw payload is 80 bytes per position.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from .codec import CODES_COLUMN, LOGPROB_COLUMN, LogprobCodec

__all__ = [
    "FORMAT",
    "FORMAT_V1",
    "READABLE_FORMATS",
    "soft_columns",
    "codec_of",
    "HEADER_KEY",
    "ID_COLUMN",
    "TOKENS_COLUMN",
    "TARGETS_COLUMN",
    "SOFT_COLUMNS",
    "STAT_COLUMNS",
    "id_type",
    "soft_label_fields",
    "shard_schema",
    "encode_header",
    "decode_header",
]

FORMAT = "softlabels.v2"
FORMAT_V1 = "softlabels.v1"
READABLE_FORMATS = (FORMAT_V1, FORMAT)
HEADER_KEY = b"softlabels"
ID_COLUMN = "sample_id"
TOKENS_COLUMN = "input_ids"
"""The token ids a teacher saw, in shards made from raw text or chat (``--text-column``, ``--chat-column``)."""
TARGETS_COLUMN = "target_positions"
"""Chat shards: list<int32> of the row's positions that have soft labels, ascending (the others have none)."""
SOFT_COLUMNS = ("topk_ids", LOGPROB_COLUMN, CODES_COLUMN)
"""Every soft-label column name of any format; a shard has ``topk_ids`` and one of the other two."""
STAT_COLUMNS = ("confidence", "entropy", "agreement")
UINT16_MAX_VOCAB = 65536


def id_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned integer type that holds every class id of ``vocab_size`` classes."""
    return pa.uint16() if vocab_size <= UINT16_MAX_VOCAB else pa.uint32()


def soft_label_fields(vocab_size: int, top_k: int, ensemble_size: int, codec: LogprobCodec | None = None) -> list[pa.Field]:
    """The soft-label and statistics fields that follow the passed-through corpus columns."""
    codec = codec or LogprobCodec()
    fields = [
        pa.field("topk_ids", pa.list_(pa.list_(id_type(vocab_size), top_k))),
        pa.field(codec.column, pa.list_(pa.list_(codec.arrow_type, top_k)), metadata=codec.field_metadata()),
        pa.field("confidence", pa.float32()),
        pa.field("entropy", pa.float32()),
    ]
    if ensemble_size > 1:
        fields.append(pa.field("agreement", pa.float32()))
    return fields


def shard_schema(
    passthrough: pa.Schema, vocab_size: int, top_k: int, ensemble_size: int, header: dict[str, Any]
) -> pa.Schema:
    """Full shard schema: ``sample_id``, the corpus columns unchanged, then the soft labels.

    Args:
        passthrough: schema of the corpus columns copied into the shard (inputs, label).
        vocab_size: number of teacher classes V.
        top_k: k stored per position.
        ensemble_size: number of teachers; ``agreement`` exists only for ensembles.
        header: the run's JSON header, stored as Parquet key-value metadata; its ``logprob_dtype``
            sets the type of ``topk_logprobs`` (see ``softlabels.codec``).
    """
    fields = [pa.field("sample_id", pa.string())]
    fields += [passthrough.field(i) for i in range(len(passthrough))]
    fields += soft_label_fields(vocab_size, top_k, ensemble_size, LogprobCodec.from_header(header))
    return pa.schema(fields, metadata={HEADER_KEY: encode_header(header)})


def soft_columns(header: dict[str, Any]) -> tuple[str, str]:
    """The (ids, stored log-probabilities) column names of the run a header or manifest describes."""
    return "topk_ids", LogprobCodec.from_header(header).column


def codec_of(schema: pa.Schema) -> LogprobCodec:
    """How the log-probabilities of these shard rows are stored: from the header, else the columns.

    Raises:
        UserError: the header is gone and the column cannot say how to decode itself.
    """
    header = decode_header(schema.metadata)
    return LogprobCodec.from_header(header) if header is not None else LogprobCodec.from_columns(schema)


def encode_header(header: dict[str, Any]) -> bytes:
    """JSON (never pickle) so any Parquet reader can show the header."""
    return json.dumps(header, sort_keys=True).encode()


def decode_header(metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The run header from a shard's key-value metadata, or None when the shard has none."""
    if not metadata or HEADER_KEY not in metadata:
        return None
    return json.loads(metadata[HEADER_KEY])
