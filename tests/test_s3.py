"""Object storage: every command on ``s3://`` against a real S3 HTTP API (moto, in-process).

The corpus and the output live in a bucket; results are compared with the same corpus read from
local disk into a local directory (sample ids and fingerprints do not depend on where the corpus
is, so the soft-label columns must be identical), and an interrupted S3 run, resumed, must give
shards byte-identical (sha256) to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (DIGITS_TEACHERS, REPO, classifier_table, interrupt_after, run_cli, run_cli_subprocess, s3_journal_shards, save_teacher,
                      token_table, upload, write_parquet)
from softlabels.storage import Location

SOFT_COLUMNS = ("sample_id", "topk_ids", "topk_logprobs", "confidence", "entropy", "agreement")


def read_dataset(uri: str) -> pa.Table:
    data = Location.of(uri) / "data"
    tables = []
    for name in data.listdir():
        with (data / name).open() as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables).sort_by("sample_id")


def shard_hashes(uri: str) -> dict[str, str]:
    data = Location.of(uri) / "data"
    return {name: hashlib.sha256((data / name).read_bytes()).hexdigest() for name in data.listdir()}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


@pytest.fixture
def corpus(tmp_path: Path, s3_bucket: str) -> tuple[Path, str]:
    local = write_parquet(classifier_table(117, seed=31), tmp_path / "corpus" / "digits.parquet")
    return local, upload(local, f"{s3_bucket}/corpus/digits.parquet")


def generate_args(corpus: object, out: object, *extra: object) -> list[object]:
    args: list[object] = ["generate", corpus, "--out", out, "--id-column", "id", "--label-column", "label",
                          "--rows-per-shard", 40, "--no-progress"]
    for spec in DIGITS_TEACHERS:
        args += ["--teacher", spec]
    return [*args, *extra]


def test_every_command_on_s3_equals_local(corpus, s3_bucket, tmp_path):
    local_corpus, s3_corpus = corpus
    out = f"{s3_bucket}/soft"
    result = run_cli(*generate_args(s3_corpus, out))
    assert result.code == 0, result.err
    local = run_cli(*generate_args(local_corpus, tmp_path / "local"))
    assert local.code == 0, local.err
    remote_table, local_table = read_dataset(out), read_dataset(str(tmp_path / "local"))
    for column in SOFT_COLUMNS:
        assert remote_table.column(column).equals(local_table.column(column)), column
    manifest = json.loads((Location.of(out) / "manifest.json").read_text())
    assert manifest["fingerprint"] == json.loads((tmp_path / "local" / "manifest.json").read_text())["fingerprint"]
    # the object store holds only whole objects: shards, journal records, the manifest
    names = sorted(p.uri[len(out) + 1:] for p in Location.of(out).walk())
    assert names == sorted(["manifest.json", *[f"data/shard-{u:06d}.parquet" for u in range(3)],
                            "_journal/rank-00000/run.json", *[f"_journal/rank-00000/shard-{u:06d}.json" for u in range(3)]])

    verified = run_cli("verify", out)
    assert verified.code == 0 and "3 shards, 117 rows" in verified.out
    inspected = run_cli("inspect", out, "--json")
    assert inspected.code == 0, inspected.err
    assert json.loads(inspected.out)["rows"] == 117
    selected = run_cli("select", out, "--where", "confidence > 0.5", "--out", f"{s3_bucket}/selected")
    assert selected.code == 0, selected.err
    kept = read_dataset(f"{s3_bucket}/selected")
    confidence = local_table.column("confidence").to_numpy()
    assert kept.column("sample_id").to_pylist() == [s for s, c in zip(local_table.column("sample_id").to_pylist(), confidence) if c > 0.5]
    assert run_cli("verify", f"{s3_bucket}/selected").code == 0
    trained = run_cli("train-student", out, "--student", "softlabels.models:digits_mlp", "--out", tmp_path / "student",
                      "--max-steps", 5, "--batch-size", 16, "--eval", f"{s3_bucket}/selected", "--no-progress")
    assert trained.code == 0, trained.err
    reference = run_cli("train-student", tmp_path / "local", "--student", "softlabels.models:digits_mlp", "--out", tmp_path / "student_local",
                        "--max-steps", 5, "--batch-size", 16, "--no-progress")
    assert reference.code == 0
    losses = [json.loads(line).get("loss") for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    local_losses = [json.loads(line).get("loss") for line in (tmp_path / "student_local" / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] == [x for x in local_losses if x is not None]


def test_rerun_on_s3_does_no_work_and_corruption_is_caught(corpus, s3_bucket):
    _, s3_corpus = corpus
    out = f"{s3_bucket}/soft"
    assert run_cli(*generate_args(s3_corpus, out)).code == 0
    again = run_cli(*generate_args(s3_corpus, out))
    assert again.code == 0 and "already complete" in again.out
    shard = Location.of(out) / "data" / "shard-000001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli("verify", out)
    assert bad.code == 2 and "shard-000001.parquet" in bad.err
    redone = run_cli(*generate_args(s3_corpus, out))
    assert redone.code == 0 and "1 written this run" in redone.out
    assert run_cli("verify", out).code == 0


def test_polars_reads_the_s3_data_prefix(corpus, s3_bucket):
    import polars as pl

    _, s3_corpus = corpus
    out = f"{s3_bucket}/soft"
    assert run_cli(*generate_args(s3_corpus, out)).code == 0
    expected = read_dataset(out)
    frame = pl.scan_parquet(f"{out}/data/").collect().sort("sample_id")
    assert frame.height == expected.num_rows == 117
    assert frame["confidence"].to_list() == expected.column("confidence").to_pylist()


@pytest.mark.parametrize("sig", [signal.SIGKILL], ids=["sigkill"])
def test_killed_s3_generate_resumes_byte_identical(tmp_path, s3_bucket, sig):
    local = write_parquet(token_table(117, seed=8), tmp_path / "tokens.parquet")
    s3_corpus = upload(local, f"{s3_bucket}/corpus/tokens.parquet")
    teacher = save_teacher("slow_teachers:slow_tokens", 5, tmp_path / "slow_tokens.safetensors")

    def args(out: str) -> list[str]:
        return ["generate", s3_corpus, "--out", out, "--id-column", "id", "--rows-per-shard", "25", "--batch-size", "7",
                "--no-progress", "--teacher", teacher]

    straight, resumed = f"{s3_bucket}/straight", f"{s3_bucket}/resumed"
    first = run_cli(*args(straight))  # in process, on the suite's pinned threads like the processes below
    assert first.code == 0, first.err
    interrupted = interrupt_after([sys.executable, "-m", "softlabels.cli", *args(resumed)], 2, sig, env())
    assert interrupted.returncode == -sig and s3_journal_shards(resumed) == 2
    assert not (Location.of(resumed) / "manifest.json").is_file(), "an interrupted run must not be sealed"
    rerun = run_cli_subprocess(*args(resumed))
    assert rerun.returncode == 0, rerun.stderr
    assert shard_hashes(resumed) == shard_hashes(straight) and len(shard_hashes(straight)) == 5


def test_two_ranks_on_s3_equal_one_process(tmp_path, s3_bucket):
    local = write_parquet(classifier_table(117, seed=23), tmp_path / "c.parquet")
    s3_corpus = upload(local, f"{s3_bucket}/corpus/c.parquet")
    teacher = save_teacher("slow_teachers:slow_digits", 4, tmp_path / "t.safetensors")
    # the single process and each rank on one thread: another count may round differently (test_determinism)
    base = {**{k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}, "OMP_NUM_THREADS": "1"}

    def args(out: str) -> list[str]:
        return [sys.executable, "-m", "softlabels.cli", "generate", s3_corpus, "--teacher", teacher, "--out", out,
                "--id-column", "id", "--rows-per-shard", "13", "--batch-size", "5", "--no-progress"]

    single = subprocess.run(args(f"{s3_bucket}/single"), env=base, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args(f"{s3_bucket}/ranks")[1:]]
    ranks = subprocess.run(command, env=base, capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert shard_hashes(f"{s3_bucket}/ranks") == shard_hashes(f"{s3_bucket}/single")
    manifests = [json.loads((Location.of(f"{s3_bucket}/{d}") / "manifest.json").read_text()) for d in ("single", "ranks")]
    assert manifests[0]["shards"] == manifests[1]["shards"] and manifests[0]["fingerprint"] == manifests[1]["fingerprint"]
    journals = Location.of(f"{s3_bucket}/ranks/_journal").listdir()
    assert journals == ["rank-00000", "rank-00001"]


def test_train_student_checkpoints_to_s3_and_resumes_exactly(corpus, s3_bucket, tmp_path):
    """Checkpoints, metrics and the student go to an S3 --out; halt + --resume equals a straight run."""
    _, s3_corpus = corpus
    data = f"{s3_bucket}/soft"
    assert run_cli(*generate_args(s3_corpus, data)).code == 0
    common = ["train-student", data, "--student", "softlabels.models:digits_mlp", "--max-steps", 8, "--batch-size", 16,
              "--checkpoint-every", 4, "--log-every", 1, "--no-progress"]
    straight = run_cli(*common, "--out", tmp_path / "straight")
    assert straight.code == 0, straight.err
    out = f"{s3_bucket}/student"
    halted = run_cli(*common, "--out", out, "--halt-after", 4)
    assert halted.code == 0 and "halted after step 4" in halted.out, halted.err
    resumed = run_cli(*common, "--out", out, "--resume")
    assert resumed.code == 0, resumed.err
    remote = [json.loads(line) for line in (Location.of(out) / "metrics.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in remote if "loss" in m] == [m["loss"] for m in local if "loss" in m]
    assert (Location.of(out) / "student.safetensors").read_bytes() == (tmp_path / "straight" / "student.safetensors").read_bytes()
    assert sorted(Location.of(out).listdir()) == ["checkpoint.pt", "metrics.jsonl", "student.json", "student.safetensors"]
