"""select: the kept rows equal an independent numpy filter of the source, and the result is a dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import classifier_table, data_dir, read_output, run_cli, save_teacher, shard_path, shard_paths, token_table, write_parquet
from softlabels.data import SoftLabelDataset
from softlabels.schema import decode_header


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    classifier = write_parquet(classifier_table(117, seed=41), root / "c.parquet")
    small = write_parquet(classifier_table(31, seed=42), root / "s.parquet")
    tokens = write_parquet(token_table(117, seed=43), root / "t.parquet")
    digits = [save_teacher("softlabels.models:digits_mlp", s, root / f"d{s}.safetensors") for s in (3, 5)]  # seeds whose argmax agree on 12 of 31 rows
    lm = save_teacher("softlabels.models:token_gru", 4, root / "lm.safetensors")
    made = {}
    for name, corpus, teachers, extra in (
        ("ensemble_single_row_shards", small, digits, ["--rows-per-shard", 1, "--top-k", 4]),
        ("one_teacher", classifier, digits[:1], ["--rows-per-shard", 13, "--top-k", 3, "--label-column", "label"]),
        ("ragged_tokens", tokens, [lm], ["--rows-per-shard", 10, "--top-k", 6]),
    ):
        args = ["generate", corpus, "--out", root / name, "--id-column", "id", "--no-progress", *extra]
        for spec in teachers:
            args += ["--teacher", spec]
        result = run_cli(*args)
        assert result.code == 0, result.err
        made[name] = root / name
    return made


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False))


def _positions(table: pa.Table) -> np.ndarray:
    return np.array([len(row) for row in table.column("topk_ids").to_pylist()], dtype=np.int64)


def _median(values: np.ndarray) -> str:
    """The SQL literal of a value that occurs in the column (exact in float32 and float64)."""
    return repr(float(np.sort(values)[len(values) // 2]))


def _cases(source: pa.Table, name: str) -> list[tuple[str, np.ndarray]]:
    """(--where, the mask numpy computes for it) over the rows of ``source``."""
    confidence, entropy = _column(source, "confidence"), _column(source, "entropy")
    ids = _column(source, "sample_id")
    middle_c, middle_e = _median(confidence), _median(entropy)
    cases = [
        (f"confidence > {middle_c}", confidence > np.float32(float(middle_c))),
        (f"confidence > {middle_c} AND entropy <= {middle_e}", (confidence > np.float32(float(middle_c))) & (entropy <= np.float32(float(middle_e)))),
        ("confidence > avg(confidence)", confidence.astype(np.float64) > confidence.astype(np.float64).mean()),
        ("sample_id LIKE '%1'", np.array([s.endswith("1") for s in ids])),
        ("confidence > 2", np.zeros(len(ids), dtype=bool)),  # selects nothing
    ]
    if "agreement" in source.column_names:
        cases.append(("agreement >= 1", _column(source, "agreement") >= 1))
    if name == "ragged_tokens":
        cases.append(("array_length(topk_ids) > 12", _positions(source) > 12))
    if "label" in source.column_names:
        cases.append(("label IN (1, 3) OR confidence < 0", np.isin(_column(source, "label"), [1, 3])))
    return cases


CASES = [(name, index) for name, count in (("ensemble_single_row_shards", 6), ("one_teacher", 6), ("ragged_tokens", 6)) for index in range(count)]


@pytest.mark.parametrize("name,index", CASES)
def test_selected_rows_equal_an_independent_filter(sources, tmp_path, name, index):
    directory = sources[name]
    source = read_output(directory)
    where, mask = _cases(source, name)[index]
    out = tmp_path / "selected"
    result = run_cli("select", directory, "--where", where, "--out", out)
    assert result.code == 0, result.err
    expected = source.filter(pa.array(mask))
    assert f"kept {int(mask.sum()):,} of {source.num_rows:,} rows" in result.out

    # row for row, every column, same Arrow types
    kept = read_output(out) if mask.any() else None
    if kept is not None:
        assert kept.schema.remove_metadata() == source.schema.remove_metadata()
        assert kept.equals(expected)
    else:
        assert not shard_paths(out)
    # shard N of the selection is the kept rows of source shard N, in their order
    for path in shard_paths(out):
        original = pq.read_table(data_dir(directory) / path.name)
        ids = set(_column(expected, "sample_id"))
        keep = np.array([s in ids for s in _column(original, "sample_id")])
        assert pq.read_table(path).equals(original.filter(pa.array(keep)))

    manifest = json.loads((out / "manifest.json").read_text())
    source_manifest = json.loads((directory / "manifest.json").read_text())
    positions = _positions(expected)
    files = [data_dir(out) / s["file"] for s in manifest["shards"]]
    assert manifest["complete"] is True
    assert manifest["totals"]["rows"] == int(mask.sum()) == sum(s["rows"] for s in manifest["shards"])
    assert manifest["totals"]["positions"] == int(positions.sum())
    assert manifest["totals"]["shards"] == len(files) == len(shard_paths(out))
    assert manifest["totals"]["bytes"] == sum(f.stat().st_size for f in files)
    soft = 0
    for f in files:
        metadata = pq.read_metadata(f)
        for g in range(metadata.num_row_groups):
            for c in range(metadata.num_columns):
                chunk = metadata.row_group(g).column(c)
                soft += chunk.total_compressed_size if chunk.path_in_schema.split(".")[0] in ("topk_ids", "topk_logprobs", "topk_logprob_codes") else 0
    assert manifest["totals"]["soft_label_bytes"] == soft
    # provenance, a new fingerprint, no fidelity claimed for rows the teacher figures did not describe
    assert manifest["fingerprint"] != source_manifest["fingerprint"]
    assert manifest["settings"]["selections"] == [{"source_fingerprint": source_manifest["fingerprint"], "where": where}]
    assert manifest["selection"]["where"] == where
    assert manifest["selection"]["source_fingerprint"] == source_manifest["fingerprint"]
    assert manifest["selection"]["source_fidelity"] == source_manifest["fidelity"]
    assert manifest["selection"]["source_totals"] == source_manifest["totals"]
    assert "fidelity" not in manifest
    for key in ("top_k", "vocab_size", "ensemble", "teachers", "input_column", "label_column", "corpus", "id_column"):
        assert manifest[key] == source_manifest[key], key
    for f in files:
        header = decode_header(pq.read_schema(f).metadata)
        original = decode_header(pq.read_schema(data_dir(directory) / f.name).metadata)
        assert header["fingerprint"] == manifest["fingerprint"]
        assert header["selections"] == manifest["settings"]["selections"]
        # per shard: the selected shard's own rows and positions
        table = pq.read_table(f)
        assert header["rows"] == table.num_rows and header["positions"] == int(_positions(table).sum())
        assert {k: v for k, v in header.items() if k not in ("fingerprint", "selections", "rows", "positions")} == \
            {k: v for k, v in original.items() if k not in ("fingerprint", "rows", "positions")}

    # a dataset: verify, inspect and the loader agree with the filter
    verified = run_cli("verify", out)
    assert verified.code == 0, verified.err
    inspected = run_cli("inspect", out, "--json")
    assert inspected.code == 0, inspected.err
    report = json.loads(inspected.out)
    assert report["rows"] == int(mask.sum()) and report["positions"] == int(positions.sum())
    dataset = SoftLabelDataset(out, batch_size=7, shuffle=True, seed=3)
    seen, valid = [], 0
    for batch in dataset:
        seen += batch["sample_id"]
        valid += int(batch["mask"].sum())
    assert sorted(seen) == sorted(_column(expected, "sample_id").tolist())
    assert valid == int(positions.sum())


def test_a_selection_trains_a_student(sources, tmp_path):
    out = tmp_path / "confident"
    assert run_cli("select", sources["one_teacher"], "--where", "confidence > avg(confidence)", "--out", out).code == 0
    result = run_cli("train-student", out, "--student", "softlabels.models:digits_mlp", "--out", tmp_path / "student",
                     "--max-steps", 3, "--batch-size", 8, "--no-progress")
    assert result.code == 0, result.err
    assert (tmp_path / "student" / "student.safetensors").is_file()
    empty = tmp_path / "empty"
    assert run_cli("select", sources["one_teacher"], "--where", "confidence > 2", "--out", empty).code == 0
    refused = run_cli("train-student", empty, "--student", "softlabels.models:digits_mlp", "--out", tmp_path / "none",
                      "--max-steps", 3, "--no-progress")
    assert refused.code == 1 and "no rows" in refused.err and len(refused.err.strip().splitlines()) == 1, refused.err


def test_rerun_is_complete_and_a_selection_of_a_selection_keeps_the_chain(sources, tmp_path):
    directory = sources["ensemble_single_row_shards"]
    first = tmp_path / "first"
    assert run_cli("select", directory, "--where", "agreement >= 0.5", "--out", first).code == 0
    before = (first / "manifest.json").read_bytes()
    again = run_cli("select", directory, "--where", "agreement >= 0.5", "--out", first)
    assert again.code == 0 and "already complete" in again.out, again.err
    assert (first / "manifest.json").read_bytes() == before
    other = run_cli("select", directory, "--where", "agreement >= 1", "--out", first)
    assert other.code == 1 and "--out" in other.err and len(other.err.strip().splitlines()) == 1
    second = tmp_path / "second"
    assert run_cli("select", first, "--where", "entropy < 1.5", "--out", second).code == 0
    chain = json.loads((second / "manifest.json").read_text())["settings"]["selections"]
    source_fingerprint = json.loads((directory / "manifest.json").read_text())["fingerprint"]
    assert [step["where"] for step in chain] == ["agreement >= 0.5", "entropy < 1.5"]
    assert chain[0]["source_fingerprint"] == source_fingerprint
    expected = read_output(directory)
    keep = (_column(expected, "agreement") >= 0.5) & (_column(expected, "entropy") < np.float32(1.5))
    if keep.any():
        assert read_output(second).equals(expected.filter(pa.array(keep)))
    assert run_cli("verify", second).code == 0


def test_an_interrupted_selection_is_redone_by_the_same_command(sources, tmp_path):
    directory = sources["one_teacher"]
    out = tmp_path / "sel"
    assert run_cli("select", directory, "--where", "confidence > 0", "--out", out).code == 0
    def files() -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    reference = files()
    assert "manifest.json" in reference and len(shard_paths(out)) > 1
    (out / "manifest.json").unlink()  # killed before the manifest
    shards = shard_paths(out)
    staged = out / "_staging" / (shards[-1].name + ".tmp")
    staged.parent.mkdir(exist_ok=True)
    shards[-1].rename(staged)  # and in the middle of a shard
    result = run_cli("select", directory, "--where", "confidence > 0", "--out", out)
    assert result.code == 0, result.err
    assert files() == reference


def test_generate_refuses_to_overwrite_a_selection(sources, tmp_path):
    out = tmp_path / "sel"
    assert run_cli("select", sources["one_teacher"], "--where", "confidence > 0.5", "--out", out).code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    source = json.loads((sources["one_teacher"] / "manifest.json").read_text())
    assert {k: v for k, v in manifest["settings"].items() if k != "selections"} == source["settings"]
    root = sources["one_teacher"].parent  # the very command that made the source, pointed at the selection
    result = run_cli("generate", root / "c.parquet", "--teacher", f"softlabels.models:digits_mlp@{root / 'd3.safetensors'}",
                     "--out", out, "--id-column", "id", "--no-progress", "--rows-per-shard", 13, "--top-k", 3,
                     "--label-column", "label")
    assert result.code == 1 and "selections" in result.err, (result.out, result.err)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert run_cli("verify", out).code == 0


@pytest.mark.parametrize("where,hint", [
    ("confidence >", "not a SQL expression"),
    ("nosuch > 0.5", "'nosuch'"),
    ("confidence + 1", "not a condition"),
    ("confidence > 'high'", "cannot be evaluated"),
    ("agreement >= 1", "'agreement'"),  # one teacher: no agreement column
    ("  ", "empty"),
])
def test_a_bad_where_is_one_line_exit_1_and_writes_nothing(sources, tmp_path, where, hint):
    out = tmp_path / "sel"
    result = run_cli("select", sources["one_teacher"], "--where", where, "--out", out)
    assert result.code == 1, (result.out, result.err)
    message = result.err.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "--where" in message and hint in message, message
    assert not out.exists()


def test_a_corrupt_source_shard_is_named(sources, tmp_path):
    directory = tmp_path / "source"
    shutil.copytree(sources["one_teacher"], directory)
    path = shard_path(directory, 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_cli("select", directory, "--where", "confidence > 0", "--out", tmp_path / "sel")
    assert result.code == 2 and "shard-000002.parquet" in result.err, result.err
    assert not (tmp_path / "sel" / "manifest.json").exists()


def test_an_unsealed_source_or_the_source_as_out_is_refused(sources, tmp_path):
    directory = tmp_path / "source"
    shutil.copytree(sources["one_teacher"], directory)
    same = run_cli("select", directory, "--where", "confidence > 0", "--out", directory)
    assert same.code == 1 and "--out" in same.err
    (directory / "manifest.json").unlink()
    unsealed = run_cli("select", directory, "--where", "confidence > 0", "--out", tmp_path / "sel")
    assert unsealed.code == 2 and "manifest" in unsealed.err


@pytest.mark.parametrize("dtype", ["uint8", "bfloat16", "float16"])
def test_a_selection_keeps_the_storage_codec(sources, tmp_path, dtype):
    root = sources["one_teacher"].parent
    source_dir = tmp_path / "source"
    result = run_cli("generate", root / "s.parquet", "--teacher", f"softlabels.models:digits_mlp@{root / 'd3.safetensors'}",
                     "--out", source_dir, "--id-column", "id", "--rows-per-shard", 4, "--top-k", 5,
                     "--logprob-dtype", dtype, "--no-progress")
    assert result.code == 0, result.err
    out = tmp_path / "sel"
    assert run_cli("select", source_dir, "--where", "confidence > avg(confidence)", "--out", out).code == 0
    source = read_output(source_dir)
    confidence = _column(source, "confidence").astype(np.float64)
    assert read_output(out).equals(source.filter(pa.array(confidence > confidence.mean())))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["logprob_dtype"] == dtype
    assert run_cli("verify", out).code == 0 and run_cli("inspect", out).code == 0
    kept = {}
    for batch in SoftLabelDataset(out, batch_size=5, shuffle=False):
        kept.update(zip(batch["sample_id"], batch["topk_logprobs"]))
    for batch in SoftLabelDataset(source_dir, batch_size=5, shuffle=False):
        for sample_id, logprobs in zip(batch["sample_id"], batch["topk_logprobs"]):
            if sample_id in kept:
                assert np.array_equal(kept.pop(sample_id).numpy(), logprobs.numpy())
    assert not kept
