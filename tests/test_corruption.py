"""Nothing corrupt is read silently: ``verify`` names the bad shard and a resumed ``generate`` redoes it.

One sealed run (117 rows in units of 25: five shards, the last short) is made once per module and
copied for each test. Output is deterministic, so after a resume regenerates a damaged unit the
directory is byte-identical to the original, and only that unit's file was touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from softlabels.rundir import manifest_text

from conftest import DIGITS_TEACHERS, CliResult, classifier_table, data_dir, run_cli, run_cli_subprocess, shard_paths, tmp_files, write_parquet

ROWS = 117
ROWS_PER_SHARD = 25
SHARDS = [f"shard-{i:06d}.parquet" for i in range(5)]
TEACHERS = DIGITS_TEACHERS[:2]


def generate_args(corpus: Path, out: Path, *extra: object) -> list[object]:
    args: list[object] = ["generate", corpus, "--out", out, "--id-column", "id", "--rows-per-shard", ROWS_PER_SHARD, "--no-progress"]
    for spec in TEACHERS:
        args += ["--teacher", spec]
    return args + list(extra)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_verification_failed(result: CliResult, *needles: object) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("verification failed:"), result.err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not named in: {lines[0]}"
    return lines[0]


class Original:
    """The module's sealed run: where its corpus is, and its files' bytes."""

    def __init__(self, root: Path) -> None:
        self.corpus = write_parquet(classifier_table(ROWS), root / "corpus" / "digits-like.parquet")
        self.out = root / "original"
        result = run_cli(*generate_args(self.corpus, self.out))
        assert result.code == 0, result.err
        assert [p.name for p in shard_paths(self.out)] == SHARDS
        self.sha = {name: sha256(data_dir(self.out) / name) for name in SHARDS}
        self.manifest_text = (self.out / "manifest.json").read_text()
        # a second, different run (k=3), for a shard that belongs to another run
        self.other = root / "other"
        assert run_cli(*generate_args(self.corpus, self.other, "--top-k", 3)).code == 0

    def copy(self, destination: Path) -> Path:
        shutil.copytree(self.out, destination, copy_function=shutil.copy2)
        return destination


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    return Original(tmp_path_factory.mktemp("corruption"))


@pytest.fixture
def out(original: Original, tmp_path: Path) -> Path:
    return original.copy(tmp_path / "out")


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def write_manifest(directory: Path, data: dict) -> None:
    """An edited manifest with a checksum that matches the edit: what the checks behind the checksum see."""
    (directory / "manifest.json").write_text(manifest_text(data))


def file_ids(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_paths(directory)}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero(path: Path) -> None:
    path.write_bytes(b"")


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_footer(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside the footer's metadata length / magic region
    path.write_bytes(bytes(data))


CORRUPTIONS = {"truncated": truncate, "zero_bytes": zero, "flipped_byte": flip_middle, "flipped_footer": flip_footer}


def test_original_verifies(original: Original, out: Path) -> None:
    result = run_cli("verify", out)
    assert result.code == 0, result.err
    assert "5 shards" in result.out and f"{ROWS} rows" in result.out


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("victim", [SHARDS[2], SHARDS[4]])
def test_corrupt_shard_is_named_by_verify_and_regenerated_by_resume(
    original: Original, out: Path, corruption: str, victim: str
) -> None:
    CORRUPTIONS[corruption](data_dir(out) / victim)
    assert sha256(data_dir(out) / victim) != original.sha[victim]

    line = assert_verification_failed(run_cli("verify", out), victim)
    assert not any(other in line for other in SHARDS if other != victim)

    untouched = {name: ident for name, ident in file_ids(out).items() if name != victim}
    result = run_cli(*generate_args(original.corpus, out))
    assert result.code == 0, result.err
    assert "(1 written this run)" in result.out
    after = file_ids(out)
    for name, ident in untouched.items():
        assert after[name] == ident, f"{name} was rewritten"
    assert {name: sha256(data_dir(out) / name) for name in SHARDS} == original.sha
    assert (out / "manifest.json").read_text() == original.manifest_text
    assert not tmp_files(out)
    assert run_cli("verify", out).code == 0


def test_unsealed_directory_with_a_damaged_shard_resumes(original: Original, out: Path) -> None:
    """A crash before the manifest plus a damaged shard: resume redoes that unit and seals."""
    (out / "manifest.json").unlink()
    truncate(data_dir(out) / SHARDS[1])
    assert_verification_failed(run_cli("verify", out), "manifest.json")
    result = run_cli(*generate_args(original.corpus, out))
    assert result.code == 0 and "(1 written this run)" in result.out, result.err
    assert {name: sha256(data_dir(out) / name) for name in SHARDS} == original.sha
    assert (out / "manifest.json").read_text() == original.manifest_text


def test_deleted_shard_is_named_and_regenerated(original: Original, out: Path) -> None:
    (data_dir(out) / SHARDS[3]).unlink()
    assert_verification_failed(run_cli("verify", out), SHARDS[3], "missing")
    result = run_cli(*generate_args(original.corpus, out))
    assert result.code == 0 and "(1 written this run)" in result.out, result.err
    assert sha256(data_dir(out) / SHARDS[3]) == original.sha[SHARDS[3]]


def test_verify_through_the_entry_point(out: Path) -> None:
    zero(data_dir(out) / SHARDS[0])
    proc = run_cli_subprocess("verify", out)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and SHARDS[0] in proc.stderr


# ---------------------------------------------------------------- manifest tampering


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "shard-1.parquet", "shard-000002.parquet/../../x", "SHARD-000002.PARQUET"])
def test_manifest_shard_names_outside_the_pattern_are_refused(out: Path, name: str) -> None:
    # give every name something real to point at, so refusing it is about the name alone
    for target in (out.parent / "x", out / "x"):  # "../x" from DIR/data is DIR/x
        target.write_bytes((data_dir(out) / SHARDS[2]).read_bytes())
    shutil.copy2(data_dir(out) / SHARDS[2], data_dir(out) / "shard-1.parquet")
    data = manifest(out)
    data["shards"][2]["file"] = name
    write_manifest(out, data)
    assert_verification_failed(run_cli("verify", out), repr(name))


def test_manifest_shard_name_of_wrong_type_is_refused(out: Path) -> None:
    data = manifest(out)
    data["shards"][0]["file"] = None
    write_manifest(out, data)
    assert_verification_failed(run_cli("verify", out), "None")


def test_shard_symlinked_outside_the_directory_is_refused(original: Original, out: Path, tmp_path: Path) -> None:
    # the link's target has exactly the right bytes: only where it resolves gives it away
    outside = tmp_path / "elsewhere" / "shard.parquet"
    outside.parent.mkdir()
    shutil.copy2(data_dir(out) / SHARDS[2], outside)
    (data_dir(out) / SHARDS[2]).unlink()
    os.symlink(outside, data_dir(out) / SHARDS[2])
    assert_verification_failed(run_cli("verify", out), SHARDS[2], "outside")
    assert sha256(outside) == original.sha[SHARDS[2]]



def test_resume_never_trusts_or_writes_through_an_outside_symlink(original: Original, out: Path, tmp_path: Path) -> None:
    """DESIGN.md leaves open whether resume refuses the link or replaces it; either way the file
    outside is never modified and the directory is never reported good while the link is there."""
    outside = tmp_path / "elsewhere" / "shard.parquet"
    outside.parent.mkdir()
    outside.write_bytes(b"not mine to overwrite")
    (data_dir(out) / SHARDS[2]).unlink()
    os.symlink(outside, data_dir(out) / SHARDS[2])
    result = run_cli(*generate_args(original.corpus, out))
    assert "Traceback" not in result.err
    assert outside.read_bytes() == b"not mine to overwrite"
    if result.code == 0:  # regenerated: the link was replaced by a real shard
        assert not (data_dir(out) / SHARDS[2]).is_symlink()
        assert sha256(data_dir(out) / SHARDS[2]) == original.sha[SHARDS[2]]
        assert run_cli("verify", out).code == 0
    else:  # refused, naming the file
        assert result.code == 2 and SHARDS[2] in result.err and len(result.err.splitlines()) == 1
        assert run_cli("verify", out).code == 2

def test_no_manifest(out: Path) -> None:
    (out / "manifest.json").unlink()
    assert_verification_failed(run_cli("verify", out), "manifest.json")


def test_empty_directory(tmp_path: Path) -> None:
    assert_verification_failed(run_cli("verify", tmp_path), "manifest.json")


def test_incomplete_manifest(out: Path) -> None:
    data = manifest(out)
    data["complete"] = False
    write_manifest(out, data)
    assert_verification_failed(run_cli("verify", out), "not complete")


def test_not_sealed_is_its_own_error_which_training_reports_as_work_to_finish(out: Path, tmp_path: Path) -> None:
    """An unfinished manifest, or none: NotSealedError (a VerificationError: verify exits 2), which
    train-student turns into one usage line naming DATA_DIR (exit 1); a damaged shard stays exit 2."""
    from softlabels.errors import NotSealedError
    from softlabels.rundir import RunDirectory

    def train(data: Path) -> CliResult:
        return run_cli("train-student", data, "--student", "softlabels.models:digits_mlp", "--out", tmp_path / "student",
                       "--max-steps", 1, "--no-progress")

    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    shard = shard_paths(damaged)[0]
    shard.write_bytes(shard.read_bytes()[:-40])
    assert train(damaged).code == 2
    data = manifest(out)
    data["complete"] = False
    write_manifest(out, data)
    for step in ("unfinished", "no manifest"):
        with pytest.raises(NotSealedError):
            RunDirectory.open(out).read_sealed()
        result = train(out)
        assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
        assert "DATA_DIR" in result.err and str(out) in result.err, result.err
        (out / "manifest.json").unlink(missing_ok=True)  # then the same with no manifest at all


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": "softlabels.v0", "complete": true}', "\xff"])
def test_unreadable_or_foreign_manifest(out: Path, text: str) -> None:
    (out / "manifest.json").write_text(text, encoding="latin-1")
    assert_verification_failed(run_cli("verify", out), "manifest.json")


def test_nonexistent_directory_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "never_made"
    result = run_cli("verify", missing)
    assert result.code == 1
    assert result.err.splitlines() == [f"error: {missing}: no such directory"]


def test_verify_on_a_file_is_a_usage_error(out: Path) -> None:
    result = run_cli("verify", out / "manifest.json")
    assert result.code == 1 and result.err.startswith("error:") and "Traceback" not in result.err


def test_row_count_mismatch_in_manifest(out: Path) -> None:
    data = manifest(out)
    data["shards"][1]["rows"] += 1
    data["totals"]["rows"] += 1  # keep the totals consistent: the shard entry itself is wrong
    write_manifest(out, data)
    assert_verification_failed(run_cli("verify", out), SHARDS[1], "rows")


def test_totals_mismatch_in_manifest(out: Path) -> None:
    data = manifest(out)
    data["totals"]["rows"] -= 1
    write_manifest(out, data)
    assert_verification_failed(run_cli("verify", out), "manifest.json", "totals")


def test_sha_mismatch_in_manifest(out: Path) -> None:
    data = manifest(out)
    data["shards"][3]["sha256"] = "0" * 64
    write_manifest(out, data)
    assert_verification_failed(run_cli("verify", out), SHARDS[3], "sha256")


def test_shard_from_another_run_is_refused(original: Original, out: Path) -> None:
    """A whole, readable shard of a different run, with the manifest updated to its bytes and hash."""
    shutil.copy2(data_dir(original.other) / SHARDS[2], data_dir(out) / SHARDS[2])
    data = manifest(out)
    size = (data_dir(out) / SHARDS[2]).stat().st_size
    data["totals"]["bytes"] += size - data["shards"][2]["bytes"]  # a consistent forgery: only the header gives it away
    data["shards"][2]["bytes"] = size
    data["shards"][2]["sha256"] = sha256(data_dir(out) / SHARDS[2])
    write_manifest(out, data)
    assert_verification_failed(run_cli("verify", out), SHARDS[2], "another run")


def test_stray_tmp_files_are_ignored_by_verify_and_removed_by_generate(original: Original, out: Path) -> None:
    strays = [out / "_staging" / f"{SHARDS[2]}.tmp", out / "manifest.json.tmp"]
    (out / "_staging").mkdir(exist_ok=True)  # a sealed run has none; a crash mid-write leaves one
    for stray in strays:
        stray.write_bytes(b"half a shard")
    before = file_ids(out)
    result = run_cli("verify", out)
    assert result.code == 0, result.err
    assert "ignoring" not in result.out  # .tmp files are not stray shards either

    result = run_cli(*generate_args(original.corpus, out))
    assert result.code == 0, result.err
    assert "already complete" in result.out
    assert not any(stray.exists() for stray in strays)
    assert file_ids(out) == before
    assert (out / "manifest.json").read_text() == original.manifest_text


def test_stray_shard_not_in_manifest_is_refused_by_name(out: Path) -> None:
    (data_dir(out) / "shard-000099.parquet").write_bytes(b"garbage that is not parquet")
    assert_verification_failed(run_cli("verify", out), "shard-000099.parquet", "not listed")


def test_resumed_shards_are_readable_parquet(original: Original, out: Path) -> None:
    """After regeneration the shard is a full Parquet file with the original row count and header."""
    flip_middle(data_dir(out) / SHARDS[4])
    assert run_cli(*generate_args(original.corpus, out)).code == 0
    metadata = pq.read_metadata(data_dir(out) / SHARDS[4])
    assert metadata.num_rows == ROWS - 4 * ROWS_PER_SHARD
    assert manifest(out)["shards"][4]["rows"] == metadata.num_rows
