"""``softlabels verify``: is a directory a complete, uncorrupted soft-label dataset (v1 or v2)?

Checks, in order: the manifest is there, complete and of this format; every shard name is
``shard-NNNNNN.parquet`` inside the directory; each shard's size, sha256, Parquet footer, header
fingerprint, row count and soft-label column types match; and the totals add up. Hashing dominates:
about 1 s per GB read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import VerificationError
from .rundir import RunDirectory, check_shard

__all__ = ["VerifyReport", "verify"]


@dataclass
class VerifyReport:
    directory: str
    shards: int
    rows: int
    positions: int
    bytes: int
    stray_files: list[str]

    def render(self) -> str:
        stray = f"; ignoring {len(self.stray_files)} stray shard file(s) not in the manifest" if self.stray_files else ""
        return f"{self.directory}: OK, {self.shards} shards, {self.rows:,} rows, {self.positions:,} positions, {self.bytes:,} bytes{stray}"


def verify(directory: str | Path) -> VerifyReport:
    """Verify a soft-label directory.

    Raises:
        UserError: ``directory`` does not exist.
        VerificationError: the first problem found, naming the bad file.
    """
    run_directory = RunDirectory.open(directory)
    root = run_directory.root
    manifest = run_directory.read_sealed()
    rows = positions = size = 0
    listed = set()
    for entry in manifest["shards"]:
        path = run_directory.shard_path(entry.get("file"))
        check_shard(path, entry, manifest)
        listed.add(path.name)
        rows += entry["rows"]
        positions += entry["positions"]
        size += entry["bytes"]
    totals = manifest["totals"]
    if (rows, positions, size) != (totals.get("rows"), totals.get("positions"), totals.get("bytes")):
        raise VerificationError(f"{root}/manifest.json: totals do not match the sum of its shards")
    stray = sorted(p.name for p in run_directory.shard_files() if p.name not in listed)  # names only: one listing
    return VerifyReport(str(root), len(listed), rows, positions, size, stray)
