"""train-student on audio runs: the loader decodes each row's audio as the teacher heard it (mono,
resampled to the run's sample_rate) and the student is called as ``model(waveforms, lengths)``.

Checked against independent computations: the batches' waveforms against soundfile + soxr, the
per-frame labels against the corpus, and offline KD from k = C stored frames against online KD with
the teacher in the loop (the online teacher sees only what the loader decoded, the stored targets what
generate decoded from the corpus)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import soxr
import torch
from torch import nn

from conftest import run_cli, save_teacher, write_parquet
from softlabels.audio import AcousticModel
from softlabels.data import SoftLabelDataset, collate
from softlabels.errors import UserError
from softlabels.losses import IGNORE_INDEX
from test_audio_generate import AUDIO, RATE, encode

CLASSES = 37  # k = C below: the stored targets are the whole distribution
# (samples, rate, channels): 8 kHz and 22.05 kHz rows are resampled, a stereo row mixed down
CLIPS = [(9_601, RATE, 1), (3_001, 8_000, 1), (12_007, 22_050, 1), (4_999, RATE, 2), (700, RATE, 1), (6_400, RATE, 1), (10_111, RATE, 1)]


def small() -> nn.Module:
    return AcousticModel(CLASSES, channels=8, hidden=12, layers=1)


def small_student() -> nn.Module:
    return AcousticModel(CLASSES, channels=6, hidden=10, layers=1, bidirectional=False)


def frames_of(samples: int) -> int:
    """Output frames of softlabels.audio's models: 1 + samples // 160, halved twice (rounding up)."""
    frames = 1 + samples // 160
    return (((frames + 1) // 2) + 1) // 2


def teacher_samples(data: bytes) -> np.ndarray:
    """The waveform the teacher hears: soundfile, averaged to mono, soxr to 16 kHz."""
    values, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = values.mean(axis=1, dtype=np.float32)
    return mono if rate == RATE else soxr.resample(mono, rate, RATE, quality="HQ").astype(np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("audio-train")
    files = [encode(n, rate, channels, "FLAC" if i % 2 else "WAV", seed=40 + i) for i, (n, rate, channels) in enumerate(CLIPS)]
    durations = [n / rate for n, rate, _ in CLIPS]
    labels = [np.random.default_rng(i).integers(0, CLASSES, frames_of(round(d * RATE))).tolist() for i, d in enumerate(durations)]
    table = pa.table({"utt": [f"u{i}" for i in range(len(files))], "audio": pa.array([{"bytes": f, "path": None} for f in files], type=AUDIO),
                      "labels": pa.array(labels, type=pa.list_(pa.int32()))})
    corpus = write_parquet(table, root / "corpus" / "speech.parquet")
    teacher = save_teacher("test_audio_train:small", 3, root / "teacher.safetensors")
    result = run_cli("generate", corpus, "--teacher", teacher, "--audio-column", "audio", "--id-column", "utt", "--label-column", "labels",
                     "--top-k", CLASSES, "--logprob-dtype", "float16", "--batch-size", 3, "--rows-per-shard", 4, "--out", root / "soft",
                     "--no-progress")
    assert result.code == 0, result.err
    return {"root": root, "files": files, "labels": labels, "teacher": teacher, "soft": root / "soft"}


def test_batches_hold_the_decoded_waveforms_and_the_frame_labels(run):
    dataset = SoftLabelDataset(run["soft"], batch_size=3, shuffle=False)
    seen = 0
    for batch in dataset:
        waveforms, lengths = batch["inputs"], batch["lengths"]
        assert waveforms.dtype == torch.float32 and lengths.dtype == torch.int64
        for row, sample_id in enumerate(batch["sample_id"]):
            i = int(sample_id[1:])
            expected = teacher_samples(run["files"][i])
            assert int(lengths[row]) == len(expected)
            np.testing.assert_array_equal(waveforms[row, : len(expected)].numpy(), expected)
            assert not waveforms[row, len(expected):].any()  # zero padding
            frames = len(run["labels"][i])
            assert batch["labels"][row, :frames].tolist() == run["labels"][i]
            assert (batch["labels"][row, frames:] == IGNORE_INDEX).all()
            assert int(batch["mask"][row].sum()) == frames
            seen += 1
    assert seen == len(CLIPS)


def test_collate_of_shard_rows_decodes_the_audio(run):
    shard = sorted((run["soft"] / "data").glob("*.parquet"))[1]
    table = pq.read_table(shard)
    batch = collate(table)
    first = int(table.column("utt" if "utt" in table.column_names else "sample_id")[0].as_py()[1:])
    np.testing.assert_array_equal(batch["inputs"][0, : int(batch["lengths"][0])].numpy(), teacher_samples(run["files"][first]))


def test_rows_without_their_header_name_the_missing_sample_rate(run):
    shard = sorted((run["soft"] / "data").glob("*.parquet"))[0]
    rows = pq.read_table(shard).replace_schema_metadata(None)
    with pytest.raises(UserError, match="column 'audio' holds audio, but the rows have no shard header"):
        collate(rows, input_column="audio", label_column="labels")


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_offline_kd_on_audio_equals_online_kd_with_the_teacher_in_the_loop(run, tmp_path):
    common = ["train-student", run["soft"], "--student", "test_audio_train:small_student", "--max-steps", 5, "--batch-size", 3,
              "--log-every", 1, "--alpha", 0.7, "--lr", 3e-3, "--seed", 2, "--no-progress"]
    offline = run_cli(*common, "--out", tmp_path / "offline")
    assert offline.code == 0, offline.err
    online = run_cli(*common, "--online-teacher", run["teacher"], "--out", tmp_path / "online")
    assert online.code == 0, online.err
    losses = _losses(tmp_path / "offline")
    assert len(losses) == 5 and len(set(losses)) == 5  # the student moved at every step
    # float16 storage rounds each log-probability by up to 2^-11 relative: the tolerance allows that
    assert _losses(tmp_path / "online") == pytest.approx(losses, rel=5e-3, abs=1e-5)


def test_labeled_and_unlabeled_audio_runs_mix(run, tmp_path):
    """The speech setup: the labeled run (frame labels, CE + KD) and an unlabeled run (KD only) interleaved."""
    files = [encode(n, RATE, 1, "WAV", seed=90 + n) for n in (5_003, 2_222, 8_888)]
    unlabeled = write_parquet(pa.table({"utt": ["x0", "x1", "x2"], "audio": pa.array([{"bytes": f, "path": None} for f in files], type=AUDIO)}),
                              tmp_path / "unlabeled" / "u.parquet")
    assert run_cli("generate", unlabeled, "--teacher", run["teacher"], "--audio-column", "audio", "--id-column", "utt", "--top-k", 5,
                   "--out", tmp_path / "soft_u", "--no-progress").code == 0
    result = run_cli("train-student", run["soft"], "--data", tmp_path / "soft_u", "--mix", "0.5,0.5", "--student",
                     "test_audio_train:small_student", "--max-steps", 6, "--batch-size", 2, "--log-every", 1, "--seed", 1,
                     "--no-progress", "--out", tmp_path / "student")
    assert result.code == 0, result.err
    assert len(_losses(tmp_path / "student")) == 6 and all(np.isfinite(_losses(tmp_path / "student")))
