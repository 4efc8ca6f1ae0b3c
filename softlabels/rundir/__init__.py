"""The run directory: the one owner of the on-disk contract of a soft-label dataset.

Layout ``softlabels.v2`` (written by every command of this release)::

    DIR/manifest.json               written last; the commit record of the run
    DIR/data/shard-NNNNNN.parquet   the dataset, and nothing else: any Parquet reader opens DIR/data
    DIR/_journal/rank-NNNNN.jsonl   one journal per rank: a run line, then one line per committed shard
    DIR/_staging/                   partial shard files (local disk), renamed into data/ when whole

Layout ``softlabels.v1`` (the first release, read by every command, never written): the shards,
``journal-NNNNN.jsonl`` and ``manifest.json`` all sit in DIR itself.

The commit protocol: a shard is written in ``_staging``, fsync'd and renamed into ``data/``; the
journal line written after it (with the shard's size and sha256) makes it count; ``manifest.json``
is written once every unit is journalled. Resume trusts a shard only while its bytes still hash to
the journalled sha256, so a truncated, zeroed or flipped shard is simply run again. Each rank
appends to its own journal, so processes sharing a directory never interleave writes to one file.

On an object store (``s3://``, ``gs://``, ...: no rename, no append, no fsync) the same protocol is
made of whole-object writes: the shard is one PUT of the finished file straight to ``data/``, the
journal record is a separate small object ``_journal/rank-NNNNN/shard-NNNNNN.json`` (after the
shard), the run record ``_journal/rank-NNNNN/run.json``, and the manifest the last object. Ranks
write disjoint units and their own journal prefixes, so they never write the same key; the
manifest is created conditionally (If-None-Match) so two ranks finishing together cannot both
write it. A half-uploaded object is never visible, so there is nothing to stage.

Shard names in a manifest or journal must be ``shard-NNNNNN.parquet`` and resolve inside the data
folder; anything else is a ``VerificationError``.

The package, by concept: ``layout`` (names, layouts, the fingerprint), ``manifest`` (entries, build,
checksum, damage), ``footer`` (a shard's header, the run header, the one shard validator),
``journal`` (a rank's commit records), ``files`` (``RunFiles``: where each file is, its reads and
writes) and ``lifecycle`` (``RunDirectory``: begin, committed and pending, seal, open sealed).
"""

from __future__ import annotations

from .files import SHARD_READERS, RunFiles
from .footer import (SCHEMA_KEYS, SETTINGS_HEADER_KEYS, SHARD_HEADER_KEYS, UNCHECKED_HEADER_KEYS, Footer, check_shard,
                     header_mismatch, manifest_run_header, read_footer, read_shard_header, run_header, settings_run_header,
                     shard_bytes_problem, validate_shard)
from .journal import JOURNAL_READERS, Journal
from .layout import (DATA_DIR, JOURNAL_DIR, MANIFEST_NAME, SHARD_PATTERN, STAGING_DIR, Layout, detect_layout,
                     refuse_out_inside_data, settings_fingerprint, shard_name, shard_unit)
from .lifecycle import Plan, RunDirectory, RunSpec
from .manifest import (MANIFEST_BODY_KEYS, MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY, REQUIRED_MANIFEST_KEYS,
                       SHARD_FIELDS, ShardEntry, build_manifest, manifest_checksum, manifest_damage, manifest_text,
                       shape_damage)

__all__ = [
    "MANIFEST_NAME", "DATA_DIR", "JOURNAL_DIR", "STAGING_DIR", "SHARD_PATTERN", "Layout", "shard_name", "shard_unit",
    "settings_fingerprint", "detect_layout", "refuse_out_inside_data",
    "MANIFEST_BODY_KEYS", "SHARD_FIELDS", "REQUIRED_MANIFEST_KEYS", "MANIFEST_CHECKSUM_KEY", "MANIFEST_INTEGRITY_KEY",
    "ShardEntry", "build_manifest", "manifest_checksum", "manifest_text", "manifest_damage", "shape_damage",
    "SHARD_HEADER_KEYS", "UNCHECKED_HEADER_KEYS", "SCHEMA_KEYS", "SETTINGS_HEADER_KEYS", "Footer", "read_footer",
    "read_shard_header", "run_header", "manifest_run_header", "settings_run_header", "header_mismatch",
    "shard_bytes_problem", "validate_shard", "check_shard",
    "JOURNAL_READERS", "Journal", "SHARD_READERS", "RunFiles", "RunSpec", "Plan", "RunDirectory",
]
