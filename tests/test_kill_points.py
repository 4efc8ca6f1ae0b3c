"""kill -9 at every commit step (``SOFTLABELS_KILL_AT``, no sleeps), rerun, get an uninterrupted run's bytes.

The killed runs are real processes (a SIGKILL runs no cleanup); reference runs and reruns run in this
process. Every run uses one thread, so equal bytes are the promise tested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DIGITS_TEACHERS, digits_mlp_soft_labels, small_classifier_run, directory_files, REPO, classifier_table, run_cli, save_teacher, tmp_files, write_parquet

GENERATE = ["--id-column", "id", "--rows-per-shard", 20, "--batch-size", 7, "--no-progress", "--teacher", DIGITS_TEACHERS[0]]


def killed(*args: object, at: str) -> subprocess.CompletedProcess[str]:
    """``softlabels ARGS`` in a child process that SIGKILLs itself at kill point ``at``."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1", "SOFTLABELS_KILL_AT": at}
    result = subprocess.run([sys.executable, "-m", "softlabels.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, f"kill point {at} was not reached: {result.returncode} {result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """61 rows in units of 20 (4 shards, the last of one row), and the files of an uninterrupted run."""
    path, _, straight = small_classifier_run(tmp_path_factory.mktemp("kill"))
    return path, straight


@pytest.mark.parametrize("point", [
    "rank-00000.jsonl-staged",          # the journal's run record, before its rename
    "shard-000001.parquet-staged",      # a whole shard fsync'd in _staging, not yet renamed
    "shard-000002.parquet-renamed",     # a shard in data/, not yet journalled
    "rank-00000.jsonl-torn:2",          # half of the second shard record on disk
    "manifest.json-staged",             # the manifest's temporary file, before its rename
    "manifest.json-renamed",            # sealed, not yet reported
])
def test_generate_killed_at_each_commit_step_then_rerun_equals_uninterrupted(tmp_path, corpus, point):
    path, straight = corpus
    out = tmp_path / "out"
    killed("generate", path, "--out", out, *GENERATE, at=point)
    if point.startswith("manifest.json-staged"):
        assert not (out / "manifest.json").exists() and list(out.glob("manifest.json.*.tmp")), "the kill left the manifest's temporary file"
    rerun = run_cli("generate", path, "--out", out, *GENERATE)
    assert rerun.code == 0, rerun.err
    assert directory_files(out) == straight
    assert not tmp_files(out)
    assert run_cli("verify", out).code == 0
    if point.startswith("rank-00000.jsonl-torn"):  # the torn record was dropped, and did not swallow the next one
        lines = (out / "_journal" / "rank-00000.jsonl").read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
        assert sorted(json.loads(line).get("file", "") for line in lines[:-1])[1:] == [f"shard-{u:06d}.parquet" for u in range(4)]


def test_seal_killed_before_its_rename_leaves_nothing_after_the_next_seal(tmp_path, corpus):
    path, straight = corpus
    out = tmp_path / "out"
    killed("generate", path, "--out", out, *GENERATE, at="manifest.json-staged")
    killed("seal", out, at="manifest.json-staged")
    assert len(list(out.glob("manifest.json.*.tmp"))) == 1  # the killed seal's own (it removed generate's first)
    result = run_cli("seal", out)
    assert result.code == 0, result.err
    assert not tmp_files(out)
    assert directory_files(out) == straight


@pytest.fixture(scope="module")
def soft(tmp_path_factory) -> Path:
    return digits_mlp_soft_labels(tmp_path_factory.mktemp("killtrain"))


TRAIN = ["--student", "softlabels.models:digits_mlp", "--max-steps", 9, "--batch-size", 8, "--log-every", 1,
         "--checkpoint-every", 3, "--seed", 4, "--lr", 3e-3, "--no-progress"]


def _train_files(out: Path) -> dict[str, object]:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"student": (out / "student.safetensors").read_bytes(),
            "metrics": [{k: v for k, v in r.items() if k != "positions_per_s"} for r in metrics]}


@pytest.mark.parametrize("point", [
    "checkpoint.pt-staged",        # the first checkpoint's temporary file, never renamed
    "checkpoint.pt-renamed:2",     # the second checkpoint in place
    "metrics.jsonl-torn:5",        # half of step 5's metrics line
])
def test_train_killed_at_each_commit_step_then_resumed_equals_uninterrupted(tmp_path, soft, point):
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert run_cli("train-student", soft, "--out", straight, *TRAIN).code == 0
    killed("train-student", soft, "--out", out, *TRAIN, at=point)
    if point == "checkpoint.pt-staged":
        assert list(out.glob("checkpoint.pt.*.tmp")) and not (out / "checkpoint.pt").exists()
    resumed = run_cli("train-student", soft, "--out", out, *TRAIN, "--resume")
    assert resumed.code == 0, resumed.err
    assert not tmp_files(out)
    assert _train_files(out) == _train_files(straight)
