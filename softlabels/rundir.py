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
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .codec import LogprobCodec
from .errors import NotSealedError, UserError, VerificationError
from .fidelity import Fidelity
from .faults import kill_point
from .lease import is_lease_name
from .schema import FORMAT, FORMAT_V1, READABLE_FORMATS, decode_header, shard_schema
from .targets import kind_of, soft_columns
from .storage import Location, append_line, atomic_write_text, commit_file, store_failure, writing

__all__ = [
    "MANIFEST_NAME",
    "DATA_DIR",
    "JOURNAL_DIR",
    "STAGING_DIR",
    "SHARD_PATTERN",
    "MANIFEST_BODY_KEYS",
    "ShardEntry",
    "shard_name",
    "settings_fingerprint",
    "build_manifest",
    "check_shard",
    "MANIFEST_CHECKSUM_KEY",
    "MANIFEST_INTEGRITY_KEY",
    "manifest_checksum",
    "manifest_text",
    "header_mismatch",
    "refuse_out_inside_data",
    "Journal",
    "RunDirectory",
]

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
JOURNAL_DIR = "_journal"
STAGING_DIR = "_staging"
SHARD_PATTERN = re.compile(r"shard-\d{6,}\.parquet")
JOURNAL_READERS = 32
"""Concurrent reads of per-object journal records on an object store."""
SHARD_READERS = 32
"""Concurrent per-shard checks (footer reads, hashes) on an object store, where each waits on the network."""
# Manifest keys that are not the run header (everything else in a manifest is a header field).
MANIFEST_BODY_KEYS = ("complete", "settings", "id_column", "corpus", "shards", "totals", "fidelity", "selection")
SHARD_FIELDS = ("file", "rows", "positions", "bytes", "sha256")
REQUIRED_MANIFEST_KEYS = ("fingerprint", "vocab_size", "teachers", "shards", "totals")
"""What every sealed manifest must hold; its target kind adds its ``manifest_keys`` (``top_k``; ``samples`` ...)."""
MANIFEST_CHECKSUM_KEY = "manifest_sha256"
"""The manifest's checksum of its own body: ``manifest_checksum``."""
MANIFEST_INTEGRITY_KEY = "manifest_integrity"
MANIFEST_INTEGRITY = "manifest_sha256 is the sha256 of the sorted, compact JSON of every other key"
"""Written beside the checksum by every writer of this release. A manifest with neither key is one of an
earlier release (read as it was); one with either must carry a matching checksum, so no single edit
(the checksum key renamed or deleted included) turns the check off."""
UNCHECKED_HEADER_KEYS = ("softlabels_version",)
"""Run-header keys a manifest need not share with every shard: a resumed run mixes releases' shards."""
SCHEMA_KEYS = ("format", "logprob_dtype", "logprob_scale", "targets")
"""Header keys besides V, the teachers and the target kind's ``manifest_keys`` that set a shard's column types."""


class ShardEntry(TypedDict, total=False):
    """One committed shard, as journalled (all keys) and as listed in a manifest (the first five)."""

    file: str
    rows: int
    positions: int
    bytes: int
    sha256: str | None
    unit: int
    soft_label_bytes: int
    fidelity: dict[str, Any]
    skipped_nonfinite: int


