"""softlabels.audio: the log-mel frontend against numpy by hand, frame counts, and the speech models'
independence from batch padding (what lets generate batch utterances by length)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabels.audio import (AUDIO_CLASSES, HOP, MEL_BINS, SAMPLE_RATE, WINDOW, LogMel, acoustic_teacher, frame_count,
                              mel_filterbank, parameters_of, streaming_student)

LENGTHS = [48_017, 399, 1_123, 8_000, 161]  # seconds down to shorter than one window


def numpy_log_mel(signal: np.ndarray) -> np.ndarray:
    """Centred Hann frames, |rfft|^2, HTK triangles built one frequency at a time, log floored at 1e-10."""
    padded = np.concatenate([np.zeros(WINDOW // 2), signal.astype(np.float64), np.zeros(WINDOW // 2)])
    n = np.arange(WINDOW)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / WINDOW)
    frames = [padded[t * HOP: t * HOP + WINDOW] for t in range(1 + len(signal) // HOP)]
    power = np.stack([np.abs(np.fft.rfft(frame * hann)) ** 2 for frame in frames])  # [F, 201]
    top = 2595 * np.log10(1 + (SAMPLE_RATE / 2) / 700)
    edges = [700 * (10 ** (m / 2595) - 1) for m in np.linspace(0, top, MEL_BINS + 2)]
    filters = np.zeros((WINDOW // 2 + 1, MEL_BINS))
    for k in range(WINDOW // 2 + 1):
        f = k * SAMPLE_RATE / WINDOW
        for m in range(MEL_BINS):
            low, centre, high = edges[m], edges[m + 1], edges[m + 2]
            if low <= f <= centre:
                filters[k, m] = (f - low) / (centre - low)
            elif centre < f <= high:
                filters[k, m] = (high - f) / (high - centre)
    return np.log(np.maximum(power @ filters, 1e-10))


def batch(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    waveforms = torch.zeros(len(lengths), max(lengths))
    for row, length in enumerate(lengths):
        waveforms[row, :length] = 0.1 * torch.randn(length, generator=generator)
    return waveforms, torch.tensor(lengths)


def test_filterbank_is_the_htk_triangles():
    filters = mel_filterbank().numpy()
    assert filters.shape == (WINDOW // 2 + 1, MEL_BINS)
    assert (filters >= 0).all() and filters.max() <= 1 + 1e-6
    assert (filters.sum(axis=0) > 0).all(), "every mel bin covers at least one FFT bin"


def test_log_mel_equals_numpy_by_hand():
    waveforms, lengths = batch([1_123, 399])
    features, frames = LogMel()(waveforms, lengths)
    assert frames.tolist() == [1 + 1_123 // HOP, 1 + 399 // HOP] == [8, 3]
    for row, length in enumerate(lengths.tolist()):
        expected = numpy_log_mel(waveforms[row, :length].numpy())
        mine = features[row, : frames[row]].double().numpy()
        # float32 STFT against float64: log-power agrees to 1e-3 where the power is not at the floor
        assert np.abs(mine - expected).max() < 2e-3
        assert (features[row, frames[row]:] == 0).all()


def test_frame_counts_cover_utterances_shorter_than_a_window():
    samples = torch.tensor([0, 1, 159, 160, 399, 400, 16_000])
    assert frame_count(samples).tolist() == [1 + s // 160 for s in samples.tolist()]
    waveforms, lengths = batch([399, 1, 16_000])
    with torch.no_grad():
        _, frames = streaming_student()(waveforms, lengths)
    mel = [1 + n // HOP for n in (399, 1, 16_000)]
    assert frames.tolist() == [-(-(-(-m // 2)) // 2) for m in mel] == [1, 1, 26]


@pytest.mark.parametrize("factory", [acoustic_teacher, streaming_student])
def test_each_utterance_of_a_padded_batch_equals_batch_size_one(factory):
    torch.manual_seed(11)
    model = factory().eval()
    waveforms, lengths = batch(LENGTHS)
    with torch.no_grad():
        logits, frames = model(waveforms, lengths)
        assert logits.shape == (len(LENGTHS), int(frames.max()), AUDIO_CLASSES) and AUDIO_CLASSES >= 1000
        for row, length in enumerate(LENGTHS):
            alone, alone_frames = model(waveforms[row: row + 1, :length], lengths[row: row + 1])
            assert alone_frames.item() == frames[row].item()
            assert torch.allclose(alone[0], logits[row, : frames[row]], atol=1e-5, rtol=0)
    assert model.sample_rate == SAMPLE_RATE


def test_the_student_is_causal_over_its_frames():
    """A streaming student's frame t does not change when later audio is appended (its LSTM runs forward only)."""
    torch.manual_seed(5)
    model = streaming_student().eval()
    waveforms, _ = batch([32_000])
    with torch.no_grad():
        whole, _ = model(waveforms, torch.tensor([32_000]))
        head, head_frames = model(waveforms[:, :16_000], torch.tensor([16_000]))
    settled = int(head_frames.item()) - 2  # the last frames see the conv windows' right context
    assert torch.allclose(head[0, :settled], whole[0, :settled], atol=1e-5, rtol=0)
    assert parameters_of(model) < parameters_of(acoustic_teacher()) / 4
