"""``softlabels verify``: is a directory a complete, uncorrupted soft-label dataset (v1 or v2)?

Checks, in order: the manifest is there, complete and of this format; every shard name is
``shard-NNNNNN.parquet`` inside the directory; each shard's size, sha256, Parquet footer, header
fingerprint, row count and soft-label column types match; and the totals add up. Hashing dominates:
about 1 s per GB read.

``--quick`` skips the hashing: sizes come from one listing of the data folder and each shard's
footer (header, rows, column types) is read, so it costs a request per shard rather than a read of
every byte. It catches a missing, truncated, replaced or foreign shard; a flipped byte inside a data
page is left to the full verify (or to the page checksums every read checks).

Both check the manifest itself first: its checksum of its own body (any edit fails), its entries'
shapes, that the data folder holds nothing it does not list, and each shard's run header against the
manifest's fields (fingerprint, format, top_k or samples, vocab_size, teachers, codec, columns, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import VerificationError
from .rundir import RunDirectory

__all__ = ["VerifyReport", "verify"]


@dataclass
class VerifyReport:
    directory: str
    shards: int
    rows: int
    positions: int
    bytes: int
    stray_files: list[str]

    quick: bool = False

    def render(self) -> str:
        stray = f"; ignoring {len(self.stray_files)} stray shard file(s) not in the manifest" if self.stray_files else ""
        quick = " (quick: sizes and footers, sha256 not checked)" if self.quick else ""
        return (f"{self.directory}: OK{quick}, {self.shards} shards, {self.rows:,} rows, {self.positions:,} positions, "
                f"{self.bytes:,} bytes{stray}")


def verify(directory: str | Path, quick: bool = False) -> VerifyReport:
    """Verify a soft-label directory.

    Args:
        quick: sizes (one listing of the data folder) and footers only, no hashing.

    Raises:
        UserError: ``directory`` does not exist.
        VerificationError: the first problem found, naming the bad file.
    """
    run_directory = RunDirectory.open(directory)
    root = run_directory.root
    manifest = run_directory.open_sealed()  # data/ holds exactly the dataset
    rows = positions = size = 0
    listed = set()
    for entry, path, _ in run_directory.check_shards(manifest, hash_bytes=not quick):  # concurrent on an object store
        listed.add(path.name)
        rows += entry["rows"]
        positions += entry["positions"]
        size += entry["bytes"]
    totals = manifest["totals"]
    if (rows, positions, size) != (totals.get("rows"), totals.get("positions"), totals.get("bytes")):
        raise VerificationError(f"{root}/manifest.json: totals do not match the sum of its shards")
    return VerifyReport(str(root), len(listed), rows, positions, size, [], quick)