def shard_name(unit: int) -> str:
    """Unit N always writes ``shard-NNNNNN.parquet``."""
    return f"shard-{unit:06d}.parquet"


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """The run fingerprint: the first 16 hex digits of the sha256 of the settings as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_manifest(
    header: dict[str, Any],
    settings: dict[str, Any],
    id_column: str | None,
    corpus: list[dict[str, Any]],
    entries: list[ShardEntry],
) -> dict[str, Any]:
    """The manifest of a finished directory.

    Args:
        header: the run header every shard carries (without the shard's ``unit``).
        settings: the settings the fingerprint hashes.
        id_column: ``--id-column`` of the run.
        corpus: the corpus record ``[{path, rows, bytes}]``.
        entries: one journal-style entry per shard in unit order; ``fidelity`` and
            ``skipped_nonfinite`` where the teacher ran. The manifest has a ``fidelity`` summary
            only when every entry has one (a selection cannot recompute it).
    """
    totals = {
        "rows": sum(e["rows"] for e in entries),
        "positions": sum(e["positions"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries),
        "soft_label_bytes": sum(e["soft_label_bytes"] for e in entries),
        "shards": len(entries),
        "skipped_nonfinite": sum(e.get("skipped_nonfinite", 0) for e in entries),
    }
    manifest: dict[str, Any] = {
        **header,
        "complete": True,
        "settings": settings,
        "id_column": id_column,
        "corpus": corpus,
        "shards": [{k: e[k] for k in SHARD_FIELDS} for e in entries],
        "totals": totals,
    }
    if entries and all("fidelity" in e for e in entries):
        fidelity = Fidelity()
        for entry in entries:
            fidelity.merge(Fidelity.from_json(entry["fidelity"]))
        manifest["fidelity"] = kind_of(header).fidelity_summary(fidelity)
    return manifest


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """The sha256 of the manifest's body (every key but ``manifest_sha256``) as sorted, compact JSON."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_text(manifest: dict[str, Any]) -> str:
    """The text of ``manifest.json``: the body with its integrity note and checksum added."""
    body = {k: v for k, v in manifest.items() if k not in (MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY)}
    body[MANIFEST_INTEGRITY_KEY] = MANIFEST_INTEGRITY
    body[MANIFEST_CHECKSUM_KEY] = manifest_checksum(body)
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def _manifest_damage(manifest: dict[str, Any]) -> str | None:
    """What makes a parsed manifest untrustworthy (checksum, entry shapes), or None."""
    if MANIFEST_CHECKSUM_KEY in manifest or MANIFEST_INTEGRITY_KEY in manifest:
        recorded = manifest.get(MANIFEST_CHECKSUM_KEY)
        if not isinstance(recorded, str):
            return f"no {MANIFEST_CHECKSUM_KEY}, which every manifest with {MANIFEST_INTEGRITY_KEY} carries"
        if recorded != manifest_checksum(manifest):
            return "its checksum does not match its contents"
    settings = manifest.get("settings")
    if "settings" in manifest and (not isinstance(settings, dict) or settings_fingerprint(settings) != manifest.get("fingerprint")):
        return "its settings do not hash to its fingerprint"
    for key in ("corpus", "id_column"):
        if isinstance(settings, dict) and key in manifest and key in settings and manifest[key] != settings[key]:
            return f"its {key} differs from the settings' {key}"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shape_damage(manifest: dict[str, Any]) -> str | None:
    """What a sealed manifest's readers would trip over (a shard entry or total missing or mistyped), or None."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "'shards' is not a list"
    files: set[str] = set()
    for index, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shards[{index}] is not an object"
        for key in SHARD_FIELDS:
            if key not in entry:
                return f"shards[{index}] has no {key!r}"
        if not isinstance(entry["file"], str) or not SHARD_PATTERN.fullmatch(entry["file"]):
            return f"names an invalid shard file {entry['file']!r}"
        if entry["file"] in files:
            return f"lists {entry['file']} twice"
        files.add(entry["file"])
        if not all(_is_count(entry[key]) for key in ("rows", "positions", "bytes")):
            return f"shards[{index}]: rows, positions and bytes must be counts"
        if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"shards[{index}]: sha256 is not 64 hex digits"
    totals = manifest.get("totals")
    if not isinstance(totals, dict) or not all(_is_count(totals.get(key)) for key in ("rows", "positions", "bytes", "shards")):
        return "'totals' lacks counts of rows, positions, bytes and shards"
    if totals["shards"] != len(shards):
        return f"totals.shards is {totals['shards']}, but it lists {len(shards)} shards"
    for key in ("rows", "positions", "bytes"):
        if totals[key] != sum(entry[key] for entry in shards):
            return f"totals.{key} is not the sum of its shards' {key}"
    try:
        LogprobCodec.from_header(manifest)
    except (ValueError, TypeError) as exc:
        return f"its log-prob storage is unreadable ({exc})"
    if not _is_count(manifest.get("vocab_size")) or not manifest["vocab_size"]:
        return "'vocab_size' is not a positive count"
    teachers = manifest.get("teachers")
    if not isinstance(teachers, list) or not teachers or not all(isinstance(t, dict) and isinstance(t.get("sha256"), str) for t in teachers):
        return "'teachers' is not a list of {name, sha256}"
    try:
        counted = kind_of(manifest).size_key
    except UserError as exc:
        return str(exc)
    if counted is not None and (not _is_count(manifest.get(counted)) or not manifest[counted]):
        return f"{counted!r} is not a positive count"
    return None


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


def refuse_out_inside_data(out: "str | os.PathLike[str] | Location", flag: str = "--out") -> None:
    """Refuse an output inside a run's ``data/`` (a folder named ``data`` beside a manifest or journal):
    anything written there breaks the dataset for every reader of ``DIR/data``.

    Raises:
        UserError: naming the run directory.
    """
    location = Location.of(out)
    if location.local:
        parts = Path(os.path.realpath(location.path)).parts
        candidates = [Location.of(Path(*parts[:i])) for i in range(2, len(parts) + 1) if parts[i - 1] == DATA_DIR]
    else:
        text = location.uri.rstrip("/")
        scheme, _, rest = text.partition("://")
        pieces = rest.split("/")
        candidates = [Location.of(f"{scheme}://{'/'.join(pieces[:i])}") for i in range(2, len(pieces) + 1) if pieces[i - 1] == DATA_DIR]
    for folder in candidates:
        parent = Location.of(os.path.dirname(folder.path)) if folder.local else Location.of(folder.uri.rsplit("/", 1)[0])
        names = parent.listdir()
        if MANIFEST_NAME in names or JOURNAL_DIR in names:
            raise UserError(f"{flag} {location} is inside {folder}, the data folder of the soft-label run {parent}; "
                            f"choose an {flag} outside it (only that run's shards may live in {DATA_DIR}/)")


SHARD_HEADER_KEYS = ("unit", "rows", "positions")
"""Header keys that describe one shard, not the run: dropped when a shard header becomes a run header."""


def run_header(shard_header: dict[str, Any]) -> dict[str, Any]:
    """The run header within a shard's header."""
    return {k: v for k, v in shard_header.items() if k not in SHARD_HEADER_KEYS}


def read_shard_header(path: Location) -> dict[str, Any] | None:
    """The run header in a shard's footer, or None when the file is unreadable or has none."""
    try:
        with path.open() as handle:
            return decode_header(pq.read_schema(handle).metadata)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        failure = store_failure(exc, path)  # the store failing says nothing about the file
        if failure is not None:
            raise failure from None
        return None


__all__ += ["SHARD_HEADER_KEYS", "run_header", "read_shard_header"]


@functools.lru_cache(maxsize=16)
def _expected_fields(vocab_size: int, teachers: int, schema_fields: str) -> tuple[tuple[str, pa.DataType], ...]:
    """The soft-label columns a run's shards must have: built once per run, not once per shard."""
    header = json.loads(schema_fields)
    soft_fields = kind_of(header).fields(vocab_size, header, LogprobCodec.from_header(header))
    schema = shard_schema(pa.schema([]), soft_fields, teachers, header)
    return tuple((field.name, field.type) for field in schema)


def check_shard(path: Location, entry: ShardEntry, manifest: dict[str, Any], hash_bytes: bool = True,
                sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Check one committed shard against its manifest (or journal) entry.

    Args:
        hash_bytes: compare the sha256 too (about 1 s per GB); False checks sizes and footers only.
        sizes: a listing of the data folder (name -> bytes, ``Location.sizes``), so a directory of many
            shards costs one listing rather than a request per shard; None asks the store per shard.

    Returns:
        The shard's own header (its footer is read once).

    Raises:
        VerificationError: naming the shard, for a missing file, wrong size or sha256, an unreadable
            file, a header from another run, a row count that differs or a soft-label column missing
            or of the wrong type.
    """
    name = path.name
    size = sizes.get(name) if sizes is not None else (path.size() if path.is_file() else None)
    if size is None:
        raise VerificationError(f"{name}: missing")
    if size != entry.get("bytes"):
        raise VerificationError(f"{name}: {size} bytes on disk, manifest says {entry.get('bytes')} (truncated or replaced)")
    if hash_bytes and entry.get("sha256") is not None and path.sha256() != entry.get("sha256"):
        raise VerificationError(f"{name}: sha256 differs from the manifest (corrupt)")
    try:
        with path.open() as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            rows = parquet.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise store_failure(exc, path) or VerificationError(f"{name}: not a readable Parquet file ({exc})") from None
    header = decode_header(schema.metadata)
    if header is None or header.get("fingerprint") != manifest.get("fingerprint"):
        raise VerificationError(f"{name}: header belongs to another run (fingerprint differs)")
    if rows != entry.get("rows"):
        raise VerificationError(f"{name}: {rows} rows, manifest says {entry.get('rows')}")
    mismatch = header_mismatch(header, manifest)
    if isinstance(header.get("positions"), int) and header["positions"] != entry.get("positions"):
        mismatch = f"positions: shard has {header['positions']}, manifest has {entry.get('positions')!r}"
    if mismatch is not None:
        raise VerificationError(f"{name}: its header and the manifest differ on {mismatch}")
    schema_keys = SCHEMA_KEYS + kind_of(manifest).manifest_keys
    schema_fields = {key: manifest[key] for key in schema_keys if key in manifest}
    expected = _expected_fields(manifest["vocab_size"], len(manifest["teachers"]), json.dumps(schema_fields, sort_keys=True))
    for field_name, field_type in expected:
        if schema.get_field_index(field_name) < 0 or schema.field(field_name).type != field_type:
            raise VerificationError(f"{name}: column {field_name!r} missing or of the wrong type")
    return header


def _parse_record(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None  # a line torn by a crash mid-append: that shard simply runs again
    return record if isinstance(record, dict) else None


class Journal:
    """One rank's record of committed shards: a run record, then one record per shard.

    Local disk: one append-only file, ``_journal/rank-NNNNN.jsonl`` (``journal-NNNNN.jsonl`` in v1),
    a line per record, fsync'd. Object store: a prefix ``_journal/rank-NNNNN/`` holding ``run.json``
    and one small object per shard, written whole.
    """

    def __init__(self, location: Location) -> None:
        self.location = location

    @property
    def per_object(self) -> bool:
        return not self.location.local

    @property
    def path(self) -> Path:
        """The journal file (local disk)."""
        return self.location.local_path

    def exists(self) -> bool:
        """Does the journal hold a readable run record? One torn by a crash counts as none, so the
        journal starts afresh (its shard records were unusable without it) instead of never again."""
        if self.per_object:
            run = self.location / "run.json"
            return run.is_file() and (_parse_record(run.read_text()) or {}).get("kind") == "run"
        if not self.location.is_file():
            return False
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        return (_parse_record(first) or {}).get("kind") == "run"

    def start(self, run: dict[str, Any]) -> None:
        """Begin a fresh journal whose first record names the run's fingerprint and settings."""
        text = json.dumps({"kind": "run", **run}, sort_keys=True) + "\n"
        if self.per_object:
            (self.location / "run.json").write_bytes(text.encode())
            return
        with writing(self.path.parent, action="create directory"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for stale in self.path.parent.glob(f"{self.path.name}.*.tmp"):  # this rank's start killed before its rename
                stale.unlink(missing_ok=True)
        atomic_write_text(self.path, text)

    def append(self, entry: ShardEntry) -> None:
        """One shard record, fsync'd; on local disk a torn last line is cut off first (``append_line``)."""
        line = json.dumps({"kind": "shard", **entry}, sort_keys=True)
        if self.per_object:
            (self.location / f"{entry['file'].removesuffix('.parquet')}.json").write_bytes((line + "\n").encode())
        else:
            append_line(self.path, line)
        kill_point("journal-appended")

    def read(self) -> tuple[dict[str, Any] | None, list[ShardEntry]]:
        """The run record and the shard records (a shard record without a run record is ignored)."""
        if self.per_object:
            names = self.location.listdir()
            if "run.json" not in names:
                return None, []
            run = _parse_record((self.location / "run.json").read_text())
            shard_names = [n for n in names if n.startswith("shard-") and n.endswith(".json")]
            with ThreadPoolExecutor(max_workers=JOURNAL_READERS) as pool:
                records = list(pool.map(lambda n: _parse_record((self.location / n).read_text()), shard_names))
            return run, [r for r in records if r is not None and r.get("kind") == "shard"]  # type: ignore[misc]
        run: dict[str, Any] | None = None
        shards: list[ShardEntry] = []
        with open(self.path, encoding="utf-8") as handle:
            lines = [line for line in handle if line.strip()]
        try:
            # One document: its records share their key strings (about a third less memory for 10^5
            # shards) and it parses in half the time. A line torn by a crash breaks it, and then
            # every line is parsed on its own, the torn one dropped.
            records: list[Any] = json.loads("[" + ",".join(lines) + "]")
        except json.JSONDecodeError:
            records = []
        if len(records) != len(lines):
            records = [_parse_record(line) for line in lines]
        for record in records:
            if not isinstance(record, dict):
                continue
            if record.get("kind") == "run":
                run = record
            elif record.get("kind") == "shard" and run is not None:
                shards.append(record)  # type: ignore[arg-type]
        return run, shards


Layout = Literal["v1", "v2"]
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class RunDirectory:
    """A soft-label directory on local disk or in an object store, layout v2 (written) or v1 (read only).

    Attributes:
        root: the directory (DIR), a local path or a store URI.
        layout: ``"v2"`` (shards under ``data/``) or ``"v1"`` (shards beside the manifest).
    """

    root: Location
    layout: Layout = "v2"

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: "str | os.PathLike[str] | Location") -> "RunDirectory":
        """An existing directory, its layout read from the manifest or, failing that, its contents.

        Raises:
            UserError: ``directory`` does not exist or is not a directory.
        """
        root = Location.of(directory)
        if not root.is_dir():
            root.require_bucket()  # a missing bucket says so
            raise UserError(f"{root}: no such directory")
        return cls(root, cls._detect(root))

    @classmethod
    def for_output(cls, directory: "str | os.PathLike[str] | Location", flag: str = "--out") -> "RunDirectory":
        """The v2 directory a command writes to (it need not exist yet).

        Raises:
            UserError: it exists and is not a directory, it holds a v1 dataset, or it lies inside a
                run's ``data/``; its store's bucket is missing or the store cannot be reached.
        """
        root = Location.of(directory)
        root.require_bucket(flag)  # a missing bucket is refused before any work, not at the first write
        refuse_out_inside_data(root, flag)
        if root.is_file():
            raise UserError(f"{flag} {root} exists and is not a directory")
        if root.is_dir() and cls._detect(root) == "v1":
            raise UserError(
                f"{flag} {root} holds a {FORMAT_V1} dataset (shards beside manifest.json); this release writes {FORMAT} "
                f"with the shards under data/: use a new {flag} (every command still reads {root})"
            )
        return cls(root, "v2")

    @staticmethod
    def _detect(root: Location) -> Layout:
        names = root.listdir()
        if MANIFEST_NAME in names:
            try:
                recorded = json.loads((root / MANIFEST_NAME).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                recorded = None
            if isinstance(recorded, dict) and recorded.get("format") == FORMAT_V1:
                return "v1"
            if isinstance(recorded, dict) and recorded.get("format") == FORMAT:
                return "v2"
        if DATA_DIR in names or JOURNAL_DIR in names:
            return "v2"
        if any(re.fullmatch(r"journal-\d+\.jsonl", name) for name in names):
            return "v1"
        return "v2"

    def foreign_file(self, fingerprint: str | None = None) -> str | None:
        """The first file in the directory that softlabels did not write (relative to the root), or None.

        softlabels writes only ``manifest.json`` (and its temporary names), the lease (``lease.LEASE_NAMES``), ``data/shard-NNNNNN.parquet``
        carrying a softlabels header (of run ``fingerprint`` when given), ``_journal/`` records and
        ``_staging/*.tmp``. Journalled shards are recognised by name; only the others are opened.
        """
        root = self.root
        names = root.listdir()
        if not names:
            return None
        journalled = set(self.read_journals()[1]) if JOURNAL_DIR in names else set()
        for name in names:
            if name == MANIFEST_NAME:
                try:
                    manifest = self.read_manifest()
                except VerificationError:
                    if JOURNAL_DIR in names or self._parse_manifest()[1] is None:
                        continue  # a damaged manifest of a run: resume_manifest rebuilds or names it
                    return name
                if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
                    return name
            elif name.startswith(MANIFEST_NAME) and name.endswith(".tmp") or is_lease_name(name):
                continue  # a seal's temporary manifest, or the lease of a writer (this one's included)
            elif name == DATA_DIR and (root / name).is_dir():
                for shard_name_ in (root / name).listdir():
                    shard = root / name / shard_name_
                    if not SHARD_PATTERN.fullmatch(shard_name_) or not shard.is_file():
                        return f"{DATA_DIR}/{shard_name_}"
                    if shard_name_ in journalled and fingerprint is None:
                        continue
                    header = read_shard_header(shard)
                    if header is None or (fingerprint is not None and header.get("fingerprint") != fingerprint):
                        return f"{DATA_DIR}/{shard_name_}"
            elif name == JOURNAL_DIR and (root / name).is_dir():
                strays = [n for n in (root / name).listdir() if not re.fullmatch(r"rank-\d{5,}(\.jsonl(\.\d+\.tmp)?)?", n)]
                if strays:
                    return f"{JOURNAL_DIR}/{strays[0]}"
            elif name == STAGING_DIR and (root / name).is_dir():
                strays = [n for n in (root / name).listdir() if not n.endswith(".tmp")]
                if strays:
                    return f"{STAGING_DIR}/{strays[0]}"
            else:
                return name
        return None

    def refuse_foreign(self, flag: str = "--out", fingerprint: str | None = None) -> None:
        """Raise unless every file in the directory is one softlabels writes.

        Raises:
            UserError: naming the first foreign file; nothing of the user's is ever overwritten.
        """
        foreign = self.foreign_file(fingerprint)
        if foreign is not None:
            raise UserError(
                f"{flag} {self.root} holds {foreign}, which softlabels did not write; "
                f"give an empty or new {flag} (softlabels never overwrites files it did not write)"
            )

    # -- names --------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Location:
        """The folder of the shards: ``DIR/data`` (v2) or DIR itself (v1)."""
        return self.root / DATA_DIR if self.layout == "v2" else self.root

    @property
    def manifest_path(self) -> Location:
        return self.root / MANIFEST_NAME

    @property
    def staging_dir(self) -> Location:
        return self.root / STAGING_DIR if self.layout == "v2" else self.root

    def shard_path(self, name: object) -> Location:
        """The location of a shard named in a manifest or journal, refusing anything that could escape.

        Raises:
            VerificationError: the name is not ``shard-NNNNNN.parquet`` (no folders, no ``..``), or on
                local disk it resolves outside the data folder (a link).
        """
        if not isinstance(name, str) or not SHARD_PATTERN.fullmatch(name):
            raise VerificationError(f"{self.root}: manifest names an invalid shard file {name!r}")
        path = self.data_dir / name
        # The name has no folder in it, so only a link can take it elsewhere: one lstat per shard,
        # and the full resolution of both paths only for a link.
        if path.local and os.path.islink(path.path) and Path(path.path).resolve().parent != Path(self.data_dir.path).resolve():
            raise VerificationError(f"{self.root}: shard {name!r} resolves outside the directory (a link?)")
        return path

    def unit_shard_path(self, unit: int) -> Location:
        return self.data_dir / shard_name(unit)

    def staging_path(self, unit: int) -> Path:
        """Where unit N's shard is written (local disk) before it is renamed into place."""
        return self.staging_dir.local_path / (shard_name(unit) + ".tmp")

    def shard_files(self) -> list[Location]:
        """Every ``shard-NNNNNN.parquet`` in the data folder, in name order."""
        return [self.data_dir / name for name in self.data_dir.listdir() if SHARD_PATTERN.fullmatch(name)]

    def map_shards(self, check: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        """``check`` of each item, in order: one after another on local disk; on an object store,
        ``SHARD_READERS`` at a time (a footer read is a round trip or two, so 10^5 shards one by one
        would take many minutes). An exception comes out where its item's result would have.
        """
        if self.root.local:
            yield from map(check, items)
            return
        with ThreadPoolExecutor(max_workers=SHARD_READERS, thread_name_prefix="softlabels-shards") as pool:
            window: deque[Future[_R]] = deque()
            try:
                for item in items:
                    window.append(pool.submit(check, item))
                    if len(window) >= 4 * SHARD_READERS:  # a bounded window, not a future per shard at once
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()
            finally:
                for future in window:
                    future.cancel()

    # -- journals -----------------------------------------------------------------------------
    def journal(self, rank: int) -> Journal:
        if self.layout == "v1":
            return Journal(self.root / f"journal-{rank:05d}.jsonl")
        if self.root.local:
            return Journal(self.root / JOURNAL_DIR / f"rank-{rank:05d}.jsonl")
        return Journal(self.root / JOURNAL_DIR / f"rank-{rank:05d}")

    def journals(self) -> list[Journal]:
        if self.layout == "v1":
            return [Journal(self.root / n) for n in self.root.listdir() if re.fullmatch(r"journal-\d+\.jsonl", n)]
        folder = self.root / JOURNAL_DIR
        pattern = r"rank-\d+\.jsonl" if self.root.local else r"rank-\d+"
        return [Journal(folder / n) for n in folder.listdir() if re.fullmatch(pattern, n)]

    def journal_paths(self) -> list[Location]:
        return [journal.location for journal in self.journals()]

    def read_journals(self) -> tuple[list[dict[str, Any]], dict[str, ShardEntry]]:
        """Every rank's run record and the latest journalled entry per shard file name."""
        runs: list[dict[str, Any]] = []
        shards: dict[str, ShardEntry] = {}
        for journal in self.journals():
            run, entries = journal.read()
            if run is not None:
                runs.append(run)
            for entry in entries:
                shards[str(entry.get("file"))] = entry
        return runs, shards

    # -- shards -------------------------------------------------------------------------------
    def prepare_for_writing(self) -> None:
        """Create the folders a writer needs (local disk; an object store has none to create)."""
        if self.root.local:
            self.data_dir.mkdir()
            self.staging_dir.mkdir()

    def commit_staged(self, unit: int) -> tuple[int, str]:
        """Move unit N's whole staged shard into the data folder (local disk); returns its (bytes, sha256)."""
        return commit_file(self.staging_path(unit), self.unit_shard_path(unit).local_path)

    def commit_bytes(self, unit: int, data: bytes) -> tuple[int, str]:
        """Write unit N's finished shard as one whole object (object store); returns its (bytes, sha256)."""
        self.unit_shard_path(unit).write_bytes(data)
        return len(data), hashlib.sha256(data).hexdigest()

    def discard_staged(self, units: list[int]) -> None:
        """Remove partial files of these units only: other ranks may be writing theirs right now."""
        if not self.root.local:
            return  # an object store never shows a partial object
        staging = self.staging_dir.local_path
        present = set(os.listdir(staging)) if staging.is_dir() else set()  # one listing, not an unlink per unit
        for unit in units:
            if shard_name(unit) + ".tmp" in present:
                self.staging_path(unit).unlink(missing_ok=True)

    def journalled_shard_intact(self, entry: ShardEntry, hash_bytes: bool = True, sizes: dict[str, int] | None = None) -> bool:
        """Does the journalled shard still have its size (and sha256)? ``sizes`` is a listing of the data folder."""
        path = self.shard_path(entry.get("file"))
        size = sizes.get(path.name) if sizes is not None else (path.size() if path.is_file() else None)
        if size is None or size != entry.get("bytes"):
            return False
        return not hash_bytes or path.sha256() == entry.get("sha256")

    # -- the manifest -------------------------------------------------------------------------
    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        """The parsed manifest, its checksum checked and its integrity keys removed.

        Raises:
            VerificationError: missing, unparsable, of no format this release reads, or damaged (a
                checksum that does not match, settings that do not hash to the fingerprint).
        """
        path = self.manifest_path
        if not path.is_file():
            raise NotSealedError(f"{self.root}: no {MANIFEST_NAME}; not a sealed soft-label directory")
        manifest, problem = self._parse_manifest()
        if problem is not None:
            raise VerificationError(f"{path}: {problem}")
        damage = _manifest_damage(manifest)
        if damage is not None:
            raise VerificationError(f"{path}: damaged or edited ({damage}); {self._rebuild_advice()}")
        return {k: v for k, v in manifest.items() if k not in (MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY)}

    def _parse_manifest(self) -> tuple[dict[str, Any], str | None]:
        """(the manifest as parsed, None) or ({}, what makes it unreadable)."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {}, f"unreadable manifest ({exc}); {self._rebuild_advice()}"
        except RecursionError:
            return {}, f"unreadable manifest (nested too deep); {self._rebuild_advice()}"
        if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
            return {}, f"format is not one of {', '.join(READABLE_FORMATS)}"
        return manifest, None

    def _rebuild_advice(self) -> str:
        return (f"rebuild it from the journals with 'softlabels seal {self.root}' (or rerun the 'softlabels generate' or "
                "'softlabels select' command that wrote it)")

    def read_sealed(self) -> dict[str, Any]:
        """The manifest, which must be complete and hold the fields readers rely on, of the right types.

        Raises:
            VerificationError: no manifest, a damaged one, an unfinished run, or a field missing or mistyped.
        """
        manifest = self.read_manifest()
        if manifest.get("complete") is not True:
            raise NotSealedError(f"{self.root}: manifest is not complete (the run has not finished)")
        required = REQUIRED_MANIFEST_KEYS + kind_of(manifest).manifest_keys
        for key in required:
            if key not in manifest:
                raise VerificationError(f"{self.manifest_path}: missing {key!r}")
        problem = _shape_damage(manifest)
        if problem is not None:
            raise VerificationError(f"{self.manifest_path}: {problem}; {self._rebuild_advice()}")
        return manifest

    def unlisted_data_files(self, manifest: dict[str, Any]) -> list[str]:
        """Names in the data folder that the manifest does not list (v1: ``*.parquet`` beside it)."""
        listed = {entry.get("file") for entry in manifest.get("shards", []) if isinstance(entry, dict)}
        names = self.data_dir.listdir()
        if self.layout == "v1":
            names = [name for name in names if name.endswith(".parquet")]
        return [name for name in names if name not in listed]

    def refuse_unlisted(self, manifest: dict[str, Any]) -> None:
        """``data/`` holds exactly the dataset: refuse anything in it the manifest does not list.

        Raises:
            VerificationError: naming the first such file (and how many there are).
        """
        unlisted = self.unlisted_data_files(manifest)
        if unlisted:
            more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
            raise VerificationError(
                f"{self.data_dir / unlisted[0]}: not listed in {MANIFEST_NAME}{more}; every reader of {self.data_dir} would read it: "
                f"move it out of the data folder"
            )

    def resume_manifest(self, fingerprint: str, units: int) -> dict[str, Any] | None:
        """For ``generate`` resuming run ``fingerprint`` of ``units`` units: the manifest to compare
        settings with (None when there is none, or when it is damaged and this run's journals will
        rebuild it: it is then removed, and a line on stderr says so). Also refuses any file in the
        data folder that is neither journalled, nor listed in the manifest, nor this run's own shard
        of one of its units (a unit committed but not yet journalled, which is redone).

        Raises:
            VerificationError: a damaged manifest with no journal of any run to rebuild it from.
            UserError: naming a file in the data folder that is not this run's.
        """
        manifest: dict[str, Any] | None = None
        if self.has_manifest():
            try:
                manifest = self.read_manifest()
            except VerificationError as exc:
                runs, _ = self.read_journals()
                if not runs:
                    raise VerificationError(f"{exc}; there is no journal to rebuild it from: restore it, or use a new --out") from None
                if any(run.get("fingerprint") == fingerprint for run in runs):
                    self.remove_manifest()
                    print(f"{self.manifest_path}: damaged; rebuilding it from this run's journals after re-checking every shard",
                          file=sys.stderr)
        known = set(self.read_journals()[1])
        if manifest is not None and manifest.get("fingerprint") == fingerprint:
            known |= {entry.get("file") for entry in manifest.get("shards", []) if isinstance(entry, dict)}
        for name in self.data_dir.listdir():
            if name in known:
                continue
            path = self.data_dir / name
            header = read_shard_header(path) if SHARD_PATTERN.fullmatch(name) and path.is_file() else None
            index = int(name[len("shard-"):-len(".parquet")]) if header is not None else -1
            if header is None or header.get("fingerprint") != fingerprint or header.get("unit") != index or index >= units:
                raise UserError(
                    f"--out {self.root} holds {DATA_DIR}/{name}, which is no shard of this run's units and no journal lists; "
                    f"every reader of {self.data_dir} would read it: move it out of the data folder"
                )
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Seal: the manifest with its checksum, written last (an empty ``_staging/`` is removed with it)."""
        text = manifest_text(manifest)
        if self.root.local:
            atomic_write_text(self.manifest_path.local_path, text)
            if self.layout == "v2" and self.staging_dir.is_dir() and not self.staging_dir.listdir():
                os.rmdir(self.staging_dir.path)
        elif not self.manifest_path.write_bytes(text.encode(), exclusive=True):
            # another rank sealed first; the same units give the same manifest, so check and keep theirs
            if self.read_manifest().get("fingerprint") != manifest.get("fingerprint"):
                raise VerificationError(f"{self.manifest_path}: sealed by a run with another fingerprint")

    def remove_manifest(self) -> None:
        """Unseal: a unit is being redone, so the directory is not complete until it is."""
        self.manifest_path.delete()

    def discard_stale_manifest_writes(self) -> None:
        """Temporary manifest files of a seal interrupted by a crash (local disk)."""
        if not self.root.local:
            return
        for name in self.root.listdir():
            if name.startswith(MANIFEST_NAME) and name.endswith(".tmp"):
                (self.root / name).delete()

    def manifest_from_shards(self) -> dict[str, Any]:
        """A manifest rebuilt from the shards' own headers, for a directory whose manifest is gone.

        Every ``shard-NNNNNN.parquet`` in the data folder must carry a header of one run. The entries
        have no sha256 (nothing to compare against), so reads check sizes, footers and page CRCs only.

        Raises:
            VerificationError: no shards, a shard without a readable header, or headers of several runs.
        """
        files = self.shard_files()
        if not files:
            raise VerificationError(f"{self.root}: no manifest and no shard-NNNNNN.parquet files in {self.data_dir}")
        header: dict[str, Any] | None = None
        entries: list[ShardEntry] = []
        for path in files:
            try:
                with path.open() as handle:
                    metadata = pq.read_metadata(handle)
                shard_header = decode_header(metadata.schema.to_arrow_schema().metadata)
            except (pa.ArrowInvalid, OSError, ValueError) as exc:
                raise store_failure(exc, path) or VerificationError(f"{path.name}: not a readable Parquet file ({exc})") from None
            if shard_header is None:
                raise VerificationError(f"{path.name}: no softlabels header in its footer")
            if header is None:
                header = run_header(shard_header)
            elif shard_header.get("fingerprint") != header.get("fingerprint"):
                raise VerificationError(
                    f"{path.name}: header of run {shard_header.get('fingerprint')}, but {files[0].name} is of run {header.get('fingerprint')}"
                )
            positions = shard_header.get("positions")
            if not isinstance(positions, int):  # shards of the first release: count the stored positions
                with path.open() as handle:
                    ids = pq.read_table(handle, columns=[soft_columns(header)[0]]).column(0)
                positions = int(pc.sum(pc.list_value_length(ids)).as_py() or 0)
            entries.append({"file": path.name, "rows": metadata.num_rows, "positions": positions,
                            "bytes": path.size(), "sha256": None})
        totals = {"rows": sum(e["rows"] for e in entries), "positions": sum(e["positions"] for e in entries),
                  "bytes": sum(e["bytes"] for e in entries), "shards": len(entries)}
        return {**(header or {}), "complete": False, "from_shards": True, "shards": entries, "totals": totals}
