"""``softlabels select``: a new sealed directory holding the rows of a sealed one that meet a condition.

Data selection without re-running the teacher, as in the million-hour setup: keep the utterances the
teacher is confident about (``confidence > 0.6``) or the ones an ensemble agrees on
(``agreement >= 1``). ``--where`` is a SQL boolean expression over the shard columns, parsed by
Polars (``pl.sql_expr``).

1. The source must be sealed, and every shard it lists is checked (size, sha256, header, rows,
   types) before anything is read: nothing corrupt is selected from silently.
2. The condition is evaluated over one lazy scan of all the source shards, reading only the columns
   it names. Aggregates therefore keep their SQL meaning over the whole directory
   (``confidence > avg(confidence)`` compares with the mean of every row, not of one shard), and a
   row-wise condition streams. NULL counts as false, as in a SQL WHERE. The mask costs one byte per
   source row; the rows themselves are read one shard at a time.
3. Source ``shard-N`` with kept rows becomes ``shard-N`` of the output: its kept rows with the same
   Arrow schema and values, so shard N still comes from unit N of the corpus. A shard left with no
   rows is not written, and a condition that keeps nothing gives a sealed directory with no shards.
   Shards are written by ``shards.write_shard`` (``.tmp``, fsync, rename). There is no journal:
   a selection is cheap to redo, and an interrupted one is redone from the start by the same command.
4. ``manifest.json`` is written last, by the same ``rundir.build_manifest`` that seals ``generate``.

Fingerprint and provenance: the settings are the source's plus ``selections``, a list that grows by
``{source_fingerprint, where}`` with each selection (a selection of a selection keeps the chain);
the fingerprint hashes those settings as ``generate`` does. The same selection of the same source
therefore always has the same fingerprint, so running it again finds it complete, and ``generate
--out`` pointed at a selection refuses (the settings differ) instead of overwriting it. The header of
every shard carries the new fingerprint and ``selections``; the manifest also has ``selection``:
the source directory, its fingerprint, the condition and the source's totals.

Fidelity: the manifest's ``fidelity`` (captured top-k mass and KL(full || stored) per position, or
the distinct ids and drawn mass of sampled targets) needs the full teacher distribution, which a
selection does not have, so a selection has no ``fidelity``; the source's summary is kept as
``selection.source_fidelity`` and described as such. ``inspect`` still reports the captured (or
drawn) mass of the selected rows, computed from the stored log-probabilities.
``totals.skipped_nonfinite`` is 0: the selection skipped no rows for non-finite teacher outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .codec import LogprobCodec
from .errors import UserError
from .claim import claim_output
from .lease import lease_scope
from .rundir import RunDirectory, ShardEntry, build_manifest, manifest_run_header, run_header, settings_fingerprint, shard_unit
from .schema import FORMAT, HEADER_KEY, decode_header, encode_header
from .targets import soft_columns
from .shards import write_shard
from .storage import Location

__all__ = ["SelectSummary", "select"]

_POLARS_ERRORS: tuple[type[BaseException], ...] = (pl.exceptions.PolarsError, ValueError, TypeError)
if hasattr(pl.exceptions, "PanicException"):  # a Rust panic inside Polars is not an Exception subclass
    _POLARS_ERRORS += (pl.exceptions.PanicException,)


@dataclass
class SelectSummary:
    """What a selection kept; ``render()`` is the line the CLI prints."""

    source: str
    out: str
    where: str
    fingerprint: str
    source_rows: int
    rows: int
    positions: int
    shards: int
    bytes: int
    already_complete: bool = False

    def render(self) -> str:
        share = self.rows / self.source_rows if self.source_rows else 0.0
        state = "already complete, nothing to do; " if self.already_complete else ""
        return (
            f"{self.out}: {state}kept {self.rows:,} of {self.source_rows:,} rows ({share:.1%}) of {self.source} "
            f"where {self.where}; {self.positions:,} positions in {self.shards} shards, {self.bytes:,} bytes "
            f"(fingerprint {self.fingerprint})"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _mask(files: list[Location], where: str, rows: int) -> np.ndarray:
    """One bool per source row (all shards in manifest order): does it meet ``where``?"""
    flag = f"--where {where!r}"
    if not where.strip():
        raise UserError("--where is empty; give a condition such as 'confidence > 0.6'")
    try:
        condition = pl.sql_expr(where)
        names = condition.meta.root_names()
    except _POLARS_ERRORS as exc:
        raise UserError(f"{flag}: not a SQL expression ({_first_line(exc)})") from None
    if not files:
        return np.zeros(0, dtype=bool)
    scan = pl.scan_parquet([str(f) for f in files], hive_partitioning=False)  # "k=v" in a path is not a column
    columns = scan.collect_schema().names()
    unknown = [name for name in dict.fromkeys(names) if name not in columns]
    if unknown:
        raise UserError(f"{flag}: unknown column {', '.join(map(repr, unknown))}; the shards have {', '.join(columns)}")
    try:
        result = scan.select(condition.alias("keep")).collect(engine="streaming").get_column("keep")
    except _POLARS_ERRORS as exc:
        raise UserError(f"{flag}: cannot be evaluated ({_first_line(exc)})") from None
    if result.dtype not in (pl.Boolean, pl.Null):
        raise UserError(f"{flag} is not a condition: it gives {result.dtype} values, not true/false")
    if result.len() == 1 and rows != 1:  # a constant or a pure aggregate holds for every row or none
        result = pl.repeat(result[0], rows, eager=True, dtype=pl.Boolean)
    if result.len() != rows:
        raise UserError(f"{flag} gives {result.len()} values for {rows} rows; it must give one per row")
    return result.cast(pl.Boolean).fill_null(False).to_numpy().astype(bool, copy=False)


def _selection_settings(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    settings = dict(manifest.get("settings") or {})
    step = {"source_fingerprint": manifest["fingerprint"], "where": where}
    settings["selections"] = [*settings.get("selections", []), step]
    return settings


def _done(out: RunDirectory, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of this selection when ``out`` already holds it sealed, with its shards in place."""
    return out.sealed(fingerprint, with_shards=True) if out.root.is_dir() else None


