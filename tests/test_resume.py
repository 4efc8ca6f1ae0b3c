"""Resumed equals uninterrupted: SIGKILL or SIGINT a real ``generate`` process, rerun, compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (REPO, interrupt_after, journal_shards, read_output, run_cli, run_cli_subprocess, save_teacher, shard_paths, tmp_files,
                      token_table, classifier_table, write_parquet)


def _generate_args(corpus: Path, teachers: list[str], out: Path) -> list[str]:
    args = ["generate", str(corpus), "--out", str(out), "--id-column", "id", "--rows-per-shard", "25", "--batch-size", "7", "--no-progress"]
    for spec in teachers:
        args += ["--teacher", spec]
    return args


def _generate_command(corpus: Path, teachers: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "softlabels.cli", *_generate_args(corpus, teachers, out)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def _interrupt_after(command: list[str], shards: int, sig: int) -> subprocess.CompletedProcess[str]:
    return interrupt_after(command, shards, sig, _env())


def _shard_hashes(out: Path) -> list[tuple[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["file"], s["sha256"]) for s in manifest["shards"]]


@pytest.fixture(scope="module")
def setups(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("resume")
    digits = write_parquet(classifier_table(117, seed=3), root / "digits.parquet")
    teachers = [save_teacher("slow_teachers:slow_digits", seed, root / f"slow{seed}.safetensors") for seed in (0, 1)]
    tokens = write_parquet(token_table(117, seed=4), root / "tokens.parquet")
    token_teacher = [save_teacher("slow_teachers:slow_tokens", 5, root / "slow_tokens.safetensors")]
    return {"ensemble": (digits, teachers), "tokens": (tokens, token_teacher)}


@pytest.fixture(scope="module")
def straight_runs(setups, tmp_path_factory) -> dict[str, Path]:
    """Each setup's uninterrupted run, once (in this process, on the suite's pinned thread count, as the
    subprocesses below run: the same bytes, test_determinism)."""
    runs = {}
    for name, (corpus, teachers) in setups.items():
        runs[name] = tmp_path_factory.mktemp("straight") / name
        result = run_cli(*_generate_args(corpus, teachers, runs[name]))
        assert result.code == 0, result.err
    return runs


@pytest.mark.parametrize("setup", ["ensemble", "tokens"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, setups, straight_runs, setup, sig):
    corpus, teachers = setups[setup]
    straight, resumed = straight_runs[setup], tmp_path / "resumed"

    interrupted = _interrupt_after(_generate_command(corpus, teachers, resumed), 2, sig)
    assert not (resumed / "manifest.json").exists(), "an interrupted run must not be sealed"
    if sig == signal.SIGINT:
        assert interrupted.returncode == 130
        assert "Traceback" not in interrupted.stderr
        assert "rerun" in interrupted.stderr
        assert not tmp_files(resumed), "Ctrl-C must not leave partial shards"
    else:
        assert interrupted.returncode == -signal.SIGKILL
    committed_before = journal_shards(resumed)
    assert 2 <= committed_before < 5

    rerun = run_cli_subprocess(*_generate_args(corpus, teachers, resumed))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{5 - committed_before} written this run" in rerun.stdout
    assert read_output(resumed).equals(read_output(straight))
    assert _shard_hashes(resumed) == _shard_hashes(straight)
    assert not tmp_files(resumed)


def test_rerun_of_a_complete_directory_does_nothing(tmp_path, setups):
    corpus, teachers = setups["ensemble"]
    out = tmp_path / "out"
    command = _generate_args(corpus, teachers, out)
    assert run_cli_subprocess(*command).returncode == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_paths(out)}
    assert len(mtimes) == 5
    again = run_cli_subprocess(*command)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(out)} == mtimes


def test_different_settings_in_the_same_directory_are_refused(tmp_path, setups):
    corpus, teachers = setups["ensemble"]
    out = tmp_path / "out"
    assert run_cli_subprocess(*_generate_args(corpus, teachers, out)).returncode == 0
    changed = _generate_args(corpus, teachers, out) + ["--top-k", "3"]
    result = run_cli_subprocess(*changed)
    assert result.returncode == 1
    assert "--top-k" in result.stderr and "10" in result.stderr and "3" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    fewer = _generate_args(corpus, teachers[:1], out)
    result = run_cli_subprocess(*fewer)
    assert result.returncode == 1 and "--teacher" in result.stderr
