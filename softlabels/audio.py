"""Speech models in plain torch: an 80-bin log-mel frontend at a 10 ms hop, and the acoustic teacher and
streaming student that use it (no torchaudio: its wheels do not load with the CPU torch here).

Audio models follow torchaudio's convention (DESIGN.md section 4, Audio): ``model(waveforms, lengths)``
with waveforms float32 [B, S_max] zero-padded at ``model.sample_rate`` and lengths int64 [B] (samples),
returns ``(logits [B, F_max, C], frame_lengths int64 [B])``. Every frame an utterance owns depends on
its own samples only: padding the batch with longer utterances changes no valid frame beyond float
rounding, so batching by length stores what batch size 1 does.

Frames: the frontend pads each utterance by half a window of zeros on both sides, so an utterance of
S samples has ``1 + S // HOP`` frames (one even when S is shorter than a window); each stride-2
convolution of the subsampling then halves that, rounding up.

    softlabels.audio:acoustic_teacher@teacher.safetensors     # conv subsampling x4, 3 BiLSTM layers
    softlabels.audio:streaming_student@student.safetensors    # conv subsampling x4, 2 LSTM layers, causal
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SAMPLE_RATE", "MEL_BINS", "HOP", "WINDOW", "AUDIO_CLASSES", "LogMel", "mel_filterbank", "frame_count",
           "AcousticModel", "acoustic_teacher", "streaming_student", "parameters_of"]

SAMPLE_RATE = 16_000
"""Samples per second the frontend expects; ``generate`` resamples other rates to a model's ``sample_rate``."""
MEL_BINS = 80
HOP = 160
"""10 ms at 16 kHz."""
WINDOW = 400
"""25 ms at 16 kHz: the FFT size and the Hann window's length."""
AUDIO_CLASSES = 1_024
"""Output classes of the default factories (per-frame targets such as senones); a pipeline with another
inventory defines its own factory over ``AcousticModel``."""


def mel_filterbank(bins: int = MEL_BINS, n_fft: int = WINDOW, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular filters on the HTK mel scale from 0 Hz to Nyquist, unnormalised: [n_fft // 2 + 1, bins]."""
    def mel(hz: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def hz(mels: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)

    frequencies = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = hz(torch.linspace(0.0, float(mel(torch.tensor(sample_rate / 2.0))), bins + 2, dtype=torch.float64))
    rising = (frequencies[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[None, 2:] - frequencies[:, None]) / (edges[2:] - edges[1:-1])
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


def frame_count(samples: torch.Tensor) -> torch.Tensor:
    """Frontend frames of utterances of ``samples`` samples (int64 [B]): ``1 + samples // HOP``."""
    return 1 + torch.div(samples, HOP, rounding_mode="floor")


class LogMel(nn.Module):
    """waveforms [B, S] (float32, 16 kHz), lengths [B] -> (log-mel [B, F, 80], frames int64 [B]).

    Hann-windowed 25 ms frames every 10 ms, centred (half a window of zeros each side), power
    spectrum, mel filters, natural log floored at 1e-10. Frames past an utterance's own are zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(WINDOW, periodic=True), persistent=False)
        self.register_buffer("filters", mel_filterbank(), persistent=False)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        waveforms = waveforms.float()
        spectrum = torch.stft(waveforms, n_fft=WINDOW, hop_length=HOP, win_length=WINDOW, window=self.window,
                              center=True, pad_mode="constant", return_complex=True)  # [B, 201, F]
        power = spectrum.real.square() + spectrum.imag.square()
        features = torch.log(torch.clamp(power.transpose(1, 2) @ self.filters, min=1e-10))  # [B, F, 80]
        frames = frame_count(lengths)
        return features * _valid(frames, features.shape[1])[..., None], frames


def _valid(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] float mask: 1 where the step is inside the row's length."""
    return (torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]).float()


class AcousticModel(nn.Module):
    """Log-mel, two stride-2 convolutions (4x subsampling: 40 ms per output frame), LSTM layers, a linear
    layer to ``classes`` logits per frame. ``bidirectional`` for a teacher; a unidirectional model is
    causal over its subsampled frames (a streaming student).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, classes: int = AUDIO_CLASSES, channels: int = 64, hidden: int = 256, layers: int = 3,
                 bidirectional: bool = True) -> None:
        super().__init__()
        self.frontend = LogMel()
        self.norm = nn.LayerNorm(MEL_BINS)
        self.conv1 = nn.Conv1d(MEL_BINS, channels, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.lstm = nn.LSTM(channels, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, frames = self.frontend(waveforms, lengths)
        x = self.norm(features) * _valid(frames, features.shape[1])[..., None]
        x = x.transpose(1, 2)  # [B, 80, F]
        for conv in (self.conv1, self.conv2):
            frames = torch.div(frames + 1, 2, rounding_mode="floor")  # ceil(F / 2)
            x = torch.relu(conv(x))
            x = x * _valid(frames, x.shape[2])[:, None, :]  # what lies past a row's end is zero, as with batch size 1
        packed = nn.utils.rnn.pack_padded_sequence(x.transpose(1, 2), frames.cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=x.shape[2])
        return self.head(hidden), frames


def acoustic_teacher() -> nn.Module:
    """The speech teacher: 3 bidirectional LSTM layers of 256, 1,024 classes (4.55M parameters)."""
    return AcousticModel(AUDIO_CLASSES, channels=128, hidden=256, layers=3, bidirectional=True)


def streaming_student() -> nn.Module:
    """The smaller streaming student: 2 unidirectional LSTM layers of 192, 1,024 classes (0.72M parameters)."""
    return AcousticModel(AUDIO_CLASSES, channels=64, hidden=192, layers=2, bidirectional=False)


def parameters_of(model: nn.Module) -> int:
    """Trainable parameter count (for the README's model sizes)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

