"""Small reference models for the quickstart and the tests (torch only).

`digits_mlp` is the teacher and student architecture for scikit-learn's bundled digits
(8x8 images, 10 classes): Linear(64, 64) - GELU - Linear(64, 10), 4,810 parameters,
about 19 KB as fp32 safetensors.

Trade-off: width. The teachers train on only 150 labeled rows (the setting is
semi-supervised), so the labels are the bottleneck, not capacity. Widening the hidden layer
from 64 to 256 quadruples the parameters (4,810 -> 19,210; 19 KB -> 77 KB per safetensors
file) and buys 0.25 points of mean teacher test accuracy (88.9% -> 89.1%; 3 splits x 3
teachers, 300 full-batch AdamW steps); narrowing it to 16 (1,210 parameters) costs 0.4 points.
Width 64 keeps each committed teacher small and leaves the gap below 100% that distilling on
the unlabeled corpus is meant to close.

Use it as a teacher or student SPEC: ``softlabels.models:digits_mlp@weights.safetensors``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "digits_mlp",
    "digits_cnn",
    "DigitsCNN",
    "DIGITS_FEATURES",
    "DIGITS_CLASSES",
    "TokenGRU",
    "FrameTagger",
    "token_gru",
    "frame_tagger",
    "TOKEN_VOCAB",
    "FRAME_FEATURES",
    "FRAME_CLASSES",
]

DIGITS_FEATURES: int = 64
"""Input width: the 8x8 pixels of a digits image, flattened row-major, scaled to [0, 1] (/16)."""

DIGITS_CLASSES: int = 10
"""Output width: one logit per digit 0-9."""

_DIGITS_HIDDEN: int = 64


def digits_mlp() -> nn.Module:
    """Build the reference MLP for scikit-learn digits, freshly initialised.

    Architecture: ``Linear(64, 64) - GELU - Linear(64, 10)`` as an ``nn.Sequential``, so the
    state-dict keys are ``0.weight`` [64, 64], ``0.bias`` [64], ``2.weight`` [10, 64] and
    ``2.bias`` [10]; the committed teachers in ``data/teachers/`` load into it with
    ``strict=True``. Seed with ``torch.manual_seed`` before calling for a reproducible init.

    Returns:
        An ``nn.Module`` in training mode, float32 on the CPU, mapping pixels float32
        ``[B, 64]`` (values in [0, 1]) to logits float32 ``[B, 10]``.
    """
    return nn.Sequential(
        nn.Linear(DIGITS_FEATURES, _DIGITS_HIDDEN),
        nn.GELU(),
        nn.Linear(_DIGITS_HIDDEN, DIGITS_CLASSES),
    )


class DigitsCNN(nn.Module):
    """The digits teacher: two 3x3 convolutions and a max-pool over the 8x8 image.

    Its inductive bias is worth about 4 points on 150 labels (96.5% for an ensemble of three,
    with 1-pixel shift augmentation, against 92% for ``digits_mlp`` on the same labels): the gap
    that distilling into the MLP over the unlabeled rows can close. Called as ``model(x)`` with
    x float32 [B, 64]; returns logits [B, 10].
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, DIGITS_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.reshape(-1, 1, 8, 8))


def digits_cnn() -> nn.Module:
    """Factory for ``DigitsCNN`` (9,930 parameters, 40 KB as fp32 safetensors)."""
    return DigitsCNN()


TOKEN_VOCAB: int = 97
"""Vocabulary of the tiny causal token model (odd on purpose, so off-by-one bugs show)."""

FRAME_FEATURES: int = 13
"""Features per frame of the tiny acoustic-style frame tagger (MFCC-sized)."""

FRAME_CLASSES: int = 37
"""Classes (senones) per frame of the frame tagger."""


class TokenGRU(nn.Module):
    """A causal token model: embedding, one GRU layer, a projection to the vocabulary.

    Called as ``model(x, lengths)`` with x int64 [B, T] (zero-padded) and lengths int64 [B];
    returns logits float32 [B, T, V]. Being causal, position j depends on tokens 0..j only, so
    padding after a row's length never changes its valid positions.
    """

    def __init__(self, vocab: int = TOKEN_VOCAB, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(x))
        return self.head(hidden)


class FrameTagger(nn.Module):
    """A per-frame classifier over feature frames, like an acoustic model's senone posteriors.

    Called as ``model(x, lengths)`` with x float32 [B, T, F] and lengths int64 [B]; returns
    logits float32 [B, T, C]. Each frame sees itself and its left neighbour (a causal width-2
    convolution), so padding on the right never leaks into valid frames.
    """

    def __init__(self, features: int = FRAME_FEATURES, classes: int = FRAME_CLASSES, width: int = 48) -> None:
        super().__init__()
        self.conv = nn.Conv1d(features, width, kernel_size=2)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        left_padded = nn.functional.pad(x.transpose(1, 2), (1, 0))
        return self.head(self.conv(left_padded).transpose(1, 2))


def token_gru() -> nn.Module:
    """Factory for ``TokenGRU`` with the default sizes (vocabulary ``TOKEN_VOCAB``)."""
    return TokenGRU()


def frame_tagger() -> nn.Module:
    """Factory for ``FrameTagger`` with the default sizes."""
    return FrameTagger()
