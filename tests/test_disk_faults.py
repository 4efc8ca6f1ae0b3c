"""Local disk faults are one line, leave nothing half-written, and a rerun after the fault is fixed
equals an uninterrupted run.

Disk full comes from a real small tmpfs where the test may mount one (root, as in CI), and always
from a patched writer: ``os.fsync`` / ``os.pwrite`` raise the errno for the chosen files (found by
their /proc/self/fd link), which is where a full disk shows on a real filesystem too. A read-only
--out is a tmpfs remounted read-only (root ignores chmod), else a chmod 0o555 folder.
"""

from __future__ import annotations

import importlib
import contextlib
import errno
import fnmatch
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pytest
import torch

from conftest import DIGITS_TEACHERS, digits_mlp_soft_labels, small_classifier_run, directory_files, classifier_table, frame_table, run_cli, save_teacher, tmp_files, write_parquet

GENERATE = ["--id-column", "id", "--rows-per-shard", 20, "--batch-size", 7, "--no-progress", "--teacher", DIGITS_TEACHERS[0]]
REASON = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the patched writer finds files through /proc/self/fd")


def _mount_works() -> bool:
    if os.geteuid() != 0:
        return False
    probe = Path(f"/tmp/softlabels-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
        if mounted:
            subprocess.run(["umount", str(probe)], check=True)
        return mounted
    except OSError:
        return False
    finally:
        probe.rmdir()


CAN_MOUNT = _mount_works()


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``, unmounted on the way out."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def fail_writes(monkeypatch: pytest.MonkeyPatch, pattern: str, code: int, after: int = 0) -> None:
    """Patched writer: fsync and pwrite of files whose name matches ``pattern`` raise ``code`` (after
    ``after`` of them succeeded), as a full, read-only or forbidden disk does."""
    real_fsync, real_pwrite, seen = os.fsync, os.pwrite, [0]

    def refused(fd: int) -> bool:
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return False
        if not fnmatch.fnmatch(name, pattern):
            return False
        seen[0] += 1
        return seen[0] > after

    def fsync(fd: int) -> None:
        if refused(fd):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if refused(fd):
            real_pwrite(fd, bytes(data)[: len(data) // 3], offset)  # part of it lands, as on a real disk
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "pwrite", pwrite)


def one_line(err: str, *words: str) -> None:
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    for word in words:
        assert word in err, err


def nothing_looks_complete(out: Path, straight: dict[str, bytes]) -> None:
    """No temporary file, no manifest, no torn journal line, and every file in data/ is a whole shard
    (the very bytes of an uninterrupted run's)."""
    assert not tmp_files(out)
    assert not (out / "manifest.json").exists()
    journal = out / "_journal" / "rank-00000.jsonl"
    text = journal.read_text() if journal.exists() else ""
    assert not text or text.endswith("\n"), "a journal line was left torn"
    assert all(json.loads(line) for line in text.splitlines())
    for shard in sorted((out / "data").glob("*")) if (out / "data").exists() else []:
        assert shard.read_bytes() == straight.get(f"data/{shard.name}"), f"{shard} is in data/ but not a whole shard"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """61 rows in units of 20, and the files of an uninterrupted run."""
    path, _, straight = small_classifier_run(tmp_path_factory.mktemp("disk"))
    return path, straight


# -- disk full --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tmpfs", "patched"])
def test_disk_full_during_generate_is_one_line_and_the_rerun_after_freeing_space_completes(tmp_path, corpus, variant, monkeypatch):
    path, straight = corpus
    with contextlib.ExitStack() as stack:
        if variant == "tmpfs":
            if not CAN_MOUNT:
                pytest.skip("needs root and mount for a real tmpfs (the patched variant runs everywhere)")
            disk = stack.enter_context(tmpfs(tmp_path / "disk", "24k"))  # room for about two of the four shards
            out = disk / "out"
        else:
            out = tmp_path / "out"
            fail_writes(monkeypatch, "shard-*.parquet.tmp", errno.ENOSPC, after=2)
        full = run_cli("generate", path, "--out", out, *GENERATE)
        assert full.code == 1
        one_line(full.err, "no space left on device", str(out))
        nothing_looks_complete(out, straight)
        if variant == "tmpfs":
            remount(disk, "size=1m")
        else:
            monkeypatch.undo()
        rerun = run_cli("generate", path, "--out", out, *GENERATE)
        assert rerun.code == 0, rerun.err
        assert directory_files(out) == straight
        assert not tmp_files(out)


@pytest.mark.parametrize("pattern, code, where", [
    ("rank-00000.jsonl", errno.ENOSPC, "_journal/rank-00000.jsonl"),      # a journal line
    ("manifest.json.*.tmp", errno.ENOSPC, "manifest.json"),               # the manifest
    ("shard-*.parquet.tmp", errno.EACCES, "data/shard-000000.parquet"),   # a shard
    ("rank-00000.jsonl.*.tmp", errno.EROFS, "_journal/rank-00000.jsonl"),  # the journal's run record
], ids=["journal-line", "manifest", "shard-permission", "run-record-read-only"])
def test_generate_write_fault_names_the_file_and_cause_and_the_rerun_equals_uninterrupted(tmp_path, corpus, monkeypatch, pattern, code, where):
    path, straight = corpus
    out = tmp_path / "out"
    fail_writes(monkeypatch, pattern, code, after=1 if pattern == "rank-00000.jsonl" else 0)
    result = run_cli("generate", path, "--out", out, *GENERATE)
    assert result.code == 1
    one_line(result.err, f"{out / where}: {REASON[code]}")
    nothing_looks_complete(out, straight)
    monkeypatch.undo()
    rerun = run_cli("generate", path, "--out", out, *GENERATE)
    assert rerun.code == 0, rerun.err
    assert directory_files(out) == straight


@pytest.fixture(scope="module")
def soft(tmp_path_factory) -> Path:
    return digits_mlp_soft_labels(tmp_path_factory.mktemp("disktrain"))


TRAIN = ["--student", "softlabels.models:digits_mlp", "--max-steps", 7, "--batch-size", 8, "--log-every", 1,
         "--checkpoint-every", 3, "--seed", 4, "--no-progress"]


@pytest.mark.parametrize("pattern, name", [("checkpoint.pt.*.tmp", "checkpoint.pt"), ("metrics.jsonl", "metrics.jsonl")])
def test_disk_full_while_training_is_one_line_and_leaves_no_partial_file(tmp_path, soft, monkeypatch, pattern, name):
    out = tmp_path / "out"
    fail_writes(monkeypatch, pattern, errno.ENOSPC, after=1)  # the first checkpoint / metrics line is written
    result = run_cli("train-student", soft, "--out", out, *TRAIN)
    assert result.code == 1
    one_line(result.err, f"{out / name}: no space left on device")
    assert not tmp_files(out)
    lines = (out / "metrics.jsonl").read_text()
    assert lines.endswith("\n") and all(json.loads(line) for line in lines.splitlines())
    monkeypatch.undo()
    resumed = run_cli("train-student", soft, "--out", out, *TRAIN, "--resume")
    assert resumed.code == 0, resumed.err
    assert (out / "student.safetensors").is_file() and not tmp_files(out)


# -- read-only and unwritable --out ---------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder nothing may be written in, and the cause softlabels should name."""
    if CAN_MOUNT:
        with tmpfs(tmp_path / "ro", "1m") as where:
            remount(where, "ro")
            yield where, "read-only file system"
    elif os.geteuid() != 0:
        where = tmp_path / "ro"
        where.mkdir()
        where.chmod(0o555)
        yield where, "permission denied"
        where.chmod(0o755)
    else:
        pytest.skip("root without mount: chmod does not bind root")


def test_read_only_out_is_one_line_for_generate_and_train(corpus, soft, read_only):
    where, cause = read_only
    generated = run_cli("generate", corpus[0], "--out", where / "out", *GENERATE)
    assert generated.code == 1
    one_line(generated.err, f"cannot create directory {where / 'out'}: {cause}")
    trained = run_cli("train-student", soft, "--out", where / "student", *TRAIN)
    assert trained.code == 1
    one_line(trained.err, str(where / "student"), cause)


@pytest.mark.skipif(not CAN_MOUNT, reason="needs a tmpfs to remount read-only")
def test_a_partial_run_on_a_disk_made_read_only_is_one_line_and_resumes_when_writable(tmp_path, corpus):
    path, straight = corpus
    with tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        assert run_cli("generate", path, "--out", out, *GENERATE).code == 0
        (out / "manifest.json").unlink()
        (out / "data" / "shard-000002.parquet").unlink()
        remount(disk, "ro")
        result = run_cli("generate", path, "--out", out, *GENERATE)
        assert result.code == 1
        one_line(result.err, "read-only file system", str(out))
        remount(disk, "rw")
        assert run_cli("generate", path, "--out", out, *GENERATE).code == 0
        assert directory_files(out) == straight


# -- torn lines -------------------------------------------------------------------------------------


def test_a_torn_journal_line_is_cut_off_and_never_swallows_the_next_record(tmp_path):
    from softlabels.rundir import Journal
    from softlabels.storage import Location

    journal = Journal(Location.of(tmp_path / "_journal" / "rank-00000.jsonl"))
    journal.start({"fingerprint": "f", "settings": {}})
    entries = [{"file": f"shard-{u:06d}.parquet", "unit": u, "bytes": 100 + u} for u in range(3)]
    journal.append(entries[0])
    with open(journal.path, "ab") as handle:  # a crash mid-append
        handle.write(b'{"bytes": 101, "file": "shard-0000')
    journal.append(entries[1])
    whole = json.dumps({"kind": "shard", **entries[2]}, sort_keys=True)
    with open(journal.path, "ab") as handle:  # a crash between the record and its newline
        handle.write(whole.encode())
    journal.append({**entries[0], "bytes": 7})
    run, shards = journal.read()
    assert run is not None and [(s["file"], s["bytes"]) for s in shards] == [
        ("shard-000000.parquet", 100), ("shard-000001.parquet", 101), ("shard-000002.parquet", 102), ("shard-000000.parquet", 7)]
    assert all(json.loads(line) for line in journal.path.read_text().splitlines())


def test_a_torn_run_record_is_redone_once_not_on_every_rerun(tmp_path, corpus):
    path, straight = corpus
    out = tmp_path / "out"
    assert run_cli("generate", path, "--out", out, *GENERATE).code == 0
    journal = out / "_journal" / "rank-00000.jsonl"
    first, rest = journal.read_bytes().split(b"\n", 1)
    journal.write_bytes(first[: len(first) // 2] + b"\n" + rest)
    (out / "manifest.json").unlink()
    again = run_cli("generate", path, "--out", out, *GENERATE)
    assert again.code == 0 and "4 written this run" in again.out, again.out + again.err
    third = run_cli("generate", path, "--out", out, *GENERATE)
    assert third.code == 0 and "already complete" in third.out, third.out
    assert directory_files(out) == straight


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, soft):
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert run_cli("train-student", soft, "--out", straight, *TRAIN).code == 0
    assert run_cli("train-student", soft, "--out", out, *TRAIN, "--halt-after", 3).code == 0
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"ce": 0.1, "kd": 0.')
    resumed = run_cli("train-student", soft, "--out", out, *TRAIN, "--resume")
    assert resumed.code == 0, resumed.err

    def losses(where: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in map(json.loads, (where / "metrics.jsonl").read_text().splitlines())]

    assert losses(out) == losses(straight)


# -- other one-liners -------------------------------------------------------------------------------


def test_a_zero_row_corpus_with_automatic_rows_per_shard_is_one_line(tmp_path):
    empty = write_parquet(classifier_table(0), tmp_path / "empty.parquet")
    result = run_cli("generate", empty, "--out", tmp_path / "out", "--teacher", DIGITS_TEACHERS[0], "--no-progress")
    assert result.code == 1
    one_line(result.err, "empty corpus", str(empty))


def test_ctrl_c_of_train_student_says_whether_a_checkpoint_exists(tmp_path, soft, monkeypatch):
    import softlabels.train.recipe as recipe

    out = tmp_path / "out"
    real = recipe.verify_inputs

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "verify_inputs", interrupted)
    early = run_cli("train-student", soft, "--out", out, *TRAIN)
    assert early.code == 130 and "no checkpoint was written" in early.err and not out.exists()
    monkeypatch.setattr(recipe, "verify_inputs", real)
    assert run_cli("train-student", soft, "--out", out, *TRAIN, "--halt-after", 3).code == 0
    monkeypatch.setattr(recipe, "verify_inputs", interrupted)
    later = run_cli("train-student", soft, "--out", out, *TRAIN, "--resume")
    assert later.code == 130 and "checkpoint in --out is kept" in later.err and "--resume" in later.err


def test_frames_of_unequal_feature_sizes_are_refused_by_sample_id_before_the_forward(tmp_path):
    table = frame_table(19, seed=3)
    rows = table.column("inputs").to_pylist()
    rows[11][0] = rows[11][0][:-1]  # one frame of 12 features among frames of 13
    table = table.set_column(1, "inputs", pa.array(rows, pa.list_(pa.list_(pa.float32()))))
    corpus = write_parquet(table, tmp_path / "frames.parquet")
    teacher = save_teacher("softlabels.models:frame_tagger", 0, tmp_path / "frames.safetensors")
    result = run_cli("generate", corpus, "--out", tmp_path / "out", "--teacher", teacher, "--id-column", "id", "--no-progress")
    assert result.code == 1
    one_line(result.err, "--input-column 'inputs'", "f-00011")
    assert "forward failed" not in result.err


def test_vectors_of_another_length_in_jsonl_are_refused_by_sample_id(tmp_path):
    path = tmp_path / "vectors.jsonl"
    with open(path, "w") as handle:
        for i in range(3000):  # the first MiB decides the vector length (64); rows 2950.. break it
            handle.write(json.dumps({"id": f"v{i}", "inputs": [0.25] * (63 if i >= 2950 and i % 3 == 0 else 64)}) + "\n")
    result = run_cli("generate", path, "--out", tmp_path / "out", "--teacher", DIGITS_TEACHERS[0], "--id-column", "id",
                     "--rows-per-shard", 1000, "--no-progress")
    assert result.code == 1
    one_line(result.err, "'inputs'", "v2952", "v2955")


def test_an_unexpected_os_error_is_one_line(tmp_path, monkeypatch):
    verify_module = importlib.import_module("softlabels.verify")  # softlabels.verify is the function

    def broken(directory, quick=False):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "x"))

    monkeypatch.setattr(verify_module, "verify", broken)
    result = run_cli("verify", tmp_path)
    assert result.code == 1
    one_line(result.err, str(tmp_path / "x"), "input/output error")


class _FlatClassifier(torch.nn.Module):
    """A vector classifier that accepts (and ignores) lengths: ragged rows fail inside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x)


def flat_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return _FlatClassifier()


def test_a_teacher_failing_on_later_rows_is_one_line_naming_them(tmp_path):
    rows = [[0.5] * (65 if i == 23 else 64) for i in range(30)]
    table = pa.table({"id": [f"t-{i:05d}" for i in range(30)], "inputs": pa.array(rows, pa.list_(pa.float32()))})
    corpus = write_parquet(table, tmp_path / "ragged.parquet")
    result = run_cli("generate", corpus, "--out", tmp_path / "out", "--teacher", f"{__name__}:flat_classifier", "--id-column", "id",
                     "--batch-size", 7, "--no-progress")
    assert result.code == 1
    one_line(result.err, "forward failed", "t-00021", "t-00023")
    assert not tmp_files(tmp_path / "out")
