"""Sealing: ``manifest.json``, the commit record of a directory, built in one place.

``build_manifest`` turns a run's header, settings, corpus record and its shards' entries (in unit
order) into the manifest. ``generate`` calls it when the last unit commits, ``select`` for a
selection, and ``seal`` (``softlabels seal DIR``) for a multi-rank run whose ranks all committed
their units but which nobody sealed, for instance because the rank that would have sealed was killed
at the very end. ``seal`` runs no teacher; everything comes from the directory itself:

* the journals' run lines: the fingerprint and the settings (every journal must name the same run,
  and the settings must still hash to the fingerprint);
* the settings' corpus record and ``rows_per_shard``: how many units the run has, so a seal can
  never produce a manifest that is missing a unit;
* each unit's latest journal entry: the file's size and sha256 are checked against the bytes on disk
  (a full hash, about 1 s per GB), and its footer against the run (header fingerprint, rows, types);
* the shard headers: the teachers' specs, the input and label columns and the storage codec; the
  manifest takes the header of unit 0, as the sealing rank of ``generate`` would have written it.

A missing or damaged unit is a ``VerificationError`` (exit 2) naming every such unit, and no
manifest is written; rerunning the same ``generate`` command redoes exactly those units.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError, VerificationError
from .fidelity import Fidelity
from .manifest import MANIFEST_NAME, read_journals, read_manifest, shard_name, write_manifest
from .schema import decode_header
from .shards import check_shard

__all__ = ["MANIFEST_BODY_KEYS", "SealReport", "settings_fingerprint", "unit_count", "build_manifest", "seal"]

# Manifest keys that are not the run header (everything else in a manifest is a header field).
MANIFEST_BODY_KEYS = ("complete", "settings", "id_column", "corpus", "shards", "totals", "fidelity", "selection")
SHARD_FIELDS = ("file", "rows", "positions", "bytes", "sha256")
ENTRY_FIELDS = ("file", "rows", "positions", "bytes", "sha256", "soft_label_bytes")
SHOWN = 10


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """The run fingerprint: the first 16 hex digits of the sha256 of the settings as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def unit_count(settings: dict[str, Any]) -> int:
    """How many units a run has: each corpus file is cut into ``rows_per_shard``-row units."""
    step = int(settings["rows_per_shard"])
    return sum(-(-int(record["rows"]) // step) for record in settings["corpus"])


def build_manifest(
    header: dict[str, Any],
    settings: dict[str, Any],
    id_column: str | None,
    corpus: list[dict[str, Any]],
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """The manifest of a finished directory.

    Args:
        header: the run header every shard carries (without the shard's ``unit``).
        settings: the settings the fingerprint hashes.
        id_column: ``--id-column`` of the run.
        corpus: the corpus record ``[{path, rows, bytes}]``.
        entries: one journal-style entry per shard in unit order, with ``file``, ``rows``,
            ``positions``, ``bytes``, ``sha256`` and ``soft_label_bytes``; ``fidelity`` and
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
        manifest["fidelity"] = fidelity.summary()
    return manifest


@dataclass
class SealReport:
    """What ``seal`` did; ``render()`` is the line the CLI prints."""

    directory: str
    fingerprint: str
    shards: int
    rows: int
    positions: int
    bytes: int
    already_sealed: bool = False

    def render(self) -> str:
        if self.already_sealed:
            return (f"{self.directory}: already sealed (fingerprint {self.fingerprint}, {self.shards} shards, "
                    f"{self.rows:,} rows); nothing to do, 'softlabels verify' checks it")
        return (f"{self.directory}: sealed, {self.shards} shards, {self.rows:,} rows, {self.positions:,} positions, "
                f"{self.bytes:,} bytes (fingerprint {self.fingerprint})")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _shard_header(path: Path) -> dict[str, Any] | None:
    try:
        return decode_header(pq.read_schema(path).metadata)
    except (pa.ArrowInvalid, OSError, ValueError):
        return None


def _journalled_run(root: Path) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """The one run the journals record: (fingerprint, settings, latest entry per shard file)."""
    runs, entries = read_journals(root)
    if not runs:
        raise UserError(f"{root}: no journal-*.jsonl with a run record; not a directory written by 'softlabels generate'")
    fingerprints = sorted({str(run.get("fingerprint")) for run in runs})
    if len(fingerprints) > 1:
        raise VerificationError(f"{root}: the journals belong to different runs (fingerprints {', '.join(fingerprints)})")
    settings = runs[0].get("settings")
    if not isinstance(settings, dict) or any(run.get("settings") != settings for run in runs):
        raise VerificationError(f"{root}: the journals' run records disagree on the settings")
    if settings_fingerprint(settings) != fingerprints[0]:
        raise VerificationError(f"{root}: the journal's settings do not hash to its fingerprint {fingerprints[0]} (damaged journal)")
    return fingerprints[0], settings, entries


def _already_sealed(root: Path, fingerprint: str | None) -> SealReport | None:
    """A report when ``root`` holds a complete manifest (of the journals' run, when there are journals)."""
    if not (root / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(root)
    except VerificationError:
        return None  # unreadable: written again from the journals
    if manifest.get("complete") is not True:
        return None
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise VerificationError(
            f"{root}/{MANIFEST_NAME}: sealed for run {manifest.get('fingerprint')}, but the journals record run {fingerprint}"
        )
    totals = manifest.get("totals", {})
    return SealReport(str(root), str(manifest.get("fingerprint")), int(totals.get("shards", len(manifest.get("shards", [])))),
                      int(totals.get("rows", 0)), int(totals.get("positions", 0)), int(totals.get("bytes", 0)), already_sealed=True)


def seal(directory: str | os.PathLike[str]) -> SealReport:
    """Write the manifest of a directory whose units are all committed, from its journals and shards.

    Raises:
        UserError: ``directory`` does not exist or holds no journal.
        VerificationError: units missing or damaged (all named, no manifest written), journals of
            different runs, or a complete manifest of another run.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    has_journal = any(root.glob("journal-*.jsonl"))
    if not has_journal:  # a selection, or a directory sealed and then stripped of its journals
        done = _already_sealed(root, None)
        if done is not None:
            return done
    fingerprint, settings, journal = _journalled_run(root)
    done = _already_sealed(root, fingerprint)
    if done is not None:
        return done

    names = [shard_name(unit) for unit in range(unit_count(settings))]
    missing: list[str] = []
    present: list[tuple[str, Path, dict[str, Any]]] = []
    for name in names:
        entry = journal.get(name)
        path = root / name
        if entry is None or not path.is_file():
            missing.append(name)
        else:
            present.append((name, path, entry))
    # the reference for the schema check: any shard whose footer names this run
    reference: dict[str, Any] | None = None
    for _, path, _ in present:
        header = _shard_header(path)
        if header is not None and header.get("fingerprint") == fingerprint:
            reference = {**header, **{k: settings[k] for k in ("top_k", "vocab_size", "teachers")}}
            break
    damaged: list[str] = []
    headers: dict[str, dict[str, Any]] = {}
    for name, path, entry in present:
        if any(key not in entry for key in ENTRY_FIELDS):
            damaged.append(f"{name} [journal entry incomplete]")
            continue
        try:
            check_shard(path, entry, reference or {**settings, "fingerprint": fingerprint})
        except VerificationError as exc:
            reason = str(exc).removeprefix(f"{name}: ").replace("manifest", "journal")
            damaged.append(f"{name} [{reason}]")
            continue
        headers[name] = _shard_header(path) or {}
    if missing or damaged:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of {len(names)} units not committed ({_listed(missing)})")
        if damaged:
            problems.append(f"{len(damaged)} damaged ({_listed(damaged)})")
        raise VerificationError(
            f"{root}: cannot seal: {'; '.join(problems)}; rerun the same 'softlabels generate' command to redo them"
        )
    header = {k: v for k, v in headers[names[0]].items() if k != "unit"} if names else {}
    entries = [journal[name] for name in names]
    manifest = build_manifest(header, settings, settings.get("id_column"), settings["corpus"], entries)
    write_manifest(root, manifest)
    totals = manifest["totals"]
    return SealReport(str(root), fingerprint, totals["shards"], totals["rows"], totals["positions"], totals["bytes"])
