"""``RunDirectory``: a run's lifecycle over its files.

Writers: ``begin`` (check the directory holds this run or none, plan this rank's units: committed or
pending), then the engine commits the pending units through the plan's journal, then
``seal_if_complete``. Readers: ``open_sealed`` (or a partial run, when asked), ``sealed`` (the one
"is it sealed" check) and ``check_shards``. A missing or unfinished manifest is ``NotSealedError``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import NotSealedError, UserError, VerificationError
from ..lease import is_lease_name
from ..storage import Location
from ..targets import kind_of, soft_columns
from .files import RunFiles
from .footer import Footer, read_footer, read_shard_header, run_header, validate_shard
from .journal import Journal
from .layout import DATA_DIR, JOURNAL_DIR, MANIFEST_NAME, SHARD_PATTERN, STAGING_DIR, shard_name, shard_unit
from .manifest import ShardEntry, build_manifest

__all__ = ["RunSpec", "Plan", "RunDirectory"]


@dataclass(frozen=True)
class RunSpec:
    """What a writer knows of its run before any unit runs.

    Attributes:
        fingerprint: ``settings_fingerprint(settings)``.
        settings: what the fingerprint hashes (with ``corpus`` and ``id_column``).
        header: the run header every shard carries.
        units: how many units the run has (unit N writes shard N).
        flags: the flag a user changes each setting by, to name it when the directory holds another
            run's settings (a setting without one is named by its key).
    """

    fingerprint: str
    settings: dict[str, Any]
    header: dict[str, Any]
    units: int
    flags: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """What ``begin`` found for one rank.

    Attributes:
        mine: this rank's units (unit N belongs to rank N mod world).
        committed: the entries of its units whose shards still hash to their journal records.
        pending: its units to (re)write, in order.
        journal: this rank's journal, started.
        sealed: the manifest when the run was already complete and sealed: nothing to do.
    """

    spec: RunSpec
    rank: int
    world: int
    mine: list[int]
    committed: dict[int, ShardEntry]
    pending: list[int]
    journal: Journal
    sealed: dict[str, Any] | None = field(default=None)


def _difference(key: str, ours: Any, theirs: Any, flag: str) -> str:
    """One setting a directory records (``theirs``) otherwise than this run (``ours``), named by its flag."""
    if not isinstance(theirs, type(ours)) and ours is not None and theirs is not None:
        return f"{flag}: DIR records {theirs!r}, this run {ours!r}"
    if key == "teachers":
        return f"{flag}: the teachers differ (sha256 {[t['sha256'][:12] for t in theirs]} in DIR, {[t['sha256'][:12] for t in ours]} now)"
    if key == "corpus":
        return f"{flag}: the corpus files differ (DIR has {[c['path'] for c in theirs]} with {sum(c['rows'] for c in theirs)} rows)"
    return f"{flag}: DIR has {theirs!r}, this run {ours!r}"


@dataclass(frozen=True)
class RunDirectory(RunFiles):
    """A soft-label directory (``RunFiles``) and the lifecycle of the run in it."""

    # -- writing a run ------------------------------------------------------------------------
    def begin(self, spec: RunSpec, rank: int = 0, world: int = 1) -> Plan:
        """Begin (or resume) run ``spec`` on ``rank`` of ``world``: plan what is committed and what is pending.

        A damaged manifest is removed when this run's journals can rebuild it. The settings the
        manifest and every journal record must be the spec's. Then the folders are created, this
        rank's partial files discarded and its journal started. When nothing is pending and the directory is sealed with these settings, the plan
        carries the manifest (rewritten only if it differs); otherwise any manifest is removed while
        units are pending.

        Raises:
            UserError: a file in ``data/`` that is not this run's, or settings recorded that differ
                (naming each setting's flag).
            VerificationError: a damaged manifest and no journal to rebuild it from.
        """
        manifest = self._resume_manifest(spec.fingerprint, spec.units)
        recorded = manifest.get("settings", {}) if manifest is not None else None
        if recorded is not None:
            self._refuse_other_settings(spec, recorded)
        runs, journalled = self.read_journals() if self.root.is_dir() else ([], {})
        for run in runs:
            self._refuse_other_settings(spec, run.get("settings", {}))
        mine = [unit for unit in range(spec.units) if unit % world == rank]
        self.prepare_for_writing()
        self.discard_staged(mine)
        if rank == 0:  # a seal interrupted by a crash; ranks start together, long before anyone seals
            self.discard_stale_manifest_writes()
        journal = self.journal(rank)
        if not journal.exists():
            journal.start({"fingerprint": spec.fingerprint, "settings": spec.settings})
        committed = self._intact(journalled, mine, hash_bytes=True)
        pending = [unit for unit in mine if unit not in committed]
        plan = Plan(spec, rank, world, mine, committed, pending, journal)
        if not pending and self.has_manifest() and recorded == spec.settings:
            everything = self._all_journalled(spec.units)
            if everything is not None:
                plan.sealed = self._seal(spec, everything)
        if pending:
            self.remove_manifest()  # a damaged shard makes the directory unsealed until it is redone
        return plan

    def _refuse_other_settings(self, spec: RunSpec, recorded: dict[str, Any]) -> None:
        """Raise a ``UserError`` naming every setting ``recorded`` has otherwise than ``spec``."""
        settings = spec.settings
        differences = [_difference(k, settings.get(k), recorded.get(k), spec.flags.get(k, k))
                       for k in sorted(set(settings) | set(recorded)) if settings.get(k) != recorded.get(k)]
        if differences:
            raise UserError(f"--out {self.root} holds a run with different settings ({'; '.join(differences)}); "
                            "use another --out or delete it")

    def seal_if_complete(self, plan: Plan, entries: dict[int, ShardEntry]) -> dict[str, Any] | None:
        """After this rank's units are committed (``entries``, by unit): seal when every unit of the run
        is, and return the manifest; None while another rank's units are missing (the last rank to
        finish seals). A single rank knows every entry; with several, every rank's journal is read."""
        everything = entries if plan.world == 1 else self._all_journalled(plan.spec.units)
        return None if everything is None else self._seal(plan.spec, everything)

    def _intact(self, journalled: dict[str, ShardEntry], units: list[int], hash_bytes: bool) -> dict[int, ShardEntry]:
        """The journal entries of ``units`` whose shards still have their size (and sha256)."""
        sizes = self.data_dir.sizes()  # one listing, not a request per shard
        intact: dict[int, ShardEntry] = {}
        for unit in units:
            entry = journalled.get(shard_name(unit))
            if entry is not None and self.journalled_shard_intact(entry, hash_bytes=hash_bytes, sizes=sizes):
                intact[unit] = entry
        return intact

    def _all_journalled(self, units: int) -> dict[int, ShardEntry] | None:
        """Every unit's journal entry (any rank) whose file is in place, or None while some are missing."""
        everything = self._intact(self.read_journals()[1], list(range(units)), hash_bytes=False)
        return everything if len(everything) == units else None

    def _seal(self, spec: RunSpec, entries: dict[int, ShardEntry]) -> dict[str, Any]:
        """Write the manifest, unless the directory is already sealed with exactly this one (a no-op rerun)."""
        shards = [entries[unit] for unit in range(spec.units)]
        manifest = build_manifest(spec.header, spec.settings, spec.settings.get("id_column"), spec.settings["corpus"], shards)
        if self.sealed() != json.loads(json.dumps(manifest)):
            self.write_manifest(manifest)
        return manifest

    def start_over(self) -> None:
        """Prepare to write a run that has no journal (a selection) from the start: folders created,
        any manifest removed, partial files discarded."""
        self.prepare_for_writing()
        self.remove_manifest()
        if self.root.local:
            for name in self.staging_dir.listdir():
                if name.endswith(".tmp"):
                    (self.staging_dir / name).delete()

    # -- reading a run ------------------------------------------------------------------------
    def sealed(self, fingerprint: str | None = None, with_shards: bool = False) -> dict[str, Any] | None:
        """The one "is it sealed" check: the complete, well-formed manifest (of run ``fingerprint`` when
        given; with ``with_shards``, only while every shard it lists has its size), or None when there
        is none, it is unfinished or damaged, of another run, or a shard is missing."""
        if not self.has_manifest():
            return None
        try:
            manifest = self.read_sealed()
            if with_shards:
                sizes = self.data_dir.sizes()  # one listing, not a request per shard
                if not all(self.journalled_shard_intact(entry, hash_bytes=False, sizes=sizes) for entry in manifest["shards"]):
                    return None
        except VerificationError:
            return None
        return manifest if fingerprint is None or manifest.get("fingerprint") == fingerprint else None

    def open_sealed(self, allow_partial: bool = False, without_manifest: bool = False) -> dict[str, Any]:
        """The manifest a reader works from: a sealed one (``read_sealed``), with ``data/`` holding exactly
        the shards it lists; with ``allow_partial``, for an unfinished run, a partial one listing the
        journalled shards (``partial_manifest``); with ``without_manifest`` and no manifest at all, one
        rebuilt from the shards' headers (``manifest_from_shards``).

        Raises:
            NotSealedError: no manifest or an unfinished run, and neither allowance applies.
            VerificationError: a damaged manifest, a file in ``data/`` it does not list, or no journal
                for a partial read.
        """
        if without_manifest and not self.has_manifest():
            return self.manifest_from_shards()
        try:
            manifest = self.read_manifest()
        except VerificationError:
            if not allow_partial:
                raise
            manifest = {}
        if manifest.get("complete") is True:
            sealed = self.require_sealed(manifest)
            self.refuse_unlisted(sealed)  # data/ holds exactly the listed shards
            return sealed
        if not allow_partial:
            raise NotSealedError(f"{self.root}: the run is not complete (no sealed manifest); "
                                 "pass allow_partial=True to read committed shards")
        return self.partial_manifest()

    def partial_manifest(self) -> dict[str, Any]:
        """A manifest (``complete: False``) of an unfinished run: its journalled shards, in name order, and
        the run header of the first of them.

        Raises:
            VerificationError: no journal.
        """
        runs, journal = self.read_journals()
        if not runs:
            raise VerificationError(f"{self.root}: no manifest and no journal; not a soft-label directory")
        settings = runs[0]["settings"]
        entries = sorted(journal.values(), key=lambda e: e["file"])
        header = read_shard_header(self.shard_path(entries[0]["file"])) if entries else {}
        kind_settings = {key: settings[key] for key in kind_of(header or settings).manifest_keys if key in settings}
        return {**run_header(header or {}), "fingerprint": runs[0]["fingerprint"], **kind_settings,
                "vocab_size": settings["vocab_size"], "shards": entries, "complete": False}

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
            footer = read_footer(path)
            shard_header = footer.header
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
            entries.append({"file": path.name, "rows": footer.rows, "positions": positions, "bytes": path.size(), "sha256": None})
        totals = {"rows": sum(e["rows"] for e in entries), "positions": sum(e["positions"] for e in entries),
                  "bytes": sum(e["bytes"] for e in entries), "shards": len(entries)}
        return {**(header or {}), "complete": False, "from_shards": True, "shards": entries, "totals": totals}

    def check_shards(self, manifest: dict[str, Any], hash_bytes: bool = True, check_types: bool = True) -> Iterator[tuple[ShardEntry, Location, Footer]]:
        """``validate_shard`` of every shard the manifest lists, in its order, with one listing of the data
        folder (concurrent on an object store): (entry, path, footer) of each.

        Raises:
            VerificationError: the first shard that fails, named.
        """
        sizes = self.data_dir.sizes()  # one listing, not a request per shard
        entries = manifest["shards"]

        def check(entry: ShardEntry) -> tuple[ShardEntry, Location, Footer]:
            path = self.shard_path(entry.get("file"))
            return entry, path, validate_shard(path, entry, manifest, hash_bytes, sizes, check_types)

        yield from self.map_shards(check, entries)

    # -- what is in the directory ----------------------------------------------------------
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
                    if JOURNAL_DIR in names or self.parse_manifest()[1] is None:
                        continue  # a damaged manifest of a run: begin rebuilds or names it
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

    def _resume_manifest(self, fingerprint: str, units: int) -> dict[str, Any] | None:
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
            index = shard_unit(name) if header is not None else -1
            if header is None or header.get("fingerprint") != fingerprint or header.get("unit") != index or index >= units:
                raise UserError(
                    f"--out {self.root} holds {DATA_DIR}/{name}, which is no shard of this run's units and no journal lists; "
                    f"every reader of {self.data_dir} would read it: move it out of the data folder"
                )
        return manifest
