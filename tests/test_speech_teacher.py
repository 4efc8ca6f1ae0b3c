"""pipelines/speech teacher stage (issue 22): senone labels at the model's output frames, frame-CE training
that resumes to the same weights as an uninterrupted run, and a teacher that softlabels loads by its SPEC."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "pipelines" / "speech"))

import build_corpus  # noqa: E402
import build_targets  # noqa: E402
import speech_models  # noqa: E402
import train_teacher  # noqa: E402


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> Path:
    """A tiny aligned corpus: 6 labeled and 3 clean test utterances (build_corpus + build_targets)."""
    root = tmp_path_factory.mktemp("speech_teacher")
    sizes = ["--labeled", "6", "--unlabeled", "1", "--test", "3", "--shard-rows", "4"]
    assert build_corpus.main(["--out", str(root / "corpus"), *sizes]) == 0
    assert build_targets.main(["--corpus", str(root / "corpus"), "--out", str(root / "targets")]) == 0
    return root / "targets"


@pytest.mark.parametrize("samples", [1, 159, 160, 399, 400, 641, 12_345, 57_601])
def test_output_frames_are_the_models_own_and_labels_take_each_frames_centre(samples):
    for factory in (speech_models.teacher, speech_models.student):
        speech_models.check_frames(factory(), samples)
    tenth = 1 + samples // 160
    senones = np.arange(tenth) * 7 + 3  # a distinct senone per 10 ms frame
    labels = speech_models.frame_labels(senones, samples)
    assert labels.shape == (speech_models.output_frames(samples),)
    for i, label in enumerate(labels):  # output frame i is centred on 10 ms frame 4i (the last one at the end)
        assert label == senones[min(4 * i, tenth - 1)]


def test_training_resumed_after_a_halt_equals_an_uninterrupted_run(targets, tmp_path):
    common = ["--targets", str(targets), "--epochs", "2", "--batch-seconds", "9"]
    assert train_teacher.main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert train_teacher.main([*common, "--out", str(tmp_path / "halted"), "--halt-after", "1"]) == 0
    assert not (tmp_path / "halted" / "teacher.safetensors").exists()
    assert len(json.loads((tmp_path / "halted" / "state.json").read_text())["epochs"]) == 1
    assert train_teacher.main([*common, "--out", str(tmp_path / "halted")]) == 0
    whole, resumed = (json.loads((tmp_path / d / "teacher.json").read_text()) for d in ("whole", "halted"))
    assert (tmp_path / "whole" / "teacher.safetensors").read_bytes() == (tmp_path / "halted" / "teacher.safetensors").read_bytes()
    assert [e["loss"] for e in whole["epochs"]] == [e["loss"] for e in resumed["epochs"]]
    assert whole["epochs"][1]["loss"] < whole["epochs"][0]["loss"]  # it learns
    assert not (tmp_path / "halted" / "state.safetensors").exists()  # the resume state goes once the teacher is written
    before = (tmp_path / "whole" / "teacher.json").read_bytes()
    assert train_teacher.main([*common, "--out", str(tmp_path / "whole")]) == 0  # finished: skipped
    assert (tmp_path / "whole" / "teacher.json").read_bytes() == before


def test_the_trained_teacher_loads_by_its_spec_and_gives_the_scripts_logits(targets, tmp_path):
    from safetensors.torch import load_file

    from softlabels.loading import load_model

    out = tmp_path / "teacher"
    assert train_teacher.main(["--targets", str(targets), "--epochs", "1", "--batch-seconds", "9", "--out", str(out)]) == 0
    record = json.loads((out / "teacher.json").read_text())
    model, _ = load_model(record["spec"], "--teacher", trained=True)
    direct = speech_models.teacher()
    direct.load_state_dict(load_file(out / "teacher.safetensors"))
    rows = train_teacher.load_set(targets / "test_clean")
    waves, lengths, labels = train_teacher.batch_of(rows, list(range(len(rows))))
    model.eval(), direct.eval()
    with torch.no_grad():
        (ours, frames), (theirs, _) = model(waves, lengths), direct(waves, lengths)
    assert torch.equal(ours, theirs) and ours.shape[-1] == speech_models.senone_count() > 5_000
    assert frames.tolist() == [(row != train_teacher.IGNORE).sum().item() for row in labels]
