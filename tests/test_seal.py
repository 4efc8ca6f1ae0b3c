"""seal: a multi-rank run whose ranks all committed but nobody sealed is sealed from its journals alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import classifier_table, journal_path, journal_paths, run_cli, save_teacher, shard_path, shard_paths, write_parquet

UNITS = 9  # 117 rows, 13 per shard


def _generate(corpus: Path, teacher: str, out: Path) -> None:
    result = run_cli("generate", corpus, "--teacher", teacher, "--out", out, "--id-column", "id",
                     "--rows-per-shard", 13, "--batch-size", 5, "--no-progress")
    assert result.code == 0, result.err


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-process run, and the same run made by two ranks one after the other, left unsealed."""
    root = tmp_path_factory.mktemp("seal")
    corpus = write_parquet(classifier_table(117, seed=21), root / "c.parquet")
    teacher = save_teacher("softlabels.models:digits_mlp", 4, root / "t.safetensors")
    single = root / "single"
    _generate(corpus, teacher, single)
    ranked = root / "ranked"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORLD_SIZE", "2")
        patch.setenv("RANK", "1")
        _generate(corpus, teacher, ranked)
        assert not (ranked / "manifest.json").exists()  # rank 1 alone: committed, not sealed
        rank1_only = root / "rank1_only"
        shutil.copytree(ranked, rank1_only)
        patch.setenv("RANK", "0")
        _generate(corpus, teacher, ranked)  # the last rank seals ...
    sealed_by_rank = _manifest(ranked)
    (ranked / "manifest.json").unlink()  # ... but was killed before its manifest reached the disk
    assert journal_paths(ranked) == [journal_path(ranked, 0), journal_path(ranked, 1)]
    assert [p.name for p in journal_paths(ranked)] == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert len(shard_paths(ranked)) == UNITS
    return {"root": root, "corpus": corpus, "teacher": teacher, "single": single, "ranked": ranked,
            "rank1_only": rank1_only, "sealed_by_rank": sealed_by_rank}


def _copy(runs, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(runs[name], target)
    return target


def test_seal_writes_the_manifest_a_normal_run_writes(runs, tmp_path):
    directory = _copy(runs, "ranked", tmp_path)
    result = run_cli("seal", directory)
    assert result.code == 0, result.err
    assert "sealed" in result.out and f"{UNITS} shards" in result.out and "117 rows" in result.out
    manifest = _manifest(directory)
    # nothing in a manifest is volatile (no times, no absolute output paths): the whole record matches
    assert manifest == _manifest(runs["single"])
    assert manifest == runs["sealed_by_rank"]
    assert manifest["complete"] is True and len(manifest["shards"]) == UNITS
    assert "fidelity" in manifest and manifest["fidelity"]["positions"] == 117
    verified = run_cli("verify", directory)
    assert verified.code == 0, verified.err
    # generate accepts the sealed directory as its own finished run
    again = run_cli("generate", runs["corpus"], "--teacher", runs["teacher"], "--out", directory, "--id-column", "id",
                    "--rows-per-shard", 13, "--batch-size", 5, "--no-progress")
    assert again.code == 0 and "already complete" in again.out, again.err


def test_seal_of_a_sealed_directory_says_so_and_changes_nothing(runs, tmp_path):
    directory = _copy(runs, "single", tmp_path)
    before = (directory / "manifest.json").read_bytes()
    result = run_cli("seal", directory)
    assert result.code == 0, result.err
    assert "already sealed" in result.out
    assert (directory / "manifest.json").read_bytes() == before


def _refused(directory: Path, *expected: str) -> str:
    result = run_cli("seal", directory)
    assert result.code == 2, (result.out, result.err)
    message = result.err.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    for text in expected:
        assert text in message, message
    assert not (directory / "manifest.json").exists()
    assert not list(directory.glob("manifest.json*"))
    return message


def test_a_missing_shard_is_named_and_nothing_is_sealed(runs, tmp_path):
    directory = _copy(runs, "ranked", tmp_path)
    shard_path(directory, 4).unlink()
    message = _refused(directory, "shard-000004.parquet", f"1 of {UNITS} units")
    assert "shard-000003.parquet" not in message


def test_units_of_a_rank_that_never_ran_are_all_named(runs, tmp_path):
    """Rank 0 never started: its units are in no journal, yet the corpus record says they exist."""
    directory = _copy(runs, "rank1_only", tmp_path)
    assert not journal_path(directory, 0).exists() and journal_path(directory, 1).is_file()
    missing = [f"shard-{unit:06d}.parquet" for unit in range(0, UNITS, 2)]
    message = _refused(directory, f"{len(missing)} of {UNITS} units", *missing)
    assert "shard-000001.parquet" not in message


def test_a_missing_journal_line_counts_as_a_missing_unit(runs, tmp_path):
    directory = _copy(runs, "ranked", tmp_path)
    journal = journal_path(directory, 1)
    lines = journal.read_text().splitlines(keepends=True)
    kept = [line for line in lines if '"shard-000005.parquet"' not in line]
    assert len(kept) == len(lines) - 1
    journal.write_text("".join(kept))
    _refused(directory, "shard-000005.parquet")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_named_and_nothing_is_sealed(runs, tmp_path, damage):
    directory = _copy(runs, "ranked", tmp_path)
    path = shard_path(directory, 3)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        _refused(directory, "shard-000003.parquet", "sha256")
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))
        _refused(directory, "shard-000003.parquet", "bytes")


def test_journals_of_different_runs_are_refused(runs, tmp_path):
    directory = _copy(runs, "ranked", tmp_path)
    journal = journal_path(directory, 1)
    lines = journal.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["settings"]["top_k"] = 3
    record["fingerprint"] = "0123456789abcdef"
    journal.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))
    _refused(directory, "different runs")


@pytest.mark.parametrize("kind", ["empty", "absent"])
def test_a_directory_without_journals_is_a_usage_error(tmp_path, kind):
    directory = tmp_path / "nothing"
    if kind == "empty":
        directory.mkdir()
    result = run_cli("seal", directory)
    assert result.code == 1, (result.out, result.err)
    assert len(result.err.strip().splitlines()) == 1 and str(directory) in result.err
