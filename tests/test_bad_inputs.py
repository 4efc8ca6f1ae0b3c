"""Every bad input of DESIGN.md section 7 gets one clear line on stderr, exit 1, and commits nothing.

Checks that run before any teacher work must not even create ``--out``. Non-finite teacher outputs
are found mid-run: then the unit holding the bad rows is never committed and the directory is not
sealed (no manifest); with ``--on-nonfinite skip`` the bad rows are dropped and counted instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (
    DIGITS_TEACHERS,
    CliResult,
    classifier_table,
    read_output,
    run_cli,
    run_cli_subprocess,
    save_teacher,
    shard_paths,
    tmp_files,
    token_table,
    write_jsonl,
    write_parquet,
)
from fixture_teachers import INF_MARKER, NAN_MARKER, NAN_TOKEN

ROWS = 117
ROWS_PER_SHARD = 25  # units of 25, 25, 25, 25, 17 rows
TEACHER = DIGITS_TEACHERS[0]
NONFINITE_TEACHER = "fixture_teachers:nonfinite_classifier"
NONFINITE_TOKENS = "fixture_teachers:nonfinite_tokens"
COMMON = ("--rows-per-shard", ROWS_PER_SHARD, "--no-progress")


def generate(corpus: object, out: Path, *extra: object, teachers: tuple[str, ...] = (TEACHER,)) -> CliResult:
    corpus_args = corpus if isinstance(corpus, (list, tuple)) else [corpus]
    args: list[object] = ["generate", *corpus_args, "--out", out, *COMMON]
    for spec in teachers:
        args += ["--teacher", spec]
    return run_cli(*args, *extra)


def assert_one_line_error(result: CliResult | object, *needles: object, code: int = 1) -> str:
    """Exit ``code``, stderr exactly one line starting with ``error:`` naming every needle, no traceback."""
    returncode = getattr(result, "code", getattr(result, "returncode", None))
    err = result.err if isinstance(result, CliResult) else result.stderr
    assert returncode == code, (returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not named in: {lines[0]}"
    return lines[0]


def assert_untouched(out: Path) -> None:
    """A check that runs before any work must not create the output directory at all."""
    assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.iterdir())}"


def assert_not_sealed(out: Path, bad_units: list[int]) -> None:
    """After a mid-run failure: no manifest, the bad units' shards absent, no partial files."""
    assert not (out / "manifest.json").exists()
    present = {p.name for p in shard_paths(out)}
    for unit in bad_units:
        assert f"shard-{unit:06d}.parquet" not in present
    assert not tmp_files(out), tmp_files(out)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_parquet(classifier_table(ROWS), tmp_path / "corpus" / "part-0.parquet")


def marked_classifier(rows: int, marks: dict[int, float]) -> pa.Table:
    """``classifier_table`` with feature 0 of the given rows set to a fixture-teacher marker."""
    table = classifier_table(rows)
    values = np.asarray(table["inputs"].combine_chunks().flatten()).reshape(rows, 64).copy()
    for row, marker in marks.items():
        values[row, 0] = marker
    inputs = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 64)
    return table.set_column(table.schema.get_field_index("inputs"), "inputs", inputs)


# ---------------------------------------------------------------- corpus checks (before any work)


def test_empty_parquet_corpus(tmp_path: Path) -> None:
    empty = write_parquet(classifier_table(0), tmp_path / "empty.parquet")
    out = tmp_path / "out"
    line = assert_one_line_error(generate(empty, out, "--id-column", "id"), "empty corpus", empty)
    assert "rows" in line
    assert_untouched(out)


def test_empty_jsonl_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")  # blank lines are not rows either
    out = tmp_path / "out"
    assert_one_line_error(generate(empty, out), "empty corpus", empty)
    assert_one_line_error(generate([empty, blank], out), "empty corpus", empty, blank)
    assert_untouched(out)


