"""The speech pipeline (issue 22) end to end at a tiny size: pipelines/speech/run.sh from synthesis to
the report, every stage's output, the report's cells against the metrics files, the teacher's metrics
against a forward of each utterance alone, and a rerun that runs nothing."""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

from conftest import REPO, forking_softlabels, run_cli, unpinned_environ

sys.path.insert(0, str(REPO / "pipelines" / "speech"))
from senones import phone_errors, read_mdef  # noqa: E402
from sphinx_align import model_dir  # noqa: E402

SIZES = {"LABELED": "14", "UNLABELED": "22", "TEST": "5", "SHARD_ROWS": "9", "TEACHER_EPOCHS": "1", "STUDENT_STEPS": "2",
         "STUDENT_BATCH": "5", "SEEDS": "0 1", "REAL": "0"}
ARMS = ("a", "b", "c")
LABELS = {"a": "(a) labeled only, hard labels", "b": "(b) labeled + unlabeled interleaved", "c": "(c) soft labels only"}


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("speech") / "run"
    exported = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": "pipelines/speech"}  # as run.sh exports them
    with forking_softlabels({**unpinned_environ(), **exported, **SIZES}, run.parent / "cli") as (env, served):
        command = ["bash", str(REPO / "pipelines" / "speech" / "run.sh"), str(run)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
        assert result.returncode == 0, result.stderr[-4000:]
        assert served() == 2 + 6  # two generates and six train-students, none in a fresh interpreter
        yield run, command, env, served


def test_every_stage_leaves_its_output(speech_run):
    run = speech_run[0]
    for path in ("corpus/corpus.json", "targets/targets.json", "teacher/teacher.safetensors", "teacher/metrics.json",
                 "soft/labeled/manifest.json", "soft/unlabeled/manifest.json", "soft/unlabeled.timing.json", "results.md"):
        assert (run / path).is_file(), path
    for arm in ARMS:
        for seed in (0, 1):
            assert (run / "students" / f"{arm}-seed{seed}" / "student.safetensors").is_file()
            assert (run / "students" / f"{arm}-seed{seed}" / "metrics.json").is_file()
    for name in ("labeled", "unlabeled"):
        assert run_cli("verify", run / "soft" / name).code == 0
    # the labeled soft labels carry the aligned frame labels, one per stored frame
    stored = pq.read_table(run / "soft" / "labeled" / "data").to_pydict()
    aligned = {r["id"]: r["labels"] for r in pq.read_table(run / "targets" / "labeled").to_pylist()}
    assert stored["labels"] == [aligned[i] for i in stored["sample_id"]]
    assert [len(ids) for ids in stored["topk_ids"]] == [len(labels) for labels in stored["labels"]]


def _cell(values: list[float]) -> str:
    return f"{statistics.fmean(values) * 100:.2f} ± {statistics.stdev(values) * 100:.2f}%"


def test_report_cells_match_the_metrics_files(speech_run):
    run = speech_run[0]
    report = (run / "results.md").read_text()
    teacher = json.loads((run / "teacher" / "metrics.json").read_text())
    students = {(arm, seed): json.loads((run / "students" / f"{arm}-seed{seed}" / "metrics.json").read_text()) for arm in ARMS for seed in (0, 1)}
    assert set(teacher["sets"]) == {"test_clean", "test_noisy", "test_noisy_0dB", "test_noisy_5dB", "test_noisy_10dB"}
    for test, scores in teacher["sets"].items():
        assert f"| {test} | teacher | - | {scores['per'] * 100:.2f}% | {scores['frame_error'] * 100:.2f}% |" in report
        for arm in ARMS:
            per = [students[arm, s]["sets"][test]["per"] for s in (0, 1)]
            frame = [students[arm, s]["sets"][test]["frame_error"] for s in (0, 1)]
            assert f"| {test} | {LABELS[arm]} | 2 | {_cell(per)} | {_cell(frame)} |" in report
        a, b = ([students[arm, s]["sets"][test]["per"] for s in (0, 1)] for arm in "ab")
        reduction = 1 - statistics.fmean(b) / statistics.fmean(a)
        assert f"| {test} | {reduction * 100:+.1f}% | {_cell([1 - b[i] / a[i] for i in (0, 1)])} |" in report
    noisy = [students["a", s]["sets"]["test_noisy"]["per"] for s in (0, 1)], [students["b", s]["sets"]["test_noisy"]["per"] for s in (0, 1)]
    assert f"relative PER on test_noisy: {(1 - statistics.fmean(noisy[1]) / statistics.fmean(noisy[0])) * 100:+.1f}%" in report
    manifest = json.loads((run / "soft" / "unlabeled" / "manifest.json").read_text())
    per_frame = manifest["totals"]["soft_label_bytes"] / manifest["totals"]["positions"]
    assert f"{per_frame:.1f} / " in report and f"{per_frame:.1f} bytes per frame (top-20)" in report
    assert f"| student | {students['a', 0]['parameters']:,} (" in report


def test_teacher_metrics_equal_a_forward_of_each_utterance_alone(speech_run):
    """evaluate.py batches by length; here each test_clean utterance goes through the teacher alone."""
    from softlabels.loading import load_model

    run = speech_run[0]
    model = load_model(f"speech_models:teacher@{run / 'teacher' / 'teacher.safetensors'}")[0].eval()
    mdef = read_mdef(model_dir() / "en-us" / "mdef")
    wrong = frames = edits = phones = 0
    with torch.inference_mode():
        for row in pq.read_table(run / "targets" / "test_clean").to_pylist():
            samples, _ = soundfile.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
            logits, count = model(torch.from_numpy(samples)[None], torch.tensor([samples.size]))
            best = logits[0, : int(count[0])].argmax(-1).numpy()
            labels = np.asarray(row["labels"])
            assert len(best) == len(labels)
            wrong, frames = wrong + int((best != labels).sum()), frames + len(labels)
            e, n = phone_errors(row["phones"], best.tolist(), mdef)
            edits, phones = edits + e, phones + n
    recorded = json.loads((run / "teacher" / "metrics.json").read_text())["sets"]["test_clean"]
    assert recorded["frames"] == frames
    assert recorded["frame_error"] == pytest.approx(wrong / frames, abs=1.5 / frames)  # a padded batch may flip a near tie
    assert recorded["per"] == pytest.approx(edits / phones, abs=2.5 / phones)


def test_a_rerun_runs_no_stage(speech_run):
    run, command, env, served = speech_run
    before = served()
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert served() == before  # no generate, no train-student
    assert "corpus complete, skipped" in again.stdout and "targets complete, skipped" in again.stdout
    assert "student " not in again.stderr
    assert again.stdout.endswith((run / "results.md").read_text())
