"""What users really type: each misuse gets one line naming the culprit, the right exit code, no
traceback, and leaves every file that was already there byte-identical.

Each case runs the real console entry point in a subprocess inside a fresh copy of a workspace
(corpora, sealed soft-label directories, a corrupted copy, a folder holding the user's own files).
Every file of the workspace is hashed (sha256) before and after, and a refused command may not
leave any new file behind either.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DIGITS_TEACHERS, classifier_table, run_cli, run_cli_subprocess, write_jsonl, write_parquet
from fixture_teachers import NAN_MARKER

TEACHER = DIGITS_TEACHERS[0]
ROWS = 117


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace every case starts from; built once, copied per case."""
    root = tmp_path_factory.mktemp("misuse-template")
    table = classifier_table(ROWS, seed=21)
    write_parquet(table, root / "corpus" / "c.parquet")
    write_parquet(table.drop_columns(["label"]), root / "unlabeled" / "u.parquet")
    narrow = classifier_table(ROWS, seed=22, features=32)
    write_parquet(narrow, root / "narrow" / "n.parquet")
    pixels = table.column("inputs").combine_chunks().flatten().to_numpy().reshape(ROWS, 64)
    with_nan = pixels.copy()
    with_nan[[5, 60], 0] = NAN_MARKER
    write_parquet(pa.table({"id": table.column("id"), "inputs": pa.FixedSizeListArray.from_arrays(pa.array(with_nan.reshape(-1)), 64)}),
                  root / "nan" / "x.parquet")
    common = ["--id-column", "id", "--rows-per-shard", 40, "--no-progress", "--teacher", TEACHER]
    assert run_cli("generate", root / "corpus" / "c.parquet", "--label-column", "label", "--out", root / "soft", *common).code == 0
    assert run_cli("generate", root / "unlabeled" / "u.parquet", "--out", root / "soft_unlabeled", *common).code == 0
    shutil.copytree(root / "soft", root / "soft_corrupt")
    shard = root / "soft_corrupt" / "data" / "shard-000001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x5A
    shard.write_bytes(bytes(data))
    (root / "mine").mkdir()
    (root / "mine" / "shard-000000.parquet").write_bytes(b"the user's own file, not a softlabels shard")
    (root / "foreign_manifest").mkdir()
    (root / "foreign_manifest" / "manifest.json").write_text(json.dumps({"hello": "world", "settings": 3}))
    (root / "afile.txt").write_text("not a directory\n")
    (root / "empty").mkdir()
    (root / "student_out").mkdir()
    (root / "student_out" / "notes.txt").write_text("mine\n")
    (root / "broken_on_import.py").write_text('raise RuntimeError("this module is broken on purpose")\n')
    (root / "broken_factory.py").write_text('def teacher():\n    raise ValueError("no such width: 77")\n')
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Misuse:
    name: str
    args: Callable[[Path], list[object]]
    code: int
    culprits: tuple[str, ...]
    absent: tuple[str, ...] = ()


def gen(*extra: object) -> Callable[[Path], list[object]]:
    return lambda w: ["generate", w / "corpus" / "c.parquet", "--id-column", "id", "--no-progress", "--teacher", TEACHER,
                      *[w / str(e)[2:] if isinstance(e, str) and e.startswith("w/") else e for e in extra]]


def train(*extra: object) -> Callable[[Path], list[object]]:
    return lambda w: ["train-student", "--student", "softlabels.models:digits_mlp", "--no-progress", "--max-steps", 3,
                      *[w / str(e)[2:] if isinstance(e, str) and e.startswith("w/") else e for e in extra]]


def cmd(*parts: object) -> Callable[[Path], list[object]]:
    return lambda w: [w / str(p)[2:] if isinstance(p, str) and p.startswith("w/") else p for p in parts]


