"""``softlabels seal DIR``: write the manifest of a directory whose units are all committed.

The manifest itself is built by ``rundir.build_manifest``, as ``generate`` and ``select`` build it.
``seal`` is for a multi-rank run whose ranks all committed their units but which nobody sealed,
for instance because the rank that would have sealed was killed at the very end. ``seal`` runs no teacher; everything comes from the directory itself:

* the journals' run lines: the fingerprint and the settings (every journal must name the same run,
  and the settings must still hash to the fingerprint);
* the settings' corpus record and ``rows_per_shard``: how many units the run has, so a seal can
  never produce a manifest that is missing a unit;
* each unit's latest journal entry: the file's size and sha256 are checked against the bytes on disk
  (a full hash, about 1 s per GB), and its footer against the run (header fingerprint, rows, types);
* the shard headers: the teachers' specs, the input and label columns and the storage codec; the
  manifest takes the header of unit 0, as the sealing rank of ``generate`` would have written it.

A damaged ``manifest.json`` (checksum, parse, shape) is rebuilt this way too, after every unit checks
out. A missing or damaged unit is a ``VerificationError`` (exit 2) naming every such unit, and no
manifest is written; rerunning the same ``generate`` command redoes exactly those units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import UserError, VerificationError
from .lease import lease_scope, take_lease
from .rundir import RunDirectory, build_manifest, check_shard, read_shard_header, run_header, settings_fingerprint, shard_name
from .storage import Location
from .targets import kind_of

__all__ = ["SealReport", "unit_count", "seal"]

ENTRY_FIELDS = ("file", "rows", "positions", "bytes", "sha256", "soft_label_bytes")
SHOWN = 10


def unit_count(settings: dict[str, Any]) -> int:
    """How many units a run has: each corpus file is cut into ``rows_per_shard``-row units."""
    step = int(settings["rows_per_shard"])
    return sum(-(-int(record["rows"]) // step) for record in settings["corpus"])


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
    rebuilt: bool = False

    def render(self) -> str:
        if self.already_sealed:
            return (f"{self.directory}: already sealed (fingerprint {self.fingerprint}, {self.shards} shards, "
                    f"{self.rows:,} rows); nothing to do, 'softlabels verify' checks it")
        state = "sealed (the damaged manifest.json rebuilt from the journals)" if self.rebuilt else "sealed"
        return (f"{self.directory}: {state}, {self.shards} shards, {self.rows:,} rows, {self.positions:,} positions, "
                f"{self.bytes:,} bytes (fingerprint {self.fingerprint})")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _journalled_run(directory: RunDirectory) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """The one run the journals record: (fingerprint, settings, latest entry per shard file)."""
    root = directory.root
    runs, entries = directory.read_journals()
    if not runs:
        raise UserError(f"{root}: no journal with a run record; not a directory written by 'softlabels generate'")
    fingerprints = sorted({str(run.get("fingerprint")) for run in runs})
    if len(fingerprints) > 1:
        raise VerificationError(f"{root}: the journals belong to different runs (fingerprints {', '.join(fingerprints)})")
    settings = runs[0].get("settings")
    if not isinstance(settings, dict) or any(run.get("settings") != settings for run in runs):
        raise VerificationError(f"{root}: the journals' run records disagree on the settings")
    if settings_fingerprint(settings) != fingerprints[0]:
        raise VerificationError(f"{root}: the journal's settings do not hash to its fingerprint {fingerprints[0]} (damaged journal)")
    return fingerprints[0], settings, entries


def _already_sealed(directory: RunDirectory, fingerprint: str | None) -> SealReport | None:
    """A report when the directory holds a complete manifest (of the journals' run, when there are journals)."""
    root = directory.root
    manifest = directory.sealed()
    if manifest is None:
        return None  # none, unfinished or damaged: written again from the journals
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise VerificationError(
            f"{directory.manifest_path}: sealed for run {manifest.get('fingerprint')}, but the journals record run {fingerprint}"
        )
    totals = manifest.get("totals", {})
    return SealReport(str(root), str(manifest.get("fingerprint")), int(totals.get("shards", len(manifest.get("shards", [])))),
                      int(totals.get("rows", 0)), int(totals.get("positions", 0)), int(totals.get("bytes", 0)), already_sealed=True)


@lease_scope
def seal(directory: str | os.PathLike[str]) -> SealReport:
    """Write the manifest of a directory whose units are all committed, from its journals and shards.

    Raises:
        UserError: ``directory`` does not exist or holds no journal.
        VerificationError: units missing or damaged (all named, no manifest written), journals of
            different runs, or a complete manifest of another run.
    """
    run_directory = RunDirectory.open(directory)
    root = run_directory.root
    take_lease(root, "softlabels seal", flag=None)  # one writer per directory, until seal ends
    run_directory.discard_stale_manifest_writes()  # of a seal killed before its rename
    if not run_directory.journal_paths():  # a selection, or a directory sealed and then stripped of its journals
        done = _already_sealed(run_directory, None)
        if done is not None:
            return done
        if run_directory.has_manifest():
            raise VerificationError(f"{run_directory.manifest_path}: damaged or not complete, and {root} has no journal to seal it from; "
                                    "rerun the 'softlabels generate' or 'softlabels select' command that wrote it")
    fingerprint, settings, journal = _journalled_run(run_directory)
    done = _already_sealed(run_directory, fingerprint)
    if done is not None:
        return done
    rebuilt = run_directory.has_manifest()  # damaged or unfinished: replaced once every unit checks out
    names = [shard_name(unit) for unit in range(unit_count(settings))]
    first_header = _check_units(run_directory, names, fingerprint, settings, journal)
    header = run_header(first_header) if names else {}
    entries = [journal[name] for name in names]
    manifest = build_manifest(header, settings, settings.get("id_column"), settings["corpus"], entries)
    run_directory.refuse_unlisted(manifest)  # never seal a data folder that holds more than the dataset
    run_directory.write_manifest(manifest)
    totals = manifest["totals"]
    return SealReport(str(root), fingerprint, totals["shards"], totals["rows"], totals["positions"], totals["bytes"], rebuilt=rebuilt)


def _reference(present: list[tuple[str, Location, dict[str, Any]]], fingerprint: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What the shards are checked against: the header of any shard whose footer names this run, with
    the settings' kind fields, vocabulary and teachers (the settings alone when no footer does)."""
    for _, path, _ in present:
        header = read_shard_header(path)
        if header is not None and header.get("fingerprint") == fingerprint:
            return {**header, **{k: settings[k] for k in (*kind_of(header).manifest_keys, "vocab_size", "teachers")}}
    return {**settings, "fingerprint": fingerprint}


def _check_units(run_directory: RunDirectory, names: list[str], fingerprint: str, settings: dict[str, Any],
                 journal: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The header of unit 0's shard, once every unit's journalled shard checks out against the run
    (size, sha256, footer; concurrent on an object store).

    Raises:
        VerificationError: naming every unit not committed and every one damaged.
    """
    sizes = run_directory.data_dir.sizes()  # one listing, not a request per shard
    missing: list[str] = []
    present: list[tuple[str, Location, dict[str, Any]]] = []
    for name in names:
        entry = journal.get(name)
        if entry is None or name not in sizes:
            missing.append(name)
        else:
            present.append((name, run_directory.shard_path(name), entry))
    expected = _reference(present, fingerprint, settings)

    def check(item: tuple[str, Location, dict[str, Any]]) -> tuple[str | None, dict[str, Any]]:
        """(what is wrong with the unit or None, its shard's header)."""
        name, path, entry = item
        if any(key not in entry for key in ENTRY_FIELDS):
            return f"{name} [journal entry incomplete]", {}
        try:
            return None, check_shard(path, entry, expected, sizes=sizes)
        except VerificationError as exc:
            reason = str(exc).removeprefix(f"{name}: ").replace("manifest", "journal")
            return f"{name} [{reason}]", {}

    damaged: list[str] = []
    first_header: dict[str, Any] = {}  # the manifest takes unit 0's header
    for (name, _, _), (problem, header) in zip(present, run_directory.map_shards(check, present)):  # concurrent on an object store
        if problem is not None:
            damaged.append(problem)
        elif name == names[0]:
            first_header = header
    if missing or damaged:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of {len(names)} units not committed ({_listed(missing)})")
        if damaged:
            problems.append(f"{len(damaged)} damaged ({_listed(damaged)})")
        raise VerificationError(
            f"{run_directory.root}: cannot seal: {'; '.join(problems)}; rerun the same 'softlabels generate' command to redo them"
        )
    return first_header
