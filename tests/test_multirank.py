"""generate under torchrun: ranks split the units, the last one seals; a killed rank is picked up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (REPO, TEST_THREADS, classifier_table, journal_path, journal_paths, read_output, run_cli, run_cli_subprocess,
                      save_teacher, write_parquet)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": str(TEST_THREADS), **extra}


def _args(corpus: Path, teacher: str, out: Path) -> list[str]:
    return ["generate", str(corpus), "--teacher", teacher, "--out", str(out), "--id-column", "id",
            "--rows-per-shard", "13", "--batch-size", "5", "--no-progress"]


def _hashes(out: Path) -> list[tuple[str, str]]:
    return [(s["file"], s["sha256"]) for s in json.loads((out / "manifest.json").read_text())["shards"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    corpus = write_parquet(classifier_table(117, seed=21), root / "c.parquet")
    teacher = save_teacher("slow_teachers:slow_digits", 4, root / "t.safetensors")
    single = root / "single"
    result = run_cli(*_args(corpus, teacher, single))  # in process, on one thread like each rank (conftest.TEST_THREADS)
    assert result.code == 0, result.err
    return corpus, teacher, single


def test_two_rank_torchrun_equals_one_process(tmp_path, setup):
    corpus, teacher, single = setup
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "softlabels.cli", *_args(corpus, teacher, out)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert journal_paths(out) == [journal_path(out, 0), journal_path(out, 1)]
    assert read_output(out).equals(read_output(single))
    assert _hashes(out) == _hashes(single)


def test_a_killed_rank_is_picked_up_by_a_rerun(tmp_path, setup):
    corpus, teacher, single = setup
    out = tmp_path / "ranks"
    # rank 1 finishes its units alone: committed, but not sealed
    lone = subprocess.run([sys.executable, "-m", "softlabels.cli", *_args(corpus, teacher, out)],
                          env=_env(RANK="1", WORLD_SIZE="2"), capture_output=True, text=True)
    assert lone.returncode == 0 and "rank 1 of 2" in lone.stdout
    assert not (out / "manifest.json").exists()
    # rank 0 is killed after its first shard
    process = subprocess.Popen([sys.executable, "-m", "softlabels.cli", *_args(corpus, teacher, out)],
                               env=_env(RANK="0", WORLD_SIZE="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = journal_path(out, 0)
    deadline = time.monotonic() + 120
    while not (journal.is_file() and '"kind": "shard"' in journal.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "rank 0 ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    # the rerun of both ranks completes what is missing and seals
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "softlabels.cli", *_args(corpus, teacher, out)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_output(out).equals(read_output(single))
    assert _hashes(out) == _hashes(single)
    assert run_cli_subprocess("verify", out).returncode == 0


def test_one_helper_reads_the_launcher_environment():
    from softlabels.distributed import DistributedEnv, distributed_env
    from softlabels.errors import UserError

    assert distributed_env({}) == DistributedEnv(0, 1, 0)
    assert distributed_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistributedEnv(3, 4, 1)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"RANK": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(UserError):
            distributed_env(bad)
