"""softlabels.audio_input: corpus cells to mono float32 clips at the teacher's rate, and bad audio named."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from conftest import upload
from softlabels.audio_input import Clip, audio_bytes, decode_audio, read_clip, resample
from softlabels.errors import UserError


def pcm16(samples: int, rate: int = 16_000, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-20_000, 20_000, size=(samples, channels), dtype=np.int16)


def encoded(values: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, values, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_pcm16_decodes_to_its_samples_over_32768(fmt):
    values = pcm16(12_345, seed=1)
    clip = decode_audio(encoded(values, 16_000, fmt), "sample id a")
    assert clip.sample_rate == 16_000 and clip.samples.dtype == np.float32
    assert np.array_equal(clip.samples, values[:, 0].astype(np.float32) / 32768)


def test_channels_are_averaged_to_mono():
    values = pcm16(3_001, channels=2, seed=2)
    clip = decode_audio(encoded(values, 22_050, "WAV"), "sample id b")
    expected = (values.astype(np.float32) / 32768).mean(axis=1)
    assert clip.sample_rate == 22_050 and np.allclose(clip.samples, expected, atol=1e-7, rtol=0)


def test_8khz_resampled_for_a_16khz_teacher_is_the_same_tone():
    seconds, tone = 1.5, 440.0
    low = Clip((0.5 * np.sin(2 * np.pi * tone * np.arange(int(8_000 * seconds)) / 8_000)).astype(np.float32), 8_000)
    high = resample(low, 16_000, "sample id c")
    assert high.sample_rate == 16_000 and len(high.samples) == 2 * len(low.samples)
    expected = 0.5 * np.sin(2 * np.pi * tone * np.arange(len(high.samples)) / 16_000)
    inner = slice(800, -800)  # away from the ends, where the filter meets silence
    assert np.abs(high.samples[inner] - expected[inner]).max() < 1e-3
    assert resample(high, 16_000, "x") is high


def test_every_cell_form_reads_the_same_bytes(tmp_path):
    data = encoded(pcm16(500, seed=3), 16_000, "WAV")
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "u1.wav").write_bytes(data)
    corpus_file = str(tmp_path / "corpus.parquet")
    for cell in ({"bytes": data, "path": "ignored.wav"}, {"bytes": None, "path": "clips/u1.wav"}, data,
                 "clips/u1.wav", str(tmp_path / "clips" / "u1.wav")):
        assert audio_bytes(cell, corpus_file, "sample id d") == data


def test_relative_paths_on_an_object_store(tmp_path, s3_bucket):
    data = encoded(pcm16(777, rate=8_000, seed=4), 8_000, "FLAC")
    (tmp_path / "u.flac").write_bytes(data)
    upload(tmp_path / "u.flac", f"{s3_bucket}/speech/audio/u.flac")
    clip = read_clip({"bytes": None, "path": "audio/u.flac"}, f"{s3_bucket}/speech/corpus.parquet", "sample id e", 16_000)
    direct = resample(decode_audio(data, "x"), 16_000, "x")
    assert clip.sample_rate == 16_000 and np.array_equal(clip.samples, direct.samples)


@pytest.mark.parametrize("case", ["truncated-wav", "truncated-flac", "not-audio", "empty-wav", "missing-file", "null-cell"])
def test_bad_audio_is_one_line_naming_the_sample(tmp_path, case):
    wav, flac = encoded(pcm16(4_000, seed=5), 16_000, "WAV"), encoded(pcm16(4_000, seed=5), 16_000, "FLAC")
    cells = {"truncated-wav": wav[: len(wav) // 2], "truncated-flac": flac[: len(flac) // 2], "not-audio": b"hello, not audio",
             "empty-wav": encoded(np.zeros((0, 1), dtype=np.int16), 16_000, "WAV"), "missing-file": "nowhere.wav",
             "null-cell": {"bytes": None, "path": None}}
    with pytest.raises(UserError) as error:
        read_clip(cells[case], str(tmp_path / "c.parquet"), "sample id utt-17", 16_000)
    message = str(error.value)
    assert message.startswith("sample id utt-17: ") and "\n" not in message
