"""Test-only teachers that take long enough per batch for a test to interrupt a run mid-way."""

from __future__ import annotations

import time

import torch
from torch import nn

from softlabels.models import digits_mlp, token_gru

SECONDS_PER_BATCH = 0.05


class Slow(nn.Module):
    """Wraps a model and sleeps before each forward; the outputs are the wrapped model's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        time.sleep(SECONDS_PER_BATCH)
        return self.inner(*args)


def slow_digits() -> nn.Module:
    return Slow(digits_mlp())


def slow_tokens() -> nn.Module:
    return Slow(token_gru())
