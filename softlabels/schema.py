"""Shard format ``softlabels.v2``: the Arrow schema of a shard and its self-describing header.

One row per corpus sample; per position the k most probable class ids and their log-probabilities.
Ids are uint16 when the vocabulary fits (<= 65,536 classes), halving the id payload against uint32:
at k=20 that is 40 instead of 80 bytes per position before compression, and with float16
log-probabilities the raw payload is 80 bytes per position.

A run of ``generate --targets sample`` (header ``targets: "sample"``) stores sampled targets instead
(``softlabels.targets.sampling``): per position the distinct ids of N draws, variable in number, with their
counts and log-probabilities, in the ``sample_*`` columns of ``sample_fields``. The header names the
kind of targets (``softlabels.targets.kind_of``); a header without ``targets`` is top-k.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from .codec import CODES_COLUMN, LogprobCodec
from .options import TARGET_KINDS

__all__ = [
    "FORMAT",
    "FORMAT_V1",
    "READABLE_FORMATS",
    "codec_of",
    "TARGET_KINDS",
    "SAMPLE_IDS_COLUMN",
    "SAMPLE_COUNTS_COLUMN",
    "SAMPLE_LOGPROBS_COLUMN",
    "SAMPLE_CODES_COLUMN",
    "SAMPLE_NORMALIZER_COLUMN",
    "SAMPLE_COLUMNS",
    "MAX_UINT8_SAMPLES",
    "PROPOSAL_TEMPERATURE_KEY",
    "sample_count_type",
    "sample_logprob_column",
    "sample_fields",
    "HEADER_KEY",
    "ID_COLUMN",
    "TOKENS_COLUMN",
    "TARGETS_COLUMN",
    "STAT_COLUMNS",
    "id_type",
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
SAMPLE_IDS_COLUMN = "sample_ids"
SAMPLE_COUNTS_COLUMN = "sample_counts"
SAMPLE_LOGPROBS_COLUMN = "sample_logprobs"
SAMPLE_CODES_COLUMN = "sample_logprob_codes"
SAMPLE_NORMALIZER_COLUMN = "sample_log_normalizer"
SAMPLE_COLUMNS = (SAMPLE_IDS_COLUMN, SAMPLE_COUNTS_COLUMN, SAMPLE_LOGPROBS_COLUMN, SAMPLE_CODES_COLUMN, SAMPLE_NORMALIZER_COLUMN)
"""Every sampled-target column name; a sampled shard has ids, counts, one of the log-prob columns and,
when the proposal temperature is not 1, the log normaliser."""
STAT_COLUMNS = ("confidence", "entropy", "agreement")
UINT16_MAX_VOCAB = 65536
MAX_UINT8_SAMPLES = 255
PROPOSAL_TEMPERATURE_KEY = b"softlabels.proposal_temperature"
"""Field metadata of ``sample_log_normalizer``: the proposal temperature, so rows without their header still say it."""


def id_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned integer type that holds every class id of ``vocab_size`` classes."""
    return pa.uint16() if vocab_size <= UINT16_MAX_VOCAB else pa.uint32()


def sample_count_type(samples: int) -> pa.DataType:
    """uint8 counts up to ``MAX_UINT8_SAMPLES`` draws per position, else uint16."""
    return pa.uint8() if samples <= MAX_UINT8_SAMPLES else pa.uint16()


def sample_logprob_column(codec: LogprobCodec) -> str:
    """The column holding the sampled ids' log-probabilities under ``codec`` (codes get their own name)."""
    return SAMPLE_CODES_COLUMN if codec.column == CODES_COLUMN else SAMPLE_LOGPROBS_COLUMN


def sample_fields(vocab_size: int, samples: int, proposal_temperature: float, codec: LogprobCodec | None = None) -> list[pa.Field]:
    """The sampled-target fields of a shard (in place of ``topk_ids`` and ``topk_logprobs``).

    ``sample_ids`` list<list<uint16|uint32>>, ``sample_counts`` list<list<uint8|uint16>>, the
    log-probabilities list<list<codec type>> and, when ``proposal_temperature`` is not 1,
    ``sample_log_normalizer`` list<float32> (one log Z_t per position).
    """
    codec = codec or LogprobCodec()
    fields = [
        pa.field(SAMPLE_IDS_COLUMN, pa.list_(pa.list_(id_type(vocab_size)))),
        pa.field(SAMPLE_COUNTS_COLUMN, pa.list_(pa.list_(sample_count_type(samples)))),
        pa.field(sample_logprob_column(codec), pa.list_(pa.list_(codec.arrow_type)), metadata=codec.field_metadata()),
    ]
    if proposal_temperature != 1.0:
        fields.append(pa.field(SAMPLE_NORMALIZER_COLUMN, pa.list_(pa.float32()),
                               metadata={PROPOSAL_TEMPERATURE_KEY: repr(float(proposal_temperature)).encode()}))
    return fields


def _stat_fields(ensemble_size: int) -> list[pa.Field]:
    fields = [pa.field("confidence", pa.float32()), pa.field("entropy", pa.float32())]
    if ensemble_size > 1:
        fields.append(pa.field("agreement", pa.float32()))
    return fields


def shard_schema(passthrough: pa.Schema, soft_fields: list[pa.Field], ensemble_size: int, header: dict[str, Any]) -> pa.Schema:
    """Full shard schema: ``sample_id``, the corpus columns unchanged, the soft labels, then the statistics.

    Args:
        passthrough: schema of the corpus columns copied into the shard (inputs, label).
        soft_fields: the target kind's soft-label fields (``TargetKind.fields``).
        ensemble_size: number of teachers; ``agreement`` exists only for ensembles.
        header: the run's JSON header, stored as Parquet key-value metadata.
    """
    fields = [pa.field("sample_id", pa.string())]
    fields += [passthrough.field(i) for i in range(len(passthrough))]
    fields += soft_fields + _stat_fields(ensemble_size)
    return pa.schema(fields, metadata={HEADER_KEY: encode_header(header)})


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
