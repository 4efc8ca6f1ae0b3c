"""One writer per output: the lease that generate, seal, select and train-student hold on their output.

A second writer is refused with one line naming the holder; what the first writes verifies and
equals a single uninterrupted run; a stale lease (a killed holder, an expired store lease) is taken
over, by exactly one of several racers; the ranks of one torchrun job share the lease.
Concurrency is made deterministic with hooks: a holder parked on a gate file, a barrier in front of
the conditional create.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import REPO, classifier_table, run_cli, save_teacher, write_parquet
from softlabels import lease as lease_module
from softlabels.distributed import launcher_job
from softlabels.lease import LOCAL_NAME, STORE_DIR, LeaseHeld, hold_lease
from softlabels.storage import Location

ROWS, ROWS_PER_SHARD = 97, 23  # 5 shards, the last short
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """Each test starts outside any launcher (the tests that need one set it)."""
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1", **extra}


@contextlib.contextmanager
def killed_holder(out: str) -> "Iterator[subprocess.Popen[str]]":
    """Another process holding ``out``'s lease (as `softlabels generate`) while the block runs; then it is
    SIGKILLed, as a crashed holder would be, leaving its lease record behind."""
    code = ("import time; from softlabels.lease import hold_lease\n"
            f"with hold_lease({out!r}, 'softlabels generate'):\n"
            "    print('held', flush=True); time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def one_line_error(code: int, err: str, *needles: object) -> str:
    assert code == 1, (code, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]}"
    return lines[0]


def data_hashes(out: str) -> dict[str, str]:
    data = Location.of(out) / "data"
    return {name: hashlib.sha256((data / name).read_bytes()).hexdigest() for name in data.listdir()}


def renewed_after(record, expiry: float) -> bool:
    """Has the lease record been renewed past ``expiry``? (A store read that meets a renewal may be cut short.)"""
    try:
        return json.loads(record.read_bytes())["expires_unix"] > expiry
    except json.JSONDecodeError:
        return False


def wait_for(condition, process: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the holder ended before {what}: {process.returncode} {process.stderr.read() if process.stderr else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- two generate processes on one --out -----------------------------------------------------------


@pytest.mark.parametrize("place", ["local", "s3"])
def test_a_second_generate_is_refused_and_the_first_equals_a_single_run(tmp_path, request, place):
    corpus = write_parquet(classifier_table(ROWS, seed=19), tmp_path / "c.parquet")
    teacher = save_teacher("gated_teachers:gated_digits", 7, tmp_path / "gated.safetensors")
    root = str(tmp_path) if place == "local" else request.getfixturevalue("s3_bucket")
    target, single = f"{root}/concurrent", f"{root}/single"

    def args(out: str) -> list[str]:
        return ["generate", str(corpus), "--teacher", teacher, "--out", out, "--id-column", "id",
                "--rows-per-shard", str(ROWS_PER_SHARD), "--batch-size", "8", "--no-progress"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the writer runs with OMP_NUM_THREADS=1: bytes are compared
    try:
        assert run_cli(*args(single)).code == 0
    finally:
        torch.set_num_threads(threads)

    gate = tmp_path / "gate"
    gate.mkdir()
    first = subprocess.Popen([sys.executable, "-m", "softlabels.cli", *args(target)], env=child_env(SOFTLABELS_TEST_GATE=str(gate)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for((gate / "entered").exists, first, "it was parked mid-run")
        os.environ["SOFTLABELS_TEST_GATE"] = str(gate)  # the second would note a teacher load in gate/loaded
        try:
            second = run_cli(*args(target))
        finally:
            del os.environ["SOFTLABELS_TEST_GATE"]
        line = one_line_error(second.code, second.err, f"--out {target}", "'softlabels generate'", f"pid {first.pid}",
                              f"host {socket.gethostname()}", "wait for it to finish, or stop it")
        assert " for " in line  # its age
        assert (gate / "loaded").read_text().split() == [str(first.pid)], "the refused writer loaded its teacher"
        (gate / "release").touch()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    assert run_cli("verify", target).code == 0
    assert data_hashes(target) == data_hashes(single) and len(data_hashes(single)) == 5
    assert not {LOCAL_NAME, STORE_DIR} & set(Location.of(target).listdir()), "the lease outlived its writer"


# -- every writer holds it; readers do not care ----------------------------------------------------


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sealed")
    corpus = write_parquet(classifier_table(61, seed=4), root / "c.parquet")
    teacher = save_teacher("softlabels.models:digits_mlp", 2, root / "t.safetensors")
    out = root / "soft"
    result = run_cli("generate", corpus, "--teacher", teacher, "--out", out, "--id-column", "id", "--rows-per-shard", 25, "--no-progress")
    assert result.code == 0, result.err
    return out


def test_seal_select_and_train_student_refuse_while_held_and_readers_do_not_care(sealed, tmp_path):
    import polars as pl

    manifest = (sealed / "manifest.json").read_bytes()
    with hold_lease(sealed, "softlabels generate"):
        assert sorted(os.listdir(sealed)) == sorted(["_journal", "data", "manifest.json", LOCAL_NAME])
        refused = run_cli("seal", sealed)
        one_line_error(refused.code, refused.err, f"{sealed} is being written by 'softlabels generate'", f"pid {os.getpid()}")
        assert run_cli("verify", sealed).code == 0
        assert json.loads(run_cli("inspect", sealed, "--json").out)["rows"] == 61
        assert pl.scan_parquet(f"{sealed}/data").collect().height == 61
    assert (sealed / "manifest.json").read_bytes() == manifest
    assert LOCAL_NAME not in os.listdir(sealed)

    for command, extra in [("softlabels select", ["select", sealed, "--where", "confidence > 0.3"]),
                           ("softlabels train-student", ["train-student", sealed, "--student", "softlabels.models:digits_mlp",
                                                        "--max-steps", 2, "--no-progress"])]:
        out = tmp_path / command.split()[1]
        with hold_lease(out, command):
            refused = run_cli(*extra, "--out", out)
            one_line_error(refused.code, refused.err, f"--out {out} is being written by '{command}'", f"pid {os.getpid()}")
            assert os.listdir(out) == [LOCAL_NAME], "the refused writer wrote something"
        assert not out.exists(), "the lease left the directory it made"
        done = run_cli(*extra, "--out", out)
        assert done.code == 0, done.err
        assert LOCAL_NAME not in os.listdir(out)


def test_a_lease_file_softlabels_did_not_write_is_not_overwritten(tmp_path):
    (tmp_path / LOCAL_NAME).write_text("my notes\n")
    with pytest.raises(lease_module.UserError, match="_lease.json, which softlabels did not write"):
        with hold_lease(tmp_path, "softlabels generate"):
            pass
    assert (tmp_path / LOCAL_NAME).read_text() == "my notes\n"


# -- stale leases ---------------------------------------------------------------------------------


def test_a_stale_local_lease_of_a_killed_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    with killed_holder(str(out)) as holder:
        with pytest.raises(LeaseHeld) as refused:
            with hold_lease(out, "softlabels seal", flag=None):
                pass
        assert refused.value.holder["pid"] == holder.pid and f"pid {holder.pid} on host" in str(refused.value)
    left = json.loads((out / LOCAL_NAME).read_text())  # the dead holder's record is still there
    assert left["pid"] == holder.pid
    with hold_lease(out, "softlabels generate") as lease:
        assert lease.previous is not None and lease.previous["pid"] == holder.pid
        assert json.loads((out / LOCAL_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the lease of 'softlabels generate' (pid {holder.pid}" in capsys.readouterr().err
    assert not (out / LOCAL_NAME).exists()


def epoch_record(number: int, expires_in: float, pid: int = 4242, host: str = "elsewhere") -> bytes:
    now = time.time()
    return json.dumps({"softlabels_lease": 1, "command": "softlabels generate", "host": host, "pid": pid,
                       "job": f"{host}:{pid}:x", "launcher": False, "rank": 0, "world_size": 1, "started": "",
                       "started_unix": now - 200, "epoch": number, "ttl_s": 60, "expires_unix": now + expires_in}).encode()


def test_an_expired_store_lease_is_taken_over_and_a_live_one_refuses(s3_bucket, monkeypatch):
    out = f"{s3_bucket}/soft"
    folder = Location.of(out) / STORE_DIR
    (folder / "00000003.json").write_bytes(epoch_record(3, expires_in=30))
    (folder / "00000002.json").write_bytes(epoch_record(2, expires_in=-500, pid=1))  # an old epoch left behind
    with pytest.raises(LeaseHeld) as refused:
        with hold_lease(out, "softlabels generate"):
            pass
    message = str(refused.value)
    assert "pid 4242 on host elsewhere, for 3 min 2" in message and message.startswith(f"--out {out} is being written")
    assert folder.listdir() == ["00000002.json", "00000003.json"], "a refused writer changed the lease"

    (folder / "00000003.json").write_bytes(epoch_record(3, expires_in=-1))  # its holder stopped renewing
    monkeypatch.setattr(lease_module, "RENEW_S", 0.02)
    with hold_lease(out, "softlabels generate") as lease:
        assert lease.previous["pid"] == 4242 and folder.listdir() == ["00000004.json"]
        first = json.loads((folder / "00000004.json").read_bytes())
        assert first["pid"] == os.getpid() and first["epoch"] == 4
        wait_for(lambda: renewed_after(folder / "00000004.json", first["expires_unix"]),
                 what="a renewal")
    assert Location.of(out).listdir() == [], "released: nothing of the lease is left"


def test_two_racers_for_an_expired_store_epoch_have_exactly_one_winner(s3_bucket, monkeypatch):
    out = f"{s3_bucket}/soft"
    folder = Location.of(out) / STORE_DIR
    (folder / "00000001.json").write_bytes(epoch_record(1, expires_in=-1))
    racers = 2
    barrier = threading.Barrier(racers, timeout=60)
    create = Location.write_bytes

    def create_together(self, data, exclusive=False):
        if exclusive and f"/{STORE_DIR}/" in self.uri:
            barrier.wait()  # every racer has seen epoch 1 expired and now creates epoch 2 at once
        return create(self, data, exclusive)

    monkeypatch.setattr(Location, "write_bytes", create_together)
    held, refused, release = [], [], threading.Event()

    def race() -> None:
        try:
            with hold_lease(out, "softlabels generate") as lease:
                held.append(lease)
                release.wait(60)
        except LeaseHeld as exc:
            refused.append(exc)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(held) + len(refused) == racers, what="both racers")
    try:
        assert len(held) == 1 and len(refused) == 1
        assert refused[0].holder["job"] == held[0].record["job"] and refused[0].holder["epoch"] == 2
        assert folder.listdir() == ["00000002.json"]
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    assert Location.of(out).listdir() == []


# -- torchrun: one job's ranks share it -----------------------------------------------------------


def test_launcher_job_is_shared_by_the_ranks_of_one_job_only():
    job = {"WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
    assert launcher_job({}) is None and launcher_job({"RANK": "1", "WORLD_SIZE": "2"}) is None
    assert launcher_job({**job, "WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launcher_job({**job, "RANK": "0"}) == launcher_job({**job, "RANK": "1", "LOCAL_RANK": "1"}) is not None
    others = [{**job, "MASTER_PORT": "29501"}, {**job, "TORCHELASTIC_RUN_ID": "abc"}, {**job, "WORLD_SIZE": "3"}]
    assert len({launcher_job(job), *(launcher_job(other) for other in others)}) == 4
    assert socket.gethostname() in launcher_job({**job, "MASTER_ADDR": "127.0.0.1"})
    assert socket.gethostname() not in launcher_job(job)


@pytest.mark.parametrize("place", ["local", "s3"])
def test_the_ranks_of_one_torchrun_job_share_the_lease(tmp_path, request, monkeypatch, place):
    out = str(tmp_path / "out") if place == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    job = {"WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "run-a"}

    def as_rank(rank: int, **env: str) -> None:
        for key, value in {**job, "RANK": str(rank), **env}.items():
            monkeypatch.setenv(key, value)

    def other_job_refused() -> None:
        as_rank(0, TORCHELASTIC_RUN_ID="run-b")
        with pytest.raises(LeaseHeld, match="rank 0 of a 2-rank job"):
            with hold_lease(out, "softlabels generate"):
                pass

    as_rank(0)
    rank0 = hold_lease(out, "softlabels generate")
    first = rank0.__enter__()
    as_rank(1)
    rank1 = hold_lease(out, "softlabels generate")
    second = rank1.__enter__()
    assert not first.joined and second.joined and second.holder["pid"] == os.getpid() and second.holder["rank"] == 0
    other_job_refused()
    rank0.__exit__(None, None, None)  # rank 0 is done; rank 1 still writes
    other_job_refused()
    rank1.__exit__(None, None, None)
    assert Location.of(out).listdir() == [], "the last rank out removes the lease"
    as_rank(0, TORCHELASTIC_RUN_ID="run-b")
    with hold_lease(out, "softlabels generate") as lease:
        assert not lease.joined and lease.previous is None


def test_a_store_lease_of_a_holder_killed_on_this_machine_is_taken_over_at_once(s3_bucket, tmp_path):
    out = f"{s3_bucket}/soft"
    with killed_holder(out) as holder:
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid} on host"):
            with hold_lease(out, "softlabels seal", flag=None):
                pass
    folder = Location.of(out) / STORE_DIR
    assert folder.listdir() == ["00000001.json"]  # unexpired: it was renewed moments ago
    with hold_lease(out, "softlabels generate") as lease:  # its pid is gone from this machine: no need to wait
        assert lease.previous["pid"] == holder.pid and folder.listdir() == ["00000002.json"]
    assert Location.of(out).listdir() == []