CASES = [
    # -- from the issue: data lost
    Misuse("out-holds-users-shard", gen("--out", "w/mine"), 1, ("--out", "shard-000000.parquet", "did not write")),
    Misuse("out-is-the-corpus-folder", lambda w: ["generate", w / "corpus", "--id-column", "id", "--teacher", TEACHER, "--out", w / "corpus"], 1, ("--out", "CORPUS")),
    Misuse("out-inside-the-corpus-folder", lambda w: ["generate", w / "corpus", "--id-column", "id", "--teacher", TEACHER, "--out", w / "corpus" / "soft"], 1, ("--out", "inside CORPUS")),
    # -- tracebacks
    Misuse("foreign-manifest-in-out", gen("--out", "w/foreign_manifest"), 1, ("--out", "manifest.json")),
    Misuse("vectors-too-narrow-for-teacher", lambda w: ["generate", w / "narrow" / "n.parquet", "--id-column", "id", "--teacher", TEACHER, "--out", w / "o"], 1, ("--teacher", "32")),
    Misuse("label-column-missing-in-shards", train("w/soft_unlabeled", "--out", "w/s", "--label-column", "label"), 1, ("--label-column", "label", "soft_unlabeled")),
    # -- looks like success
    Misuse("teacher-without-weights", lambda w: ["generate", w / "corpus" / "c.parquet", "--id-column", "id", "--teacher", "softlabels.models:digits_cnn", "--out", w / "o"], 1, ("--teacher", "@weights")),
    Misuse("alpha-0-on-unlabeled-shards", train("w/soft_unlabeled", "--out", "w/s", "--alpha", 0), 1, ("--alpha", "label")),
    Misuse("mix-weights-not-adding-up", train("w/soft", "--data", "w/soft", "--out", "w/s", "--mix", "0.7,0.7"), 1, ("--mix", "0.7,0.7")),
    # -- misleading messages
    Misuse("teacher-module-raises-on-import", lambda w: ["generate", w / "corpus" / "c.parquet", "--id-column", "id", "--teacher", "broken_on_import:teacher", "--out", w / "o"], 1, ("--teacher", "broken_on_import", "RuntimeError", "on purpose")),
    Misuse("teacher-factory-raises", lambda w: ["generate", w / "corpus" / "c.parquet", "--id-column", "id", "--teacher", "broken_factory:teacher", "--out", w / "o"], 1, ("--teacher", "teacher()", "ValueError", "width: 77")),
    Misuse("student-typo", lambda w: ["train-student", w / "soft", "--student", "softlabels.models:digits_mpl", "--out", w / "s"], 1, ("--student", "digits_mpl"), ("--teacher",)),
    Misuse("corrupt-eval-directory", train("w/soft", "--out", "w/s", "--eval", "w/soft_corrupt"), 2, ("--eval", "soft_corrupt", "shard-000001.parquet")),
    Misuse("corrupt-data-directory", train("w/soft_corrupt", "--out", "w/s"), 2, ("soft_corrupt", "shard-000001.parquet")),
    Misuse("inspect-flipped-bytes", cmd("inspect", "w/soft_corrupt"), 2, ("shard-000001.parquet",)),
    Misuse("bad-eval-directory-missing", train("w/soft", "--out", "w/s", "--eval", "w/nowhere"), 1, ("--eval", "nowhere")),
    # -- our own
    Misuse("top-k-zero", gen("--out", "w/o", "--top-k", 0), 1, ("--top-k", "0")),
    Misuse("batch-size-zero", gen("--out", "w/o", "--batch-size", 0), 1, ("--batch-size",)),
    Misuse("rows-per-shard-negative", gen("--out", "w/o", "--rows-per-shard", -5), 1, ("--rows-per-shard",)),
    Misuse("unknown-logprob-dtype", gen("--out", "w/o", "--logprob-dtype", "float8"), 1, ("--logprob-dtype", "float8")),
    Misuse("unknown-ensemble", gen("--out", "w/o", "--ensemble", "mean"), 1, ("--ensemble", "mean")),
    Misuse("missing-corpus-file", lambda w: ["generate", w / "nope.parquet", "--teacher", TEACHER, "--out", w / "o"], 1, ("nope.parquet",)),
    Misuse("missing-id-column", lambda w: ["generate", w / "corpus" / "c.parquet", "--id-column", "uid", "--teacher", TEACHER, "--out", w / "o"], 1, ("--id-column", "uid")),
    Misuse("out-is-a-file", gen("--out", "w/afile.txt"), 1, ("--out", "afile.txt")),
    Misuse("ray-actors-without-ray", gen("--out", "w/o", "--ray-actors", 2), 1, ("--ray-actors", "--engine ray")),
    Misuse("missing-weights-file", lambda w: ["generate", w / "corpus" / "c.parquet", "--teacher", "softlabels.models:digits_cnn@" + str(w / "nope.safetensors"), "--out", w / "o"], 1, ("--teacher", "nope.safetensors")),
    Misuse("unknown-flag", gen("--out", "w/o", "--topk", 5), 1, ("--topk",)),
    Misuse("missing-teacher", lambda w: ["generate", w / "corpus" / "c.parquet", "--out", w / "o"], 1, ("--teacher",)),
    Misuse("verify-missing-directory", cmd("verify", "w/nowhere"), 1, ("nowhere",)),
    Misuse("verify-an-empty-directory", cmd("verify", "w/empty"), 2, ("empty", "manifest")),
    Misuse("seal-an-empty-directory", cmd("seal", "w/empty"), 1, ("empty", "journal")),
    Misuse("select-bad-where", cmd("select", "w/soft", "--where", "confidence >>> 2", "--out", "w/sel"), 1, ("--where",)),
    Misuse("select-unknown-column", cmd("select", "w/soft", "--where", "confidnce > 0.5", "--out", "w/sel"), 1, ("--where", "confidnce")),
    Misuse("select-into-the-source", cmd("select", "w/soft", "--where", "confidence > 0.5", "--out", "w/soft"), 1, ("--out", "source")),
    Misuse("select-into-a-folder-of-the-source", cmd("select", "w/soft", "--where", "confidence > 0.5", "--out", "w/soft/sel"), 1, ("--out", "is inside the source directory")),
    Misuse("select-into-users-folder", cmd("select", "w/soft", "--where", "confidence > 0.5", "--out", "w/mine"), 1, ("--out", "did not write")),
    Misuse("train-temperature-zero", train("w/soft", "--out", "w/s", "--temperature", 0), 1, ("--temperature",)),
    Misuse("train-alpha-above-one", train("w/soft", "--out", "w/s", "--alpha", 1.5), 1, ("--alpha", "1.5")),
    Misuse("train-negative-lr", train("w/soft", "--out", "w/s", "--lr", -0.1), 1, ("--lr",)),
    Misuse("train-unknown-tail", train("w/soft", "--out", "w/s", "--tail", "spread"), 1, ("--tail", "spread")),
    Misuse("train-out-holds-users-files", train("w/soft", "--out", "w/student_out"), 1, ("--out", "notes.txt")),
    Misuse("train-out-is-the-data", train("w/soft", "--out", "w/soft"), 1, ("--out",)),
    Misuse("train-out-inside-the-data", train("w/soft", "--out", "w/soft/student"), 1, ("--out", "is inside the soft-label directory")),
    Misuse("train-no-data", lambda w: ["train-student", "--student", "softlabels.models:digits_mlp", "--out", w / "s"], 1, ("DATA_DIR",)),
    Misuse("train-data-not-soft-labels", train("w/corpus", "--out", "w/s"), 1, ("corpus",)),
    Misuse("inspect-plot-into-a-directory", cmd("inspect", "w/soft", "--plot", "w/empty"), 1, ("--plot",)),
    Misuse("mix-not-numbers", train("w/soft", "--out", "w/s", "--mix", "a,b"), 1, ("--mix",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_misuse_is_one_line_and_costs_no_file(case: Misuse, template: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "w"
    shutil.copytree(template, workspace)
    before = snapshot(workspace)
    proc = run_cli_subprocess(*case.args(workspace), cwd=workspace)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == case.code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for culprit in case.culprits:
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    for word in case.absent:
        assert word not in lines[0], lines[0]
    after = snapshot(workspace)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that was there changed"
    assert set(after) == set(before), f"new files left behind: {sorted(set(after) - set(before))}"


def test_the_battery_is_big_enough():
    assert len(CASES) >= 34 and len({c.name for c in CASES}) == len(CASES)


def test_users_shard_in_out_is_kept_byte_identical(template: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "w"
    shutil.copytree(template, workspace)
    mine = (workspace / "mine" / "shard-000000.parquet").read_bytes()
    proc = run_cli_subprocess(*gen("--out", "w/mine")(workspace), cwd=workspace)
    assert proc.returncode == 1
    assert (workspace / "mine" / "shard-000000.parquet").read_bytes() == mine
    assert sorted(p.name for p in (workspace / "mine").iterdir()) == ["shard-000000.parquet"]


def test_nan_failure_then_the_suggested_skip_rerun_completes(template: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "w"
    shutil.copytree(template, workspace)
    args = ["generate", workspace / "nan" / "x.parquet", "--id-column", "id", "--rows-per-shard", 40, "--no-progress",
            "--teacher", "fixture_teachers:nonfinite_classifier", "--out", workspace / "o"]
    first = run_cli_subprocess(*args)
    assert first.returncode == 1 and "--on-nonfinite skip" in first.stderr and "s-00005" in first.stderr
    second = run_cli_subprocess(*args, "--on-nonfinite", "skip")
    assert second.returncode == 0, second.stderr
    table = pa.concat_tables([pq.read_table(p) for p in sorted((workspace / "o" / "data").glob("*.parquet"))])
    kept = set(table.column("sample_id").to_pylist())
    assert kept == {f"s-{i:05d}" for i in range(ROWS)} - {"s-00005", "s-00060"}
    assert run_cli("verify", workspace / "o").code == 0


def test_ctrl_c_in_train_student_says_how_to_resume(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = tmp_path / "w"
    shutil.copytree(template, workspace)
    out = workspace / "s"
    base = ["train-student", workspace / "soft", "--student", "fixture_teachers:interrupting_student", "--out", out,
            "--max-steps", 8, "--batch-size", 16, "--no-progress"]
    monkeypatch.setenv("SOFTLABELS_TEST_INTERRUPT", "1")
    interrupted = run_cli_subprocess(*base)
    monkeypatch.delenv("SOFTLABELS_TEST_INTERRUPT")
    assert interrupted.returncode == 130, interrupted.stderr
    lines = [line for line in interrupted.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in interrupted.stderr
    assert (out / "checkpoint.pt").is_file()
    resumed = run_cli_subprocess(*base, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert steps and max(steps) == 8


def test_ctrl_c_advice_is_per_command():
    from softlabels.cli import COMMANDS

    advice = {c.name: c.resume_advice for c in COMMANDS}
    assert "--resume" in advice["train-student"] and "--resume" not in advice["generate"]
    assert len(set(advice.values())) >= 3


def test_jsonl_vectors_are_vectors(template: Path, tmp_path: Path) -> None:
    """Float arrays of one length in JSONL feed a fixed-size model as Parquet vectors do: same shards."""
    table = pq.read_table(template / "corpus" / "c.parquet").drop_columns(["label"])
    jsonl = write_jsonl(table, tmp_path / "j" / "c.jsonl")
    parquet = write_parquet(table, tmp_path / "p" / "c.parquet")
    for corpus, out in ((jsonl, tmp_path / "oj"), (parquet, tmp_path / "op")):
        result = run_cli("generate", corpus, "--id-column", "id", "--teacher", TEACHER, "--out", out, "--rows-per-shard", 50, "--no-progress")
        assert result.code == 0, result.err
    read = [pa.concat_tables([pq.read_table(p) for p in sorted((o / "data").glob("*.parquet"))]) for o in (tmp_path / "oj", tmp_path / "op")]
    for column in ("sample_id", "topk_ids", "topk_logprobs", "confidence"):
        assert read[0].column(column).to_pylist() == read[1].column(column).to_pylist()
    assert pa.types.is_fixed_size_list(read[0].schema.field("inputs").type)


def test_no_arguments_prints_the_help():
    proc = run_cli_subprocess()
    assert proc.returncode == 0 and "Usage: softlabels" in proc.stdout and "generate" in proc.stdout
    assert "error" not in proc.stderr


def test_version_and_short_help():
    from softlabels import __version__

    proc = run_cli_subprocess("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"softlabels {__version__}"
    short = run_cli_subprocess("generate", "-h")
    assert short.returncode == 0 and "--teacher" in short.stdout


@pytest.mark.parametrize("command", ["generate", "train-student", "verify", "inspect", "select", "seal"])
def test_help_shows_every_default(command: str) -> None:
    """Every option of every command has help text, and a default (or 'required') in --help."""
    import dataclasses

    from softlabels.cli import COMMANDS

    config = next(c.config for c in COMMANDS if c.name == command)
    result = run_cli(command, "--help")
    assert result.code == 0
    text = " ".join(result.out.split())
    for item in dataclasses.fields(config):
        spec = item.metadata.get("option")
        if spec is None or not item.init:
            continue
        assert spec.help.strip(), f"{command} {spec.flag or spec.metavar} has no help"
        if spec.flag is None:
            assert spec.metavar in text
            continue
        start = text.index(spec.flag)
        following = text[start: start + 400]
        assert "[default:" in following or "[required]" in following, f"{command} {spec.flag}: {following}"
    if command == "train-student":
        assert "hf:" in text[text.index("--student"):]
    if command == "generate":
        assert "[default: bfloat16]" in text and "[default: 64]" in text
