"""Test-only teachers for bad-input tests: non-finite outputs and a mismatched vocabulary.

Each factory seeds its own generator, so the models are deterministic without a weights file (a bare
factory's identity is the sha256 of this source file). Use them as SPECs like
``fixture_teachers:nonfinite_classifier``; ``tests/`` is on ``sys.path`` under pytest and on
``PYTHONPATH`` in ``run_cli_subprocess``.
"""

from __future__ import annotations

import torch
from torch import nn

NAN_MARKER = -1.0
"""A classifier row whose first feature equals this gets all-NaN logits."""

INF_MARKER = -2.0
"""A classifier row whose first feature equals this gets +Inf in one class (and finite elsewhere)."""

TOKEN_VOCAB = 97
NAN_TOKEN = 96
"""A token sequence containing this token gets NaN logits at that position only."""


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


class NonFiniteClassifier(nn.Module):
    """Linear(64, 10), except rows marked in feature 0 get NaN or +Inf logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        nan_rows = (x[:, 0] == NAN_MARKER)[:, None]
        inf_cells = (x[:, 0] == INF_MARKER)[:, None] & (torch.arange(10, device=x.device) == 3)[None, :]
        logits = logits.masked_fill(nan_rows, float("nan"))
        return logits.masked_fill(inf_cells, float("inf"))


class NonFiniteTokens(nn.Module):
    """Per-position token model: NaN at every padded position and wherever the token is NAN_TOKEN.

    Padded positions (t >= length) must be ignored by the caller; only a NAN_TOKEN inside a row's
    valid span makes that row non-finite.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(TOKEN_VOCAB, 8)
        self.head = nn.Linear(8, TOKEN_VOCAB)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embed(x))
        steps = torch.arange(x.shape[1], device=x.device)[None, :]
        bad = (steps >= lengths[:, None]) | (x == NAN_TOKEN)
        return logits.masked_fill(bad[..., None], float("nan"))


def nonfinite_classifier() -> nn.Module:
    return _seeded(NonFiniteClassifier(), 11)


def nonfinite_tokens() -> nn.Module:
    return _seeded(NonFiniteTokens(), 12)


def classifier_vocab7() -> nn.Module:
    """Same input as digits_mlp (64 features) but only 7 classes: an ensemble vocabulary mismatch."""
    return _seeded(nn.Linear(64, 7), 13)


def not_a_module() -> str:
    return "I am not a model"


class MaskedClassifier(torch.nn.Module):
    """digits-shaped classifier whose classes 1 and 6 are masked with -inf, as a padded vocabulary is."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        masked = torch.zeros(10, dtype=torch.bool, device=x.device)
        masked[[1, 6]] = True
        return logits.masked_fill(masked, float("-inf"))


def masked_classifier() -> torch.nn.Module:
    return MaskedClassifier()


class InterruptingStudent(nn.Module):
    """digits_mlp-shaped student that sends its own process SIGINT on its INTERRUPT_AT-th training
    forward when $SOFTLABELS_TEST_INTERRUPT is 1: a deterministic Ctrl-C in the middle of
    train-student, no sleep or race."""

    INTERRUPT_AT = 3

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            import os

            if self.calls == self.INTERRUPT_AT and os.environ.get("SOFTLABELS_TEST_INTERRUPT") == "1":
                import signal

                os.kill(os.getpid(), signal.SIGINT)
        return self.linear(x)


def interrupting_student() -> nn.Module:
    return InterruptingStudent()
