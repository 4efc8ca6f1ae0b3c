"""A shard's footer and what is checked against it: the one reader of a shard's header, the run
header derived from a shard, a manifest or the settings, and the one shard validator."""

from __future__ import annotations

import functools
import json
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from ..codec import LogprobCodec
from ..errors import VerificationError
from ..schema import decode_header, shard_schema
from ..storage import Location, store_failure
from ..targets import kind_of
from .manifest import MANIFEST_BODY_KEYS, ShardEntry

__all__ = ["SHARD_HEADER_KEYS", "UNCHECKED_HEADER_KEYS", "SCHEMA_KEYS", "SETTINGS_HEADER_KEYS", "Footer", "read_footer",
           "read_shard_header", "run_header", "manifest_run_header", "settings_run_header", "header_mismatch",
           "shard_bytes_problem", "validate_shard", "check_shard"]

SHARD_HEADER_KEYS = ("unit", "rows", "positions")
"""Header keys that describe one shard, not the run: dropped when a shard header becomes a run header."""
UNCHECKED_HEADER_KEYS = ("softlabels_version",)
"""Run-header keys a manifest need not share with every shard: a resumed run mixes releases' shards."""
SCHEMA_KEYS = ("format", "logprob_dtype", "logprob_scale", "targets")
"""Header keys besides V, the teachers and the target kind's ``manifest_keys`` that set a shard's column types."""
SETTINGS_HEADER_KEYS = ("format", "vocab_size", "ensemble", "precision", "input_column", "id_column", "label_column",
                        "text_column", "chat_column", "max_length", "pack", "tokenizer", "audio_column", "sample_rate")
"""Settings a run header repeats as they are (the text and audio ones only where the settings have them)."""


class Footer(NamedTuple):
    """What one read of a shard's Parquet footer gives.

    Attributes:
        header: the softlabels header (None when the shard has none, or one that is not a JSON object).
        metadata: the Parquet file metadata (rows, row groups).
        schema: the Arrow schema, when it was asked for (``read_footer(with_schema=True)``).
    """

    header: dict[str, Any] | None
    metadata: pq.FileMetaData
    schema: pa.Schema | None = None

    @property
    def rows(self) -> int:
        return int(self.metadata.num_rows)

    @property
    def row_groups(self) -> list[int]:
        """The rows of each row group, in order."""
        return [self.metadata.row_group(group).num_rows for group in range(self.metadata.num_row_groups)]


def read_footer(path: Location, with_schema: bool = False) -> Footer:
    """The footer of the shard at ``path`` (one read); the Arrow schema too when ``with_schema``
    (otherwise only the key-value metadata is decoded: no schema to rebuild).

    Raises:
        VerificationError: not a readable Parquet file, naming the shard.
        StoreError: the store failed (which says nothing about the file).
    """
    try:
        with path.open() as handle:
            if with_schema:
                parquet = pq.ParquetFile(handle)
                metadata, schema = parquet.metadata, parquet.schema_arrow
            else:
                metadata, schema = pq.read_metadata(handle), None
    except (pa.ArrowInvalid, OSError) as exc:
        raise store_failure(exc, path) or VerificationError(f"{path.name}: not a readable Parquet file ({exc})") from None
    try:
        header = decode_header(schema.metadata if schema is not None else metadata.metadata)
    except ValueError:
        header = None
    return Footer(header if isinstance(header, dict) else None, metadata, schema)


def read_shard_header(path: Location) -> dict[str, Any] | None:
    """The header in a shard's footer, or None when the file is unreadable or has none.

    Raises:
        StoreError: the store failed (which says nothing about the file).
    """
    try:
        return read_footer(path).header
    except VerificationError:
        return None


def run_header(shard_header: dict[str, Any]) -> dict[str, Any]:
    """The run header within a shard's header."""
    return {k: v for k, v in shard_header.items() if k not in SHARD_HEADER_KEYS}


def manifest_run_header(manifest: dict[str, Any]) -> dict[str, Any]:
    """The run header within a manifest: every key but the manifest's body (``MANIFEST_BODY_KEYS``)."""
    return {k: v for k, v in manifest.items() if k not in MANIFEST_BODY_KEYS}


