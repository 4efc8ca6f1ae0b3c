"""Reading an unlabeled corpus as deterministic units of rows, streaming.

A corpus is Parquet files (given as files, directories or globs) and JSONL files. Work is cut into
units: a contiguous row range of one file, ``rows_per_shard`` rows long, numbered in file order, so a
rerun cuts the same units and unit N always writes shard N. Only one unit's rows are ever in memory:
Parquet units read just the row groups they overlap, and JSONL units seek to a byte offset recorded
while counting lines (every ``rows_per_shard``-th line, so the index costs 8 bytes per unit, not per
row). The only whole-corpus pass is the duplicate-id check, which reads the id column alone.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .errors import UserError
from .schema import ID_COLUMN
from .storage import Location, is_uri, store_failure

__all__ = ["CorpusFile", "Unit", "Corpus", "auto_rows_per_shard", "discover_files", "open_corpus"]

CORPUS_SUFFIXES = (".parquet", ".jsonl")
JSONL_SCHEMA_SAMPLE_BYTES = 1 << 20
SHARD_TARGET_POSITIONS = 1 << 21
"""Positions an automatic unit aims at: about 100 MB of shard at k=20 (48 bytes per position)."""
UNIT_INPUT_BYTES = 256 << 20
"""Most input bytes an automatic unit holds in memory (images, long frames)."""
MIN_AUTO_ROWS, MAX_AUTO_ROWS = 64, 1 << 16
SIZE_SAMPLE_ROWS = 1024


@dataclass
class CorpusFile:
    """One corpus file: where it is, how it is named in sample ids, and its row count."""

    path: Location
    relpath: str
    rows: int
    size: int
    schema: pa.Schema
    # JSONL only: byte offset of rows 0, rows_per_shard, 2*rows_per_shard, ..., and the file end.
    unit_offsets: list[int] = field(default_factory=list)
    # JSONL only: the schema JSON is parsed with (lists where ``schema`` has fixed-size vectors).
    parse_schema: pa.Schema | None = None

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix == ".jsonl"


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of corpus file ``file_index``; unit ``index`` writes shard ``index``."""

    index: int
    file_index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def discover_files(arguments: list[str]) -> list[Location]:
    """Expand CORPUS arguments (files, directories, globs; local or store URIs) into a sorted,
    de-duplicated file list."""
    found: list[Location] = []
    for argument in arguments:
        place = Location.of(argument)
        if glob.has_magic(argument) and not place.exists():
            matches = _glob(argument)
            if not matches:
                raise UserError(f"corpus glob {argument} matches no files")
        elif place.is_file():
            matches = [place]
        elif place.is_dir():
            matches = [p for p in place.walk() if p.suffix in CORPUS_SUFFIXES]
            if not matches:
                raise UserError(f"corpus directory {argument} holds no .parquet or .jsonl files")
        else:
            raise UserError(f"corpus file {argument} does not exist")
        for match in matches:
            if match.suffix not in CORPUS_SUFFIXES:
                raise UserError(f"corpus file {match} is neither .parquet nor .jsonl")
        found.extend(matches)
    unique: dict[str, Location] = {}
    for place in found:
        unique.setdefault(str(Path(place.path).resolve()) if place.local else place.uri, place)
    return list(unique.values())


