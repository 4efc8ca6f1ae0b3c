"""generate --audio-column: stored frames equal a direct teacher forward on the decoded waveforms (WAV,
FLAC, path columns, resampling, ragged lengths, ensembles), batches by length store what batch size 1
does in corpus order, and bad audio is one line naming the sample (or skipped and recorded)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile
import soxr
import torch
from torch import nn

from conftest import (assert_equal_to_storage_precision, decoded, directory_files, run_cli, save_teacher, shard_paths, tolerance, upload,
                      write_parquet)
from softlabels.audio import AUDIO_CLASSES, AcousticModel
from softlabels.loading import load_model
from softlabels.schema import decode_header

RATE = 16_000
K = 20
AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def tiny() -> nn.Module:
    """A small acoustic teacher with the full 1,024 classes, so top-20 is a real truncation."""
    return AcousticModel(AUDIO_CLASSES, channels=8, hidden=12, layers=1)


class HalfFrames(nn.Module):
    """A teacher at half the frame rate of ``tiny``: every other frame."""

    sample_rate = RATE

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny()

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, frames = self.inner(waveforms, lengths)
        return logits[:, ::2], torch.div(frames + 1, 2, rounding_mode="floor")


def half_frames() -> nn.Module:
    return HalfFrames()


def tiny_8k() -> nn.Module:
    model = tiny()
    model.sample_rate = 8_000
    return model


class NoRate(nn.Module):
    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(lengths), 3, AUDIO_CLASSES), torch.full_like(lengths, 3)


def no_rate() -> nn.Module:
    return NoRate()


# (samples, rate, channels): seconds down to shorter than one 25 ms window, 8 kHz, stereo
CLIPS = [(16_321, RATE, 1), (200, RATE, 1), (4_999, RATE, 1), (8_000, 8_000, 1), (3_001, RATE, 2), (12_007, 22_050, 1)]


def encode(samples: int, rate: int, channels: int, fmt: str, seed: int) -> bytes:
    values = np.random.default_rng(seed).integers(-20_000, 20_000, size=(samples, channels), dtype=np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, values, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def audio_corpus(root: Path, column: str, clips=CLIPS, fmt: str = "WAV") -> tuple[Path, list[bytes]]:
    """A corpus file under ``root/corpus`` with one audio cell per clip ("bytes", "path" string, or a
    "struct_path" Audio struct with null bytes; the files sit in ``clips/`` beside the corpus)."""
    files = [encode(n, rate, channels, fmt, seed) for seed, (n, rate, channels) in enumerate(clips)]
    folder = root / "corpus"
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    names = [f"clips/utt-{i}.{fmt.lower()}" for i in range(len(files))]
    for name, data in zip(names, files):
        (folder / name).write_bytes(data)
    if column == "bytes":
        cells = pa.array([{"bytes": data, "path": name} for data, name in zip(files, names)], type=AUDIO)
    elif column == "struct_path":
        cells = pa.array([{"bytes": None, "path": name} for name in names], type=AUDIO)
    else:
        cells = pa.array(names)
    table = pa.table({"utt": [f"utt-{i}" for i in range(len(files))], "audio": cells})
    return write_parquet(table, folder / "speech.parquet"), files


def direct(specs: list[str], files: list[bytes]) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """Per utterance, alone (batch size 1): the ensemble's log-probabilities [F, C], F, and seconds;
    decoded here with soundfile, averaged to mono and resampled with soxr."""
    models = [load_model(spec)[0].eval() for spec in specs]
    logprobs, frames, seconds = [], [], []
    for data in files:
        values, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        seconds.append(len(values) / rate)
        mono = values.mean(axis=1, dtype=np.float32)
        if rate != RATE:
            mono = soxr.resample(mono, rate, RATE, quality="HQ").astype(np.float32)
        members = []
        with torch.inference_mode():
            for model in models:
                logits, count = model(torch.from_numpy(mono)[None], torch.tensor([len(mono)]))
                members.append(torch.log_softmax(logits[0, : int(count[0])].double(), dim=-1))
        frames.append(int(count[0]))
        logprobs.append(torch.logsumexp(torch.stack(members), dim=0) - np.log(len(members)))
    return logprobs, frames, seconds


def assert_matches_direct(out: Path, specs: list[str], files: list[bytes]) -> None:
    table = pq.read_table(out / "data")
    assert table.column("sample_id").to_pylist() == [f"utt-{i}" for i in range(len(files))]  # corpus order
    logprobs, frames, seconds = direct(specs, files)
    assert pc.list_value_length(table.column("topk_ids")).to_pylist() == frames
    np.testing.assert_allclose(table.column("duration_s").to_numpy(), seconds, rtol=1e-6)
    ids, values, codec = decoded(table)
    full = torch.cat(logprobs).numpy()  # [N, C]
    assert full.shape[1] == AUDIO_CLASSES and ids.shape == (sum(frames), K)
    at_ids = np.take_along_axis(full, ids, axis=1)
    assert np.all(np.abs(values - at_ids) <= tolerance(codec, values, at_ids) + 1e-5)
    kth = -np.sort(-full, axis=1)[:, K - 1]
    assert np.all(at_ids.min(axis=1) >= kth - 1e-5)  # the stored ids are the teacher's top k


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("audio-teachers")
    return [save_teacher("test_audio_generate:tiny", seed, root / f"tiny{seed}.safetensors") for seed in (0, 1)]


@pytest.mark.parametrize("column,fmt", [("bytes", "WAV"), ("bytes", "FLAC"), ("path", "WAV"), ("struct_path", "FLAC")])
def test_generate_equals_a_direct_forward_on_the_decoded_waveforms(tmp_path, teachers, column, fmt):
    corpus, files = audio_corpus(tmp_path, column, fmt=fmt)
    result = run_cli("generate", corpus, "--teacher", teachers[0], "--audio-column", "audio", "--id-column", "utt",
                     "--out", tmp_path / "out", "--batch-size", 4, "--rows-per-shard", 4, "--no-progress")
    assert result.code == 0, result.err
    assert len(shard_paths(tmp_path / "out")) == 2
    assert_matches_direct(tmp_path / "out", teachers[:1], files)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["audio_column"] == "audio" and manifest["settings"]["sample_rate"] == RATE
    header = decode_header(pq.read_schema(shard_paths(tmp_path / "out")[1]).metadata)
    assert header["audio_column"] == "audio" and header["sample_rate"] == RATE  # a shard describes itself
    assert "skipped_samples" not in manifest
    assert run_cli("verify", tmp_path / "out").code == 0
    report = json.loads(run_cli("inspect", tmp_path / "out", "--json").out)["audio"]
    assert report["frames"] == manifest["totals"]["positions"] and report["skipped_samples"] == 0
    assert report["hours"] == pytest.approx(sum(n / rate for n, rate, _ in CLIPS) / 3600, rel=1e-6)


def test_two_teacher_ensemble_by_length_equals_the_direct_ensemble(tmp_path, teachers):
    corpus, files = audio_corpus(tmp_path, "bytes")
    result = run_cli("generate", corpus, "--teacher", teachers[0], "--teacher", teachers[1], "--audio-column", "audio",
                     "--id-column", "utt", "--out", tmp_path / "out", "--batch-seconds", 0.7, "--no-progress")
    assert result.code == 0, result.err
    assert_matches_direct(tmp_path / "out", teachers, files)
    assert "agreement" in pq.read_table(tmp_path / "out" / "data").column_names


def test_batches_by_length_store_what_batch_size_one_does_in_corpus_order(tmp_path, teachers):
    lengths = [800, 19_000, 3_333, 161, 12_000, 7_777, 401, 16_000, 2_500, 9_001, 640]
    corpus, _ = audio_corpus(tmp_path, "bytes", clips=[(n, RATE, 1) for n in lengths])
    common = ["--teacher", teachers[0], "--audio-column", "audio", "--id-column", "utt", "--rows-per-shard", 5, "--no-progress"]
    assert run_cli("generate", corpus, *common, "--out", tmp_path / "one", "--batch-size", 1).code == 0
    result = run_cli("generate", corpus, *common, "--out", tmp_path / "bylength", "--batch-seconds", 2.5)
    assert result.code == 0, result.err
    one, bylength = shard_paths(tmp_path / "one"), shard_paths(tmp_path / "bylength")
    assert [p.name for p in one] == [p.name for p in bylength] and len(one) == 3
    for ours, theirs in zip(bylength, one):
        ours_table, theirs_table = pq.read_table(ours), pq.read_table(theirs)
        ids = ours_table.column("sample_id").to_pylist()
        assert ids == sorted(ids, key=lambda s: int(s.split("-")[1]))  # corpus order within the shard
        assert_equal_to_storage_precision(ours_table, theirs_table)


def bad_corpus(tmp_path: Path, bad: str) -> Path:
    """Seven good rows, and at row 5 (the second unit of 4 rows) one bad row ``utt-bad``."""
    good = [encode(n, RATE, 1, "WAV", seed) for seed, n in enumerate([1_601, 3_200, 999, 4_000, 2_222, 5_000, 700])]
    broken = {
        "corrupt": b"RIFF\x00\x00 this is not audio at all" * 3,
        "empty": encode(0, RATE, 1, "WAV", 9),
        "truncated": encode(8_000, RATE, 1, "WAV", 9)[:5_000],
    }[bad]
    cells = good[:5] + [broken] + good[5:]
    ids = [f"utt-{i}" for i in range(5)] + ["utt-bad"] + [f"utt-{i}" for i in range(5, 7)]
    table = pa.table({"utt": ids, "audio": pa.array([{"bytes": c, "path": None} for c in cells], type=AUDIO)})
    return write_parquet(table, tmp_path / "corpus" / "speech.parquet")


@pytest.mark.parametrize("bad", ["corrupt", "empty", "truncated"])
def test_bad_audio_is_one_line_naming_the_sample_and_nothing_is_sealed(tmp_path, teachers, bad):
    corpus = bad_corpus(tmp_path, bad)
    result = run_cli("generate", corpus, "--teacher", teachers[0], "--audio-column", "audio", "--id-column", "utt",
                     "--out", tmp_path / "out", "--rows-per-shard", 4, "--no-progress")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "utt-bad" in lines[0] and "--audio-column" in lines[0], result.err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("bad", ["corrupt", "empty", "truncated"])
def test_skip_mode_drops_the_bad_row_and_records_its_id(tmp_path, teachers, bad):
    corpus = bad_corpus(tmp_path, bad)
    result = run_cli("generate", corpus, "--teacher", teachers[0], "--audio-column", "audio", "--id-column", "utt",
                     "--out", tmp_path / "out", "--rows-per-shard", 4, "--on-bad-audio", "skip", "--no-progress")
    assert result.code == 0, result.err
    assert "1 bad rows skipped" in result.out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["sample_id"] for s in manifest["skipped_samples"]] == ["utt-bad"]
    assert manifest["skipped_samples"][0]["reason"]
    table = pq.read_table(tmp_path / "out" / "data")
    assert table.column("sample_id").to_pylist() == [f"utt-{i}" for i in range(7)]
    assert manifest["totals"]["rows"] == 7
    assert run_cli("verify", tmp_path / "out").code == 0


def test_teachers_that_disagree_on_frames_are_one_line(tmp_path, teachers):
    corpus, _ = audio_corpus(tmp_path, "bytes", clips=CLIPS[:3])
    half = save_teacher("test_audio_generate:half_frames", 2, tmp_path / "half.safetensors")
    result = run_cli("generate", corpus, "--teacher", teachers[0], "--teacher", half, "--audio-column", "audio",
                     "--out", tmp_path / "out", "--no-progress")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "frame_lengths" in lines[0], result.err
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "manifest.json").exists()


def test_a_teacher_without_a_sample_rate_is_one_line(tmp_path):
    corpus, _ = audio_corpus(tmp_path, "bytes", clips=CLIPS[:2])
    result = run_cli("generate", corpus, "--teacher", "test_audio_generate:no_rate", "--audio-column", "audio",
                     "--out", tmp_path / "out", "--no-progress")
    assert result.code == 1 and "sample_rate" in result.err and len(result.err.strip().splitlines()) == 1, result.err


def test_teachers_at_other_rates_are_one_line(tmp_path, teachers):
    corpus, _ = audio_corpus(tmp_path, "bytes", clips=CLIPS[:2])
    slow = save_teacher("test_audio_generate:tiny_8k", 3, tmp_path / "tiny_8k.safetensors")
    result = run_cli("generate", corpus, "--teacher", teachers[0], "--teacher", slow, "--audio-column", "audio",
                     "--out", tmp_path / "out", "--no-progress")
    assert result.code == 1 and "8000 Hz" in result.err and len(result.err.strip().splitlines()) == 1, result.err


def test_audio_column_of_another_type_is_one_line(tmp_path, teachers):
    write_parquet(pa.table({"audio": pa.array([[0.1, 0.2]])}), tmp_path / "corpus" / "c.parquet")
    result = run_cli("generate", tmp_path / "corpus" / "c.parquet", "--teacher", teachers[0], "--audio-column", "audio",
                     "--out", tmp_path / "out", "--no-progress")
    assert result.code == 1 and "--audio-column 'audio'" in result.err, result.err


def test_audio_paths_relative_to_a_corpus_in_object_storage(tmp_path, teachers, s3_bucket):
    corpus, files = audio_corpus(tmp_path, "path", clips=CLIPS[:4], fmt="FLAC")
    for local in sorted((tmp_path / "corpus").rglob("*.*")):
        upload(local, f"{s3_bucket}/speech/{local.relative_to(tmp_path / 'corpus').as_posix()}")
    result = run_cli("generate", f"{s3_bucket}/speech/speech.parquet", "--teacher", teachers[0], "--audio-column", "audio",
                     "--id-column", "utt", "--out", tmp_path / "out", "--no-progress")
    assert result.code == 0, result.err
    assert_matches_direct(tmp_path / "out", teachers[:1], files)


def test_a_run_stopped_by_bad_audio_resumes_with_skip_to_the_bytes_of_an_uninterrupted_run(tmp_path, teachers):
    corpus = bad_corpus(tmp_path, "corrupt")
    common = [corpus, "--teacher", teachers[0], "--audio-column", "audio", "--id-column", "utt", "--rows-per-shard", 4,
              "--batch-seconds", 0.3, "--no-progress"]
    assert run_cli("generate", *common, "--out", tmp_path / "out").code == 1  # unit 0 committed, unit 1 stops
    assert len(shard_paths(tmp_path / "out")) == 1
    result = run_cli("generate", *common, "--out", tmp_path / "out", "--on-bad-audio", "skip")
    assert result.code == 0 and "(1 written this run)" in result.out, result.err
    assert run_cli("generate", *common, "--out", tmp_path / "whole", "--on-bad-audio", "skip").code == 0
    assert directory_files(tmp_path / "out") == directory_files(tmp_path / "whole")
