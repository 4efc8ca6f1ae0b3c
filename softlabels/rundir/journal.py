"""A rank's journal: the record of the shards it committed, read on resume and by ``seal``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..faults import kill_point
from ..storage import Location, append_line, atomic_write_text, writing
from .manifest import ShardEntry

__all__ = ["JOURNAL_READERS", "Journal"]

JOURNAL_READERS = 32
"""Concurrent reads of per-object journal records on an object store."""


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

