"""The speech experiment's models: softlabels.audio's acoustic model over the en-us senones.

Factories for ``softlabels`` SPECs (with ``pipelines/speech`` on PYTHONPATH)::

    speech_models:teacher@RUN/teacher/teacher.safetensors   # 3 BiLSTM layers of 256 (about 6.4M parameters)
    speech_models:student                                    # 2 LSTM layers of 160, causal (about 1.2M: 5.5x smaller)

Both see 80 log-mel bins every 10 ms, subsample by 4 (two stride-2 convolutions: 40 ms per output
frame) and classify each output frame into one of the acoustic model's senones (5,126 for en-us). A
10 ms senone sequence is read at the output frames by ``frame_labels``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from softlabels.audio import AcousticModel

SUBSAMPLING = 4
"""10 ms frames per output frame."""


@functools.lru_cache(maxsize=1)
def senone_count() -> int:
    """Senones of PocketSphinx's en-us acoustic model (its ``mdef``)."""
    from senones import read_mdef
    from sphinx_align import model_dir

    return read_mdef(model_dir() / "en-us" / "mdef").n_sen


def teacher() -> nn.Module:
    return AcousticModel(senone_count(), channels=128, hidden=256, layers=3, bidirectional=True)


def student() -> nn.Module:
    return AcousticModel(senone_count(), channels=64, hidden=160, layers=2, bidirectional=False)


def output_frames(samples: int) -> int:
    """Output frames of the model for ``samples`` samples: 1 + samples // 160 frames, halved twice (rounding up)."""
    frames = 1 + samples // 160
    for _ in range(2):
        frames = (frames + 1) // 2
    return frames


def frame_labels(senones: np.ndarray, samples: int) -> np.ndarray:
    """int64 [output_frames(samples)]: the 10 ms senone at the centre of each output frame (frame 4i)."""
    senones = np.asarray(senones, dtype=np.int64)
    centre = np.minimum(np.arange(output_frames(samples)) * SUBSAMPLING, len(senones) - 1)
    return senones[centre]


def check_frames(model: nn.Module, samples: int) -> None:
    """Raise if the model's frame count for ``samples`` samples differs from ``output_frames``."""
    with torch.no_grad():
        _, frames = model(torch.zeros(1, samples), torch.tensor([samples]))
    if int(frames[0]) != output_frames(samples):
        raise ValueError(f"{samples} samples: the model gives {int(frames[0])} frames, output_frames {output_frames(samples)}")
