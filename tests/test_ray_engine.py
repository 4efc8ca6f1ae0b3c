"""``generate --engine ray``: the Ray engine equals the local engine row for row, and the two resume each other.

One local Ray (2 CPUs, actors take half a CPU each) is started for the module; in-process runs join
it, subprocess runs start their own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, interrupt_after, journal_paths, journal_shards, read_output, run_cli, save_teacher, tmp_files, token_table, write_parquet

ray = pytest.importorskip("ray")

SOFT_COLUMNS = ["sample_id", "inputs", "topk_ids", "topk_logprobs", "confidence", "entropy", "agreement"]
SHARDS = 5  # 117 rows in files of 70 and 47, 25 rows per shard: units of 25, 25, 20, 25, 22


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-corpus")
    table = token_table(117, seed=4)
    write_parquet(table.slice(0, 70), root / "corpus" / "a.parquet")
    write_parquet(table.slice(70), root / "corpus" / "b.parquet")
    return root / "corpus"


def _args(corpus: Path, teachers: list[str], out: Path, *extra: object) -> list[object]:
    args: list[object] = ["generate", corpus, "--out", out, "--id-column", "id", "--rows-per-shard", 25,
                          "--batch-size", 7, "--top-k", 6, "--no-progress", *extra]
    for spec in teachers:
        args += ["--teacher", spec]
    return args


def _manifest_shards(out: Path) -> list[tuple[str, int, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(s["file"], s["rows"], s["sha256"]) for s in manifest["shards"]]


def _journalled(out: Path) -> dict[str, dict]:
    entries = {}
    for journal in journal_paths(out):
        for line in journal.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "shard":
                entries[record["file"]] = {k: v for k, v in record.items() if k not in ("time", "kind")}
    return entries


def test_ray_engine_equals_local_engine_row_for_row(tmp_path, corpus):
    """Ragged tokens, two files, uneven shards, an ensemble whose second member has NaN rows (skipped), 2 actors."""
    teachers = [save_teacher("softlabels.models:token_gru", 5, tmp_path / "gru.safetensors"), "fixture_teachers:nonfinite_tokens"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    first = run_cli(*_args(corpus, teachers, local, "--on-nonfinite", "skip"))
    assert first.code == 0, first.err
    second = run_cli(*_args(corpus, teachers, on_ray, "--on-nonfinite", "skip", "--engine", "ray", "--ray-actors", 2))
    assert second.code == 0, second.err
    assert len(second.out.strip().splitlines()) == 1, "stdout holds the summary line only"
    assert f"in {SHARDS} shards ({SHARDS} written this run), " in second.out
    assert "rows skipped for non-finite teacher outputs" in second.out  # the keep-mask path ran

    ours, theirs = read_output(on_ray), read_output(local)
    assert ours.num_rows == theirs.num_rows < 117
    assert ours.select(SOFT_COLUMNS).equals(theirs.select(SOFT_COLUMNS))  # bitwise, row for row
    assert ours.equals(theirs)
    assert _manifest_shards(on_ray) == _manifest_shards(local)
    assert len(_journalled(local)) == SHARDS and _journalled(on_ray) == _journalled(local)
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (on_ray, local)]
    assert manifests[0] == manifests[1]  # settings, fingerprint, totals, fidelity: the engine leaves no trace
    verified = run_cli("verify", on_ray)
    assert verified.code == 0, verified.err


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def _interrupt_after(args: list[object], shards: int, sig: int) -> subprocess.CompletedProcess[str]:
    return interrupt_after([sys.executable, "-m", "softlabels.cli", *[str(a) for a in args]], shards, sig, _env())


@pytest.fixture(scope="module")
def slow_setup(tmp_path_factory, corpus) -> tuple[list[str], Path]:
    """Slow teachers (so runs can be interrupted) and their uninterrupted local output."""
    root = tmp_path_factory.mktemp("ray-slow")
    teachers = [save_teacher("slow_teachers:slow_tokens", seed, root / f"slow{seed}.safetensors") for seed in (1, 2)]
    straight = root / "straight"
    result = run_cli(*_args(corpus, teachers, straight))
    assert result.code == 0, result.err
    return teachers, straight


def test_local_run_killed_then_resumed_on_ray_equals_uninterrupted(tmp_path, corpus, slow_setup):
    teachers, straight = slow_setup
    out = tmp_path / "out"
    killed = _interrupt_after(_args(corpus, teachers, out), 2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    before = journal_shards(out)
    assert 2 <= before < SHARDS and not (out / "manifest.json").exists()

    resumed = run_cli(*_args(corpus, teachers, out, "--engine", "ray"))
    assert resumed.code == 0, resumed.err
    assert f"({SHARDS - before} written this run)" in resumed.out
    assert read_output(out).equals(read_output(straight))
    assert _manifest_shards(out) == _manifest_shards(straight)
    assert not tmp_files(out)
    again = run_cli(*_args(corpus, teachers, out))  # and the local engine sees a complete run
    assert again.code == 0 and "already complete" in again.out


def test_ray_run_ctrl_c_keeps_whole_shards_and_the_local_engine_finishes(tmp_path, corpus, slow_setup):
    """A subprocess with its own local Ray: SIGINT after one shard, then resumed by the local engine."""
    teachers, straight = slow_setup
    out = tmp_path / "out"
    interrupted = _interrupt_after(_args(corpus, teachers, out, "--engine", "ray"), 1, signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "Traceback" not in interrupted.stderr and "rerun" in interrupted.stderr
    assert interrupted.stdout == ""
    assert not tmp_files(out), "Ctrl-C must not leave partial shards"
    assert not (out / "manifest.json").exists()
    before = journal_shards(out)
    assert 1 <= before < SHARDS

    resumed = run_cli(*_args(corpus, teachers, out))
    assert resumed.code == 0, resumed.err
    assert f"({SHARDS - before} written this run)" in resumed.out
    assert read_output(out).equals(read_output(straight))
    assert _manifest_shards(out) == _manifest_shards(straight)


@pytest.mark.parametrize("extra, message", [
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --engine ray"),
    (["--engine", "local", "--ray-actors", "2"], "--ray-actors needs --engine ray"),
    (["--engine", "spark"], "--engine must be one of local, ray, got 'spark'"),
    (["--engine", "ray", "--ray-actors", "0"], "--ray-actors must be at least 1, got 0"),
])
def test_bad_engine_flags_are_one_line_errors(tmp_path, corpus, extra, message):
    result = run_cli(*_args(corpus, ["softlabels.models:token_gru"], tmp_path / "out", *extra))
    assert result.code == 1
    assert result.err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_fails_fast_before_any_work(tmp_path, corpus):
    result = run_cli(*_args(corpus, ["softlabels.models:token_gru"], tmp_path / "out", "--engine", "ray",
                            "--ray-address", "127.0.0.1:1"))
    assert result.code == 1
    assert result.err.startswith("error: --ray-address 127.0.0.1:1: no Ray cluster answers there (")
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_ray_is_one_line_naming_the_extra(tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = run_cli(*_args(corpus, ["softlabels.models:token_gru"], tmp_path / "out", "--engine", "ray"))
    assert result.code == 1
    assert result.err.strip() == "error: --engine ray needs Ray: pip install 'softlabels[ray]'"


def test_engine_is_not_part_of_the_fingerprint(tmp_path, corpus):
    from softlabels.generate import GenerateConfig, _prepare

    teacher = save_teacher("softlabels.models:token_gru", 0, tmp_path / "token_gru.safetensors")
    common = dict(corpus=[str(corpus)], teachers=[teacher], out=tmp_path / "out", id_column="id")
    local = _prepare(GenerateConfig(**common))
    on_ray = _prepare(GenerateConfig(**common, engine="ray", ray_actors=3))
    assert on_ray.settings == local.settings and on_ray.fingerprint == local.fingerprint


def test_ray_actors_decode_their_own_audio_and_equal_the_local_engine(tmp_path):
    """Audio path cells relative to the corpus file: each actor reads and decodes its units' audio
    (8 kHz and 22.05 kHz rows resampled, a stereo row mixed down), batched by length."""
    from test_audio_generate import audio_corpus

    corpus, _ = audio_corpus(tmp_path, "path")
    teacher = save_teacher("test_audio_generate:tiny", 2, tmp_path / "tiny.safetensors")
    common = ["generate", corpus, "--teacher", teacher, "--audio-column", "audio", "--id-column", "utt", "--rows-per-shard", 2,
              "--batch-seconds", 0.6, "--no-progress"]
    local = run_cli(*common, "--out", tmp_path / "local")
    assert local.code == 0, local.err
    on_ray = run_cli(*common, "--out", tmp_path / "ray", "--engine", "ray", "--ray-actors", 2)
    assert on_ray.code == 0, on_ray.err
    assert read_output(tmp_path / "ray").equals(read_output(tmp_path / "local"))
    assert _manifest_shards(tmp_path / "ray") == _manifest_shards(tmp_path / "local")