def test_empty_corpus_directory(tmp_path: Path) -> None:
    folder = tmp_path / "nothing_here"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a corpus file")
    out = tmp_path / "out"
    assert_one_line_error(generate(folder, out), folder)
    assert_untouched(out)


@pytest.mark.parametrize("kind", ["file", "glob"])
def test_nonexistent_corpus_path(tmp_path: Path, kind: str) -> None:
    missing = tmp_path / "no_such_dir" / ("corpus.parquet" if kind == "file" else "*.parquet")
    out = tmp_path / "out"
    assert_one_line_error(generate(missing, out), missing)
    assert_untouched(out)


@pytest.mark.parametrize(
    ("flag", "column"),
    [("--input-column", "pixels"), ("--id-column", "uid"), ("--label-column", "target")],
)
def test_missing_column_lists_available_columns(corpus: Path, tmp_path: Path, flag: str, column: str) -> None:
    out = tmp_path / "out"
    line = assert_one_line_error(generate(corpus, out, flag, column), flag, repr(column), corpus)
    available = line.split("available columns:", 1)[1]
    assert [name.strip() for name in available.split(",")] == ["id", "inputs", "label"]
    assert_untouched(out)


def test_missing_column_in_jsonl(tmp_path: Path) -> None:
    corpus = write_jsonl(classifier_table(ROWS), tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, "--input-column", "pixels"), "'pixels'", "id, inputs, label", corpus)
    assert_untouched(out)


def test_missing_column_in_second_file_names_that_file(tmp_path: Path) -> None:
    first = write_parquet(classifier_table(ROWS), tmp_path / "corpus" / "a.parquet")
    second = write_parquet(classifier_table(30, seed=1).drop_columns(["label"]), tmp_path / "corpus" / "b.parquet")
    out = tmp_path / "out"
    line = assert_one_line_error(generate([first, second], out, "--label-column", "label"), second, "'label'")
    assert str(first) not in line
    assert_untouched(out)


def test_column_type_differs_between_files(tmp_path: Path) -> None:
    first = write_parquet(classifier_table(ROWS), tmp_path / "corpus" / "a.parquet")
    narrow = write_parquet(classifier_table(30, seed=1, features=32, first_id=ROWS), tmp_path / "corpus" / "b.parquet")
    out = tmp_path / "out"
    assert_one_line_error(generate([first, narrow], out), narrow, first, "'inputs'")
    assert_untouched(out)


def test_string_input_column_is_rejected(tmp_path: Path) -> None:
    table = classifier_table(ROWS)
    table = table.append_column("text", pa.array([f"sample {i}" for i in range(ROWS)]))
    corpus = write_parquet(table, tmp_path / "corpus.parquet")
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, "--input-column", "text"), "--input-column", "'text'", "string")
    assert_untouched(out)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_duplicate_ids_in_one_file(tmp_path: Path, fmt: str) -> None:
    table = classifier_table(ROWS)
    ids = table["id"].to_pylist()
    ids[90] = ids[7]  # s-00007 twice, in different units
    ids[116] = ids[40]  # s-00040 twice, the second in the last (short) unit
    table = table.set_column(0, "id", pa.array(ids))
    path = tmp_path / f"corpus.{fmt}"
    corpus = write_parquet(table, path) if fmt == "parquet" else write_jsonl(table, path)
    out = tmp_path / "out"
    line = assert_one_line_error(generate(corpus, out, "--id-column", "id"), "duplicate", "--id-column", "s-00007", "s-00040")
    assert set(re.findall(r"s-\d{5}", line)) == {"s-00007", "s-00040"}
    assert_untouched(out)


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    first = write_parquet(classifier_table(ROWS), tmp_path / "corpus" / "a.parquet")
    # ids s-00110 .. s-00139 overlap the first file's s-00110 .. s-00116
    second = write_parquet(classifier_table(30, seed=1, first_id=110), tmp_path / "corpus" / "b.parquet")
    out = tmp_path / "out"
    line = assert_one_line_error(generate([first, second], out, "--id-column", "id"), "duplicate")
    named = set(re.findall(r"s-\d{5}", line))
    assert named and named <= {f"s-{i:05d}" for i in range(110, ROWS)}
    assert_untouched(out)