def _glob(pattern: str) -> list[Location]:
    """Files matching a glob: the local filesystem's, or a listing of the store prefix before the first wildcard."""
    if not is_uri(pattern):
        return [Location.of(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
    magic = min(i for i, c in enumerate(pattern) if c in "*?[")
    prefix = pattern[:magic].rsplit("/", 1)[0]
    return [p for p in Location.of(prefix).walk() if fnmatch.fnmatchcase(p.uri, pattern)]


def _relative_names(paths: list[Location]) -> list[str]:
    """Names relative to the files' common folder, so sample ids survive moving the corpus (to a store too)."""
    if all(p.local for p in paths):
        resolved = [Path(p.path).resolve() for p in paths]
        base = Path(os.path.commonpath([p.parent for p in resolved]))
        return [p.relative_to(base).as_posix() for p in resolved]
    keys = [p.uri.split("://", 1)[-1] for p in paths]
    base = posixpath.commonpath([posixpath.dirname(k) for k in keys])
    return [posixpath.relpath(k, base) for k in keys]


def _lines(handle: Any) -> Iterator[bytes]:
    """The lines of a binary file (local or remote), each with its newline."""
    rest = b""
    while block := handle.read(1 << 22):
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def _scan_jsonl(path: Location, rows_per_shard: int) -> tuple[int, list[int]]:
    """Count non-blank lines, recording the byte offset at which every unit starts."""
    rows = 0
    offsets: list[int] = []
    position = 0
    with path.open() as handle:
        for line in _lines(handle):
            if line.strip():
                if rows % rows_per_shard == 0:
                    offsets.append(position)
                rows += 1
            position += len(line)
    offsets.append(position)
    return rows, offsets


def _jsonl_head(path: Location) -> bytes:
    """The whole lines within the first MiB of a JSONL file (all of it when it is shorter)."""
    sample = path.read_head(JSONL_SCHEMA_SAMPLE_BYTES)
    cut = sample.rfind(b"\n")
    return sample[: cut + 1] if cut >= 0 and len(sample) == JSONL_SCHEMA_SAMPLE_BYTES else sample


def _jsonl_schema(path: Location) -> tuple[pa.Schema, pa.Schema]:
    """(the schema JSON is parsed with, the corpus schema) from the first MiB of a JSONL file.

    JSON has no fixed-size arrays, so a column of float arrays that all have the same length in
    that sample is a vector (``fixed_size_list``: ``model(x)``), as in Parquet; arrays of integers
    stay sequences of tokens (``model(x, lengths)``).
    """
    try:
        table = pajson.read_json(io.BytesIO(_jsonl_head(path)))
    except pa.ArrowInvalid as exc:
        raise UserError(f"corpus file {path}: not valid JSONL ({exc})") from None
    fields = []
    for parsed in table.schema:
        column = table.column(parsed.name)
        if pa.types.is_list(parsed.type) and pa.types.is_floating(parsed.type.value_type) and column.null_count == 0 and len(column):
            widths = pc.list_value_length(column)
            low, high = pc.min(widths).as_py(), pc.max(widths).as_py()
            if low == high and low > 0:
                fields.append(pa.field(parsed.name, pa.list_(parsed.type.value_type, low)))
                continue
        fields.append(parsed)
    return table.schema, pa.schema(fields)


class Corpus:
    """The corpus files, the units they are cut into, and a reader for one unit's rows."""

    def __init__(
        self,
        files: list[CorpusFile],
        rows_per_shard: int,
        columns: list[str],
        id_column: str | None,
    ) -> None:
        self.files = files
        self.rows_per_shard = rows_per_shard
        self.columns = columns
        self.id_column = id_column
        self.units: list[Unit] = []
        for file_index, corpus_file in enumerate(files):
            for start in range(0, corpus_file.rows, rows_per_shard):
                stop = min(start + rows_per_shard, corpus_file.rows)
                self.units.append(Unit(len(self.units), file_index, start, stop))

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def passthrough_schema(self) -> pa.Schema:
        """Schema of the corpus columns copied into shards (the same in every file)."""
        schema = self.files[0].schema
        return pa.schema([schema.field(name) for name in self.columns])

    def read_unit(self, unit: Unit) -> pa.Table:
        """``sample_id`` then the passthrough columns for the unit's rows."""
        corpus_file = self.files[unit.file_index]
        wanted = list(dict.fromkeys(self.columns + ([self.id_column] if self.id_column else [])))
        if corpus_file.is_jsonl:
            table = self._read_jsonl_unit(corpus_file, unit, wanted)
        else:
            table = _read_parquet_rows(corpus_file.path, unit.start, unit.stop, wanted)
        if table.num_rows != unit.rows:
            raise UserError(f"corpus file {corpus_file.path} changed while reading (rows {unit.start}-{unit.stop})")
        if self.id_column:
            ids = _ids_as_strings(table.column(self.id_column), corpus_file.path, self.id_column)
        else:
            ids = _positional_ids(corpus_file.relpath, unit.start, unit.stop)
        columns = [table.column(name) for name in self.columns]
        return pa.Table.from_arrays([ids, *columns], names=[ID_COLUMN, *self.columns])

    def _read_jsonl_unit(self, corpus_file: CorpusFile, unit: Unit, wanted: list[str]) -> pa.Table:
        slot = unit.start // self.rows_per_shard
        begin, end = corpus_file.unit_offsets[slot], corpus_file.unit_offsets[slot + 1]
        payload = corpus_file.path.read_range(begin, end)
        schema = corpus_file.parse_schema or corpus_file.schema
        options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        try:
            table = pajson.read_json(io.BytesIO(payload), parse_options=options)
        except pa.ArrowInvalid as exc:
            raise UserError(
                f"corpus file {corpus_file.path}, rows {unit.start}-{unit.stop - 1}: {exc}"
            ) from None
        for vector in corpus_file.schema:
            if pa.types.is_fixed_size_list(vector.type) and vector.name in table.column_names:
                try:
                    vectors = table.column(vector.name).cast(vector.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    lengths = pc.list_value_length(table.column(vector.name)).fill_null(-1).to_numpy(zero_copy_only=False)
                    bad = np.flatnonzero(lengths != vector.type.list_size)
                    first = slot * self.rows_per_shard
                    if self.id_column and self.id_column in table.column_names:
                        ids = [str(v) for v in table.column(self.id_column).take(pa.array(bad[:5])).to_pylist()]
                    else:
                        ids = [f"{corpus_file.relpath}#{first + int(row)}" for row in bad[:5]]
                    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                    raise UserError(
                        f"corpus file {corpus_file.path}: column {vector.name!r} holds vectors of {vector.type.list_size} values in the "
                        f"file's first rows, but sample ids {', '.join(ids)}{more} have another length (vectors must all be one size)"
                    ) from None
                table = table.set_column(table.schema.get_field_index(vector.name), vector, vectors)
        # a unit may be a sub-range of its slot (the vocabulary probe reads the first rows only)
        return table.slice(unit.start - slot * self.rows_per_shard, unit.rows).select(wanted)


def _read_parquet_rows(path: Location, start: int, stop: int, columns: list[str]) -> pa.Table:
    try:
        with path.open() as handle:
            return _read_parquet_slice(pq.ParquetFile(handle), start, stop, columns)
    except OSError as exc:
        failure = store_failure(exc, path)
        if failure is not None:
            raise failure from None
        raise


def _read_parquet_slice(parquet: pq.ParquetFile, start: int, stop: int, columns: list[str]) -> pa.Table:
    groups, first_row, row = [], None, 0
    for index in range(parquet.metadata.num_row_groups):
        count = parquet.metadata.row_group(index).num_rows
        if row + count > start and row < stop:
            groups.append(index)
            if first_row is None:
                first_row = row
        row += count
    table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(start - (first_row or 0), stop - start)


def _positional_ids(relpath: str, start: int, stop: int) -> pa.Array:
    rows = pc.cast(pa.array(np.arange(start, stop, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(relpath, rows, "#")


def _ids_as_strings(column: pa.ChunkedArray, path: Location, name: str) -> pa.Array:
    if column.null_count:
        raise UserError(f"corpus file {path}: id column {name!r} has {column.null_count} null values")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_integer(column.type)):
        raise UserError(f"corpus file {path}: id column {name!r} must be string or integer, not {column.type}")
    return pc.cast(column.combine_chunks(), pa.string())


def _check_columns(corpus_file: CorpusFile, required: dict[str, str]) -> None:
    names = corpus_file.schema.names
    for flag, column in required.items():
        if column not in names:
            raise UserError(
                f"corpus file {corpus_file.path}: no column {column!r} ({flag}); "
                f"available columns: {', '.join(names)}"
            )


def _check_unique_ids(corpus: Corpus) -> None:
    """Duplicate ids would make two rows indistinguishable downstream; name a few of them."""
    if corpus.id_column is None:
        return  # "<file>#<row>" is unique by construction
    arrays: list[pa.Array] = []
    for file_index, corpus_file in enumerate(corpus.files):
        if corpus_file.is_jsonl:
            for unit in (u for u in corpus.units if u.file_index == file_index):
                column = corpus._read_jsonl_unit(corpus_file, unit, [corpus.id_column]).column(0)
                arrays.append(_ids_as_strings(column, corpus_file.path, corpus.id_column))
        else:
            with corpus_file.path.open() as handle:
                column = pq.read_table(handle, columns=[corpus.id_column]).column(0)
            arrays.append(_ids_as_strings(column, corpus_file.path, corpus.id_column))
    ids = pa.chunked_array(arrays, type=pa.string())
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    shown = ", ".join(repeated[:5]) + (f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else "")
    raise UserError(f"duplicate sample ids in --id-column {corpus.id_column!r}: {shown}")


BYTES_PER_TOKEN = 4.0


def _is_text(data_type: pa.DataType) -> bool:
    """Strings, or lists of structs (chat messages): inputs a tokenizer turns into tokens."""
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return True
    return (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)) and pa.types.is_struct(data_type.value_type)


def auto_rows_per_shard(sample: pa.ChunkedArray | pa.Array) -> int:
    """Rows per unit for ``--rows-per-shard auto``, from a sample of the input column.

    Aims at ``SHARD_TARGET_POSITIONS`` positions per shard (2^21: about 100 MB at k=20), holds at
    most ``UNIT_INPUT_BYTES`` of inputs in memory, and stays within 64..65,536 rows, as a power of
    two. Sequences of 1,024 positions give 2,048-row shards, 128-token windows 16,384, classifiers
    (one position a row) 65,536 unless their inputs are large. Text and chat columns count one
    token per 4 bytes.
    """
    rows = max(len(sample), 1)
    if _is_text(sample.type):  # documents or conversations: tokens estimated at 4 bytes each
        positions = max(sample.nbytes / rows / BYTES_PER_TOKEN, 1.0)
    elif pa.types.is_list(sample.type) or pa.types.is_large_list(sample.type):
        lengths = pc.list_value_length(sample)
        positions = max(float(pc.mean(lengths).as_py() or 1.0), 1.0)
    else:
        positions = 1.0
    bytes_per_row = max(sample.nbytes / rows, 1.0)
    wanted = min(SHARD_TARGET_POSITIONS / positions, UNIT_INPUT_BYTES / bytes_per_row)
    wanted = int(min(max(wanted, MIN_AUTO_ROWS), MAX_AUTO_ROWS))
    return 1 << (wanted.bit_length() - 1)


def _sample_column(path: Location, column: str) -> pa.ChunkedArray | None:
    """The first ``SIZE_SAMPLE_ROWS`` values of ``column`` in a corpus file, or None if it has no such column."""
    try:
        if path.suffix == ".jsonl":
            table = pajson.read_json(io.BytesIO(_jsonl_head(path)))
        else:
            with path.open() as handle:
                parquet = pq.ParquetFile(handle)
                if column not in parquet.schema_arrow.names:
                    return None
                batches = list(parquet.iter_batches(batch_size=SIZE_SAMPLE_ROWS, columns=[column]))[:1]
                if not batches:
                    return None  # a file of 0 rows has nothing to sample (an empty corpus is named later)
                table = pa.Table.from_batches(batches)
    except (pa.ArrowInvalid, OSError) as exc:
        failure = store_failure(exc, path)
        if failure is not None:
            raise failure from None
        return None  # reported with the file's name when the corpus is opened
    if column not in table.column_names:
        return None
    return table.column(column).slice(0, SIZE_SAMPLE_ROWS)


def open_corpus(
    arguments: list[str],
    input_column: str,
    id_column: str | None,
    label_column: str | None,
    rows_per_shard: int | None,
) -> Corpus:
    """Find, check and cut the corpus into units; every check runs before any teacher work.

    ``rows_per_shard`` None picks it from the first file's input column (``auto_rows_per_shard``).

    Raises:
        UserError: no files, an empty corpus, a missing column (the message lists those available),
            unreadable files, inconsistent column types across files, or duplicate ids.
    """
    paths = discover_files(arguments)
    if not paths:
        raise UserError("no corpus files given")
    if rows_per_shard is None:
        sample = next((found for found in (_sample_column(p, input_column) for p in paths) if found is not None and len(found)), None)
        rows_per_shard = auto_rows_per_shard(sample) if sample is not None else MAX_AUTO_ROWS
    files: list[CorpusFile] = []
    for path, relpath in zip(paths, _relative_names(paths)):
        size = path.size()
        if path.suffix == ".jsonl":
            rows, offsets = _scan_jsonl(path, rows_per_shard)
            parse_schema, schema = _jsonl_schema(path) if rows else (pa.schema([]), pa.schema([]))
            files.append(CorpusFile(path, relpath, rows, size, schema, offsets, parse_schema))
        else:
            try:
                with path.open() as handle:
                    metadata = pq.read_metadata(handle)
                schema = metadata.schema.to_arrow_schema()
            except (pa.ArrowInvalid, OSError) as exc:
                raise store_failure(exc, path) or UserError(f"corpus file {path}: not a readable Parquet file ({exc})") from None
            files.append(CorpusFile(path, relpath, metadata.num_rows, size, schema))
    files = [f for f in files if f.rows > 0]
    if not files:
        raise UserError(f"empty corpus: {', '.join(str(p) for p in paths)} hold no rows")
    required = {"--input-column": input_column}
    if id_column:
        required["--id-column"] = id_column
    if label_column:
        required["--label-column"] = label_column
    columns = list(dict.fromkeys([input_column] + ([label_column] if label_column else [])))
    for corpus_file in files:
        _check_columns(corpus_file, required)
    reference = files[0]
    for corpus_file in files[1:]:
        for name in columns:
            if corpus_file.schema.field(name).type != reference.schema.field(name).type:
                raise UserError(
                    f"corpus file {corpus_file.path}: column {name!r} is {corpus_file.schema.field(name).type}, "
                    f"but {reference.path} has {reference.schema.field(name).type}"
                )
    corpus = Corpus(files, rows_per_shard, columns, id_column)
    _check_unique_ids(corpus)
    return corpus


def corpus_record(corpus: Corpus) -> list[dict[str, object]]:
    """What the manifest and the fingerprint say of the corpus: names, rows and sizes."""
    return [{"path": f.relpath, "rows": f.rows, "bytes": f.size} for f in corpus.files]


__all__ += ["corpus_record"]