def _stored_as(table: pa.Table, source: LogprobCodec, target: LogprobCodec) -> pa.Table:
    """A v1 shard's rows with the log-prob column named and described as format v2 stores it."""
    if source.column == target.column:
        return table
    index = table.schema.get_field_index(source.column)
    field = pa.field(target.column, table.schema.field(index).type, metadata=target.field_metadata())
    return table.set_column(index, field, table.column(index))


@lease_scope
def select(directory: str | os.PathLike[str], where: str, out: str | os.PathLike[str]) -> SelectSummary:
    """Write the rows of the sealed ``directory`` that meet ``where`` to a new sealed directory ``out``.

    Raises:
        UserError: no such directory, a bad ``--where`` (syntax, unknown column, not a condition),
            or an ``--out`` that holds something else.
        VerificationError: the source is not sealed, or one of its shards is damaged.
    """
    source = RunDirectory.open(directory)
    manifest = source.open_sealed()  # sealed, and data/ holds exactly the shards it lists
    settings = _selection_settings(manifest, where)
    fingerprint = settings_fingerprint(settings)
    claim_output(out, "softlabels select", lambda place: RunDirectory.for_output(place).foreign_file(fingerprint),
                 [(source.root, "the source directory")])  # new, empty, or this selection's; one writer until select ends
    target = RunDirectory.for_output(out)
    done = _done(target, fingerprint)
    if done is None:
        files = [path for _, path, _ in source.check_shards(manifest)]  # every shard checked before any is read
        mask = _mask(files, where, sum(int(entry["rows"]) for entry in manifest["shards"]))
        target.start_over()  # an interrupted run of this selection: redone whole
        result = _write_selection(source, manifest, files, mask, target, settings, where)
        target.write_manifest(result)
    totals = (done or result)["totals"]
    return SelectSummary(str(source.root), str(target.root), where, fingerprint, int(manifest["totals"]["rows"]), totals["rows"],
                         totals["positions"], totals["shards"], totals["bytes"], already_complete=done is not None)


def _write_selection(source: RunDirectory, manifest: dict[str, Any], files: list[Location], mask: np.ndarray,
                     target: RunDirectory, settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Write each source shard's kept rows as the same shard of ``target``; returns the manifest to seal."""
    header = manifest_run_header(manifest)
    header.update(fingerprint=settings_fingerprint(settings), selections=settings["selections"], format=FORMAT)
    codecs = LogprobCodec.from_header(manifest), LogprobCodec.from_header(header)
    entries: list[ShardEntry] = []
    start = 0
    for path, entry in zip(files, manifest["shards"]):
        keep = mask[start : start + int(entry["rows"])]
        start += int(entry["rows"])
        if keep.any():
            entries.append(_write_kept(path, keep, manifest, header, codecs, target))
    result = build_manifest(header, settings, manifest.get("id_column"), manifest.get("corpus", []), entries)
    result["selection"] = {
        "source": source.root.name,
        "source_fingerprint": manifest["fingerprint"],
        "where": where,
        "source_totals": manifest["totals"],
        "source_fidelity": manifest.get("fidelity"),
        "note": "fidelity needs the full teacher distribution; source_fidelity describes every row of the source, not this selection",
    }
    return result


def _write_kept(path: Location, keep: np.ndarray, manifest: dict[str, Any], header: dict[str, Any],
                codecs: tuple[LogprobCodec, LogprobCodec], target: RunDirectory) -> ShardEntry:
    """Shard N of the selection: the kept rows of the source's shard N, with the selection's header."""
    unit = shard_unit(path.name)
    with path.open() as handle:
        kept = _stored_as(pq.read_table(handle).filter(pa.array(keep)), *codecs)
    positions = int(pc.sum(pc.list_value_length(kept.column(soft_columns(manifest)[0]))).as_py() or 0)
    shard_header = {**run_header(decode_header(kept.schema.metadata) or {}), **header, "unit": unit,
                    "rows": kept.num_rows, "positions": positions}
    kept = kept.replace_schema_metadata({HEADER_KEY: encode_header(shard_header)})
    size, digest, soft_bytes = write_shard(kept, target, unit, positions)
    return {"file": target.unit_shard_path(unit).name, "unit": unit, "rows": kept.num_rows, "positions": positions,
            "bytes": size, "sha256": digest, "soft_label_bytes": soft_bytes}