def test_many_duplicate_integer_ids_are_counted(tmp_path: Path) -> None:
    # ids 0..16 each appear twice: a few are named, the rest counted
    table = classifier_table(ROWS).set_column(0, "id", pa.array(np.arange(ROWS) % 100, pa.int64()))
    corpus = write_parquet(table, tmp_path / "corpus.parquet")
    out = tmp_path / "out"
    line = assert_one_line_error(generate(corpus, out, "--id-column", "id"), "duplicate", "--id-column")
    named = [int(n) for n in re.findall(r"\b\d+\b", line.split(":", 2)[2].split("(")[0])]
    assert named and set(named) <= set(range(17))
    assert "12 more" in line  # 17 repeated ids in all
    assert_untouched(out)


# ---------------------------------------------------------------- teacher and flag checks


def test_ensemble_vocab_mismatch(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = "fixture_teachers:classifier_vocab7"
    result = generate(corpus, out, teachers=(TEACHER, other))
    assert_one_line_error(result, "vocab", TEACHER, other, "10", "7")
    assert_untouched(out)


def test_top_k_larger_than_vocab(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, "--top-k", 11), "--top-k", "11", "10")
    assert_untouched(out)
    # the boundary k = V is allowed and stores the whole distribution
    assert generate(corpus, out, "--top-k", 10).code == 0
    assert json.loads((out / "manifest.json").read_text())["top_k"] == 10


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--top-k", 0), ("--top-k", -3), ("--batch-size", 0), ("--rows-per-shard", 0)],
)
def test_non_positive_sizes(corpus: Path, tmp_path: Path, flag: str, value: int) -> None:
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, flag, value), flag, str(value))
    assert_untouched(out)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--ensemble", "bogus"), ("--on-nonfinite", "ignore"), ("--precision", "fp16"), ("--device", "tpu")],
)
def test_unknown_choice(corpus: Path, tmp_path: Path, flag: str, value: str) -> None:
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, flag, value, teachers=(TEACHER, DIGITS_TEACHERS[1])), flag, value)
    assert_untouched(out)


def test_missing_teacher_file(corpus: Path, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "teacher.pt2"
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, teachers=(TEACHER, str(missing))), "--teacher", missing)
    assert_untouched(out)


def test_missing_weights_file(corpus: Path, tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "teacher.safetensors"
    spec = f"softlabels.models:digits_mlp@{missing}"
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, teachers=(spec,)), "--teacher", missing)
    assert_untouched(out)


def test_corrupt_and_mismatched_weights(corpus: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, teachers=(f"softlabels.models:digits_mlp@{garbage}",)), garbage)
    # real weights of another architecture do not load strictly
    from safetensors.torch import save_file

    from fixture_teachers import classifier_vocab7

    wrong = tmp_path / "vocab7.safetensors"
    save_file(classifier_vocab7().state_dict(), str(wrong))
    assert_one_line_error(generate(corpus, out, teachers=(f"softlabels.models:digits_mlp@{wrong}",)), wrong)
    assert_untouched(out)


@pytest.mark.parametrize("form", ["unknown_extension", "bare_name", "no_module", "no_factory", "not_a_module"])
def test_unknown_teacher_spec_form(corpus: Path, tmp_path: Path, form: str) -> None:
    onnx = tmp_path / "teacher.onnx"
    onnx.write_bytes(b"onnx")
    spec = {
        "unknown_extension": str(onnx),
        "bare_name": "my_teacher",
        "no_module": "no_such_module_for_softlabels_tests:factory",
        "no_factory": "fixture_teachers:no_such_factory",
        "not_a_module": "fixture_teachers:not_a_module",
    }[form]
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, teachers=(spec,)), "--teacher", spec)
    assert_untouched(out)