def settings_run_header(settings: dict[str, Any], fingerprint: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The run header a new run writes into every shard: the settings it repeats
    (``SETTINGS_HEADER_KEYS``), the fingerprint, and ``fields`` (the teachers by name and sha256, the
    target kind's and codec's fields, the version)."""
    return {**{k: settings[k] for k in SETTINGS_HEADER_KEYS if k in settings}, "fingerprint": fingerprint, **fields}


def header_mismatch(header: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """The first run-header field of a shard that the manifest lacks or records otherwise, as
    ``"FIELD: shard has X, manifest has Y"``, or None. Teachers are compared by sha256."""
    for key, value in header.items():
        if key in SHARD_HEADER_KEYS or key in UNCHECKED_HEADER_KEYS:
            continue
        if key not in manifest:
            return f"{key}: shard has {value!r}, manifest has none"
        recorded = manifest[key]
        if key == "teachers" and isinstance(value, list) and isinstance(recorded, list):
            value = [t.get("sha256") if isinstance(t, dict) else t for t in value]
            recorded = [t.get("sha256") if isinstance(t, dict) else t for t in recorded]
        if recorded != value:
            return f"{key}: shard has {value!r}, manifest has {recorded!r}"
    return None


@functools.lru_cache(maxsize=16)
def _expected_fields(vocab_size: int, teachers: int, schema_fields: str) -> tuple[tuple[str, pa.DataType], ...]:
    """The soft-label columns a run's shards must have: built once per run, not once per shard."""
    header = json.loads(schema_fields)
    soft_fields = kind_of(header).fields(vocab_size, header, LogprobCodec.from_header(header))
    schema = shard_schema(pa.schema([]), soft_fields, teachers, header)
    return tuple((field.name, field.type) for field in schema)


def shard_bytes_problem(path: Location, entry: ShardEntry, hash_bytes: bool = True,
                        sizes: dict[str, int] | None = None) -> str | None:
    """What is wrong with a committed shard's bytes (missing, another size, another sha256), or None.

    Args:
        hash_bytes: compare the sha256 too (about 1 s per GB), where the entry records one.
        sizes: a listing of the data folder (name -> bytes, ``Location.sizes``), so a directory of many
            shards costs one listing rather than a request per shard; None asks the store per shard.
    """
    name = path.name
    size = sizes.get(name) if sizes is not None else (path.size() if path.is_file() else None)
    if size is None:
        return "missing"
    if size != entry.get("bytes"):
        return f"{size} bytes on disk, manifest says {entry.get('bytes')} (truncated or replaced)"
    if hash_bytes and entry.get("sha256") is not None and path.sha256() != entry.get("sha256"):
        return "sha256 differs from the manifest (corrupt)"
    return None


def validate_shard(path: Location, entry: ShardEntry, manifest: dict[str, Any], hash_bytes: bool = True,
                   sizes: dict[str, int] | None = None, check_types: bool = True) -> Footer:
    """Check one committed shard against its manifest (or journal) entry: the one shard validator.

    Its bytes (``shard_bytes_problem``), then its footer: a header of the manifest's run, the entry's
    rows and positions, the run header the manifest records (not for a manifest rebuilt from the
    shards themselves, ``from_shards``), and with ``check_types`` every soft-label column of its type.

    Returns:
        The shard's footer (read once).

    Raises:
        VerificationError: naming the shard and what differs.
    """
    name = path.name
    problem = shard_bytes_problem(path, entry, hash_bytes, sizes)
    if problem is not None:
        raise VerificationError(f"{name}: {problem}")
    footer = read_footer(path, with_schema=check_types)
    header = footer.header
    if header is None or header.get("fingerprint") != manifest.get("fingerprint"):
        raise VerificationError(f"{name}: header belongs to another run (fingerprint differs)")
    if footer.rows != entry.get("rows"):
        raise VerificationError(f"{name}: {footer.rows} rows, manifest says {entry.get('rows')}")
    mismatch = None if manifest.get("from_shards") else header_mismatch(header, manifest)
    if isinstance(header.get("positions"), int) and header["positions"] != entry.get("positions"):
        mismatch = f"positions: shard has {header['positions']}, manifest has {entry.get('positions')!r}"
    if mismatch is not None:
        raise VerificationError(f"{name}: its header and the manifest differ on {mismatch}")
    if check_types:
        schema_keys = SCHEMA_KEYS + kind_of(manifest).manifest_keys
        schema_fields = {key: manifest[key] for key in schema_keys if key in manifest}
        schema = footer.schema if footer.schema is not None else footer.metadata.schema.to_arrow_schema()
        for field_name, field_type in _expected_fields(manifest["vocab_size"], len(manifest["teachers"]),
                                                       json.dumps(schema_fields, sort_keys=True)):
            if schema.get_field_index(field_name) < 0 or schema.field(field_name).type != field_type:
                raise VerificationError(f"{name}: column {field_name!r} missing or of the wrong type")
    return footer


def check_shard(path: Location, entry: ShardEntry, manifest: dict[str, Any], hash_bytes: bool = True,
                sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """``validate_shard`` with every check; returns the shard's own header."""
    header = validate_shard(path, entry, manifest, hash_bytes, sizes).header
    return header if header is not None else {}
