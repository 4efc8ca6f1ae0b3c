"""The shard format ``softlabels.v2`` of DESIGN.md section 3, checked from the outside.

The layout (shards and nothing else under ``data/``), column names and Arrow types, the per-shard
JSON header, every manifest field (sha256 and byte counts recomputed with hashlib and os.stat), what
Polars makes of ``DIR/data``, the summary line and ``generate --help``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import (
    DIGITS_TEACHERS,
    classifier_table,
    read_output,
    run_cli,
    run_cli_subprocess,
    save_teacher,
    shard_paths,
    tmp_files,
    token_table,
    write_parquet,
)

ROWS = 117
ROWS_PER_SHARD = 25
SHARD_NAME = re.compile(r"shard-\d{6}\.parquet")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_of(spec: str) -> Path:
    return Path(spec.partition("@")[2])


def portable(spec: str) -> str:
    """``module:factory@/abs/dir/w.safetensors`` -> ``module:factory@w.safetensors``: no local directories."""
    target, _, weights = spec.partition("@")
    return f"{target}@{Path(weights).name}"


class Run:
    """One generate run, with what the test knows about its inputs."""

    def __init__(self, out: Path, corpus: list[tuple[Path, pa.Table]], teachers: list[str], top_k: int, vocab: int, stdout: str):
        self.out, self.corpus, self.teachers, self.top_k, self.vocab, self.stdout = out, corpus, teachers, top_k, vocab, stdout

    @property
    def manifest(self) -> dict:
        return json.loads((self.out / "manifest.json").read_text())

    @property
    def shards(self) -> list[Path]:
        return shard_paths(self.out)


def _generate(out: Path, corpora: list[tuple[Path, pa.Table]], teachers: list[str], top_k: int, vocab: int, *flags: object) -> Run:
    args: list[object] = ["generate", *[p for p, _ in corpora], "--out", out, "--no-progress",
                          "--top-k", top_k, "--rows-per-shard", ROWS_PER_SHARD, "--batch-size", 7, *flags]
    for spec in teachers:
        args += ["--teacher", spec]
    result = run_cli(*args)
    assert result.code == 0, result.err
    return Run(out, corpora, teachers, top_k, vocab, result.out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("format")


@pytest.fixture(scope="module")
def ensemble_run(workdir: Path) -> Run:
    """Three committed digits teachers, k=5 of V=10, two corpus files (117 and 30 rows), labels."""
    first = classifier_table(ROWS, seed=1)
    second = classifier_table(30, seed=2, first_id=ROWS)
    corpora = [
        (write_parquet(first, workdir / "corpus" / "part-a.parquet"), first),
        (write_parquet(second, workdir / "corpus" / "sub" / "part-b.parquet"), second),
    ]
    return _generate(workdir / "ensemble", corpora, list(DIGITS_TEACHERS), 5, 10,
                     "--id-column", "id", "--label-column", "label", "--ensemble", "probs")


@pytest.fixture(scope="module")
def single_run(workdir: Path) -> Run:
    """One token teacher over ragged sequences: many positions per row, no agreement column."""
    spec = save_teacher("softlabels.models:token_gru", 3, workdir / "tokens.safetensors")
    table = token_table(ROWS, seed=3)
    corpora = [(write_parquet(table, workdir / "tokens" / "tokens.parquet"), table)]
    return _generate(workdir / "single", corpora, [spec], 20, 97)


RUNS = ["ensemble_run", "single_run"]


def _run(request: pytest.FixtureRequest, name: str) -> Run:
    return request.getfixturevalue(name)


def expected_schema(run: Run) -> pa.Schema:
    source = run.corpus[0][1]
    id_type = pa.uint16() if run.vocab <= 65536 else pa.uint32()
    fields = [pa.field("sample_id", pa.string()), source.schema.field("inputs")]
    if "label" in source.column_names and len(run.teachers) > 1:  # the ensemble run passes --label-column
        fields.append(source.schema.field("label"))
    fields += [
        pa.field("topk_ids", pa.list_(pa.list_(id_type, run.top_k))),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32(), run.top_k))),  # bfloat16 values, the default
        pa.field("confidence", pa.float32()),
        pa.field("entropy", pa.float32()),
    ]
    if len(run.teachers) > 1:
        fields.append(pa.field("agreement", pa.float32()))
    return pa.schema(fields)


# --------------------------------------------------------------------------- columns and types


@pytest.mark.parametrize("name", RUNS)
def test_shard_columns_and_arrow_types(request, name):
    run = _run(request, name)
    expected = expected_schema(run)
    assert run.shards
    for shard in run.shards:
        schema = pq.read_schema(shard)
        assert schema.names == expected.names, shard.name
        for field in expected:
            assert schema.field(field.name).type == field.type, (shard.name, field.name, schema.field(field.name).type)


@pytest.mark.parametrize("name", RUNS)
def test_shard_files_are_named_zstd_and_complete(request, name):
    run = _run(request, name)
    names = sorted(p.name for p in run.out.iterdir())
    # DIR holds the manifest and the folders; no Parquet file beside the manifest
    assert "manifest.json" in names and "data" in names
    assert not [n for n in names if n.endswith(".parquet")]
    assert set(names) <= {"manifest.json", "data", "_journal", "_staging"}, names
    # DIR/data holds the shards and nothing else, so any Parquet reader can open the folder
    data_names = sorted(p.name for p in (run.out / "data").iterdir())
    assert all(SHARD_NAME.fullmatch(n) for n in data_names), data_names
    assert data_names == [f"shard-{i:06d}.parquet" for i in range(len(data_names))]
    assert data_names == [p.name for p in run.shards]
    assert not tmp_files(run.out)
    for shard in run.shards:
        metadata = pq.read_metadata(shard)
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                assert metadata.row_group(group).column(column).compression == "ZSTD"


@pytest.mark.parametrize("name", RUNS)
def test_positions_per_row_follow_the_inputs(request, name):
    run = _run(request, name)
    table = read_output(run.out)
    lengths = pc.list_value_length(table.column("topk_ids")).to_numpy()
    np.testing.assert_array_equal(lengths, pc.list_value_length(table.column("topk_logprobs")).to_numpy())
    if pa.types.is_fixed_size_list(table.schema.field("inputs").type):
        assert (lengths == 1).all()  # a classifier has one position per row
    else:
        np.testing.assert_array_equal(lengths, pc.list_value_length(table.column("inputs")).to_numpy())
    values = table.column("topk_logprobs").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    # bfloat16 storage: float32 values whose low 16 bits are zero
    assert values.dtype == np.float32 and not (values.view(np.uint32) & 0xFFFF).any()
    per_position = values.astype(np.float64).reshape(-1, run.top_k)
    assert (per_position <= 0).all() and (np.diff(per_position, axis=1) <= 0).all()
    assert (np.exp(per_position).sum(axis=1) <= 1 + 3e-3).all()


# --------------------------------------------------------------------------- header


@pytest.mark.parametrize("name", RUNS)
def test_every_shard_carries_the_run_header(request, name):
    run = _run(request, name)
    manifest = run.manifest
    for index, shard in enumerate(run.shards):
        # the header is plain Parquet key-value metadata (readable without Arrow), JSON under b"softlabels"
        key_values = pq.read_metadata(shard).metadata
        assert b"softlabels" in key_values
        header = json.loads(key_values[b"softlabels"].decode("utf-8"))
        assert pq.read_schema(shard).metadata[b"softlabels"] == key_values[b"softlabels"]
        assert header["format"] == "softlabels.v2"
        assert header["fingerprint"] == manifest["fingerprint"]
        assert header["targets"] == "topk"
        assert header["top_k"] == run.top_k
        assert header["vocab_size"] == run.vocab
        assert header["ensemble"] == manifest["ensemble"]
        assert header["teachers"] == [{"name": portable(spec), "sha256": sha256_of(weights_of(spec))} for spec in run.teachers]
        assert header["teacher_temperature"] == 1.0
        assert header["precision"] == manifest["precision"]
        assert header["id_column"] == manifest["id_column"] == ("id" if len(run.teachers) > 1 else None)
        assert header["logprob_dtype"] == "bfloat16"
        assert header["unit"] == index == int(shard.stem.split("-")[1])
        # per shard: its own rows and positions, as the manifest lists them
        table = pq.read_table(shard)
        assert header["rows"] == table.num_rows == manifest["shards"][index]["rows"]
        assert header["positions"] == int(pc.sum(pc.list_value_length(table.column("topk_ids"))).as_py()) == manifest["shards"][index]["positions"]
        # no local directories: the machine's paths stay on the machine
        assert str(run.out.parent) not in key_values[b"softlabels"].decode("utf-8")
        assert str(Path(DIGITS_TEACHERS[0].partition("@")[2]).parent) not in key_values[b"softlabels"].decode("utf-8")


# --------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("name", RUNS)
def test_manifest_fields(request, name):
    run = _run(request, name)
    manifest = run.manifest
    assert manifest["format"] == "softlabels.v2"
    assert manifest["complete"] is True
    assert re.fullmatch(r"[0-9a-f]{8,64}", manifest["fingerprint"])
    assert manifest["top_k"] == run.top_k
    assert manifest["vocab_size"] == run.vocab
    if len(run.teachers) > 1:
        assert manifest["ensemble"] == "probs"
    assert [{k: t[k] for k in ("name", "sha256")} for t in manifest["teachers"]] == [
        {"name": portable(spec), "sha256": sha256_of(weights_of(spec))} for spec in run.teachers
    ]
    assert manifest["settings"]["logprob_dtype"] == manifest["logprob_dtype"] == "bfloat16"
    # no absolute local paths anywhere in the manifest
    text = (run.out / "manifest.json").read_text()
    assert str(run.out.parent) not in text
    assert str(Path(DIGITS_TEACHERS[0].partition("@")[2]).parent) not in text

    # corpus files: relative paths (to their common folder) and row counts
    base = run.corpus[0][0].parent  # in both runs the first file sits in the files' common folder
    assert [(c["path"], c["rows"]) for c in manifest["corpus"]] == [
        (path.relative_to(base).as_posix(), table.num_rows) for path, table in run.corpus
    ]

    # shards: one entry per file, each checked against the bytes on disk
    assert [s["file"] for s in manifest["shards"]] == [p.name for p in run.shards]
    positions_total = 0
    for entry, shard in zip(manifest["shards"], run.shards):
        assert set(entry) >= {"file", "rows", "positions", "bytes", "sha256"}
        assert entry["sha256"] == sha256_of(shard)
        assert entry["bytes"] == shard.stat().st_size
        table = pq.read_table(shard)
        assert entry["rows"] == table.num_rows
        positions = int(pc.sum(pc.list_value_length(table.column("topk_ids"))).as_py())
        assert entry["positions"] == positions
        positions_total += positions
    expected_rows = [min(ROWS_PER_SHARD, t.num_rows - start) for _, t in run.corpus for start in range(0, t.num_rows, ROWS_PER_SHARD)]
    assert [s["rows"] for s in manifest["shards"]] == expected_rows

    totals = manifest["totals"]
    assert totals["rows"] == sum(t.num_rows for _, t in run.corpus)
    assert totals["positions"] == positions_total
    assert totals["bytes"] == sum(p.stat().st_size for p in run.shards)
    assert totals["shards"] == len(run.shards)


def test_verify_accepts_the_directory(ensemble_run, single_run):
    for run in (ensemble_run, single_run):
        result = run_cli("verify", run.out)
        assert result.code == 0, result.err


# --------------------------------------------------------------------------- readers


def test_polars_reads_the_directory_with_the_documented_dtypes(ensemble_run, single_run):
    expected = {
        ensemble_run: {
            "sample_id": pl.String,
            "label": pl.Int64,
            "topk_ids": pl.List(pl.Array(pl.UInt16, 5)),
            "topk_logprobs": pl.List(pl.Array(pl.Float32, 5)),
            "confidence": pl.Float32,
            "entropy": pl.Float32,
            "agreement": pl.Float32,
        },
        single_run: {
            "sample_id": pl.String,
            "inputs": pl.List(pl.Int64),
            "topk_ids": pl.List(pl.Array(pl.UInt16, 20)),
            "topk_logprobs": pl.List(pl.Array(pl.Float32, 20)),
            "confidence": pl.Float32,
            "entropy": pl.Float32,
        },
    }
    for run, dtypes in expected.items():
        frame = pl.scan_parquet(run.out / "data").collect()  # the folder, not a glob
        assert frame.height == sum(t.num_rows for _, t in run.corpus)
        for column, dtype in dtypes.items():
            assert frame.schema[column] == dtype, (column, frame.schema[column])
        assert ("agreement" in frame.columns) == (len(run.teachers) > 1)
        # the same numbers as the Arrow reader sees, row for row
        arrow = read_output(run.out)
        frame = frame.sort("sample_id")
        assert frame["sample_id"].to_list() == arrow.column("sample_id").to_pylist()
        assert frame["topk_ids"].to_list() == arrow.column("topk_ids").to_pylist()
        polars_values = np.concatenate([np.asarray(row, dtype=np.float64).reshape(-1) for row in frame["topk_logprobs"].to_list()])
        arrow_values = arrow.column("topk_logprobs").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(polars_values, arrow_values.astype(np.float64))
        # exploding positions gives one row per position, as a user inspecting the data would do
        exploded = frame.select(pl.col("topk_ids").explode())
        assert exploded.height == run.manifest["totals"]["positions"]


# --------------------------------------------------------------------------- CLI surface


@pytest.mark.parametrize("name", RUNS)
def test_summary_line_reports_bytes_per_position(request, name):
    run = _run(request, name)
    totals = run.manifest["totals"]
    assert f"{totals['bytes'] / totals['positions']:.1f} bytes/position" in run.stdout
    assert f"{totals['rows']:,} rows" in run.stdout
    assert f"{totals['positions']:,} positions" in run.stdout


def test_generate_help_lists_every_documented_flag():
    result = run_cli("generate", "--help")
    assert result.code == 0, result.err
    text = result.out + result.err
    for flag in ("--teacher", "--out", "--input-column", "--id-column", "--label-column", "--top-k", "--ensemble",
                 "--batch-size", "--rows-per-shard", "--device", "--precision", "--on-nonfinite"):
        assert flag in text, flag
    assert "CORPUS" in text.upper()


def test_generate_help_through_the_console_entry_point():
    result = run_cli_subprocess("generate", "--help")
    assert result.returncode == 0, result.stderr
    assert "--teacher" in result.stdout and "--rows-per-shard" in result.stdout
    assert "Traceback" not in result.stderr