def test_unknown_flag_is_a_one_line_usage_error(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_one_line_error(generate(corpus, out, "--top_k", 5), "--top_k")
    assert_one_line_error(run_cli("verify", tmp_path, "--deep"), "--deep")
    assert_one_line_error(run_cli("generate", "--teacher", TEACHER, "--out", out), "CORPUS")
    assert_untouched(out)


def test_out_is_an_existing_file(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_text("precious")
    assert_one_line_error(generate(corpus, out), "--out", out)
    assert out.read_text() == "precious"


# ---------------------------------------------------------------- non-finite teacher outputs (mid-run)

NAN_ROWS = {53: NAN_MARKER, 61: INF_MARKER, 70: NAN_MARKER}  # all in unit 2 (rows 50..74)
NAN_IDS = {f"s-{row:05d}" for row in NAN_ROWS}


@pytest.fixture
def nan_corpus(tmp_path: Path) -> Path:
    return write_parquet(marked_classifier(ROWS, NAN_ROWS), tmp_path / "nan" / "corpus.parquet")


def test_nonfinite_error_names_sample_ids_and_commits_nothing_for_them(nan_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = generate(nan_corpus, out, "--id-column", "id", teachers=(NONFINITE_TEACHER,))
    line = assert_one_line_error(result, "NaN", "--on-nonfinite skip")
    assert set(re.findall(r"s-\d{5}", line)) == NAN_IDS
    assert_not_sealed(out, bad_units=[2, 3, 4])
    # whatever was committed before the failure is whole and correct; the directory is not a dataset
    for shard in shard_paths(out):
        assert pq.read_metadata(shard).num_rows == ROWS_PER_SHARD
    assert run_cli("verify", out).code == 2


def test_nonfinite_in_one_member_of_an_ensemble_is_an_error(nan_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = generate(nan_corpus, out, "--id-column", "id", "--batch-size", 7, teachers=(TEACHER, NONFINITE_TEACHER))
    line = assert_one_line_error(result, "NaN")
    # batches of 7 inside unit 2 start at rows 50, 57, 64, 71: the first bad batch holds row 53 only
    assert set(re.findall(r"s-\d{5}", line)) == {"s-00053"}
    assert_not_sealed(out, bad_units=[2, 3, 4])


def test_nonfinite_skip_drops_and_counts_rows(nan_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = generate(nan_corpus, out, "--id-column", "id", "--on-nonfinite", "skip", teachers=(NONFINITE_TEACHER,))
    assert result.code == 0, result.err
    assert "3 rows skipped" in result.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["totals"]["skipped_nonfinite"] == 3
    assert manifest["totals"]["rows"] == ROWS - 3
    assert [s["rows"] for s in manifest["shards"]] == [25, 25, 22, 25, 17]
    table = read_output(out)
    all_ids = {f"s-{i:05d}" for i in range(ROWS)}
    kept = table["sample_id"].to_pylist()
    assert len(kept) == len(set(kept)) == ROWS - 3
    assert set(kept) == all_ids - NAN_IDS
    assert run_cli("verify", out).code == 0

    # the kept rows hold exactly what a run over the corpus without the bad rows stores
    clean = marked_classifier(ROWS, NAN_ROWS).filter(pa.array([i not in NAN_ROWS for i in range(ROWS)]))
    clean_corpus = write_parquet(clean, tmp_path / "clean" / "corpus.parquet")
    reference = tmp_path / "reference"
    assert generate(clean_corpus, reference, "--id-column", "id", teachers=(NONFINITE_TEACHER,)).code == 0
    expected = read_output(reference)
    for column in ("sample_id", "inputs", "topk_ids", "topk_logprobs", "confidence", "entropy"):
        assert table[column].equals(expected[column]), column


def _marked_tokens(rows: int, marked: list[int]) -> pa.Table:
    """Ragged token rows (tokens < NAN_TOKEN); the marked rows get NAN_TOKEN at their middle position."""
    table = token_table(rows, vocab=NAN_TOKEN)
    sequences = table["inputs"].to_pylist()
    for row in marked:
        sequences[row][len(sequences[row]) // 2] = NAN_TOKEN
    return table.set_column(1, "inputs", pa.array(sequences, pa.list_(pa.int64())))


def test_nonfinite_sequences_flag_only_rows_with_bad_valid_positions(tmp_path: Path) -> None:
    """The token teacher returns NaN at every padded position too: padding must never flag a row."""
    marked = [30, 31, 99]
    corpus = write_parquet(_marked_tokens(ROWS, marked), tmp_path / "tokens.parquet")
    out = tmp_path / "out"
    line = assert_one_line_error(generate(corpus, out, "--id-column", "id", teachers=(NONFINITE_TOKENS,)), "NaN")
    assert set(re.findall(r"t-\d{5}", line)) == {"t-00030", "t-00031"}  # unit 1 fails first
    assert_not_sealed(out, bad_units=[1, 2, 3, 4])

    skipped = tmp_path / "skipped"
    result = generate(corpus, skipped, "--id-column", "id", "--on-nonfinite", "skip", teachers=(NONFINITE_TOKENS,))
    assert result.code == 0, result.err
    manifest = json.loads((skipped / "manifest.json").read_text())
    table = read_output(skipped)
    lengths = dict(zip(_marked_tokens(ROWS, marked)["id"].to_pylist(), (len(s) for s in _marked_tokens(ROWS, marked)["inputs"].to_pylist())))
    expected_ids = sorted(set(lengths) - {f"t-{r:05d}" for r in marked})
    assert table["sample_id"].to_pylist() == expected_ids
    assert manifest["totals"]["skipped_nonfinite"] == len(marked)
    assert manifest["totals"]["positions"] == sum(lengths[i] for i in expected_ids)
    assert [len(p) for p in table["topk_ids"].to_pylist()] == [lengths[i] for i in expected_ids]


def test_null_and_empty_inputs_name_sample_ids(tmp_path: Path) -> None:
    table = classifier_table(ROWS)
    inputs = table["inputs"].to_pylist()
    inputs[80] = None
    nulls = write_parquet(table.set_column(1, "inputs", pa.array(inputs, table.schema.field("inputs").type)), tmp_path / "nulls.parquet")
    out = tmp_path / "out"
    assert_one_line_error(generate(nulls, out, "--id-column", "id"), "--input-column", "s-00080", "null")
    assert_not_sealed(out, bad_units=[3, 4])

    tokens = token_table(ROWS)
    sequences = tokens["inputs"].to_pylist()
    sequences[42] = []
    empty = write_parquet(tokens.set_column(1, "inputs", pa.array(sequences, pa.list_(pa.int64()))), tmp_path / "empty_seq.parquet")
    out = tmp_path / "out_tokens"
    spec = save_teacher("softlabels.models:token_gru", 0, tmp_path / "token_gru.safetensors")
    assert_one_line_error(generate(empty, out, "--id-column", "id", teachers=(spec,)), "t-00042", "empty")
    assert_not_sealed(out, bad_units=[1, 2, 3, 4])


# ---------------------------------------------------------------- the real entry point


def test_entry_point_prework_error_exit_1_one_line(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # progress stays on: a check before any work must not leave a progress bar on stderr either
    proc = run_cli_subprocess("generate", corpus, "--teacher", TEACHER, "--out", out, "--input-column", "pixels")
    assert_one_line_error(proc, "'pixels'", "available columns: id, inputs, label")
    assert proc.stdout == ""
    assert_untouched(out)


def test_entry_point_nonfinite_error_exit_1_one_line(nan_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli_subprocess(
        "generate", nan_corpus, "--teacher", NONFINITE_TEACHER, "--out", out, "--id-column", "id",
        "--rows-per-shard", ROWS_PER_SHARD, "--no-progress",
    )
    line = assert_one_line_error(proc, "NaN")
    assert set(re.findall(r"s-\d{5}", line)) == NAN_IDS
    assert_not_sealed(out, bad_units=[2, 3, 4])
