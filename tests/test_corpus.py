"""Corpus reading end to end: formats, discovery, units per file, sample ids, passthrough columns.

Expectations come from the input tables the test wrote (and from a second run over the same rows in
another layout), never from the library's own reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import classifier_table, frame_table, read_output, run_cli, save_teacher, shard_paths, token_table, write_jsonl, write_parquet

ROWS_PER_SHARD = 25
BATCH = 7


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("corpus-teachers")
    return {
        "tokens": save_teacher("softlabels.models:token_gru", 1, folder / "tokens.safetensors"),
        "frames": save_teacher("softlabels.models:frame_tagger", 2, folder / "frames.safetensors"),
        "digits": save_teacher("softlabels.models:digits_mlp", 3, folder / "digits.safetensors"),
    }


def generate(out: Path, corpus: list[object], teacher: str, *flags: object) -> Path:
    result = run_cli("generate", *corpus, "--teacher", teacher, "--out", out, "--no-progress",
                     "--rows-per-shard", ROWS_PER_SHARD, "--batch-size", BATCH, *flags)
    assert result.code == 0, result.err
    return out


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_ids(out: Path) -> list[list[str]]:
    """Sample ids of each shard, in shard order and row order (not re-sorted)."""
    return [pq.read_table(p, columns=["sample_id"]).column(0).to_pylist() for p in shard_paths(out)]


def by_id(table: pa.Table) -> dict[str, dict]:
    return {row["sample_id"]: row for row in table.to_pylist()}


def assert_same_soft_labels(left: pa.Table, right: pa.Table) -> None:
    assert left.column("sample_id").to_pylist() == right.column("sample_id").to_pylist()
    for column in ("topk_ids", "topk_logprobs", "confidence", "entropy"):
        assert left.column(column).type == right.column(column).type
        assert left.column(column).combine_chunks().equals(right.column(column).combine_chunks()), column


# --------------------------------------------------------------------------- Parquet vs JSONL


@pytest.mark.parametrize("kind, make_table", [("tokens", token_table), ("frames", frame_table)])
def test_jsonl_and_parquet_give_the_same_soft_labels(tmp_path, teachers, kind, make_table):
    source = make_table(117, seed=4)
    parquet = write_parquet(source, tmp_path / "parquet" / "corpus.parquet")
    jsonl = write_jsonl(source, tmp_path / "jsonl" / "corpus.jsonl")
    from_parquet = read_output(generate(tmp_path / "out-parquet", [parquet], teachers[kind], "--id-column", "id"))
    from_jsonl = read_output(generate(tmp_path / "out-jsonl", [jsonl], teachers[kind], "--id-column", "id"))

    assert from_parquet.num_rows == from_jsonl.num_rows == 117
    assert from_jsonl.column("sample_id").to_pylist() == sorted(source.column("id").to_pylist())
    # JSONL sequences are variable-length lists; the values (and hence the soft labels) are identical
    assert pa.types.is_list(from_jsonl.schema.field("inputs").type)
    jsonl_inputs = [np.asarray(v, dtype=np.float64) for v in from_jsonl.column("inputs").to_pylist()]
    parquet_inputs = [np.asarray(v, dtype=np.float64) for v in from_parquet.column("inputs").to_pylist()]
    assert all(np.array_equal(a, b) for a, b in zip(jsonl_inputs, parquet_inputs))
    assert_same_soft_labels(from_parquet, from_jsonl)
    assert [s["rows"] for s in manifest_of(tmp_path / "out-jsonl")["shards"]] == [25, 25, 25, 25, 17]


def test_jsonl_with_blank_lines_and_default_ids(tmp_path, teachers):
    source = token_table(53, seed=6)
    path = tmp_path / "blank.jsonl"
    lines = [json.dumps(row) for row in source.to_pylist()]
    with open(path, "w", encoding="utf-8") as handle:
        for index, line in enumerate(lines):
            handle.write(line + "\n" + ("\n" if index % 10 == 9 else ""))
    out = generate(tmp_path / "out", [path], teachers["tokens"])
    table = read_output(out)
    rows = by_id(table)
    assert len(rows) == 53
    for row_index, row in enumerate(source.to_pylist()):  # row numbers count records, not lines
        assert rows[f"blank.jsonl#{row_index}"]["inputs"] == row["inputs"]


# --------------------------------------------------------------------------- discovery


def _tree(root: Path) -> dict[str, pa.Table]:
    """A nested corpus with sizes that do not divide --rows-per-shard, plus a file to ignore."""
    tables = {
        "b.parquet": token_table(7, seed=2),
        "a/x.parquet": token_table(30, seed=1),
        "z/deep/w.parquet": token_table(51, seed=4),
        "a/y.parquet": token_table(25, seed=3),
    }
    for relpath, table in tables.items():
        write_parquet(table, root / relpath)
    (root / "a" / "notes.txt").write_text("not a corpus file\n")
    return tables


def _check_tree_output(out: Path, tables: dict[str, pa.Table], expected_order: list[str]) -> None:
    manifest = manifest_of(out)
    assert [(c["path"], c["rows"]) for c in manifest["corpus"]] == [(p, tables[p].num_rows) for p in expected_order]

    # units never cross files: each file is cut on its own, in file order, into rows-per-shard pieces
    expected_units = []
    for relpath in expected_order:
        rows = tables[relpath].num_rows
        expected_units += [(relpath, start, min(start + ROWS_PER_SHARD, rows)) for start in range(0, rows, ROWS_PER_SHARD)]
    shards = shard_ids(out)
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:06d}.parquet" for i in range(len(expected_units))]
    assert len(shards) == len(expected_units)
    for ids, (relpath, start, stop) in zip(shards, expected_units):
        assert ids == [f"{relpath}#{row}" for row in range(start, stop)]

    # default ids point at the right input row
    rows = by_id(read_output(out))
    for relpath, table in tables.items():
        if relpath not in expected_order:
            continue
        for index, inputs in enumerate(table.column("inputs").to_pylist()):
            assert rows[f"{relpath}#{index}"]["inputs"] == inputs
    assert len(rows) == sum(tables[p].num_rows for p in expected_order)


def test_directory_argument_is_searched_recursively_in_sorted_order(tmp_path, teachers):
    root = tmp_path / "corpus"
    tables = _tree(root)
    out = generate(tmp_path / "out", [root], teachers["tokens"])
    _check_tree_output(out, tables, sorted(tables))


def test_glob_argument_is_expanded_recursively_in_sorted_order(tmp_path, teachers):
    root = tmp_path / "corpus"
    tables = _tree(root)
    out = generate(tmp_path / "out", [f"{root}/**/*.parquet"], teachers["tokens"])
    _check_tree_output(out, tables, sorted(tables))
    narrow = generate(tmp_path / "narrow", [f"{root}/a/*.parquet"], teachers["tokens"])
    # ids are relative to the files' common folder, here corpus/a
    renamed = {"x.parquet": tables["a/x.parquet"], "y.parquet": tables["a/y.parquet"]}
    _check_tree_output(narrow, renamed, ["x.parquet", "y.parquet"])


def test_several_file_arguments_mixing_parquet_and_jsonl(tmp_path, teachers):
    first, second = token_table(26, seed=8), token_table(24, seed=9)
    a = write_parquet(first, tmp_path / "in" / "one" / "first.parquet")
    b = write_jsonl(second, tmp_path / "in" / "two" / "second.jsonl")
    out = generate(tmp_path / "out", [a, b], teachers["tokens"])
    tables = {"one/first.parquet": first, "two/second.jsonl": second}
    _check_tree_output(out, tables, ["one/first.parquet", "two/second.jsonl"])
    assert [s["rows"] for s in manifest_of(out)["shards"]] == [25, 1, 24]


# --------------------------------------------------------------------------- passthrough columns


def test_label_and_input_columns_pass_through_unchanged(tmp_path, teachers):
    source = classifier_table(117, seed=12)
    corpus = write_parquet(source, tmp_path / "digits.parquet")
    with_label = read_output(generate(tmp_path / "labelled", [corpus], teachers["digits"], "--id-column", "id", "--label-column", "label"))
    assert with_label.schema.field("label").type == source.schema.field("label").type
    assert with_label.schema.field("inputs").type == source.schema.field("inputs").type
    assert with_label.column("label").to_pylist() == source.column("label").to_pylist()
    assert with_label.column("inputs").combine_chunks().equals(source.column("inputs").combine_chunks())
    assert with_label.column_names.index("label") < with_label.column_names.index("topk_ids")

    without = read_output(generate(tmp_path / "plain", [corpus], teachers["digits"], "--id-column", "id"))
    assert "label" not in without.column_names
    assert_same_soft_labels(with_label, without)


def test_integer_id_column_becomes_string_sample_id(tmp_path, teachers):
    source = classifier_table(40, seed=13)
    source = source.set_column(0, "id", pa.array(np.arange(1000, 1040, dtype=np.int64)))
    corpus = write_parquet(source, tmp_path / "int-ids.parquet")
    table = read_output(generate(tmp_path / "out", [corpus], teachers["digits"], "--id-column", "id"))
    assert table.schema.field("sample_id").type == pa.string()
    assert sorted(table.column("sample_id").to_pylist()) == sorted(str(i) for i in range(1000, 1040))


# --------------------------------------------------------------------------- row groups


@pytest.mark.parametrize("row_group_size", [10, 7, 25, 1000])
def test_small_row_groups_read_the_right_rows(tmp_path, teachers, row_group_size):
    source = token_table(117, seed=14)
    grouped = write_parquet(source, tmp_path / "grouped" / "corpus.parquet", row_group_size=row_group_size)
    assert pq.ParquetFile(grouped).metadata.num_row_groups == -(-117 // min(row_group_size, 117))
    out = generate(tmp_path / "out", [grouped], teachers["tokens"])
    shards = shard_ids(out)
    assert [len(ids) for ids in shards] == [25, 25, 25, 25, 17]
    for index, ids in enumerate(shards):
        assert ids == [f"corpus.parquet#{row}" for row in range(25 * index, min(25 * index + 25, 117))]
    table = read_output(out)
    rows = by_id(table)
    for index, inputs in enumerate(source.column("inputs").to_pylist()):
        assert rows[f"corpus.parquet#{index}"]["inputs"] == inputs
    # the soft labels match a run over the same rows stored as one row group
    single = write_parquet(source, tmp_path / "single" / "corpus.parquet")
    reference = read_output(generate(tmp_path / "reference", [single], teachers["tokens"]))
    assert_same_soft_labels(table, reference)
    lengths = pc.list_value_length(table.column("topk_ids")).to_pylist()
    assert lengths == [len(rows[i]["inputs"]) for i in table.column("sample_id").to_pylist()]
